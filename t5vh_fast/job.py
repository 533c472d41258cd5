"""Batch scoring of JSONL rows (docs/contract.md, "Batch scoring"): streaming, length-bucketed, restartable.

``score_rows`` is the library entry point (an iterator of dicts in, an iterator
of dicts out); ``run_job`` adds the files: output and errors JSONL, resume after
a crash, progress and a summary. ``t5vh_fast.ray`` runs the same pieces
(``parse_row``, ``score_batches``, the records, the writer) on Ray Data.

What ``run_job`` may do to files (docs/contract.md, "Batch scoring"): input,
output and errors are three different files; only a regular output file is
locked, fingerprinted and read back (devices, pipes and stdout are only
written); an existing output is resumed only when ``OUTPUT.t5vh-job.json``
beside it holds the same fingerprint, and an output it did not write is refused.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import itertools
import json
import math
import numbers
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, TextIO

import numpy as np

from ._files import exclusive_lock, is_regular_or_missing, same_regular_file, sha256_file, write_json_atomic
from .errors import InputError, NonFiniteError, OutputError, PathNotFound
from .inputs import DEFAULT_MAX_QUERY_TOKENS, check_positive_int, check_text, is_integer, pad_batch
from .manifest import MANIFEST_NAME, read_manifest
from .scoring import check_beta, reward

JOB_FILE_SUFFIX = ".t5vh-job.json"  # the fingerprint beside an output: OUTPUT.t5vh-job.json
JOB_FILE_FORMAT = 1
MAX_LINE_BYTES = 1 << 24  # a longer input line is a bad row, read in pieces: memory stays bounded
DUPLICATE_ID = "duplicate id: an earlier row has the same id"


@dataclass(frozen=True)
class Row:
    """One valid input row, tokenized."""

    line: int  # 1-based line number in the input
    id: object  # the caller's id, echoed in the output
    query_ids: list
    response_ids: list
    score: Optional[float]  # the reward model's score, when given
    file: Optional[str] = None  # the input file, when the input is a directory of files (Ray)


@dataclass(frozen=True)
class BadRow:
    line: int  # 1-based line number in its input file
    id: object  # the row's id when it has a usable one, else None
    reason: str  # what is wrong with it
    file: Optional[str] = None  # the input file, when the input is a directory of files (Ray)

    def to_json(self) -> dict:
        where = {"line": self.line} if self.file is None else {"file": self.file, "line": self.line}
        return {**where, "id": self.id, "error": self.reason}


def parse_row(line_no: int, raw, *, policy, max_tokens: int, max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS):
    """A ``Row`` or a ``BadRow`` saying what is wrong with it; ``raw`` is a dict or a JSON string."""
    raw, row_id = _object_and_id(line_no, raw)
    if isinstance(raw, BadRow):
        return raw
    try:
        query = _tokens(raw, "query", policy, add_eos=True, max_tokens=max_tokens)
        response = _tokens(raw, "response", policy, add_eos=False, max_tokens=max_tokens)
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
    if len(query) > max_query_tokens:
        return BadRow(line_no, row_id, f"query too long: {len(query)} tokens > --max-query-tokens {max_query_tokens}")
    if len(query) + len(response) > max_tokens:
        return BadRow(line_no, row_id, f"too long: {len(query)} + {len(response)} tokens > --max-tokens {max_tokens}")
    score = raw.get("score")
    if score is not None and (
        isinstance(score, (bool, np.bool_)) or not isinstance(score, numbers.Real) or not math.isfinite(score)
    ):
        return BadRow(line_no, row_id, f"'score' must be a finite number, got {score!r}")
    return Row(line_no, row_id, query, response, None if score is None else float(score))


def parse_query(line_no: int, raw, *, policy, max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS):
    """A ``Row`` without a response (``response_ids`` empty), or a ``BadRow``: a query to sample a
    response for. The same fields and checks as ``parse_row``, less the response's."""
    raw, row_id = _object_and_id(line_no, raw)
    if isinstance(raw, BadRow):
        return raw
    try:
        query = _tokens(
            raw, "query", policy, add_eos=True, max_tokens=max_query_tokens, limit_name="--max-query-tokens"
        )
    except ValueError as exc:
        return BadRow(line_no, row_id, str(exc))
    if not query:
        return BadRow(line_no, row_id, "empty query")
    bad = [t for t in query if not (0 <= t < policy.vocab_size)]
    if bad:
        return BadRow(line_no, row_id, f"query token id {bad[0]} is outside the vocabulary [0, {policy.vocab_size})")
    if len(query) > max_query_tokens:
        return BadRow(line_no, row_id, f"query too long: {len(query)} tokens > --max-query-tokens {max_query_tokens}")
    return Row(line_no, row_id, query, [], None)


