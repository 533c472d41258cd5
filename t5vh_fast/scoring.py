"""Teacher-forced scoring: log-probs, values, entropy in one decoder pass; KL and PPO reward."""

from __future__ import annotations

import concurrent.futures
import functools
import math
import numbers
import os
import threading
import warnings
from typing import Optional

import numpy as np

from .decoder import OnnxDecoder
from .errors import InputError, NonFiniteError
from .results import Scores


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
    by_length: Optional[bool] = None,
) -> Scores:
    """Score checked R x T ``responses`` for checked B x S queries (R = B x num_samples, query-major):
    one encoder call per query, then the decoder.

    Only the responses' real (unmasked) positions reach the LM head and the
    log-softmax; the rest of each R x T result is 0. Where the decoder has the
    packed graph (the CPU, an export that has it) and ``by_length`` is not
    given, the batch is one call of it (``packed_scores``): each row's
    positions up to its last scored one, without padding; where the decoder
    has ``score_workers`` (a scoring process's single-threaded sessions), its
    queries are cut into that many parts (``query_parts``), each encoded and
    scored on a thread of its own at once (``at_once``). Otherwise, with
    ``by_length`` (the default on the CPU) the rows are cut into groups of similar scored length
    (``length_groups``) and each group runs only as many positions as its
    longest row: attention is causal, so the positions after a row's last
    scored one change nothing, and a batch of ragged responses no longer pays
    decoder layers for its padding. Without it (the default on a GPU, whose
    wide GEMMs make padding cheap) the batch is one decoder call. On CUDA, with an
    export that has the scorer graph, the log-softmax runs there too
    (``score_step``): only the positions' numbers come back, not their logits.
    """
    batch, length = responses.shape
    decoder_ids = np.concatenate(
        [np.full((batch, 1), decoder_start_token_id, dtype=np.int64), responses[:, :-1]], axis=1
    )
    lengths = scored_lengths(response_mask)
    out = np.zeros((3, batch * length), dtype=np.float32)  # log-probs, values, entropy
    threads = (getattr(decoder, "threads", None) or os.cpu_count() or 1) if decoder.device == "cpu" else 1
    if by_length is None and getattr(decoder, "scores_packed", False):  # the CPU: no padding
        work = lengths.reshape(-1, num_samples).sum(axis=1)
        parts = query_parts(np.asarray(mask).sum(axis=1), work, getattr(decoder, "score_workers", 1))
        inputs = (decoder, out, ids, mask, decoder_ids, responses, response_mask, lengths, num_samples)
        at_once(functools.partial(_score_packed, *inputs, threads=threads if len(parts) == 1 else 1), parts)
        return _checked_scores(out, response_mask, precision, weights_version)
    if by_length is None:
        by_length = decoder.device == "cpu"
    if by_length:
        groups = length_groups(lengths)
    else:
        groups = [np.arange(batch)] if lengths.any() else []
    whole = len(groups) == 1 and len(groups[0]) == batch  # one call on the batch as it is
    # the KV cache encode() allocates is only used by that one call; groups get their own
    state = decoder.encode(ids, mask, num_samples=num_samples, capacity=int(lengths.max()) if whole else 1)
    on_device = getattr(decoder, "scores_on_device", False)
    for rows in groups:
        steps = int(lengths[rows].max())
        part = state if whole else decoder.rows_of(state, rows, capacity=steps)
        real = np.flatnonzero(response_mask[rows, :steps].reshape(-1))
        chosen = responses[rows, :steps].reshape(-1)[real]
        positions = rows[real // steps] * length + real % steps  # flat positions in the R x T result
        if on_device:  # CUDA: the logits stay there, only P log-probs and entropies come back
            logprobs, values, entropy = decoder.score_step(part, decoder_ids[rows, :steps], real, chosen)
            out[:, positions] = logprobs, values, entropy
        else:
            logits, values, _ = decoder.step(part, decoder_ids[rows, :steps], select=real)
            _host_scores(out, logits, values, chosen, positions, threads)
    return _checked_scores(out, response_mask, precision, weights_version)


def _score_packed(
    decoder, out, ids, mask, decoder_ids, responses, response_mask, lengths, num_samples, queries, *, threads
) -> None:
    """The rows of ``queries`` (query indices, ascending) scored with the packed decoder into ``out``: one
    encoder call, then one packed decoder call per ``logit_chunks`` run of their rows."""
    rows = (queries[:, None] * num_samples + np.arange(num_samples)).reshape(-1)
    length = responses.shape[1]
    state = decoder.encode(ids[queries], mask[queries], num_samples=num_samples, capacity=None)
    for chunk in logit_chunks(response_mask[rows], decoder.packed_vocab):
        part = state if len(chunk) == len(rows) else decoder.rows_of(state, chunk, capacity=None)
        picked = rows[chunk]
        steps = int(lengths[picked].max())
        real = np.flatnonzero(response_mask[picked, :steps].reshape(-1))
        logits, values = decoder.packed_scores(part, decoder_ids[picked, :steps], lengths[picked], real)
        chosen = responses[picked, :steps].reshape(-1)[real]
        _host_scores(out, logits, values, chosen, picked[real // steps] * length + real % steps, threads)


DECODER_COST = 1.75  # a scored position's work against an encoder token's (its LM head too; t5-small shape)


def query_parts(tokens: np.ndarray, scored: np.ndarray, parts: int) -> list:
    """The queries that have scored positions, cut into at most ``parts`` sets of about equal work (``tokens``
    per query in the encoder, plus ``DECODER_COST`` x its rows' ``scored`` positions): each a
    ``_score_packed`` call on its own thread. Largest first, each to the least loaded set; each ascending."""
    busy = np.flatnonzero(np.asarray(scored) > 0)
    cost = np.asarray(tokens)[busy] + DECODER_COST * np.asarray(scored)[busy]
    count = max(1, min(int(parts), len(busy)))
    load, members = np.zeros(count), [[] for _ in range(count)]
    for query in np.argsort(-cost, kind="stable"):
        k = int(np.argmin(load))
        members[k].append(busy[query])
        load[k] += cost[query]
    return [np.sort(np.array(part, dtype=np.int64)) for part in members if part]


_POOL: dict = {}  # at_once's thread pools, by size, each made once
_POOL_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: it makes its own pool
    os.register_at_fork(after_in_child=_POOL.clear)


def at_once(function, parts: list) -> list:
    """``function(part)`` for every part at once: the first on this thread, the others on the pool's threads
    (onnxruntime and NumPy let go of the GIL while they work). Their results in order; an exception is
    raised once every part has ended, so none still writes into a result when the caller sees it."""
    if len(parts) <= 1:
        return [function(part) for part in parts]
    later = [_pool(len(parts) - 1).submit(function, part) for part in parts[1:]]
    try:
        first = function(parts[0])
    finally:
        concurrent.futures.wait(later)
    return [first] + [future.result() for future in later]


def _pool(size: int) -> concurrent.futures.ThreadPoolExecutor:
    with _POOL_LOCK:
        if size not in _POOL:
            _POOL[size] = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="t5vh-scoring")
        return _POOL[size]


def _host_scores(
    out: np.ndarray, logits: np.ndarray, values: np.ndarray, chosen: np.ndarray, positions, threads: int = 1
) -> None:
    """Log-probs of the ``chosen`` ids, values and entropies from M x V ``logits``, into ``out``'s flat
    ``positions``, the log-softmax on up to ``threads`` threads."""
    lse, entropy = log_normalizer_and_entropy(logits, threads)
    out[:, positions] = logits[np.arange(len(chosen)), chosen] - lse, values, entropy


def _checked_scores(out: np.ndarray, response_mask: np.ndarray, precision: str, weights_version) -> Scores:
    batch, length = response_mask.shape
    scored = np.flatnonzero(response_mask.reshape(-1))
    check_scores_finite(scored, length, *out[:, scored])  # after every group: the first bad row is named
    logprobs, values, entropy = out.reshape(3, batch, length)
    return Scores(
        logprobs=logprobs,
        values=values,
        entropy=entropy,
        response_mask=response_mask,
        precision=precision,
        weights_version=weights_version,
    )


LOGITS_BUDGET = 256 * 2**20  # bytes of float32 logits one packed decoder call may return


def logit_chunks(response_mask: np.ndarray, vocab_size: int, budget: Optional[int] = None) -> list:
    """The rows, in order, cut into consecutive runs whose scored positions' logits (positions x V float32)
    fit in ``budget`` bytes (``LOGITS_BUDGET``): one packed decoder call each, so a large ``score()`` call
    holds a bounded logits block (a PPO batch of 256 x 128 tokens would be 4.2 GB at once at a
    32k vocabulary). A row larger than the budget alone is a run of its own. One run when all fit."""
    budget = LOGITS_BUDGET if budget is None else budget
    per_row = (np.asarray(response_mask) != 0).sum(axis=1) * vocab_size * 4
    chunks, start, size = [], 0, 0
    for row, need in enumerate(per_row):
        if size and size + need > budget:
            chunks.append(np.arange(start, row))
            start, size = row, 0
        size += need
    chunks.append(np.arange(start, len(per_row)))
    return chunks


def scored_lengths(response_mask: np.ndarray) -> np.ndarray:
    """Per row, the positions the decoder must run: up to the last masked-in one (0 for an empty row)."""
    real = np.asarray(response_mask) != 0
    return np.where(real.any(axis=1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)


CALL_COST = 64  # one more decoder call costs about as much as this many padded positions (measured, t5-small, CPU)


def length_groups(lengths: np.ndarray, call_cost: Optional[int] = None) -> list:
    """The non-empty rows cut into groups of similar length, minimising the decoder positions run
    (rows x the group's longest) plus ``call_cost`` per group; each group's row numbers ascending.

    An exact partition of the rows sorted by length (dynamic programming over the cut points).
    """
    call_cost = CALL_COST if call_cost is None else call_cost
    order = np.flatnonzero(lengths)
    order = order[np.argsort(lengths[order], kind="stable")]
    sorted_lengths = lengths[order].astype(np.int64)
    best = np.zeros(len(order) + 1, dtype=np.int64)
    cut = np.zeros(len(order) + 1, dtype=np.int64)
    for end in range(1, len(order) + 1):
        starts = np.arange(end)
        costs = best[:end] + (end - starts) * sorted_lengths[end - 1] + call_cost
        cut[end] = np.argmin(costs)
        best[end] = costs[cut[end]]
    groups, end = [], len(order)
    while end > 0:
        groups.append(np.sort(order[cut[end] : end]))
        end = cut[end]
    return groups[::-1]


# positions whose exp(logits) exist at once: 4 MB at a 32k vocabulary, so each chunk's five passes (max,
# subtract, exp, sum, dot) find it in the caches: 37 against 43 ms per 1,000 positions with 256 (33 MB)
ROWS_AT_ONCE = 32


def log_normalizer_and_entropy(logits: np.ndarray, threads: int = 1):
    """Row-wise log-sum-exp and entropy of N x V ``logits`` (``log_normalizer_and_entropy_rows``) on up to
    ``threads`` threads, each on its own consecutive rows (NumPy lets go of the GIL in its loops): the
    same numbers, row by row. 1,060 x 32,128 logits on this package's 2-core benchmark CPU: 39.6 ms on
    one thread, 23.6 on two. Once onnxruntime's threads stop spinning when their run returns, the
    scorer's pass has both cores to itself."""
    parts = max(1, min(int(threads), len(logits) // ROWS_AT_ONCE))
    if parts == 1:
        return log_normalizer_and_entropy_rows(logits)
    cuts = np.linspace(0, len(logits), parts + 1).astype(int)
    results = at_once(log_normalizer_and_entropy_rows, [logits[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    return tuple(np.concatenate(part) for part in zip(*results))


def log_normalizer_and_entropy_rows(logits: np.ndarray):
    """Row-wise log-sum-exp and entropy of N x V ``logits``, ``ROWS_AT_ONCE`` rows at a time, so that
    the exp pass's temporary stays small whatever N (it was as large as the logits, ~140 MB per batch
    of 32 rows at t5-small size, and set the scoring job's peak memory).

    The sums are float32 (NumPy sums pairwise: ~1e-6 from a float64 sum at a 32k vocabulary, two orders
    below the parity tolerance); only the sampler's CDF needs float64 (the RNG contract). One exp pass
    into one reused buffer serves both numbers: ~50 ms per 1,000 rows here, against ~77 with float64
    block sums and a fresh buffer per chunk."""
    lse = np.empty(len(logits), dtype=np.float32)
    entropy = np.empty(len(logits), dtype=np.float32)
    buffer = np.empty((min(ROWS_AT_ONCE, len(logits)), logits.shape[-1]), dtype=np.float32)
    for start in range(0, len(logits), ROWS_AT_ONCE):
        part = logits[start : start + ROWS_AT_ONCE]
        weights = buffer[: len(part)]
        top = part.max(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore"):  # NaN/inf rows give a non-finite lse: check_scores_finite names them
            np.subtract(part, top, out=weights)
            np.exp(weights, out=weights)
            total = weights.sum(axis=-1)
            part_lse = top[:, 0] + np.log(total)
            lse[start : start + len(part)] = part_lse
            entropy[start : start + len(part)] = part_lse - np.einsum("ij,ij->i", weights, part) / total
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
