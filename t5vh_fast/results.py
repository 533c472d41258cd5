"""Result types shared by the PyTorch reference and the ONNX runtime.

Arrays are NumPy arrays from the runtime and torch tensors from the reference;
the shapes are the same. ``B`` is the batch size, ``T`` the response length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Rollout:
    """Tokens sampled by ``respond_to_batch`` and what the model said about them."""

    # B x T int64: the sampled response tokens, exactly ``txt_len`` per row (EOS included, never padded)
    tokens: Any
    # B x T float32: log p(token) under the model's *unfiltered* distribution (what PPO needs)
    logprobs: Any
    # B x T float32: the value head's output at the position that chose each token
    values: Any
    # B x S int64: the query mask the rollout was computed with (1 = real token, 0 = padding)
    attention_mask: Any
    # B x T float32: log p(token) under the filtered distribution actually sampled from;
    # None when top_k/top_p filtering was off (then it equals ``logprobs``)
    sampling_logprobs: Optional[Any] = None


@dataclass(frozen=True)
class Scores:
    """Teacher-forced numbers for given query/response pairs (``score``)."""

    # B x T float32: log p(response token) under the unfiltered distribution, 0 where masked
    logprobs: Any
    # B x T float32: value at the position that predicts each response token, 0 where masked
    values: Any
    # B x T float32: entropy of the full next-token distribution at each position, 0 where masked
    entropy: Any
    # B x T int64: 1 for real response tokens, 0 for padding of ragged responses
    response_mask: Any