def _object_and_id(line_no: int, raw):
    """``(row dict, id)`` of a raw row (a dict or a JSON string), or ``(BadRow, None)``."""
    if isinstance(raw, str):
        raw = load_json(line_no, raw)
        if isinstance(raw, BadRow):
            return raw, None
    if not isinstance(raw, dict):
        return BadRow(line_no, None, f"a row must be a JSON object, got {type(raw).__name__}"), None
    row_id = raw.get("id")
    row_id = row_id.item() if isinstance(row_id, np.generic) else row_id
    if row_id is None:
        return BadRow(line_no, None, "missing field 'id'"), None
    try:
        _id_key(row_id)
    except (TypeError, ValueError):
        return BadRow(line_no, None, f"'id' must be a string or a finite number, got {row_id!r:.60}"), None
    return raw, row_id


def load_json(line_no: int, text: str):
    """The JSON value of one input line, or a ``BadRow``. NaN and infinities are refused: they are
    not JSON, and an id or score holding one would be written back as invalid JSON."""
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        return BadRow(line_no, None, f"invalid JSON: {exc.msg} at column {exc.colno}")
    except ValueError as exc:
        return BadRow(line_no, None, f"invalid JSON: {exc}")


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _tokens(raw: dict, name: str, policy, *, add_eos: bool, max_tokens: int, limit_name: str = "--max-tokens") -> list:
    ids = raw.get(f"{name}_ids")
    if ids is not None:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else ids
        if not isinstance(ids, (list, tuple)) or not all(is_integer(t) for t in ids):
            raise ValueError(f"'{name}_ids' must be a list of integers")
        return [int(t) for t in ids]
    text = raw.get(name)
    if text is None:
        raise ValueError(f"missing field '{name}' or '{name}_ids'")
    check_text(text, f"'{name}'", max_tokens=max_tokens, limit_name=limit_name)
    return policy.tokenizer.encode(text, add_special_tokens=add_eos).ids


def score_rows(
    policy,
    rows: Iterable,
    *,
    ref_policy=None,
    beta: float = 0.1,
    batch_size: int = 32,
    max_tokens: int = 512,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    sort_window: int = 16,
    batch_tokens: Optional[int] = None,
) -> Iterator[dict]:
    """Score an iterable of rows (dicts or JSON strings) lazily; yields one dict per row.

    Good rows give ``id, response_ids, logprobs, values, entropy,
    weights_version, precision`` (plus ``ref_logprobs, kl, ref_weights_version``
    with ``ref_policy`` and ``reward`` when the row has a ``score``); bad rows give ``line, id, error``, and so does a row whose id an
    earlier row had. Rows are read ``batch_size * sort_window`` at a time and
    batched by length to cut padding, so output order is not input order:
    match on ``id``. ``batch_tokens`` also bounds a batch by its padded size
    (rows x longest query + longest response), so memory stays flat whatever
    the lengths; a row alone over it is a bad row. Options are checked here,
    when called, not when the first row is read; a non-finite number raises
    ``NonFiniteError``.
    """
    _check_job_options(policy, ref_policy, beta, batch_size, max_tokens, max_query_tokens, sort_window)
    check_batch_tokens(batch_tokens)
    parsed = _first_occurrences(
        parse_row(n, raw, policy=policy, max_tokens=max_tokens, max_query_tokens=max_query_tokens)
        for n, raw in enumerate(rows, start=1)
    )
    batches = score_batches(
        policy, parsed, ref_policy, beta, int(batch_size), int(sort_window), max_query_tokens, batch_tokens
    )
    return (record for batch in batches for _, record in batch)


