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


def score(decoder: OnnxDecoder, ids, mask, responses, response_mask, *, decoder_start_token_id: int) -> Scores:
    """Score checked B x T ``responses`` for checked B x S queries: one encoder and one decoder call."""
    decoder_ids = np.concatenate(
        [np.full((responses.shape[0], 1), decoder_start_token_id, dtype=np.int64), responses[:, :-1]], axis=1
    )
    state = decoder.encode(ids, mask)
    logits, values, _ = decoder.step(state, decoder_ids)
    batch, length, vocab = logits.shape
    flat = logits.reshape(batch * length, vocab)
    weights, block_sums, lse = exp_weights(flat)  # weights = exp(logits - max): one exp pass for both
    chosen = np.take_along_axis(flat, responses.reshape(-1, 1), axis=-1)[:, 0]
    entropy = lse - np.einsum("ij,ij->i", weights, flat) / block_sums.sum(axis=-1)
    keep = response_mask == 1
    logprobs = (chosen - lse).reshape(batch, length)
    entropy = entropy.reshape(batch, length)
    check_scores_finite(keep, logprobs, values, entropy)
    return Scores(
        logprobs=np.where(keep, logprobs, 0).astype(np.float32),
        values=np.where(keep, values, 0).astype(np.float32),
        entropy=np.where(keep, entropy, 0).astype(np.float32),
        response_mask=response_mask,
    )


def check_scores_finite(keep: np.ndarray, *arrays: np.ndarray) -> None:
    """Every B x T number at a kept position is finite; else ``NonFiniteError`` naming the first bad row."""
    bad = np.zeros_like(keep)
    for array in arrays:
        bad |= keep & ~np.isfinite(array)
    if bad.any():
        row, position = map(int, np.argwhere(bad)[0])
        raise NonFiniteError(
            f"non-finite logits or value (NaN or inf) at row {row}, response position {position}: "
            "the model or its export is broken (fp16 overflow?); refusing to score garbage",
            row=row,
        )


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
