"""Sampling math in pure NumPy: filtering, log-softmax, the inverse-CDF draw.

Mirrors the torch functions in ``t5vh_fast.reference`` (``filter_logits``,
``draw``, ``token_logprobs``, ``check_finite``: same signatures, same messages);
tests hold both to transformers' warpers.
Per step this is a few float32 passes over B x V; only the cumulative sum the
RNG contract needs is float64.
"""

from __future__ import annotations

import numpy as np

from .errors import NonFiniteError


def filter_logits(logits: np.ndarray, *, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Top-k then top-p, decided by value (the tie rule of ``docs/contract.md``; one token always kept).

    Top-k keeps every token whose logit is >= the k-th largest (ties at the
    boundary all kept, so possibly more than k). Top-p removes the ascending
    prefix whose cumulative probability is <= 1 - top_p and keeps every token
    whose logit is >= the smallest kept value (tokens tied with it all kept).
    ``t5vh_fast.reference.filter_logits`` implements the same rule in torch.

    Returns a new float32 array with removed tokens at -inf. Top-p needs the
    ascending cumulative probabilities; they are computed on sorted *values*
    (no argsort), and after top-k on the k survivors only (on the whole row
    when ties at the k-th value keep more than k).
    """
    logits = np.array(logits, dtype=np.float32)
    rows, vocab = logits.shape
    candidates = logits
    if 0 < top_k < vocab:
        part = np.partition(logits, vocab - top_k, axis=-1)
        kth = part[:, vocab - top_k : vocab - top_k + 1]
        logits[logits < kth] = -np.inf
        if (np.isfinite(logits).sum(axis=-1) == top_k).all():  # no ties at the k-th value: top-p needs the k only
            candidates = part[:, vocab - top_k :]
        # else ties kept more than k in some row: top-p sorts the whole filtered row (`candidates` is `logits`)
    if top_p < 1.0:
        values = np.sort(candidates, axis=-1)
        remove = np.cumsum(softmax(values), axis=-1) <= (1.0 - top_p)
        remove[:, -1] = False
        smallest_kept = values[np.arange(rows), remove.sum(axis=-1)]  # `remove` is a prefix of the sorted row
        logits[logits < smallest_kept[:, None]] = -np.inf
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp (float32 in, float32 out; the sum itself in float64)."""
    return exp_weights(logits)[2]


BLOCK = 256  # the CDF is built per block of this many tokens; only the block holding u is summed in full


def exp_weights(logits: np.ndarray, out: np.ndarray = None):
    """``(weights, block_sums, lse)``: ``exp(logits - max)`` in float32, its float64 sums per
    block of ``BLOCK`` tokens, and the row-wise log-sum-exp. One exp pass serves both the
    log-probs and the draw. ``out``: a float32 array of the logits' shape to write the weights
    into (a loop that reuses it spares the system a fresh block, and its page faults, per call)."""
    top = logits.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # NaN/inf rows give a non-finite lse: check_finite names them
        weights = np.subtract(logits, top, out=out)
        np.exp(weights, out=weights)
    block_sums = _block_sums(weights)
    lse = (top[:, 0] + np.log(block_sums.sum(axis=-1))).astype(np.float32)
    return weights, block_sums, lse


def _block_sums(weights: np.ndarray) -> np.ndarray:
    """float64 sums of consecutive ``BLOCK``-token blocks (the last one may be shorter).

    A reshape of each row's aligned prefix is a view; this is ~5x faster than
    ``np.add.reduceat``."""
    rows, vocab = weights.shape
    aligned = vocab - vocab % BLOCK
    sums = weights[:, :aligned].reshape(rows, -1, BLOCK).sum(axis=-1, dtype=np.float64)
    if aligned == vocab:
        return sums
    return np.concatenate([sums, weights[:, aligned:].sum(axis=-1, dtype=np.float64)[:, None]], axis=-1)


def draw(logits: np.ndarray, u: np.ndarray, weights=None, block_sums=None) -> np.ndarray:
    """The RNG contract: the first index whose float64 cumulative probability of the
    renormalised distribution exceeds ``u`` (one uniform per row).

    The float64 CDF is built in two levels (block totals, then the one block that
    holds ``u``), so a step costs one pass over B x V instead of a full float64
    cumulative sum. Pass ``weights``/``block_sums`` from ``exp_weights`` to reuse them.
    """
    if weights is None:
        weights, block_sums, _ = exp_weights(logits)
    rows, vocab = weights.shape
    block_cdf = np.cumsum(block_sums, axis=-1)
    threshold = u * block_cdf[:, -1]
    block = np.minimum((block_cdf <= threshold[:, None]).sum(axis=-1), block_sums.shape[-1] - 1)
    before = np.where(block > 0, block_cdf[np.arange(rows), block - 1], 0.0)
    index = block[:, None] * BLOCK + np.arange(BLOCK)
    inside = index < vocab
    local = np.where(inside, np.take_along_axis(weights, np.minimum(index, vocab - 1), axis=-1), 0.0)
    cdf = before[:, None] + np.cumsum(local, axis=-1, dtype=np.float64)
    token = block * BLOCK + (cdf <= threshold[:, None]).sum(axis=-1)
    lost = (token >= vocab) | (weights[np.arange(rows), np.minimum(token, vocab - 1)] == 0)
    if lost.any():
        # The block totals and the running sum inside a block round differently (pairwise vs in order), so
        # u * total can fall between them at a block edge or past the end of the row, onto a token without
        # mass. There the full float64 CDF decides, with its own total: exactly the contract's definition
        # (u < 1 makes u * total < total in float64, so the index is a token with mass, never past the end).
        full = np.cumsum(weights[lost], axis=-1, dtype=np.float64)
        token[lost] = (full <= u[lost, None] * full[:, -1:]).sum(axis=-1)
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
        raise NonFiniteError(
            f"non-finite logits (NaN or inf) at step {step}, row {int(bad[0])}: "
            "the model or its export is broken (fp16 overflow?); refusing to sample garbage"
        )
