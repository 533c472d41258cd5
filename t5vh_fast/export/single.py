"""Write the ``single`` layout of a model: its graphs with their weights, and the host tables."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch

from ..decoder import EMBEDDING_FILE, TABLES_FILE
from ..manifest import (
    DECODER_GRAPH,
    ENCODER_GRAPH,
    LOOKUP_GRAPH,
    PACKED_ENCODER_GRAPH,
    PACKED_GRAPH,
    SAMPLER_GRAPH,
    SCORER_GRAPH,
)
from ..weights import ModelSpec, checkpoint_params, plan_arrays
from .graph import decoder_graph, encoder_graph, packed_decoder_graph, packed_encoder_graph, save, save_beside
from .sampler import lookup_graph, sampler_graph, scorer_graph


def write_single_layout(model, out: Path, *, precision: str = "fp32", keep_fp32: tuple = ()) -> List[str]:
    """Write the single layout of ``model`` (a ``T5HeadWithValueModel``) into ``out``; returns the file names.

    ``keep_fp32``: sublayers whose matrices stay fp32 at a reduced ``precision``.
    """
    spec = ModelSpec.from_config(model.config.to_dict())
    arrays = plan_arrays(checkpoint_params(model.state_dict(), spec), spec, precision, keep_fp32)
    files = save(encoder_graph(spec, arrays["encoder"]), out / ENCODER_GRAPH)
    files += save_beside(packed_encoder_graph(spec, arrays["encoder"]), out / PACKED_ENCODER_GRAPH, out / ENCODER_GRAPH)
    files += save(decoder_graph(spec, arrays["decoder"]), out / DECODER_GRAPH)
    files += save_beside(packed_decoder_graph(spec, arrays["decoder"]), out / PACKED_GRAPH, out / DECODER_GRAPH)
    host = arrays["host"]
    np.save(out / EMBEDDING_FILE, host.pop("embedding"), allow_pickle=False)
    np.savez(out / TABLES_FILE, **host, **bucket_tables(spec))
    (out / SAMPLER_GRAPH).write_bytes(sampler_graph(spec.vocab_size).SerializeToString())
    (out / SCORER_GRAPH).write_bytes(scorer_graph(spec.vocab_size).SerializeToString())
    (out / LOOKUP_GRAPH).write_bytes(lookup_graph().SerializeToString())
    return files + [EMBEDDING_FILE, TABLES_FILE, SAMPLER_GRAPH, SCORER_GRAPH, LOOKUP_GRAPH]


def bucket_tables(spec: ModelSpec) -> dict:
    """transformers' own relative-position buckets, tabulated once for every distance that matters.

    ``encoder_buckets[r + M]`` is the bucket of relative position ``r`` (key minus
    query) in [-M, M]; ``decoder_buckets[n]`` of a key ``n`` positions back, in
    [0, M]; beyond ``M = max_distance`` the buckets no longer change. Taking the
    buckets from transformers (not re-deriving its float32 log) keeps the
    runtime's position bias exactly the model's.
    """
    from transformers.models.t5.modeling_t5 import T5Attention

    reach = spec.max_distance
    relative = torch.arange(-reach, reach + 1)
    encoder = T5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=spec.num_buckets, max_distance=spec.max_distance
    )
    decoder = T5Attention._relative_position_bucket(
        -torch.arange(reach + 1), bidirectional=False, num_buckets=spec.num_buckets, max_distance=spec.max_distance
    )
    return {"encoder_buckets": encoder.numpy().astype(np.int64), "decoder_buckets": decoder.numpy().astype(np.int64)}
