"""Batch scoring and rollouts on Ray Data: the ``ray`` extra (``pip install "t5vh_fast[ray]"``).

``score_dataset`` and ``respond_dataset`` map a ``ray.data.Dataset`` of rows
through a pool of actors, each holding one loaded policy (and reference),
loaded once. Rows are parsed, length-bucketed and turned into records by the
single-process job's own functions (``t5vh_fast.job``), so both write the same
records. ``run_job`` is ``t5vh-score --ray``: JSONL file or directory in, JSONL
file or directory out, resumable. Nothing else in the package imports Ray.

Errors: a ``T5vhError`` raised in a worker reaches the driver inside Ray's own
exception, as text (``[t5vh_fast.ExportError] message [/t5vh_fast]``); ``run_job``
turns it back into the ``T5vhError``, so the command line prints one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import errors as _errors
from ._files import exclusive_lock, is_within, write_json_atomic
from .errors import ClusterError, DependencyError, InputError, NonFiniteError, OutputError, PathNotFound, T5vhError
from .inputs import DEFAULT_MAX_QUERY_TOKENS, check_positive_int, check_sampling_options, check_seed, pad_batch
from .job import (
    DUPLICATE_ID,
    BadRow,
    JobSummary,
    Output,
    Row,
    _check_job_options,
    _differences,
    _first_occurrences,
    _id_key,
    _input_lines,
    _read_job_file,
    check_batch_tokens,
    complete_records,
    default_errors_path,
    encode,
    in_windows,
    job_file,
    job_files,
    job_fingerprint,
    load_json,
    parse_query,
    parse_row,
    report_key,
    score_batches,
    write_batches,
)
from .manifest import read_manifest
from .policy import read_config, read_tokenizer

try:
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink, FileBasedDatasource
except ImportError as _exc:
    raise DependencyError(f'Ray Data is not installed ({_exc}): pip install "t5vh_fast[ray]"') from None

JSONL_COLUMNS = ("file", "line", "json", "bad")  # the rows read_jsonl makes
OUTPUT_SCHEMA = pa.schema([("record", pa.string()), ("error", pa.string()), ("tokens", pa.int64())])
JSONL_EXTENSIONS = ["jsonl", "json", "jsonl.gz", "json.gz", "jsonl.zst", "json.zst", "jsonl.bz2", "json.bz2"]
ROWS_PER_FILE = 20_000  # rows per output file when the output is a directory
PROBE_TIMEOUT_S = 5.0  # how long a cluster address may take to accept a connection
_BLOCK_ROWS = 4096  # rows per block read_jsonl yields


# ---------------------------------------------------------------------- row ids and their random numbers


def row_hash(row_id) -> int:
    """The 64-bit hash of a row id that seeds the row's random numbers (docs/contract.md):
    the first 8 bytes, little-endian, of ``blake2b(json.dumps(id, sort_keys=True), digest_size=8)``."""
    digest = hashlib.blake2b(_id_key(row_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def row_uniforms(seed: int, row_id, txt_len: int) -> np.ndarray:
    """The ``txt_len`` uniforms ``respond_dataset`` samples row ``row_id`` with:
    ``Generator(PCG64([seed, row_hash(row_id)])).random(txt_len)``, whatever the batch or actor."""
    return np.random.Generator(np.random.PCG64([int(seed), row_hash(row_id)])).random(int(txt_len))


def _digest(key: str) -> bytes:
    """16 bytes standing for an id key: sets of ids travel to actors as sorted arrays of these."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def _sorted_digests(keys) -> np.ndarray:
    return np.sort(np.array([_digest(k) for k in keys], dtype="S16"))


def _contains(sorted_digests: np.ndarray, key: str) -> bool:
    if len(sorted_digests) == 0:
        return False
    digest = np.array(_digest(key), dtype="S16")
    i = int(np.searchsorted(sorted_digests, digest))
    return i < len(sorted_digests) and sorted_digests[i] == digest


# ---------------------------------------------------------------------- reading JSONL


def read_jsonl(path: Union[str, Path], **read_args) -> ray.data.Dataset:
    """A JSONL file, or a directory of them, as rows ``file, line, json, bad``: each non-blank line's
    text, read by the job's own line reader (a line that is not UTF-8 or is over 16 MiB has the
    reason in ``bad``; a BOM before line 1 is dropped). ``file`` is the path within the directory
    (None for a single file); ``line`` counts from 1 in its file. ``score_dataset`` and
    ``respond_dataset`` parse these rows exactly as ``t5vh-score`` parses its input."""
    path = str(path)
    is_dir = os.path.isdir(path)
    source = _JsonlSource(
        path, root=os.path.abspath(path) if is_dir else None, file_extensions=JSONL_EXTENSIONS if is_dir else None
    )
    return ray.data.read_datasource(source, **read_args)


