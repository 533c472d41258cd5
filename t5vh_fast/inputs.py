"""Checks and conversions of user input, shared by the PyTorch reference and the runtime.

NumPy only: the runtime imports this without torch. Every check raises
``InputError`` (a ``ValueError``) naming the bad value and what to do instead.
Options are checked once, up front, before any work.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import numpy as np

from .errors import InputError

# The longest query (in tokens) a call accepts unless told otherwise. T5's relative positions set no
# hard limit, but encoder memory grows with the square of the query length: at 2048 tokens (4x the
# 512 T5 was trained on) a t5-small-shaped encoder holds 8 heads x 2048^2 floats = 134 MB of
# attention scores per row; a 32,000-character text (~8,000 tokens) needs 16x that and was OOM-killed.
DEFAULT_MAX_QUERY_TOKENS = 2048
# Raw text longer than this many characters per allowed token is refused before tokenizing.
MAX_CHARS_PER_TOKEN = 32


def is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(name: str, value) -> None:
    """``value`` is a positive integer (Python or NumPy)."""
    if not is_integer(value) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def check_query_length(ids: np.ndarray, max_query_tokens) -> None:
    """Checked B x S query ids are at most ``max_query_tokens`` long."""
    check_positive_int("max_query_tokens", max_query_tokens)
    if ids.shape[1] > max_query_tokens:
        raise InputError(
            f"queries are {ids.shape[1]} tokens long, more than max_query_tokens={max_query_tokens} "
            "(memory grows with the square of the length): shorten them, or raise max_query_tokens"
        )


def check_text(text, name: str, *, max_tokens: int, limit_name: str = "max_query_tokens") -> None:
    """``text`` is a str, valid Unicode, and not absurdly long for ``max_tokens`` tokens (checked
    before tokenizing; the token count is checked after)."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{name} is not valid UTF-8: character {exc.start} is {text[exc.start]!r} "
            "(a byte that is not UTF-8, or a lone surrogate escape)"
        ) from None
    if len(text) > MAX_CHARS_PER_TOKEN * max_tokens:
        raise InputError(
            f"{name} is {len(text)} characters long, far more than {limit_name}={max_tokens} tokens can hold: "
            "shorten it"
        )


def check_sampling_options(txt_len, top_k, top_p) -> None:
    """Validate ``respond_to_batch`` options once, before any work."""
    if not is_integer(txt_len) or txt_len <= 0:
        raise InputError(f"txt_len must be a positive integer, got {txt_len!r}")
    if not is_integer(top_k) or top_k < 0:
        raise InputError(f"top_k must be an integer >= 0 (0 turns top-k off), got {top_k!r}")
    if isinstance(top_p, (bool, np.bool_)) or not isinstance(top_p, numbers.Real) or not (0.0 < float(top_p) <= 1.0):
        raise InputError(f"top_p must be in (0, 1] (1.0 turns top-p off), got {top_p!r}")


def resolve_txt_len(txt_len, max_length, default: int = 20):
    """``txt_len``, or its old name ``max_length``; both given must agree."""
    if txt_len is not None and max_length is not None and txt_len != max_length:
        raise InputError(f"txt_len={txt_len} and max_length={max_length} disagree: pass one of them")
    if txt_len is None and max_length is None:
        return default
    return txt_len if txt_len is not None else max_length


