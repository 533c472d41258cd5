"""Sampling math in pure NumPy: filtering, log-softmax, the inverse-CDF draw.

Mirrors the torch functions in ``t5vh_fast.modeling`` (``filter_logits``,
``draw``, ``token_logprobs``); tests hold both to transformers' warpers.
Per step this is a few float32 passes over B x V; only the cumulative sum the
RNG contract needs is float64.
"""

from __future__ import annotations

import numpy as np


def filter_logits(logits: np.ndarray, *, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Top-k then top-p with transformers' TopK/TopPLogitsWarper semantics (min one token kept).

    Returns a new float32 array with removed tokens at -inf.
    """
    logits = np.array(logits, dtype=np.float32)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = -np.partition(-logits, top_k - 1, axis=-1)[:, top_k - 1 : top_k]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        cumulative = np.cumsum(softmax(sorted_logits), axis=-1)
        remove = cumulative <= (1.0 - top_p)
        remove[:, -1] = False
        np.put_along_axis(logits, order, np.where(remove, -np.inf, sorted_logits), axis=-1)
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp (float32 in, float32 out; the sum itself in float64)."""
    top = logits.max(axis=-1)
    total = np.exp(logits - top[:, None]).sum(axis=-1, dtype=np.float64)
    return (top + np.log(total)).astype(np.float32)


def draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The RNG contract: the first index whose float64 cumulative probability of the
    renormalised distribution exceeds ``u`` (one uniform per row)."""
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    cdf = np.cumsum(weights, axis=-1, dtype=np.float64)
    token = (cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1)
    overflow = token >= logits.shape[-1]
    if overflow.any():  # u * total rounded up to total: take the last token with mass
        token[overflow] = cdf[overflow].argmax(axis=-1)
    return token.astype(np.int64)


def token_logprobs(logits: np.ndarray, token: np.ndarray, lse: np.ndarray = None) -> np.ndarray:
    """log p(token) per row; pass ``lse`` (``logsumexp(logits)``) when it is already known."""
    if lse is None:
        lse = logsumexp(logits)
    return np.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - lse


def check_finite(lse: np.ndarray, step: int) -> None:
    """A NaN or +inf anywhere in a row makes its log-sum-exp non-finite: fail loudly."""
    bad = np.flatnonzero(~np.isfinite(lse))
    if bad.size:
        raise FloatingPointError(
            f"non-finite logits (NaN or inf) at step {step}, row {int(bad[0])}: "
            "the model or its export is broken (fp16 overflow?); refusing to sample garbage"
        )
