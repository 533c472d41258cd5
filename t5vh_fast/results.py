"""Result types shared by the PyTorch reference and the ONNX runtime.

Arrays are NumPy arrays from the runtime and torch tensors from the reference;
the shapes are the same. ``B`` is the number of queries, ``N`` the samples per
query, ``R = B x N`` the number of responses (query-major: all samples of query
0, then of query 1, ...), ``T`` the response length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Rollout:
    """Tokens sampled by ``respond_to_batch`` and what the model said about them."""

    # R x T int64: the sampled response tokens, exactly ``txt_len`` per row (EOS included, never padded)
    tokens: Any
    # R x T float32: log p(token) under the model's *unfiltered* distribution (what PPO needs)
    logprobs: Any
    # R x T float32: the value head's output at the position that chose each token
    values: Any
    # B x S int64: the mask of the queries the rollout was computed for (1 = real token, 0 = padding)
    attention_mask: Any
    # R x T float32: log p(token) under the filtered distribution actually sampled from;
    # None when top_k/top_p filtering was off (then it equals ``logprobs``)
    sampling_logprobs: Optional[Any] = None
    # R int64: the query (row of the query batch) each response was sampled for
    query_index: Optional[Any] = None
    # the precision of the numbers that produced it: "fp32", "int8", "fp16" or "bf16"
    precision: str = "fp32"
    # the weights that produced it (``OnnxPolicy.weights_version``); None for the PyTorch reference
    weights_version: Optional[str] = None


@dataclass(frozen=True)
class Scores:
    """Teacher-forced numbers for given query/response pairs (``score``)."""

    # R x T float32: log p(response token) under the unfiltered distribution, 0 where masked
    logprobs: Any
    # R x T float32: value at the position that predicts each response token, 0 where masked
    values: Any
    # R x T float32: entropy of the full next-token distribution at each position, 0 where masked
    entropy: Any
    # R x T int64: 1 for real response tokens, 0 for padding of ragged responses
    response_mask: Any
    # the precision of the numbers: "fp32", "int8", "fp16" or "bf16"
    precision: str = "fp32"
    # the weights that produced them (``OnnxPolicy.weights_version``); None for the PyTorch reference
    weights_version: Optional[str] = None
