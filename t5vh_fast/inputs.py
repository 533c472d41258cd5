"""Checks and conversions of user input, shared by the reference and the runtime.

NumPy only: the runtime imports this without torch. Every check raises
``ValueError`` naming the bad value and what to do instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def check_sampling_options(txt_len, top_k, top_p) -> None:
    """Validate ``respond_to_batch`` options once, before any work."""
    if isinstance(txt_len, bool) or not isinstance(txt_len, (int, np.integer)) or txt_len <= 0:
        raise ValueError(f"txt_len must be a positive integer, got {txt_len!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 turns top-k off), got {top_k!r}")
    if not isinstance(top_p, (int, float, np.floating)) or not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1.0 turns top-p off), got {top_p!r}")


def pad_batch(sequences: Sequence[Sequence[int]], *, pad_id: int = 0):
    """Right-pad ragged token lists; returns ``(ids, attention_mask)`` as int64 arrays."""
    if len(sequences) == 0:
        raise ValueError("empty batch: pass at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty: every row needs at least one token")
    ids = np.full((len(sequences), max(lengths)), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = np.asarray(seq, dtype=np.int64)
        mask[row, : len(seq)] = 1
    return ids, mask


def as_token_batch(ids, attention_mask=None, *, vocab_size: int, name: str = "query_ids"):
    """Return ``(ids, mask)`` as B x S int64 arrays, checking shape, mask and vocabulary."""
    if isinstance(ids, (list, tuple)):
        if len(ids) == 0:
            raise ValueError(f"empty batch: {name} has no rows")
        if isinstance(ids[0], (list, tuple, np.ndarray)):
            lengths = {len(r) for r in ids}
            if len(lengths) > 1 and attention_mask is None:
                raise ValueError(
                    f"{name} rows have different lengths {sorted(lengths)} and no attention_mask: "
                    "right-pad them with t5vh_fast.pad_batch(rows), which also returns the mask"
                )
            if len(lengths) > 1:
                raise ValueError(f"{name} rows have different lengths {sorted(lengths)}: pad them to one length")
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a B x S matrix of token ids, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"empty batch: {name} has no rows")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no tokens: every row needs at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(
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
            raise ValueError(f"attention_mask has shape {mask.shape} but {name} has shape {arr.shape}: they must match")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = mask.astype(np.int64)
        empty = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"row {int(empty[0])} of attention_mask is all zeros: every row needs at least one token")
    return arr, mask


def check_uniforms(uniforms, batch: int, txt_len: int) -> Optional[np.ndarray]:
    """The caller's ``B x txt_len`` uniforms as float64, each in [0, 1)."""
    if uniforms is None:
        return None
    u = np.asarray(uniforms, dtype=np.float64)
    if u.shape != (batch, txt_len):
        raise ValueError(f"uniforms must have shape (batch, txt_len) = {(batch, txt_len)}, got {u.shape}")
    if not ((u >= 0.0) & (u < 1.0)).all():
        raise ValueError("uniforms must lie in [0, 1)")
    return u