def score_batches(
    policy,
    parsed: Iterable,
    ref_policy,
    beta: float,
    batch_size: int,
    sort_window: int,
    max_query_tokens: int,
    batch_tokens: Optional[int] = None,
) -> Iterator[list]:
    """Lists of ``(row, output record)`` for parsed rows (``Row`` or ``BadRow``, in input order):
    bad rows first, then length-sorted batches of each window of ``batch_size * sort_window`` rows."""
    return in_windows(
        parsed,
        batch_size,
        sort_window,
        lambda batch: _score_batch(policy, batch, ref_policy, beta, max_query_tokens),
        batch_tokens,
    )


def in_windows(parsed: Iterable, batch_size: int, sort_window: int, run, batch_tokens: Optional[int] = None):
    """The job's length bucketing: read ``batch_size * sort_window`` rows, yield the bad ones with
    their error records, then ``run(batch)`` (a list of records) on batches sorted by length: at most
    ``batch_size`` rows, and with ``batch_tokens`` at most that many padded tokens."""
    parsed = iter(parsed)
    while True:
        window = list(itertools.islice(parsed, batch_size * sort_window))
        if not window:
            return
        good = sorted((r for r in window if isinstance(r, Row)), key=lambda r: (len(r.query_ids), len(r.response_ids)))
        batches = list(_token_batches(good, batch_size, batch_tokens))
        bad = [r for r in window if isinstance(r, BadRow)] + [b[0] for b in batches if isinstance(b[0], BadRow)]
        if bad:
            yield [(r, r.to_json()) for r in sorted(bad, key=lambda r: r.line)]
        for batch in batches:
            if not isinstance(batch[0], BadRow):
                yield list(zip(batch, run(batch)))


def _token_batches(rows: list, batch_size: int, batch_tokens: Optional[int]) -> Iterator[list]:
    """Consecutive (length-sorted) rows in batches of at most ``batch_size`` rows and, with ``batch_tokens``,
    at most that many padded tokens; a row alone over the budget comes out as a one-``BadRow`` batch."""
    batch: list = []
    longest = (0, 0)
    for row in rows:
        size = (len(row.query_ids), len(row.response_ids))
        if batch_tokens is not None and sum(size) > batch_tokens:
            reason = f"too long for --batch-tokens {batch_tokens}: {size[0]} + {size[1]} tokens; raise --batch-tokens"
            yield [BadRow(row.line, row.id, reason)]
            continue
        grown = (max(longest[0], size[0]), max(longest[1], size[1]))
        full = len(batch) == batch_size or (batch_tokens is not None and (len(batch) + 1) * sum(grown) > batch_tokens)
        if batch and full:
            yield batch
            batch, grown = [], size
        batch.append(row)
        longest = grown
    if batch:
        yield batch


def check_batch_tokens(batch_tokens) -> None:
    if batch_tokens is not None:
        check_positive_int("batch_tokens", batch_tokens)


def _score_batch(policy, batch: list, ref_policy, beta: float, max_query_tokens: int) -> list:
    ids, mask = pad_batch([r.query_ids for r in batch], pad_id=policy.pad_token_id)
    resp, resp_mask = pad_batch([r.response_ids for r in batch], pad_id=policy.pad_token_id)
    scores = _score(policy, "policy", batch, ids, resp, mask, resp_mask, max_query_tokens)
    ref = None
    if ref_policy is not None:
        ref = _score(ref_policy, "reference", batch, ids, resp, mask, resp_mask, max_query_tokens)
    out = []
    for i, row in enumerate(batch):
        n = len(row.response_ids)
        record = {
            "id": row.id,
            "response_ids": row.response_ids,
            "logprobs": scores.logprobs[i, :n].tolist(),
            "values": scores.values[i, :n].tolist(),
            "entropy": scores.entropy[i, :n].tolist(),
            # which weights, at which precision, computed this row (a PPO trainer refuses stale ones)
            "weights_version": scores.weights_version,
            "precision": scores.precision,
        }
        if ref is not None:
            kl = scores.logprobs[i, :n] - ref.logprobs[i, :n]
            record["ref_logprobs"] = ref.logprobs[i, :n].tolist()
            record["kl"] = kl.tolist()
            record["ref_weights_version"] = ref.weights_version
            if row.score is not None:
                record["reward"] = float(reward(row.score, kl, beta=beta))
        out.append(record)
    return out


