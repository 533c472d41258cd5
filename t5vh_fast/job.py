"""Batch scoring of JSONL rows (DESIGN.md §6): streaming, length-bucketed, restartable.

``score_rows`` is the library entry point (an iterator of dicts in, an iterator
of dicts out) for Ray/Spark-style jobs; ``run_job`` adds the files: output and
errors JSONL, resume after a crash, progress and a summary.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, TextIO

from .errors import InputError
from .inputs import pad_batch
from .scoring import reward


@dataclass(frozen=True)
class Row:
    """One valid input row, tokenized."""

    line: int  # 1-based line number in the input
    id: object  # the caller's id, echoed in the output
    query_ids: list
    response_ids: list
    score: Optional[float]  # the reward model's score, when given


@dataclass(frozen=True)
class BadRow:
    line: int
    id: object
    reason: str

    def to_json(self) -> dict:
        return {"line": self.line, "id": self.id, "error": self.reason}


def parse_row(line_no: int, raw, *, policy, max_tokens: int):
    """A ``Row`` or a ``BadRow`` saying what is wrong with it; ``raw`` is a dict or a JSON string."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            return BadRow(line_no, None, f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(raw, dict):
        return BadRow(line_no, None, f"a row must be a JSON object, got {type(raw).__name__}")
    row_id = raw.get("id")
    if row_id is None:
        return BadRow(line_no, None, "missing field 'id'")
    try:
        query = _tokens(raw, "query", policy, add_eos=True)
        response = _tokens(raw, "response", policy, add_eos=False)
    except ValueError as exc:
        return BadRow(line_no, row_id, str(exc))
    if not query:
        return BadRow(line_no, row_id, "empty query")
    if not response:
        return BadRow(line_no, row_id, "empty response: nothing to score")
    for name, ids in (("query", query), ("response", response)):
        bad = [t for t in ids if not (0 <= t < policy.vocab_size)]
        if bad:
            return BadRow(
                line_no, row_id, f"{name} token id {bad[0]} is outside the vocabulary [0, {policy.vocab_size})"
            )
    if len(query) + len(response) > max_tokens:
        return BadRow(line_no, row_id, f"too long: {len(query)} + {len(response)} tokens > --max-tokens {max_tokens}")
    score = raw.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)
    ):
        return BadRow(line_no, row_id, f"'score' must be a finite number, got {score!r}")
    return Row(line_no, row_id, query, response, None if score is None else float(score))