def pad_batch(sequences: Sequence[Sequence[int]], *, pad_id: int = 0):
    """Right-pad ragged token lists; returns ``(ids, attention_mask)`` as int64 arrays."""
    if len(sequences) == 0:
        raise InputError("empty batch: pass at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise InputError(f"sequence {lengths.index(0)} is empty: every row needs at least one token")
    ids = np.full((len(sequences), max(lengths)), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = np.asarray(seq, dtype=np.int64)
        mask[row, : len(seq)] = 1
    return ids, mask


def as_token_batch(
    ids, attention_mask=None, *, vocab_size: int, name: str = "query_ids", mask_name: str = "attention_mask"
):
    """Return ``(ids, mask)`` as B x S int64 arrays, checking shape, mask and vocabulary."""
    if isinstance(ids, (list, tuple)):
        if len(ids) == 0:
            raise InputError(f"empty batch: {name} has no rows")
        if isinstance(ids[0], (list, tuple, np.ndarray)):
            lengths = {len(r) for r in ids}
            if len(lengths) > 1 and attention_mask is None:
                raise InputError(
                    f"{name} rows have different lengths {sorted(lengths)} and no {mask_name}: "
                    "right-pad them with t5vh_fast.pad_batch(rows), which also returns the mask"
                )
            if len(lengths) > 1:
                raise InputError(f"{name} rows have different lengths {sorted(lengths)}: pad them to one length")
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name} must be a B x S matrix of token ids ({exc})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"{name} must be a B x S matrix of token ids, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError(f"empty batch: {name} has no rows")
    if arr.shape[1] == 0:
        raise InputError(f"{name} has no tokens: every row needs at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise InputError(
            f"{name}[{row}, {col}] = {int(arr[row, col])} is outside the vocabulary [0, {vocab_size}): "
            "was it tokenized with another model's tokenizer?"
        )
    if attention_mask is None:
        mask = np.ones_like(arr)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != arr.shape:
            raise InputError(f"{mask_name} has shape {mask.shape} but {name} has shape {arr.shape}: they must match")
        if not np.isin(mask, (0, 1)).all():
            raise InputError(f"{mask_name} must hold only 0 (padding) and 1 (token)")
        mask = mask.astype(np.int64)
        empty = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty.size:
            raise InputError(f"row {int(empty[0])} of {mask_name} is all zeros: every row needs at least one token")
    return arr, mask


def check_response_batch(responses, response_mask, *, queries: int, vocab_size: int):
    """``(responses, response_mask, num_samples)``: R x T int64 arrays, R = queries x num_samples.

    R may be any multiple of the number of queries: the responses are then
    grouped query-major (all of query 0's, then query 1's, ...).
    """
    resp, resp_mask = as_token_batch(
        responses, response_mask, vocab_size=vocab_size, name="response_ids", mask_name="response_mask"
    )
    if resp.shape[0] % queries:
        raise InputError(
            f"{queries} queries but {resp.shape[0]} responses: pass one response per query, or the same number "
            "of responses for every query, grouped query-major"
        )
    return resp, resp_mask, resp.shape[0] // queries


def check_num_samples(num_samples) -> None:
    """``num_samples``: responses per query, an integer >= 1."""
    if not is_integer(num_samples) or num_samples < 1:
        raise InputError(f"num_samples must be an integer >= 1 (responses per query), got {num_samples!r}")


def check_uniforms(uniforms, batch: int, txt_len: int, num_samples: int = 1) -> Optional[np.ndarray]:
    """The caller's ``(B x num_samples) x txt_len`` uniforms as float64, each in [0, 1)."""
    if uniforms is None:
        return None
    u = np.asarray(uniforms, dtype=np.float64)
    rows = batch * num_samples
    if u.ndim == 2 and u.shape[0] != rows and u.shape[1] == txt_len:
        raise InputError(
            f"uniforms has {u.shape[0]} rows, but {batch} queries x {num_samples} samples = {rows} responses "
            "are sampled: pass one row of uniforms per response"
        )
    if u.shape != (rows, txt_len):
        raise InputError(f"uniforms must have shape (responses, txt_len) = {(rows, txt_len)}, got {u.shape}")
    if not ((u >= 0.0) & (u < 1.0)).all():
        raise InputError("uniforms must lie in [0, 1)")
    return u


def check_seed(seed) -> None:
    """``seed`` is None or an integer >= 0 (numpy's PCG64 takes no negative seeds)."""
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise InputError(f"seed must be an integer >= 0 or None, got {seed!r}")
