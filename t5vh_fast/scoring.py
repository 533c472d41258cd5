"""Teacher-forced scoring: log-probs, values, entropy in one decoder pass; KL and PPO reward."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from .decoder import OnnxDecoder
from .errors import InputError, NonFiniteError
from .results import Scores
from .sampling import exp_weights


def score(
    decoder: OnnxDecoder,
    ids,
    mask,
    responses,
    response_mask,
    *,
    decoder_start_token_id: int,
    num_samples: int = 1,
    precision: str = "fp32",
    weights_version=None,
) -> Scores:
    """Score checked R x T ``responses`` for checked B x S queries (R = B x num_samples, query-major):
    one encoder call per query, one decoder call.

    Only the responses' real (unmasked) positions reach the LM head and the
    log-softmax; the rest of each R x T result is 0.
    """
    batch, length = responses.shape
    decoder_ids = np.concatenate(
        [np.full((batch, 1), decoder_start_token_id, dtype=np.int64), responses[:, :-1]], axis=1
    )
    real = np.flatnonzero(response_mask.reshape(-1))
    state = decoder.encode(ids, mask, num_samples=num_samples, capacity=length)
    logits, values, _ = decoder.step(state, decoder_ids, select=real)
    chosen = np.take_along_axis(logits, responses.reshape(-1)[real, None], axis=-1)[:, 0]
    lse, entropy = log_normalizer_and_entropy(logits)
    check_scores_finite(real, length, chosen - lse, values, entropy)
    return Scores(
        logprobs=_scatter(chosen - lse, real, batch, length),
        values=_scatter(values, real, batch, length),
        entropy=_scatter(entropy, real, batch, length),
        response_mask=response_mask,
        precision=precision,
        weights_version=weights_version,
    )


ROWS_AT_ONCE = 256  # positions whose exp(logits) exist at once: 33 MB at a 32k vocabulary


def log_normalizer_and_entropy(logits: np.ndarray):
    """Row-wise log-sum-exp and entropy of N x V ``logits``, ``ROWS_AT_ONCE`` rows at a time, so that
    the exp pass's temporary stays small whatever N (it was as large as the logits, ~140 MB per batch
    of 32 rows at t5-small size, and set the scoring job's peak memory)."""
    lse = np.empty(len(logits), dtype=np.float32)
    entropy = np.empty(len(logits), dtype=np.float32)
    for start in range(0, len(logits), ROWS_AT_ONCE):
        part = logits[start : start + ROWS_AT_ONCE]
        weights, block_sums, part_lse = exp_weights(part)  # weights = exp(logits - max): one exp pass for both
        lse[start : start + len(part)] = part_lse
        entropy[start : start + len(part)] = part_lse - np.einsum("ij,ij->i", weights, part) / block_sums.sum(axis=-1)
    return lse, entropy


def check_scores_finite(positions: np.ndarray, length: int, *picked: np.ndarray) -> None:
    """Every number at the scored flat ``positions`` is finite; else ``NonFiniteError`` naming the first bad row."""
    bad = np.zeros(len(positions), dtype=bool)
    for array in picked:
        bad |= ~np.isfinite(array)
    if bad.any():
        row, position = divmod(int(positions[np.flatnonzero(bad)[0]]), length)
        raise NonFiniteError(
            f"non-finite logits or value (NaN or inf) at row {row}, response position {position}: "
            "the model or its export is broken (fp16 overflow?); refusing to score garbage",
            row=row,
        )


def _scatter(picked: np.ndarray, positions: np.ndarray, batch: int, length: int) -> np.ndarray:
    """A B x T float32 array holding ``picked`` at the flat ``positions`` and 0 elsewhere."""
    out = np.zeros(batch * length, dtype=np.float32)
    out[positions] = picked
    return out.reshape(batch, length)


def kl(scores: Scores, ref_scores: Scores) -> np.ndarray:
    """Per-token KL estimate ``logp - logp_ref`` (0 where masked).

    Warns when the batch mean of the summed KL is negative: with responses
    sampled from the policy that should not happen, and is how the seed's
    generate() quirks showed up.
    """
    if np.shape(scores.logprobs) != np.shape(ref_scores.logprobs):
        raise InputError(
            f"scores {np.shape(scores.logprobs)} and ref_scores {np.shape(ref_scores.logprobs)} differ in shape: "
            "score the same responses with both models"
        )
    per_token = (np.asarray(scores.logprobs) - np.asarray(ref_scores.logprobs)) * np.asarray(scores.response_mask)
    if per_token.sum(axis=-1).mean() < 0:
        warnings.warn(
            f"mean KL to the reference is negative ({per_token.sum(axis=-1).mean():.4g}): responses were not "
            "sampled from the policy as scored (EOS masking, padding after EOS, filtering?)",
            stacklevel=2,
        )
    return per_token.astype(np.float32)


def reward(score, per_token_kl, *, beta: float = 0.1) -> np.ndarray:
    """PPO reward ``score - beta * sum(kl)`` per row; ``beta`` a finite number >= 0, every input finite."""
    check_beta(beta)
    score, per_token_kl = np.asarray(score, dtype=np.float64), np.asarray(per_token_kl, dtype=np.float64)
    for name, array in (("score", score), ("per_token_kl", per_token_kl)):
        if not np.isfinite(array).all():
            raise NonFiniteError(f"{name} holds NaN or inf: a reward computed from it would be garbage")
    return score - beta * per_token_kl.sum(axis=-1)


def check_beta(beta) -> None:
    """``beta`` (the KL coefficient) is a finite real number >= 0."""
    if isinstance(beta, (bool, np.bool_)) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 0:
        raise InputError(f"beta must be a finite number >= 0, got {beta!r}")