def _tokens(raw: dict, name: str, policy, *, add_eos: bool) -> list:
    ids = raw.get(f"{name}_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"'{name}_ids' must be a list of integers")
        return ids
    text = raw.get(name)
    if text is None:
        raise ValueError(f"missing field '{name}' or '{name}_ids'")
    if not isinstance(text, str):
        raise ValueError(f"'{name}' must be a string")
    return policy.tokenizer.encode(text, add_special_tokens=add_eos).ids


def score_rows(
    policy,
    rows: Iterable,
    *,
    ref_policy=None,
    beta: float = 0.1,
    batch_size: int = 32,
    max_tokens: int = 512,
    sort_window: int = 16,
) -> Iterator[dict]:
    """Score an iterable of rows (dicts or JSON strings) lazily; yields one dict per row.

    Good rows give ``id, response_ids, logprobs, values, entropy`` (plus
    ``ref_logprobs, kl`` with ``ref_policy`` and ``reward`` when the row has a
    ``score``); bad rows give ``line, id, error``. Rows are read
    ``batch_size * sort_window`` at a time and batched by length to cut
    padding, so output order is not input order: match on ``id``.
    """
    _check_job_options(batch_size=batch_size, max_tokens=max_tokens, sort_window=sort_window, beta=beta)
    parsed = (parse_row(n, raw, policy=policy, max_tokens=max_tokens) for n, raw in enumerate(rows, start=1))
    for batch in _batches(policy, parsed, ref_policy, beta, batch_size, sort_window):
        for _, record in batch:
            yield record


def _batches(policy, parsed: Iterator, ref_policy, beta: float, batch_size: int, sort_window: int):
    """Lists of ``(row, output record)``: bad rows first, then length-sorted batches of each window."""
    while True:
        window = list(itertools.islice(parsed, batch_size * sort_window))
        if not window:
            return
        bad = [(r, r.to_json()) for r in window if isinstance(r, BadRow)]
        if bad:
            yield bad
        good = sorted((r for r in window if isinstance(r, Row)), key=lambda r: (len(r.query_ids), len(r.response_ids)))
        for start in range(0, len(good), batch_size):
            batch = good[start : start + batch_size]
            yield list(zip(batch, _score_batch(policy, batch, ref_policy, beta)))


def _score_batch(policy, batch: list, ref_policy, beta: float) -> list:
    ids, mask = pad_batch([r.query_ids for r in batch], pad_id=policy.pad_token_id)
    resp, resp_mask = pad_batch([r.response_ids for r in batch], pad_id=policy.pad_token_id)
    scores = policy.score(ids, resp, mask, resp_mask)
    ref = ref_policy.score(ids, resp, mask, resp_mask) if ref_policy is not None else None
    out = []
    for i, row in enumerate(batch):
        n = len(row.response_ids)
        record = {
            "id": row.id,
            "response_ids": row.response_ids,
            "logprobs": scores.logprobs[i, :n].tolist(),
            "values": scores.values[i, :n].tolist(),
            "entropy": scores.entropy[i, :n].tolist(),
        }
        if ref is not None:
            kl = scores.logprobs[i, :n] - ref.logprobs[i, :n]
            record["ref_logprobs"] = ref.logprobs[i, :n].tolist()
            record["kl"] = kl.tolist()
            if row.score is not None:
                record["reward"] = float(reward(row.score, kl, beta=beta))
        out.append(record)
    return out


def _check_job_options(*, batch_size, max_tokens, sort_window, beta):
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("sort_window", sort_window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise InputError(f"beta must be a finite number >= 0, got {beta!r}")


# ---------------------------------------------------------------------- files and resume


def recover_output(path: Optional[Path]) -> set:
    """Ids already written to the output (as ``_id_key``s)."""
    return {_id_key(v) for v in _complete_lines(path, "id")}


def recover_errors(path: Optional[Path]) -> set:
    """Input line numbers already reported in the errors file."""
    return set(_complete_lines(path, "line"))


def _complete_lines(path: Optional[Path], field: str) -> list:
    """``field`` of every complete JSON line of ``path``; a torn tail (killed mid-write) is cut off."""
    if path is None or not path.exists():
        return []
    values, good_end = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn line")
                values.append(json.loads(line)[field])
            except (ValueError, KeyError, TypeError):
                break
            good_end += len(line)
    if good_end != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return values


def _first_occurrences(parsed):
    """Rows in input order; a later row with an id seen before becomes a ``BadRow``."""
    seen = set()
    for row in parsed:
        if isinstance(row, Row):
            key = _id_key(row.id)
            if key in seen:
                row = BadRow(row.line, row.id, "duplicate id: an earlier row has the same id")
            seen.add(key)
        yield row


def _id_key(row_id) -> str:
    return json.dumps(row_id, sort_keys=True)


@dataclass
class JobSummary:
    rows_ok: int = 0  # scored and written in this run
    rows_failed: int = 0  # sent to the errors file in this run
    rows_skipped: int = 0  # already in the output from an earlier run
    tokens: int = 0  # response tokens scored in this run
    elapsed_s: float = 0.0

    def line(self) -> str:
        rate = self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (
            f"{self.rows_ok} rows scored, {self.rows_failed} failed, {self.rows_skipped} already done, "
            f"{self.elapsed_s:.1f} s, {rate:.0f} tokens/s"
        )


def run_job(
    policy,
    input_file: TextIO,
    output_path: Optional[Path],
    *,
    errors_path: Optional[Path] = None,
    ref_policy=None,
    beta: float = 0.1,
    batch_size: int = 32,
    max_tokens: int = 512,
    sort_window: int = 16,
    fail_fast: bool = False,
    progress: bool = False,
) -> JobSummary:
    """Score ``input_file`` into ``output_path`` (None = stdout), resuming a previous run.

    Ids already in the output are skipped; bad rows go to ``errors_path``
    (None = stderr) with their line number and reason. Output is flushed
    after every batch. With ``fail_fast`` the first bad row raises ``InputError``.
    """
    _check_job_options(batch_size=batch_size, max_tokens=max_tokens, sort_window=sort_window, beta=beta)
    summary = JobSummary()
    done = recover_output(output_path) if output_path is not None else set()
    reported = recover_errors(errors_path)
    out = open(output_path, "a", encoding="utf-8") if output_path is not None else sys.stdout
    errors = open(errors_path, "a", encoding="utf-8") if errors_path is not None else sys.stderr
    from tqdm import tqdm

    bar = tqdm(unit=" rows", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()

    def pending():
        for line_no, line in enumerate(input_file, start=1):
            if not line.strip():
                continue
            try:
                row_id = json.loads(line).get("id")
            except (ValueError, AttributeError):
                row_id = None
            if row_id is not None and _id_key(row_id) in done:
                summary.rows_skipped += 1
                continue
            yield line_no, line

    try:
        parsed = _first_occurrences(parse_row(n, line, policy=policy, max_tokens=max_tokens) for n, line in pending())
        for batch in _batches(policy, parsed, ref_policy, beta, batch_size, sort_window):
            lines = []
            for row, record in batch:
                if "error" in record:
                    if fail_fast:
                        raise InputError(f"line {record['line']}: {record['error']} (--fail-fast)")
                    summary.rows_failed += 1
                    if record["line"] not in reported:
                        errors.write(json.dumps(record) + "\n")
                else:
                    summary.rows_ok += 1
                    summary.tokens += len(row.response_ids)
                    lines.append(json.dumps(record) + "\n")
            out.write("".join(lines))  # one write and one flush per batch
            out.flush()
            errors.flush()
            bar.update(len(batch))
            bar.set_postfix_str(f"{summary.tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
    finally:
        bar.close()
        summary.elapsed_s = time.perf_counter() - start
        if out is not sys.stdout:
            out.close()
        if errors is not sys.stderr:
            errors.close()
    return summary