class _JsonlSource(FileBasedDatasource):
    def __init__(self, paths, *, root: Optional[str], **kwargs):
        super().__init__(paths, **kwargs)
        self._root = root

    def _read_stream(self, f, path: str):
        label = None if self._root is None else Path(os.path.relpath(path, self._root)).as_posix()
        lines, texts, bads = [], [], []
        for line_no, item in _input_lines(io.BufferedReader(_RawStream(f), 1 << 20)):
            lines.append(line_no)
            texts.append(item if isinstance(item, str) else None)
            bads.append(item.reason if isinstance(item, BadRow) else None)
            if len(lines) == _BLOCK_ROWS:
                yield _jsonl_block(label, lines, texts, bads)
                lines, texts, bads = [], [], []
        if lines:
            yield _jsonl_block(label, lines, texts, bads)


def _jsonl_block(label, lines, texts, bads):
    return pa.table(
        {"file": pa.array([label] * len(lines), pa.string()), "line": lines, "json": texts, "bad": bads},
        schema=pa.schema([("file", pa.string()), ("line", pa.int64()), ("json", pa.string()), ("bad", pa.string())]),
    )


class _RawStream(io.RawIOBase):
    """A pyarrow input stream as a raw Python file, so ``io.BufferedReader.readline(limit)`` works."""

    def __init__(self, f):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# ---------------------------------------------------------------------- parsing rows in a worker


@dataclasses.dataclass
class _Vocab:
    """What parsing a row needs of a policy (tokenizer, vocabulary size) without loading its graphs."""

    root: Path  # the export directory
    vocab_size: int  # from its config.json, as OnnxPolicy reads it
    _tokenizer: object = None  # read on first use: rows of token ids never need it

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = read_tokenizer(self.root)
        return self._tokenizer


def _vocab(export_dir) -> _Vocab:
    root = Path(export_dir).expanduser()
    return _Vocab(root, int(read_config(root)["vocab_size"]))


def _parse(table, policy, *, respond: bool, max_tokens: int, max_query_tokens: int, done=None, later=None):
    """``(parsed rows, rows skipped)`` of a batch: ``Row`` or ``BadRow`` each, as the job parses them.

    ``done``: sorted id digests already written (rows with those ids are
    skipped, as a resumed job skips them); ``later``: ``(file, line)`` of rows
    whose id an earlier row of the whole input has, found by
    ``_later_duplicates``; None checks for duplicates within this batch only."""
    jsonl = set(table.column_names) == set(JSONL_COLUMNS)
    parsed, skipped = [], 0
    for row in table.to_pylist():
        file, line = row.get("file"), row.get("line")
        if jsonl:
            raw = BadRow(line, None, row["bad"]) if row["bad"] is not None else load_json(line, row["json"])
        else:
            raw = row
        if isinstance(raw, BadRow):
            parsed.append(dataclasses.replace(raw, file=file))
            continue
        if done is not None and _is_done(done, raw):
            skipped += 1
            continue
        if respond:
            item = parse_query(line, raw, policy=policy, max_query_tokens=max_query_tokens)
        else:
            item = parse_row(line, raw, policy=policy, max_tokens=max_tokens, max_query_tokens=max_query_tokens)
        item = dataclasses.replace(item, file=file)
        if later is not None and isinstance(item, Row) and (file, line) in later:
            item = BadRow(line, item.id, DUPLICATE_ID, file)
        parsed.append(item)
    if later is None and not respond:
        parsed = list(_first_occurrences(parsed))
    return parsed, skipped


def _is_done(done: np.ndarray, raw) -> bool:
    row_id = raw.get("id") if isinstance(raw, dict) else None
    if row_id is None:
        return False
    try:
        return _contains(done, _id_key(row_id))
    except (TypeError, ValueError):  # not an id the job accepts: parse_row says so
        return False


def _output_table(outputs: Sequence[Output], skipped: int = 0):
    """The rows a worker returns: one per input row; a skipped row has no record."""
    return pa.table(
        {
            "record": [o.text for o in outputs] + [None] * skipped,
            "error": [o.error for o in outputs] + [None] * skipped,
            "tokens": [o.tokens for o in outputs] + [0] * skipped,
        },
        schema=OUTPUT_SCHEMA,
    )


_MARK = re.compile(r"\[t5vh_fast\.(\w+)\] (.*?) \[/t5vh_fast\]", re.S)


class _Carried(RuntimeError):
    """A ``T5vhError`` leaving a Ray worker: Ray passes its text on, and ``_user_error`` reads it back."""


