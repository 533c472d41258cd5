"""Which initializer of Optimum's graphs holds which parameter: found by exporting a fingerprinted model.

Optimum's graphs come from tracing: weights are renamed (``onnx::MatMul_123``),
stored transposed, the tied LM head is a scaled transpose of the embedding,
and the tracer merges initializers with equal values (in a freshly initialised
model every norm weight is all ones: one initializer for all of them, which no
refresh could separate again). So the exporter traces a copy of the model
whose every parameter holds distinct random numbers, finds each initializer's
parameter and transform by its exact bytes, writes the real values through
the same transforms, and stores the graphs with their weights as external
data (what onnxruntime's ``add_external_initializers`` needs to replace them at
refresh). The parity check then runs on the real graphs as for any export.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Dict, Mapping

import numpy as np
import torch

from ..errors import ExportError
from ..weights import EMBEDDING_ALIASES, ModelSpec, transformed

TRANSFORMS = ("copy", "transpose", "lm_head")


def fingerprinted(model):
    """A copy of ``model`` whose parameters hold distinct random numbers (tied ones stay tied)."""
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(20261126)
    with torch.no_grad():
        for param in twin.parameters():  # each tied parameter once
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return twin


def _key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array.shape, hashlib.sha1(array.tobytes()).hexdigest()


def _candidates(params: Mapping[str, np.ndarray], spec: ModelSpec) -> Dict[tuple, tuple]:
    """``{(shape, hash): (parameter, transform)}`` for every way a parameter can appear in a graph."""
    out = {}
    for name, value in params.items():
        for transform in TRANSFORMS:
            if transform == "lm_head" and name != ("shared.weight" if spec.tied else "lm_head.weight"):
                continue
            if transform != "copy" and value.ndim != 2:
                continue
            out.setdefault(_key(transformed(transform, value, spec)), (name, transform))
    return out


def _canonical(state: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """The state dict as float32 NumPy, tied aliases of the embedding folded into ``shared.weight``."""
    return {
        name: value.detach().float().numpy()
        for name, value in state.items()
        if name not in EMBEDDING_ALIASES and not (name == "lm_head.weight" and _tied(state))
    }


def _tied(state) -> bool:
    return "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == state["shared.weight"].data_ptr()


def map_and_fill(graph_path: Path, twin, model, spec: ModelSpec) -> Dict[str, dict]:
    """Map the initializers of a graph traced from ``twin`` to parameters, then write ``model``'s values.

    Rewrites ``graph_path`` with its weights as external data (``<graph>.data``)
    and returns ``{initializer: {"source": parameter, "transform": ...}}``.
    Raises ``ExportError`` if an initializer shaped like a weight matches no
    parameter (a refresh would leave it stale).
    """
    import onnx
    from onnx import numpy_helper

    candidates = _candidates(_canonical(twin.state_dict()), spec)
    real = _canonical(model.state_dict())
    shapes = {v.shape for v in real.values() if v.ndim == 2} | {v.T.shape for v in real.values() if v.ndim == 2}
    graph = onnx.load(str(graph_path))
    mapping = {}
    for init in _all_initializers(graph.graph):
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        found = candidates.get(_key(value))
        if found is None:
            if value.ndim == 2 and value.shape in shapes:
                raise ExportError(
                    f"{graph_path.name}: initializer {init.name} {value.shape} matches no parameter of the model: "
                    "this export could not be refreshed in place; use --no-optimum or report it"
                )
            continue
        source, transform = found
        mapping[init.name] = {"source": source, "transform": transform}
        init.CopyFrom(numpy_helper.from_array(transformed(transform, real[source], spec), init.name))
    data = f"{graph_path.name}.data"
    onnx.save(
        graph,
        str(graph_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=0,
    )
    return mapping


def _all_initializers(graph):
    """The initializers of a graph and of its subgraphs (the merged decoder's If branches)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.node:
                yield from _all_initializers(attribute.g)
            for sub in attribute.graphs:
                yield from _all_initializers(sub)