def _score(model, which: str, batch: list, ids, resp, mask, resp_mask, max_query_tokens: int):
    """``model.score`` on a padded batch; a NaN or inf is reported with the input line and id it came from."""
    try:
        return model.score(ids, resp, mask, resp_mask, max_query_tokens=max_query_tokens)
    except NonFiniteError as exc:
        if exc.row is None:
            raise
        row = batch[exc.row]
        raise NonFiniteError(
            f"line {row.line} (id {row.id!r}): the {which} model gives NaN or inf logits or values: it or its "
            "export is broken; nothing of this batch was written (rows written before are kept)",
            row=exc.row,
        ) from None


def _check_job_options(policy, ref_policy, beta, batch_size, max_tokens, max_query_tokens, sort_window) -> None:
    for name, value in (
        ("batch_size", batch_size),
        ("max_tokens", max_tokens),
        ("max_query_tokens", max_query_tokens),
        ("sort_window", sort_window),
    ):
        check_positive_int(name, value)
    check_beta(beta)
    if ref_policy is not None and ref_policy.vocab_size != policy.vocab_size:
        raise InputError(
            f"the reference model's vocabulary differs from the policy's ({ref_policy.vocab_size} vs "
            f"{policy.vocab_size} tokens): KL compares the same tokens under both models; export the reference "
            "from the policy's base model"
        )


# ---------------------------------------------------------------------- files and resume


def job_file(output: Path) -> Path:
    """``OUTPUT.t5vh-job.json``: the fingerprint of the job that writes ``output``."""
    return output.with_name(output.name + JOB_FILE_SUFFIX)


def job_fingerprint(policy, ref_policy=None, **options) -> dict:
    """What decides the numbers in an output: the sha256 of each export's manifest (which covers its
    graphs, precision and versions), the weights each policy runs now (``weights_version``: they
    differ from the export's after ``update_weights``), the precision, and the options that change
    numbers or which rows are scored. New entries are new keys: an older job file lacking one never
    matches. ``policy`` and ``ref_policy``: loaded policies or their export directories (then the
    weights and precision a fresh load reports)."""

    def manifest_sha(model):
        return sha256_file(Path(model if isinstance(model, (str, Path)) else model.root) / MANIFEST_NAME)

    def running(model):
        if isinstance(model, (str, Path)):
            from .policy import export_weights_version  # onnxruntime: only when asked

            return export_weights_version(model), read_manifest(Path(model)).get("precision", "fp32")
        return model.weights_version, model.precision

    policy_version, precision = running(policy)
    return {
        "policy_manifest_sha256": manifest_sha(policy),
        "ref_manifest_sha256": None if ref_policy is None else manifest_sha(ref_policy),
        "policy_weights_version": policy_version,
        "ref_weights_version": None if ref_policy is None else running(ref_policy)[0],
        "precision": precision,
        **options,
    }


def recover_output(path: Optional[Path]) -> set:
    """Ids already written to the output (as ``_id_key``s)."""
    return {_id_key(v) for v in _complete_lines(path, "id")}


def recover_errors(path: Optional[Path]) -> set:
    """Bad rows already reported in the errors file (``report_key`` of each: its input line number)."""
    return {report_key(record) for record in complete_records(path, "line")}


def report_key(error_record: dict):
    """What identifies a bad row across runs: its line number, with its file when it has one."""
    line = error_record["line"]
    return line if error_record.get("file") is None else (error_record["file"], line)