@contextlib.contextmanager
def _carried():
    try:
        yield
    except T5vhError as exc:
        raise _Carried(f"[t5vh_fast.{type(exc).__name__}] {exc} [/t5vh_fast]") from None


def _user_error(exc: BaseException) -> Optional[T5vhError]:
    """The ``T5vhError`` a worker raised, rebuilt from the text of Ray's exception; None if none."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, T5vhError) and not isinstance(e, ray.exceptions.RayError):
            return e
        match = _MARK.search(str(e))
        if match:
            cls = getattr(_errors, match.group(1), None)
            if isinstance(cls, type) and issubclass(cls, T5vhError):
                return cls(match.group(2))
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


class _Worker:
    """One actor: loads its policy (and reference) once. A load that fails (a tampered export, a
    GPU that does not start) is raised by the actor's first batch, as a task error, which Ray Data
    does not retry: the job stops with it. (Raised in ``__init__`` it would kill the actor, and
    whether Ray then starts another depends on its version and ``DataContext`` settings.)"""

    def __init__(self, export_dir, ref_dir, load_options: dict):
        from .policy import load

        self.error = None
        try:
            self.policy = load(export_dir, **load_options)
            self.ref = None if ref_dir is None else load(ref_dir, **load_options)
        except T5vhError as exc:
            self.error = exc

    def __call__(self, table):
        with _carried():
            if self.error is not None:
                raise self.error
            return self.run(table)


class _Scorer(_Worker):
    def __init__(self, export_dir, ref_dir, load_options: dict, options: dict, done, later):
        super().__init__(export_dir, ref_dir, {**load_options, "for_scoring": True})
        self.options, self.done, self.later = options, done, later

    def run(self, table):
        o = self.options
        parsed, skipped = _parse(
            table,
            self.policy,
            respond=False,
            max_tokens=o["max_tokens"],
            max_query_tokens=o["max_query_tokens"],
            done=self.done,
            later=self.later,
        )
        batches = score_batches(
            self.policy,
            parsed,
            self.ref,
            o["beta"],
            o["batch_size"],
            o["sort_window"],
            o["max_query_tokens"],
            o.get("batch_tokens"),
        )
        return _output_table([out for batch in batches for out in encode(batch)], skipped)


class _Responder(_Worker):
    def __init__(self, export_dir, load_options: dict, options: dict):
        super().__init__(export_dir, None, load_options)
        self.options = options

    def run(self, table):
        o = self.options
        parsed, _ = _parse(table, self.policy, respond=True, max_tokens=0, max_query_tokens=o["max_query_tokens"])
        batches = in_windows(parsed, o["batch_size"], o["sort_window"], self.respond)
        return _output_table([out for batch in batches for out in encode(batch)])

    def respond(self, batch: list) -> list:
        o = self.options
        ids, mask = pad_batch([r.query_ids for r in batch], pad_id=self.policy.pad_token_id)
        uniforms = np.stack([row_uniforms(o["seed"], r.id, o["txt_len"]) for r in batch])
        try:
            rollout = self.policy.respond_to_batch(
                ids,
                mask,
                txt_len=o["txt_len"],
                top_k=o["top_k"],
                top_p=o["top_p"],
                uniforms=uniforms,
                max_query_tokens=o["max_query_tokens"],
            )
        except NonFiniteError as exc:
            if exc.row is None:
                raise
            row = batch[exc.row]
            raise NonFiniteError(f"line {row.line} (id {row.id!r}): {exc}", row=exc.row) from None
        records = []
        for i, row in enumerate(batch):
            record = {
                "id": row.id,
                "query_ids": row.query_ids,
                "response_ids": rollout.tokens[i].tolist(),
                "logprobs": rollout.logprobs[i].tolist(),
                "values": rollout.values[i].tolist(),
                "weights_version": rollout.weights_version,
                "precision": rollout.precision,
            }
            if rollout.sampling_logprobs is not None:
                record["sampling_logprobs"] = rollout.sampling_logprobs[i].tolist()
            records.append(record)
        return records


# ---------------------------------------------------------------------- the public calls


def score_dataset(
    ds: ray.data.Dataset,
    export_dir,
    *,
    ref_dir=None,
    beta: float = 0.1,
    batch_size: int = 32,
    max_tokens: int = 512,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    sort_window: int = 16,
    batch_tokens: Optional[int] = None,
    concurrency: Optional[int] = None,
    providers: Union[str, Sequence[str]] = "auto",
    threads: Optional[int] = None,
    num_cpus: Optional[float] = None,
    skip_ids: Sequence = (),
) -> ray.data.Dataset:
    """Score every row of ``ds`` as ``t5vh-score`` does; returns a lazy ``ray.data.Dataset``.

    ``ds`` rows: as ``read_jsonl`` makes them (JSONL lines, parsed here), or
    objects with the job's input fields (``id``, ``query``/``query_ids``,
    ``response``/``response_ids``, ``score``; from ``read_parquet``, ...),
    optionally with ``line`` (and ``file``), which error records echo.

    Each output row is one input row: ``record`` (the JSON line ``t5vh-score``
    writes for it: scores, or ``line, id, error`` for a bad row), ``error``
    (the reason for a bad row, else null) and ``tokens`` (response tokens
    scored). Output order is not input order: match on ``id``.

    Duplicate ids: when rows carry ``line``, this call first reads the input
    once to find every id an earlier row (by ``file``, then ``line``) already
    had, and such rows become bad rows, as in the job; without ``line`` only
    rows in the same batch of ``batch_size * sort_window`` rows are compared.
    ``skip_ids``: ids to leave out (a resumed job's), counted as skipped.

    Actors: ``concurrency`` of them (default: one per GPU under CUDA, else one
    per ``num_cpus`` CPUs of the cluster, less one CPU left for reading), each
    loading the policy and reference once with ``providers`` and ``threads``
    (default: ``num_cpus``) onnxruntime threads, and asking Ray for
    ``num_cpus`` CPUs (default 1) and, under CUDA, one GPU.
    """
    vocab, ref_vocab = _check_exports(export_dir, ref_dir)
    _check_job_options(vocab, ref_vocab, beta, batch_size, max_tokens, max_query_tokens, sort_window)
    check_batch_tokens(batch_tokens)
    resources, load_options = _actor_pool(providers, concurrency, num_cpus, threads)
    later = _later_duplicates(ds, export_dir, max_tokens, max_query_tokens) if "line" in _columns(ds) else None
    options = dict(
        beta=float(beta),
        batch_size=int(batch_size),
        max_tokens=int(max_tokens),
        max_query_tokens=int(max_query_tokens),
        sort_window=int(sort_window),
        batch_tokens=batch_tokens,
    )
    done = _sorted_digests(_id_key(i) for i in skip_ids)
    return ds.map_batches(
        _Scorer,
        fn_constructor_kwargs=dict(
            export_dir=str(export_dir),
            ref_dir=None if ref_dir is None else str(ref_dir),
            load_options=load_options,
            options=options,
            done=done,
            later=later,
        ),
        batch_size=int(batch_size) * int(sort_window),
        batch_format="pyarrow",
        **resources,
    )


def respond_dataset(
    ds: ray.data.Dataset,
    export_dir,
    *,
    txt_len: int,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int,
    batch_size: int = 32,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    sort_window: int = 16,
    concurrency: Optional[int] = None,
    providers: Union[str, Sequence[str]] = "auto",
    threads: Optional[int] = None,
    num_cpus: Optional[float] = None,
) -> ray.data.Dataset:
    """Sample one response of exactly ``txt_len`` tokens per row of ``ds``; returns a lazy Dataset.

    ``ds`` rows: ``id`` and ``query`` (text) or ``query_ids``, as objects or as
    ``read_jsonl`` lines. Output rows as in ``score_dataset``; a record is
    ``id, query_ids, response_ids, logprobs, values, weights_version,
    precision`` (and ``sampling_logprobs`` when ``top_k``/``top_p`` filter), ready for
    ``score_dataset``. A bad row gives ``line, id, error``.

    Randomness: row ``id`` is sampled with ``row_uniforms(seed, id, txt_len)``
    (numpy ``PCG64([seed, row_hash(id)])``, docs/contract.md), so its tokens do
    not depend on how Ray splits the data into batches or actors; rows with the
    same id get the same random numbers. Actors as in ``score_dataset``.
    """
    check_sampling_options(txt_len, top_k, top_p)
    if seed is None:
        raise InputError("seed must be an integer >= 0: every row's random numbers derive from it and its id")
    check_seed(seed)
    for name, value in (
        ("batch_size", batch_size),
        ("max_query_tokens", max_query_tokens),
        ("sort_window", sort_window),
    ):
        check_positive_int(name, value)
    _check_exports(export_dir, None)
    resources, load_options = _actor_pool(providers, concurrency, num_cpus, threads)
    options = dict(
        txt_len=int(txt_len),
        top_k=int(top_k),
        top_p=float(top_p),
        seed=int(seed),
        batch_size=int(batch_size),
        max_query_tokens=int(max_query_tokens),
        sort_window=int(sort_window),
    )
    return ds.map_batches(
        _Responder,
        fn_constructor_kwargs=dict(export_dir=str(export_dir), load_options=load_options, options=options),
        batch_size=int(batch_size) * int(sort_window),
        batch_format="pyarrow",
        **resources,
    )


def _check_exports(export_dir, ref_dir):
    """Vocabularies of the policy's and the reference's exports, checked to be exports (no graph loaded)."""
    out = []
    for d in (export_dir, ref_dir):
        if d is None:
            out.append(None)
            continue
        read_manifest(Path(d).expanduser())
        out.append(_vocab(d))
    return out


def _columns(ds) -> list:
    schema = ds.schema()
    return [] if schema is None else list(schema.names)


def _actor_pool(providers, concurrency, num_cpus, threads):
    """``(map_batches resource arguments, load options)``: the actor pool and what each actor asks for."""
    if concurrency is not None:
        check_positive_int("concurrency", concurrency)
    if threads is not None:
        check_positive_int("threads", threads)
    if num_cpus is not None and not (isinstance(num_cpus, (int, float)) and num_cpus > 0):
        raise InputError(f"num_cpus must be a number > 0 (CPUs Ray reserves per actor), got {num_cpus!r}")
    _ensure_ray()
    cluster = ray.cluster_resources()
    cpus, gpus = float(cluster.get("CPU", 0)), int(cluster.get("GPU", 0))
    wants_gpu = _wants_gpu(providers)
    use_gpu = wants_gpu is True or (wants_gpu is None and gpus > 0)
    per_actor_cpus = float(num_cpus or 1)
    if use_gpu:
        if gpus < 1:
            raise InputError(
                f"providers={providers!r} needs a GPU, and the Ray cluster has none: use providers='cpu', or add GPU nodes"
            )
        size = concurrency or gpus
        if size > gpus:
            raise InputError(f"concurrency {size} needs {size} GPUs (one per actor), the cluster has {gpus}: lower it")
        resources = dict(num_cpus=per_actor_cpus, num_gpus=1)
    else:
        size = concurrency or max(1, int((cpus - 1) // per_actor_cpus))
        resources = dict(num_cpus=per_actor_cpus)
    if size * per_actor_cpus > cpus - 1:
        raise InputError(
            f"{size} actors x {per_actor_cpus:g} CPUs need {size * per_actor_cpus:g} of the cluster's {cpus:g} CPUs, "
            "and reading the input needs one more (an actor pool holding every CPU starves the reads and the job "
            "hangs): lower concurrency, or give each actor a fraction of a CPU (num_cpus=0.5)"
        )
    load_options = dict(providers=providers, threads=threads or max(1, int(per_actor_cpus)))
    return dict(compute=ray.data.ActorPoolStrategy(size=int(size)), **resources), load_options


def _wants_gpu(providers) -> Optional[bool]:
    """True for providers that run on a GPU, False for the CPU, None for "auto" (a GPU if there is one)."""
    names = [providers.lower()] if isinstance(providers, str) else [str(p).lower() for p in providers]
    if names == ["auto"]:
        return None
    if names == ["cpu"]:
        return False
    if names[0] in ("cuda", "tensorrt") or any("cuda" in n or "tensorrt" in n for n in names):
        return True
    if isinstance(providers, str):
        raise InputError(
            f"providers={providers!r} is not one of 'auto', 'cpu', 'cuda', 'tensorrt' or a list of provider names"
        )
    return False


def _ensure_ray() -> None:
    if not ray.is_initialized():
        connect("auto")


def _later_duplicates(ds, export_dir, max_tokens: int, max_query_tokens: int) -> set:
    """``(file, line)`` of every valid row whose id an earlier valid row had (by file, then line):
    the rows the job reports as duplicates. One pass over the input, with Ray tasks; the driver
    holds 16 bytes and a position per row."""
    scan = ds.map_batches(
        _scan_ids,
        fn_kwargs=dict(export_dir=str(export_dir), max_tokens=int(max_tokens), max_query_tokens=int(max_query_tokens)),
        batch_format="pyarrow",
        batch_size=4096,
    )
    keys, files, lines, names = [], [], [], {}
    for table in scan.iter_batches(batch_format="pyarrow", batch_size=None):
        if table.num_rows == 0:
            continue
        keys.append(np.array(table["key"].to_pylist(), dtype="S16"))
        files.append(np.array([names.setdefault(f, len(names)) for f in table["file"].to_pylist()], dtype=np.int64))
        lines.append(np.asarray(table["line"].to_numpy(zero_copy_only=False), dtype=np.int64))
    if not keys:
        return set()
    keys, files, lines = np.concatenate(keys), np.concatenate(files), np.concatenate(lines)
    in_order = sorted(names, key=lambda name: name or "")  # files by name; None (a single file) alone
    file_rank = np.array([in_order.index(name) for name in names], dtype=np.int64)[files]
    order = np.lexsort((lines, file_rank, keys))
    repeated = np.zeros(len(order), dtype=bool)
    repeated[1:] = keys[order][1:] == keys[order][:-1]
    by_code = {code: name for name, code in names.items()}
    return {(by_code[int(files[i])], int(lines[i])) for i in order[repeated]}


_VOCABS: dict = {}  # per worker process: the tokenizer of an export is read once


def _scan_ids(table, *, export_dir: str, max_tokens: int, max_query_tokens: int):
    with _carried():
        vocab = _VOCABS.get(export_dir) or _VOCABS.setdefault(export_dir, _vocab(export_dir))
        # later=set(): no duplicate check here (this scan is what finds them)
        parsed, _ = _parse(
            table, vocab, respond=False, max_tokens=max_tokens, max_query_tokens=max_query_tokens, later=set()
        )
        rows = [r for r in parsed if isinstance(r, Row)]
        return pa.table(
            {
                "key": pa.array([_digest(_id_key(r.id)) for r in rows], pa.binary(16)),
                "file": pa.array([r.file for r in rows], pa.string()),
                "line": pa.array([r.line for r in rows], pa.int64()),
            }
        )


# ---------------------------------------------------------------------- connecting


def connect(address: Optional[str] = "auto") -> bool:
    """Join a Ray cluster; True when this call did (so the caller disconnects), False when this
    process already had one.

    ``"auto"``: the cluster ``RAY_ADDRESS`` names or one started on this machine
    (``ray start --head``), else a new local one; ``ADDRESS``: ``host:port`` of
    a head node (6379 by default) or ``ray://host:port`` (Ray Client). An
    address that does not accept a connection within a few seconds is a
    ``ClusterError`` (Ray itself would wait for minutes)."""
    named = os.environ.get("RAY_ADDRESS") if address in (None, "auto") else address
    if named and named not in ("auto", "local"):
        _probe(named)
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.ERROR)
    try:
        if address in (None, "auto"):
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:  # no cluster to join: start one here
                ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return True


def _probe(address: str) -> None:
    """Connect to the head's port once, with a timeout, before Ray's own (much longer) waiting."""
    target = address.split("://", 1)[-1].rsplit("/", 1)[0]
    default_port = 10001 if address.startswith("ray://") else 6379
    host, _, port = target.rpartition(":") if ":" in target else (target, "", str(default_port))
    try:
        port = int(port)
        with socket.create_connection((host.strip("[]"), port), timeout=PROBE_TIMEOUT_S):
            pass
    except ValueError:
        raise ClusterError(f"--ray {address!r} is not an address: give host:port of the head node, or auto") from None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({reason} within {PROBE_TIMEOUT_S:g} s): start it there with "
            "`ray start --head`, check the host and port (the head's GCS port, 6379 by default), or use --ray auto"
        ) from None


# ---------------------------------------------------------------------- t5vh-score --ray


def run_job(
    export_dir,
    input_path,
    output,
    *,
    errors=None,
    ref_dir=None,
    beta: float = 0.1,
    batch_size: int = 32,
    max_tokens: int = 512,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    sort_window: int = 16,
    batch_tokens: Optional[int] = None,
    fail_fast: bool = False,
    progress: bool = False,
    address: Optional[str] = "auto",
    concurrency: Optional[int] = None,
    providers: Union[str, Sequence[str]] = "auto",
    threads: Optional[int] = None,
    rows_per_file: int = ROWS_PER_FILE,
):
    """``t5vh-score --ray``: score ``input_path`` (a JSONL file or a directory of them) into
    ``output``; returns ``(JobSummary, where the bad rows went)``.

    ``output``: a file (or ``-``, stdout), written by this process as the
    single-process job writes it; or a directory (one that exists, or a name
    ending in ``/``), written by Ray as ``part-*.jsonl`` files of up to
    ``rows_per_file`` rows, with bad rows in ``errors`` (a directory, default
    ``OUTPUT.errors``). Either is fingerprinted (``OUTPUT.t5vh-job.json``),
    locked while the job runs, and resumed by running the same command
    again: ids already written are skipped, so no row is written twice.
    """
    vocab, ref_vocab = _check_exports(export_dir, ref_dir)
    _check_job_options(vocab, ref_vocab, beta, batch_size, max_tokens, max_query_tokens, sort_window)
    check_batch_tokens(batch_tokens)
    check_positive_int("rows_per_file", rows_per_file)
    source = Path(input_path)
    if not source.exists():
        raise PathNotFound(f"input not found: {source}")
    if source.is_dir() and not any(p.is_file() and _is_jsonl(p) for p in source.rglob("*")):
        raise PathNotFound(f"{source} holds no JSONL files (*.jsonl, *.json, compressed or not)")
    to_dir = output not in (None, "-") and (str(output).endswith(("/", os.sep)) or Path(output).is_dir())
    output_path = None if output in (None, "-") else Path(output)
    if to_dir:
        errors_path = Path(errors) if errors not in (None, "-") else output_path.with_name(output_path.name + ".errors")
        if errors == "-":
            raise OutputError("a directory output writes bad rows to a directory (--errors DIR), not to stderr")
    else:
        errors_path = default_errors_path(output_path) if errors is None else (None if errors == "-" else Path(errors))
    _check_layout(source, output_path, errors_path)
    fingerprint = job_fingerprint(
        export_dir, ref_dir, beta=float(beta), max_tokens=int(max_tokens), max_query_tokens=int(max_query_tokens)
    )
    options = dict(
        ref_dir=ref_dir,
        beta=beta,
        batch_size=batch_size,
        max_tokens=max_tokens,
        max_query_tokens=max_query_tokens,
        sort_window=sort_window,
        batch_tokens=batch_tokens,
        concurrency=concurrency,
        providers=providers,
        threads=threads,
    )
    start = time.perf_counter()
    joined = connect(address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress and to_dir
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors come out as ours, or as a traceback
    try:
        with _user_errors():
            if to_dir:
                summary = _run_to_dir(
                    export_dir, source, output_path, errors_path, fingerprint, options, rows_per_file, fail_fast
                )
            else:
                summary = _run_to_file(
                    export_dir, source, output_path, errors_path, fingerprint, options, fail_fast, progress
                )
    finally:
        if joined:
            ray.shutdown()
    summary.elapsed_s = time.perf_counter() - start
    return summary, errors_path


def _is_jsonl(path: Path) -> bool:
    return any(path.name.endswith("." + ext) for ext in JSONL_EXTENSIONS) and not path.name.startswith((".", "_"))


def _check_layout(source: Path, output: Optional[Path], errors: Optional[Path]) -> None:
    """No output inside the input directory (it would be read as input), and no input inside an output."""
    for what, path in (("output", output), ("errors", errors)):
        if path is None:
            continue
        if source.is_dir() and is_within(path, source):
            raise OutputError(
                f"the {what} {path} is inside the input directory {source}: it would be read as input; "
                "write it elsewhere"
            )
        if is_within(source, path):
            raise OutputError(f"the input {source} is inside the {what} {path}: name another {what}")
    if output is not None and errors is not None and (is_within(errors, output) or is_within(output, errors)):
        raise OutputError(f"the output {output} and the errors {errors} overlap: name two separate places")


@contextlib.contextmanager
def _user_errors():
    """A ``T5vhError`` a worker raised comes out as itself, not inside Ray's exception."""
    try:
        yield
    except T5vhError:
        raise
    except Exception as exc:
        error = _user_error(exc)
        if error is None:
            raise
        raise error from None


def _run_to_file(export_dir, source, output_path, errors_path, fingerprint, options, fail_fast, progress):
    with job_files(source, output_path, errors_path, fingerprint) as files:
        summary = JobSummary()
        scored = score_dataset(read_jsonl(source), export_dir, skip_ids=_keys_to_ids(files.done), **options)

        def batches():
            for table in scored.iter_batches(batch_format="pyarrow", batch_size=None):
                outputs = []
                for text, error, tokens in zip(*(table[c].to_pylist() for c in ("record", "error", "tokens"))):
                    if text is None:
                        summary.rows_skipped += 1
                    elif error is None:
                        outputs.append(Output(text, tokens=tokens))
                    else:
                        outputs.append(Output(text, error, report_key(json.loads(text))))
                yield outputs

        write_batches(batches(), files, summary, fail_fast=fail_fast, progress=progress)
    return summary


def _keys_to_ids(keys) -> list:
    """Ids back from their ``_id_key`` (JSON) form."""
    return [json.loads(k) for k in keys]


# ---------------------------------------------------------------------- a directory output


def _run_to_dir(export_dir, source, out_dir, errors_dir, fingerprint, options, rows_per_file, fail_fast):
    busy = f"another t5vh-score job is writing {out_dir}: wait for it to finish, or name another output"
    with exclusive_lock(out_dir, busy):
        done, reported = _start_dir(out_dir, errors_dir, fingerprint)
        scored = score_dataset(read_jsonl(source), export_dir, skip_ids=done, **options)
        sink = _PartsSink(out_dir, errors_dir, ray.put(reported), fail_fast, rows_per_file)
        scored.write_datasink(sink)
    return sink.summary


def _start_dir(out_dir: Path, errors_dir: Path, fingerprint: dict):
    """``(ids already written, bad rows already reported)`` of a directory output, after checking
    this job may write it (as ``job._start`` checks a file) and removing what a killed run left."""
    sidecar = job_file(out_dir)
    for what, d in (("output", out_dir), ("errors", errors_dir)):
        if d.exists() and not d.is_dir():
            raise OutputError(f"the {what} {d} is a file, and this job writes a directory there: name a directory")
    if sidecar.exists() and out_dir.exists():
        differences = _differences(_read_job_file(sidecar), fingerprint)
        if differences:
            raise OutputError(
                f"{out_dir} was written by a job with other settings ({'; '.join(differences)}): resuming would "
                "mix two sets of numbers in one output; rerun with the same exports and options, or name another output"
            )
    else:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise OutputError(
                f"{out_dir} exists and was not written by t5vh-score (no {sidecar.name} beside it): refusing to change "
                "it; name another output, or delete it to start over"
            )
        if errors_dir.exists() and any(errors_dir.iterdir()):
            raise OutputError(
                f"{errors_dir} already holds rows, and this run starts its output afresh: delete it, or name another "
                "errors directory"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sidecar, {"t5vh_job": 1, "fingerprint": fingerprint})
    errors_dir.mkdir(parents=True, exist_ok=True)
    done, reported = [], set()
    for d, field in ((out_dir, "id"), (errors_dir, "line")):
        for path in sorted(d.iterdir()):
            if _PART.fullmatch(path.name) and path.is_file():
                records = complete_records(path, field)
                if field == "id":
                    done += [r["id"] for r in records]
                else:
                    reported |= {report_key(r) for r in records}
            elif _LEFTOVER.fullmatch(path.name):
                path.unlink()  # a part a killed run was writing: its rows are scored again
            else:
                raise OutputError(f"{path} was not written by t5vh-score: refusing to resume into {d}; move it away")
    return done, reported


_PART = re.compile(r"part-[0-9a-f]{32}\.jsonl")
_LEFTOVER = re.compile(r"\.part-[0-9a-f]{32}\.jsonl\.tmp")


class _PartsSink(Datasink):
    """Writes each write task's rows as ``part-<uuid>.jsonl`` (scored) in the output directory and
    the same name in the errors directory (bad rows), each renamed into place when complete, so a
    killed job leaves whole files only (and ``.part-*.tmp``, removed by the next run)."""

    def __init__(self, out_dir: Path, errors_dir: Path, reported, fail_fast: bool, rows_per_file: int):
        self.out_dir, self.errors_dir = str(out_dir), str(errors_dir)
        self.reported = reported  # an ObjectRef of the set of report keys an earlier run wrote
        self.fail_fast = fail_fast
        self.rows_per_file = rows_per_file
        self.summary = JobSummary()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        with _carried():
            reported = ray.get(self.reported)
            name = f"part-{uuid.uuid4().hex}.jsonl"
            counts = dict(ok=0, failed=0, skipped=0, tokens=0)
            with _Part(self.out_dir, name) as out, _Part(self.errors_dir, name) as errors:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    good, bad = [], []
                    for text, error, tokens in zip(*(table[c].to_pylist() for c in ("record", "error", "tokens"))):
                        if text is None:
                            counts["skipped"] += 1
                        elif error is None:
                            counts["ok"] += 1
                            counts["tokens"] += tokens
                            good.append(text + "\n")
                        else:
                            output = Output(text, error, report_key(json.loads(text)))
                            if self.fail_fast:
                                raise InputError(f"{output.where}: {error} (--fail-fast)")
                            counts["failed"] += 1
                            if output.key not in reported:
                                bad.append(text + "\n")
                    out.write("".join(good))
                    errors.write("".join(bad))
            return counts

    def on_write_complete(self, write_result) -> None:
        returns = getattr(write_result, "write_returns", write_result)
        for counts in returns:
            self.summary.rows_ok += counts["ok"]
            self.summary.rows_failed += counts["failed"]
            self.summary.rows_skipped += counts["skipped"]
            self.summary.tokens += counts["tokens"]


class _Part:
    """A part file written under a hidden temporary name and renamed into place on success
    (not created at all when nothing was written to it)."""

    def __init__(self, directory: str, name: str):
        self.final = os.path.join(directory, name)
        self.tmp = os.path.join(directory, f".{name}.tmp")
        self.f = None

    def __enter__(self):
        return self

    def write(self, text: str) -> None:
        if not text:
            return
        try:
            if self.f is None:
                self.f = open(self.tmp, "w", encoding="utf-8")
            self.f.write(text)
        except OSError as exc:
            raise OutputError(f"cannot write {self.tmp}: {exc.strerror or exc}") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.f is None:
            return
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.final)
        else:
            os.unlink(self.tmp)