def _complete_lines(path: Optional[Path], field: str) -> list:
    """``field`` of every record of a file the job wrote (see ``complete_records``)."""
    return [record[field] for record in complete_records(path, field)]


def complete_records(path: Optional[Path], field: str) -> list:
    """Every record (a dict holding ``field``) of a file the job wrote; a torn last line (killed
    mid-write) is cut off.

    Any other line that is not such a record means the job did not write the
    file: it is refused, and not one byte of it is changed."""
    if path is None or not path.exists():
        return []
    values, good_end = [], 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or field not in record:
                    raise KeyError(field)
                values.append(record)
            except (ValueError, KeyError, TypeError, IndexError):
                if line.endswith(b"\n") or not line.startswith(b"{"):
                    raise OutputError(
                        f"line {line_no} of {path} is not a t5vh-score record: refusing to resume (and change) "
                        "a file this job did not write; name another file"
                    ) from None
                break  # the torn last line
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
                row = BadRow(row.line, row.id, DUPLICATE_ID, row.file)
            seen.add(key)
        yield row


def _id_key(row_id) -> str:
    return json.dumps(row_id, sort_keys=True, allow_nan=False)


def default_errors_path(output: Optional[Path]) -> Optional[Path]:
    """``OUTPUT.errors.jsonl`` beside a regular output; None (stderr) for stdout, a device or a pipe."""
    if not _readable(output):
        return None
    return output.with_name(output.name + ".errors.jsonl")


def _check_paths(source, output: Optional[Path], errors: Optional[Path]) -> None:
    """Input, output and errors are three different files, and the outputs are not directories."""
    for what, path in (("output", output), ("errors file", errors)):
        if path is not None and path.is_dir():
            raise OutputError(f"the {what} {path} is a directory: name a file")
    named = (("input", source), ("output", output), ("errors file", errors))
    for (a, a_path), (b, b_path) in itertools.combinations(named, 2):
        if a_path is not None and b_path is not None and same_regular_file(a_path, b_path):
            raise OutputError(
                f"the {a} and the {b} are the same file ({b_path}): writing one would destroy the other; "
                "input, output and errors must be three different files"
            )


def _readable(path: Optional[Path]) -> bool:
    """A file the job may read back: a regular file or a path not yet created (not stdout, a device or a pipe)."""
    return path is not None and is_regular_or_missing(path)


def _start(output: Optional[Path], errors: Optional[Path], fingerprint: dict) -> bool:
    """Whether this run resumes ``output`` (True) or starts it afresh; refuses (``OutputError``) an
    output the job did not write, one written with another fingerprint, and, for a fresh start, an
    errors file that already holds errors. Call it holding the output's lock."""
    sidecar = job_file(output) if _readable(output) else None
    if sidecar is not None and sidecar.exists() and output.exists():
        differences = _differences(_read_job_file(sidecar), fingerprint)
        if differences:
            raise OutputError(
                f"{output} was written by a job with other settings ({'; '.join(differences)}): resuming would "
                "mix two sets of numbers in one file; rerun with the same exports and options, or name another output"
            )
        return True
    if sidecar is not None and output.exists() and output.stat().st_size > 0:
        raise OutputError(
            f"{output} exists and was not written by t5vh-score (no {sidecar.name} beside it): refusing to change "
            "it; name another output, or delete it to start over"
        )
    if _readable(errors) and errors.exists() and errors.stat().st_size > 0:
        raise OutputError(
            f"{errors} already holds rows, and this run starts its output afresh: delete it, or name another "
            "errors file"
        )
    if sidecar is not None:
        write_json_atomic(sidecar, {"t5vh_job": JOB_FILE_FORMAT, "fingerprint": fingerprint})
    return False


def _read_job_file(sidecar: Path) -> dict:
    try:
        recorded = json.loads(sidecar.read_bytes())["fingerprint"]
        if isinstance(recorded, dict):
            return recorded
    except (ValueError, KeyError, TypeError):
        pass
    raise OutputError(f"{sidecar} is damaged: delete it and its output to start over")


def _differences(recorded: dict, current: dict) -> list:
    def show(value):
        return "none" if value is None else f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else value

    return [
        f"{key} {show(recorded.get(key))} then, {show(current.get(key))} now"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]


@contextlib.contextmanager
def _input(input_file):
    """The input as a binary file: a path, ``-`` (stdin) or an open file (text or binary)."""
    if isinstance(input_file, (str, Path)) and str(input_file) != "-":
        try:
            f = open(input_file, "rb")
        except FileNotFoundError:
            raise PathNotFound(f"input file not found: {input_file}") from None
        with f:
            yield f
    elif isinstance(input_file, (str, Path)):
        yield sys.stdin.buffer
    elif isinstance(input_file, io.TextIOBase):
        yield (
            input_file.buffer
            if hasattr(input_file, "buffer")
            else io.BytesIO(input_file.read().encode("utf-8", "surrogatepass"))
        )
    else:
        yield input_file


def _input_lines(source) -> Iterator:
    """``(line number, text or BadRow)`` per non-blank line. Each line is decoded on its own, so a byte
    that is not UTF-8 costs its line only; a UTF-8 BOM before line 1 is dropped."""
    line_no = 0
    while True:
        data = source.readline(MAX_LINE_BYTES + 1)
        if not data:
            return
        line_no += 1
        if len(data) > MAX_LINE_BYTES:
            while data and not data.endswith(b"\n"):
                data = source.readline(MAX_LINE_BYTES)
            yield line_no, BadRow(line_no, None, f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        if line_no == 1 and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8) :]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield line_no, BadRow(line_no, None, f"not UTF-8: byte 0x{data[exc.start]:02x} at byte {exc.start + 1}")
            continue
        if text.strip():
            yield line_no, text


@contextlib.contextmanager
def _appending(path: Optional[Path], default: TextIO):
    """``path`` opened for appending text (``default`` when None)."""
    if path is None:
        yield default
        return
    try:
        f = open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    try:
        yield f
    finally:
        try:
            f.close()
        except OSError:  # a failed flush was reported where it happened
            pass


def _write(f, text: str) -> None:
    """Write and flush; a failure (a full disk, a closed pipe) is one ``OutputError`` naming the file."""
    try:
        f.write(text)
        f.flush()
    except OSError as exc:
        raise OutputError(f"cannot write {getattr(f, 'name', 'the output')}: {exc.strerror or exc}") from None


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
    input_file,
    output_path: Optional[Path],
    *,
    errors_path: Optional[Path] = None,
    ref_policy=None,
    beta: float = 0.1,
    batch_size: int = 32,
    max_tokens: int = 512,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    sort_window: int = 16,
    batch_tokens: Optional[int] = None,
    fail_fast: bool = False,
    progress: bool = False,
) -> JobSummary:
    """Score ``input_file`` (a path, ``-`` or an open file) into ``output_path`` (None = stdout).

    A regular output file is locked for the run (a second job on it is
    refused) and fingerprinted in ``OUTPUT.t5vh-job.json``; when it exists with
    the same fingerprint the run resumes it, skipping ids already written, and
    otherwise refuses to touch it. Bad rows go to ``errors_path`` (None =
    stderr) with their line number and reason. Output is flushed after every
    batch. With ``fail_fast`` the first bad row raises ``InputError``.
    ``batch_tokens``: as in ``score_rows``.
    """
    _check_job_options(policy, ref_policy, beta, batch_size, max_tokens, max_query_tokens, sort_window)
    check_batch_tokens(batch_tokens)
    output_path = None if output_path is None else Path(output_path)
    errors_path = None if errors_path is None else Path(errors_path)
    fingerprint = job_fingerprint(
        policy, ref_policy, beta=float(beta), max_tokens=int(max_tokens), max_query_tokens=int(max_query_tokens)
    )
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(_input(input_file))
        files = stack.enter_context(job_files(source, output_path, errors_path, fingerprint))
        summary = JobSummary()

        def pending():
            for line_no, item in _input_lines(source):
                raw = load_json(line_no, item) if isinstance(item, str) else item
                if isinstance(raw, BadRow):
                    yield raw
                    continue
                row_id = raw.get("id") if isinstance(raw, dict) else None
                if row_id is not None and _id_key(row_id) in files.done:
                    summary.rows_skipped += 1
                    continue
                yield parse_row(line_no, raw, policy=policy, max_tokens=max_tokens, max_query_tokens=max_query_tokens)

        batches = score_batches(
            policy,
            _first_occurrences(pending()),
            ref_policy,
            beta,
            int(batch_size),
            int(sort_window),
            max_query_tokens,
            batch_tokens,
        )
        write_batches((encode(batch) for batch in batches), files, summary, fail_fast=fail_fast, progress=progress)
    return summary


@dataclass
class JobFiles:
    """A job's output and errors files, open for appending, with what an earlier run wrote to them."""

    out: TextIO  # the output, open for appending (stdout when there is no output path)
    errors: TextIO  # the errors file, open for appending (stderr when there is none)
    done: set  # ``_id_key`` of every id already in the output (empty for a fresh start)
    reported: set  # ``report_key`` of every bad row already in the errors file


@contextlib.contextmanager
def job_files(source, output_path: Optional[Path], errors_path: Optional[Path], fingerprint: dict):
    """The files of one run, for its duration: three different files, the output locked and
    fingerprinted, resumed (``done``, ``reported``) or started afresh (see ``_start``)."""
    with contextlib.ExitStack() as stack:
        _check_paths(source, output_path, errors_path)
        if _readable(output_path):
            busy = f"another t5vh-score job is writing {output_path}: wait for it to finish, or name another output"
            stack.enter_context(exclusive_lock(output_path, busy))
        resume = _start(output_path, errors_path, fingerprint)
        done = recover_output(output_path) if resume else set()
        reported = recover_errors(errors_path) if resume and _readable(errors_path) else set()
        out = stack.enter_context(_appending(output_path, sys.stdout))
        errors = stack.enter_context(_appending(errors_path, sys.stderr))
        yield JobFiles(out, errors, done, reported)


@dataclass(frozen=True)
class Output:
    """One row's result, encoded as the job writes it."""

    text: str  # the record: one line of JSON, without its newline
    error: Optional[str] = None  # why the row is bad; None when it was scored
    key: object = None  # a bad row's ``report_key`` (its line number), so that a rerun reports it once
    tokens: int = 0  # response tokens scored (0 for a bad row)

    @property
    def where(self) -> str:
        """Where a bad row is, for a message: ``line N`` or ``FILE line N``."""
        return f"{self.key[0]} line {self.key[1]}" if isinstance(self.key, tuple) else f"line {self.key}"


def encode(batch: list) -> list:
    """``Output``s of a list of ``(row, record)``: records as JSON text (NaN refused in scored ones)."""
    return [
        Output(json.dumps(record), record["error"], report_key(record))
        if "error" in record
        else Output(json.dumps(record, allow_nan=False), tokens=len(record["response_ids"]))
        for _, record in batch
    ]


def write_batches(batches, files: JobFiles, summary: JobSummary, *, fail_fast: bool, progress: bool) -> None:
    """Write each batch (a list of ``Output``) to ``files``, one write and one flush per batch, and
    count it in ``summary``; a bad row already reported by an earlier run is counted, not written."""
    from tqdm import tqdm

    bar = tqdm(unit=" rows", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch in batches:
            lines, bad_lines = [], []
            for output in batch:
                if output.error is not None:
                    if fail_fast:
                        raise InputError(f"{output.where}: {output.error} (--fail-fast)")
                    summary.rows_failed += 1
                    if output.key not in files.reported:
                        bad_lines.append(output.text + "\n")
                else:
                    summary.rows_ok += 1
                    summary.tokens += output.tokens
                    lines.append(output.text + "\n")
            _write(files.out, "".join(lines))
            _write(files.errors, "".join(bad_lines))
            bar.update(len(batch))
            bar.set_postfix_str(f"{summary.tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
    finally:
        bar.close()
        summary.elapsed_s = time.perf_counter() - start
