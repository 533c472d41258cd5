"""Issue 9, one section per class: bad paths, devices, two jobs, odd bytes, NaN, long queries,
one-line errors, interrupted exports, score_rows, resume fingerprints.

Every refusal asserts the exit status, one line naming the problem, no
traceback, and that no byte of any file the user had changed. Tests that need
processes wait on observable events (a line in the output, a process exit)
with timeouts, never on sleeps alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import t5vh_fast
from t5vh_fast import job as job_module
from t5vh_fast import scoring
from t5vh_fast._files import exclusive_lock, same_regular_file, write_json_atomic
from t5vh_fast.cli import export_command, sample_command, score_command
from t5vh_fast.demo import build_model
from t5vh_fast.errors import InputError, NonFiniteError, OutputError
from t5vh_fast.export import export
from t5vh_fast.job import score_rows
from t5vh_fast.manifest import MANIFEST_NAME

TIMEOUT = 120  # seconds any one process may take before the test fails instead of hanging


# ---------------------------------------------------------------------- helpers


def rows(n: int, start: int = 0, *, response=(7, 8, 9)) -> str:
    return "".join(
        json.dumps({"id": i, "query_ids": [5 + i % 40, 6, 1], "response_ids": list(response)}) + "\n"
        for i in range(start, start + n)
    )


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes (and nothing else): what "unchanged" is checked against."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *phrases: str) -> str:
    """Exit status 1, the package's one-line error naming the problem, and no traceback."""
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}: {result.output}"
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), result.output
    for phrase in phrases:
        assert phrase in line, line
    return line


def strict_json(line: str):
    """``json.loads`` that refuses NaN and Infinity, as any other JSON parser does."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def score(export_dir: Path, *args: str):
    return CliRunner().invoke(score_command, [str(export_dir), *args, "--providers", "cpu"])


def score_cmd(export_dir: Path, *args: str) -> list:
    return [sys.executable, "-m", "t5vh_fast", "score", str(export_dir), *args, "--providers", "cpu"]


def wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def with_manifest_hash(export_dir: Path, name: str) -> None:
    """Record ``name``'s current sha256 in the manifest, as a tampering user (or an old exporter) would."""
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text())
    manifest["files"][name] = hashlib.sha256((export_dir / name).read_bytes()).hexdigest()
    (export_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def nan_export(tiny_export, tmp_path_factory):
    """The tiny export with one NaN in the embedding row of token 9, hashes updated to match:
    what an exporter that let NaN pass as parity wrote. Any query holding token 9 gives NaN."""
    out = tmp_path_factory.mktemp("nan") / "nan-onnx"
    shutil.copytree(tiny_export, out)
    embedding = np.load(out / "t5vh_embedding.npy")
    embedding[9, 0] = np.nan
    np.save(out / "t5vh_embedding.npy", embedding)
    with_manifest_hash(out, "t5vh_embedding.npy")
    return out


# ---------------------------------------------------------------------- 1. a path never destroys what the user had


def _export_layout(tmp_path: Path, tiny_dir: Path, case: str):
    """(model directory, -o) for one way of pointing an export at something that must be kept."""
    model = tmp_path / "a" / "m"
    shutil.copytree(tiny_dir, model)
    if case == "model itself":
        return model, model
    if case == "ancestor of the model":
        return model, tmp_path / "a"
    if case == "symlink to the model":
        (tmp_path / "link").symlink_to(model)
        return model, tmp_path / "link"
    if case == "a directory of mine":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "todo.txt").write_text("mine\n")
        return model, tmp_path / "notes"
    (tmp_path / "notes.txt").write_text("mine\n")  # "a file of mine"
    return model, tmp_path / "notes.txt"


@pytest.mark.parametrize(
    "case,phrase",
    [
        ("model itself", "contains the model directory"),
        ("ancestor of the model", "contains the model directory"),
        ("symlink to the model", "contains the model directory"),
        ("a directory of mine", "is not a t5vh export"),
        ("a file of mine", "is not a t5vh export"),
    ],
)
def test_export_with_force_never_replaces_what_it_did_not_write(tmp_path, tiny_dir, case, phrase):
    model, out = _export_layout(tmp_path, tiny_dir, case)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(export_command, [str(model), "-o", str(out), "--force"])
    assert_one_line_error(result, phrase)
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_export_inside_the_model_directory_keeps_the_model(tmp_path, tiny_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    before = snapshot(model)
    export(model, model / "onnx", merged=False)
    export(model, model / "onnx", force=True, merged=False)  # replacing its own export is fine
    assert {k: v for k, v in snapshot(model).items() if not k.startswith("onnx")} == before


def _score_layout(tmp_path: Path, case: str) -> list:
    """The t5vh-score arguments for one way of aliasing input, output and errors."""
    (tmp_path / "rows.jsonl").write_text(rows(6) + "{bad\n")
    (tmp_path / "notes.txt").write_text("my notes\nline two\n")
    if case == "-o INPUT":
        return ["rows.jsonl", "-o", "rows.jsonl"]
    if case == "--errors INPUT":
        return ["rows.jsonl", "-o", "out.jsonl", "--errors", "rows.jsonl"]
    if case == "--errors OUTPUT":
        return ["rows.jsonl", "-o", "out.jsonl", "--errors", "out.jsonl"]
    if case == "-o hard link to INPUT":
        os.link(tmp_path / "rows.jsonl", tmp_path / "alias.jsonl")
        return ["rows.jsonl", "-o", "alias.jsonl"]
    if case == "-o symlink to INPUT":
        (tmp_path / "alias.jsonl").symlink_to(tmp_path / "rows.jsonl")
        return ["rows.jsonl", "-o", "alias.jsonl"]
    if case == "-o notes.txt":
        return ["rows.jsonl", "-o", "notes.txt"]
    if case == "-o - --errors notes.txt":
        return ["rows.jsonl", "-o", "-", "--errors", "notes.txt"]
    (tmp_path / "outdir").mkdir()  # "-o DIRECTORY"
    return ["rows.jsonl", "-o", "outdir"]


@pytest.mark.parametrize(
    "case,phrase",
    [
        ("-o INPUT", "the input and the output are the same file"),
        ("--errors INPUT", "the input and the errors file are the same file"),
        ("--errors OUTPUT", "the output and the errors file are the same file"),
        ("-o hard link to INPUT", "the input and the output are the same file"),
        ("-o symlink to INPUT", "the input and the output are the same file"),
        ("-o notes.txt", "was not written by t5vh-score"),
        ("-o - --errors notes.txt", "already holds rows"),
        ("-o DIRECTORY", "is a directory"),
    ],
)
def test_score_never_writes_over_a_file_the_user_had(tmp_path, tiny_export, monkeypatch, case, phrase):
    args = _score_layout(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = score(tiny_export, *[str(a) for a in args])
    assert_one_line_error(result, phrase)
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before  # not a byte changed, and nothing added (no job file, no lock)


def test_same_regular_file_sees_open_files_and_ignores_devices(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("x\n")
    with open(path, "rb") as f:  # what `t5vh-score EXPORT - -o rows.jsonl < rows.jsonl` hands the job
        assert same_regular_file(f, path)
    assert same_regular_file(tmp_path / "new.jsonl", tmp_path / "." / "new.jsonl")
    assert not same_regular_file(path, tmp_path / "new.jsonl")
    assert not same_regular_file("/dev/null", "/dev/null")  # written twice, read never: fine


# ---------------------------------------------------------------------- 2. only regular files are resumed


def test_devices_are_written_and_never_read_back(tmp_path, tiny_export):
    (tmp_path / "rows.jsonl").write_text(rows(4))
    for _ in range(2):  # a second run does not "resume" /dev/null
        result = score(tiny_export, str(tmp_path / "rows.jsonl"), "-o", "/dev/null")
        assert result.exit_code == 0, result.output
        assert "4 rows scored" in result.output
    assert not Path("/dev/null.t5vh-job.json").exists() and not Path("/dev/.null.t5vh-lock").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line(tmp_path, tiny_export):
    (tmp_path / "rows.jsonl").write_text(rows(4))
    limited = ["bash", "-c", 'ulimit -v 6291456 && exec "$@"', "bash"]  # a regression fails here, not the machine
    proc = subprocess.run(
        limited + score_cmd(tiny_export, str(tmp_path / "rows.jsonl"), "-o", "/dev/full"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "Error: cannot write /dev/full: No space left on device"


def test_a_fifo_output_is_written_not_read(tmp_path, tiny_export):
    (tmp_path / "rows.jsonl").write_text(rows(5))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        proc = subprocess.run(
            score_cmd(tiny_export, str(tmp_path / "rows.jsonl"), "-o", str(fifo)),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        got, _ = reader.communicate(timeout=TIMEOUT)
    finally:
        reader.kill()
    assert proc.returncode == 0, proc.stderr
    assert sorted(strict_json(line)["id"] for line in got.decode().splitlines()) == list(range(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "rows.jsonl"]  # no job or errors file


# ---------------------------------------------------------------------- 3. one writer per output


def test_a_second_job_on_one_output_is_refused_and_a_killed_job_leaves_no_stuck_lock(tmp_path, tiny_export):
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(
        score_cmd(tiny_export, "-", "-o", str(out), "--batch-size", "1", "--sort-window", "1"),
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        first.stdin.write(rows(1).encode())
        first.stdin.flush()
        # one row written: the first job holds the lock and waits for more input
        wait_for(lambda: out.exists() and out.read_bytes().endswith(b"\n"), "the first job's first row")
        (tmp_path / "rows.jsonl").write_text(rows(10))
        second = score(tiny_export, str(tmp_path / "rows.jsonl"), "-o", str(out))
        assert first.poll() is None, "the first job should still be running"
        assert_one_line_error(second, "another t5vh-score job is writing", f"pid {first.pid}")
        assert len(out.read_text().splitlines()) == 1  # still the first job's row only
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=TIMEOUT)
        first.stdin.close()
    third = score(tiny_export, str(tmp_path / "rows.jsonl"), "-o", str(out))
    assert third.exit_code == 0, third.output
    assert "9 rows scored, 0 failed, 1 already done" in third.output
    ids = [strict_json(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == list(range(10))
    assert not (tmp_path / ".out.jsonl.t5vh-lock").exists()  # removed when the job finished


def test_exports_to_one_output_take_turns(tmp_path, tiny_dir):
    out = tmp_path / "out"
    live = tmp_path / ".out.partial.live"  # what the export holding the lock is building
    live.mkdir()
    with exclusive_lock(out, "held by the test"), pytest.raises(OutputError, match="another t5vh-export is writing"):
        export(tiny_dir, out)
    assert live.is_dir()


# ---------------------------------------------------------------------- 4. bytes are not a crash


def test_odd_bytes_cost_only_their_own_row(tmp_path, tiny_export, monkeypatch):
    monkeypatch.setattr(job_module, "MAX_LINE_BYTES", 4096)
    good = rows(3).encode().splitlines(keepends=True)
    lines = [
        b"\xef\xbb\xbf" + good[0],  # 1: a UTF-8 BOM before the first row
        b'{"id": "latin1", "query": "caf\xe9", "response_ids": [7]}\n',  # 2: not UTF-8
        b'{"id": NaN, "query_ids": [5, 1], "response_ids": [7]}\n',  # 3
        b'{"id": "inf", "query_ids": [5, 1], "response_ids": [7], "score": 1e999}\n',  # 4
        b'{"id": "surrogate", "query": "\\ud800", "response_ids": [7]}\n',  # 5: a lone surrogate escape
        b'{"id": "huge", "query": "' + b"x" * 5000 + b'", "response_ids": [7]}\n',  # 6: over the line limit
        good[1],  # 7
        b"\xff\xfe\n",  # 8: garbage
        good[2],  # 9
    ]
    (tmp_path / "rows.jsonl").write_bytes(b"".join(lines))
    out, errors = tmp_path / "out.jsonl", tmp_path / "out.jsonl.errors.jsonl"
    result = score(tiny_export, str(tmp_path / "rows.jsonl"), "-o", str(out))
    assert result.exit_code == 0 and "3 rows scored, 6 failed" in result.output, result.output
    result = score(tiny_export, str(tmp_path / "rows.jsonl"), "-o", str(out))  # a rerun does not die either
    assert result.exit_code == 0 and "0 rows scored, 6 failed, 3 already done" in result.output, result.output
    assert sorted(strict_json(line)["id"] for line in out.read_text().splitlines()) == [0, 1, 2]
    reasons = {e["line"]: e["error"] for e in map(strict_json, errors.read_text().splitlines())}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 8]
    assert reasons[2].startswith("not UTF-8: byte 0xe9")
    assert "NaN is not a JSON number" in reasons[3] and "1e999 is out of range" in reasons[4]
    assert "'query' is not valid UTF-8" in reasons[5] and "longer than 4096 bytes" in reasons[6]


# ---------------------------------------------------------------------- 5. NaN never passes as parity


def test_score_refuses_non_finite_numbers_naming_the_row(nan_export, monkeypatch):
    policy = t5vh_fast.load(nan_export, providers="cpu")
    ids, mask = t5vh_fast.pad_batch([[5, 6, 1], [5, 9, 1], [7, 1]])
    with pytest.raises(NonFiniteError, match="row 1, response position 0"):
        policy.score(ids, [[7, 8]] * 3, mask)
    with pytest.raises(NonFiniteError, match="step 0, row 1"):
        policy.respond_to_batch(ids, mask, txt_len=2, seed=0)
    fine = policy.score(ids[[0, 2]], [[7, 8]] * 2, mask[[0, 2]])
    assert np.isfinite(fine.logprobs).all()
    # rows scored in length groups (one per length here): still the first bad row, not the first bad group
    monkeypatch.setattr(scoring, "CALL_COST", 0)
    ids, mask = t5vh_fast.pad_batch([[5, 6, 1], [5, 9, 1], [7, 1], [9, 1]])
    responses, resp_mask = t5vh_fast.pad_batch([[7, 8, 9], [7, 8, 9, 10], [7, 8], [7]])
    with pytest.raises(NonFiniteError, match="row 1, response position 0"):
        policy.score(ids, responses, mask, resp_mask)


def test_reference_score_refuses_non_finite_numbers():
    model = build_model("tiny", seed=1)
    with torch.no_grad():
        model.v_head.state_representation.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="row 0, response position 0"):
        model.score([[5, 1]], [[7, 8]])


def test_the_job_stops_at_a_non_finite_row_and_writes_no_nan(tmp_path, nan_export):
    text = rows(4) + json.dumps({"id": "poisoned", "query_ids": [9, 1], "response_ids": [7]}) + "\n"
    (tmp_path / "rows.jsonl").write_text(text)
    out = tmp_path / "out.jsonl"
    result = score(nan_export, str(tmp_path / "rows.jsonl"), "-o", str(out), "--batch-size", "1", "--sort-window", "1")
    assert_one_line_error(result, "line 5 (id 'poisoned')", "NaN or inf")
    written = out.read_text()
    assert "NaN" not in written and "Infinity" not in written
    assert sorted(strict_json(line)["id"] for line in written.splitlines()) == [0, 1, 2, 3]


def test_a_non_finite_error_without_a_row_passes_through_the_job_unchanged():
    """Only an error that names its row can be given the row's line and id; any other goes on as it is."""

    class Failing:
        vocab_size, pad_token_id = 256, 0

        def score(self, *args, **kwargs):
            raise NonFiniteError("the whole batch is NaN")

    records = score_rows(Failing(), [{"id": 1, "query_ids": [5, 1], "response_ids": [4]}])
    with pytest.raises(NonFiniteError, match="^the whole batch is NaN$"):
        list(records)


def test_export_refuses_a_nan_weight_end_to_end(tmp_path):
    model = build_model("tiny", seed=2)
    with torch.no_grad():
        model.shared.weight[9, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(export_command, [str(tmp_path / "m")])
    assert_one_line_error(result, "holds 1 NaN or inf value")
    assert not (tmp_path / "m-onnx").exists()


# ---------------------------------------------------------------------- 6. no input exhausts memory silently


def test_queries_longer_than_the_limit_are_refused(tiny_export, reference):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    query = [[5, 6, 7, 8, 1]]
    for model in (policy, reference):
        with pytest.raises(InputError, match="queries are 5 tokens long, more than max_query_tokens=4"):
            model.respond_to_batch(query, txt_len=2, max_query_tokens=4)
        with pytest.raises(InputError, match="max_query_tokens=4"):
            model.score(query, [[7]], max_query_tokens=4)
        assert model.respond_to_batch(query, txt_len=2, uniforms=[[0.5, 0.5]], max_query_tokens=5).tokens.shape == (
            1,
            2,
        )
        with pytest.raises(InputError, match="max_query_tokens=2048"):
            model.respond_to_batch([[5] * 2049], txt_len=1)  # the documented default
    with pytest.raises(InputError, match=r"text 1 is \d+ tokens long, more than max_query_tokens=5"):
        policy.encode_text(["hi", "hello world, hello"], max_query_tokens=5)
    with pytest.raises(InputError, match="text 0 is 161 characters long"):
        policy.encode_text(["x" * 161], max_query_tokens=5)  # refused before tokenizing
    with pytest.raises(InputError, match="max_query_tokens must be a positive integer"):
        policy.encode_text(["hi"], max_query_tokens=0)


def test_a_32000_character_text_is_one_line_not_an_oom(tiny_export):
    result = CliRunner().invoke(sample_command, [str(tiny_export), "word " * 6400, "--providers", "cpu"])
    assert_one_line_error(result, "text 0 is", "tokens long, more than max_query_tokens=2048")
    result = CliRunner().invoke(sample_command, [str(tiny_export), "hi", "--max-query-tokens", "0"])
    assert_one_line_error(result, "max_query_tokens must be a positive integer, got 0")


def test_score_sends_long_queries_to_the_errors_file(tmp_path, tiny_export):
    (tmp_path / "rows.jsonl").write_text(
        rows(3) + json.dumps({"id": "long", "query_ids": [5] * 9, "response_ids": [7]})
    )
    result = score(
        tiny_export, str(tmp_path / "rows.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--max-query-tokens", "8"
    )
    assert result.exit_code == 0 and "3 rows scored, 1 failed" in result.output
    error = strict_json((tmp_path / "o.jsonl.errors.jsonl").read_text())
    assert error["id"] == "long" and "query too long: 9 tokens > --max-query-tokens 8" in error["error"]


# ---------------------------------------------------------------------- 7. every user error is one line


def _damage(export_dir: Path, case: str) -> None:
    manifest = export_dir / MANIFEST_NAME
    if case == "manifest is a JSON list":
        manifest.write_text("[1, 2]")
    elif case == "manifest lacks files":
        data = json.loads(manifest.read_text())
        del data["files"]
        manifest.write_text(json.dumps(data))
    elif case == "manifest is not UTF-8":
        manifest.write_bytes(manifest.read_bytes().replace(b'"fp32"', b'"fp\xff32"'))
    elif case == "tokenizer.json is corrupt":
        (export_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    elif case == "garbage .onnx, hash matches":
        (export_dir / "t5vh_decoder.onnx").write_bytes(b"garbage" * 100)
        with_manifest_hash(export_dir, "t5vh_decoder.onnx")
    elif case == "config.json is not JSON":
        (export_dir / "config.json").write_text("{")


@pytest.mark.parametrize(
    "case,phrases",
    [
        ("manifest is a JSON list", ["t5vh_manifest.json holds a JSON list", "re-export"]),
        ("manifest lacks files", ["t5vh_manifest.json has no valid 'files' table", "re-export"]),
        ("manifest is not UTF-8", ["t5vh_manifest.json is not valid JSON", "re-export"]),
        ("tokenizer.json is corrupt", ["tokenizer.json is not a readable tokenizer"]),
        ("garbage .onnx, hash matches", ["onnxruntime cannot load", "t5vh_decoder.onnx", "re-export"]),
        ("config.json is not JSON", ["config.json is not a model config", "re-export"]),
    ],
)
def test_a_damaged_export_is_one_line(tmp_path, tiny_export, case, phrases):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_export, damaged)
    _damage(damaged, case)
    result = CliRunner().invoke(sample_command, [str(damaged), "hello", "--providers", "cpu"])
    assert_one_line_error(result, *phrases)


def test_a_truncated_checkpoint_is_one_line(tmp_path, tiny_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    data = (model / "model.safetensors").read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 64, b"garbage"):
        (model / "model.safetensors").write_bytes(damaged)
        result = CliRunner().invoke(export_command, [str(model)])
        assert_one_line_error(result, "model.safetensors is not a readable safetensors file")


def test_command_line_mistakes_are_one_line(tmp_path, tiny_export):
    runner = CliRunner()
    # a non-UTF-8 byte on the command line reaches Python as a lone surrogate
    result = runner.invoke(sample_command, [str(tiny_export), "caf\udce9", "--providers", "cpu"])
    assert_one_line_error(result, "text 0 is not valid UTF-8", "character 3")
    result = runner.invoke(sample_command, [str(tiny_export), "hi", "--seed", "-1", "--providers", "cpu"])
    assert_one_line_error(result, "seed must be an integer >= 0", "-1")
    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(tiny_export, other_vocab)
    config = json.loads((other_vocab / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    (tmp_path / "rows.jsonl").write_text(rows(3, response=(7, 230)))
    result = score(
        tiny_export, str(tmp_path / "rows.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--ref", str(other_vocab)
    )
    assert_one_line_error(result, "the reference model's vocabulary differs", "200 vs 256")
    assert not (tmp_path / "o.jsonl").exists()


def test_python_api_messages_name_the_right_thing(tiny_export, tmp_path):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    with pytest.raises(InputError, match="row 0 of response_mask is all zeros"):
        policy.score([[5, 1]], [[7, 8]], None, [[0, 0]])
    assert policy.decode_text([[-1, 5, 2**40]]) == policy.decode_text([[5]])  # ids it lacks are skipped
    with pytest.raises(InputError, match="beta must be a finite number >= 0, got nan"):
        t5vh_fast.reward([1.0], [[0.1]], beta=float("nan"))
    with pytest.raises(NonFiniteError, match="score holds NaN"):
        t5vh_fast.reward([float("nan")], [[0.1]], beta=0.1)
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        policy.respond_to_batch([[5, 1]], txt_len=1, seed=-1)
    with pytest.raises(OutputError, match="is a directory"):
        write_json_atomic(tmp_path, {"a": 1})  # e.g. t5vh-bench --json DIR


# ---------------------------------------------------------------------- 8. interrupted work is cleaned up


def test_an_export_removes_what_a_killed_export_to_the_same_place_left(tmp_path, tiny_dir):
    stale = tmp_path / ".out.partial.k1ll3d"  # a SIGKILLed export's build directory
    stale.mkdir()
    (stale / "encoder_model.onnx").write_bytes(b"half")
    other = tmp_path / ".other.partial.k1ll3d"  # another output's: not ours to remove
    other.mkdir()
    (tmp_path / ".out.t5vh-lock").write_text("pid 1\n")  # a killed export's lock file: not held by anyone
    export(tiny_dir, tmp_path / "out", merged=False)
    assert not stale.exists() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial.k1ll3d", "out"]


# ---------------------------------------------------------------------- 9. score_rows keeps the CLI's contract


def test_score_rows_checks_options_when_called():
    policy = object()  # never touched: the options fail first
    for kwargs, message in (
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(max_tokens=1.5), "max_tokens must be a positive integer"),
        (dict(max_query_tokens=-1), "max_query_tokens must be a positive integer"),
        (dict(beta=float("nan")), "beta must be a finite number"),
    ):
        with pytest.raises(InputError, match=message):
            score_rows(policy, [], **kwargs)  # raises here, without iterating


def test_score_rows_reports_duplicates_and_takes_numpy_numbers(tiny_export):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    row = {"id": np.int64(1), "query_ids": np.array([5, 6, 1]), "response_ids": [np.int64(7)], "score": np.float32(2)}
    records = list(
        score_rows(policy, [row, dict(row)], batch_size=np.int64(2), sort_window=np.int32(1), beta=np.float64(0))
    )
    good = [r for r in records if "error" not in r]
    bad = [r for r in records if "error" in r]
    assert len(good) == 1 and good[0]["id"] == 1 and type(good[0]["id"]) is int
    assert bad == [{"line": 2, "id": 1, "error": "duplicate id: an earlier row has the same id"}]
    json.dumps(records, allow_nan=False)  # every record is JSON as it is
    ref = t5vh_fast.load(tiny_export, providers="cpu")
    ref.vocab_size = 200
    with pytest.raises(InputError, match="the reference model's vocabulary differs"):
        score_rows(policy, [row], ref_policy=ref)


# ---------------------------------------------------------------------- 10. a resume never mixes two runs


def test_a_resume_with_other_settings_is_refused(tmp_path, tiny_export):
    (tmp_path / "half.jsonl").write_text(rows(3))
    (tmp_path / "rows.jsonl").write_text(rows(6))
    out = tmp_path / "out.jsonl"
    base = ["-o", str(out), "--ref", str(tiny_export), "--beta", "0.1"]
    assert score(tiny_export, str(tmp_path / "half.jsonl"), *base).exit_code == 0
    job = json.loads((tmp_path / "out.jsonl.t5vh-job.json").read_text())
    manifest_sha = hashlib.sha256((tiny_export / MANIFEST_NAME).read_bytes()).hexdigest()
    version = t5vh_fast.load(tiny_export, providers="cpu").weights_version
    assert job["fingerprint"] == {
        "policy_manifest_sha256": manifest_sha,
        "ref_manifest_sha256": manifest_sha,
        "policy_weights_version": version,
        "ref_weights_version": version,
        "precision": "fp32",
        "beta": 0.1,
        "max_tokens": 512,
        "max_query_tokens": 2048,
    }
    other_export = tmp_path / "re-exported"
    shutil.copytree(tiny_export, other_export)
    manifest = json.loads((other_export / MANIFEST_NAME).read_text())
    (other_export / MANIFEST_NAME).write_text(json.dumps({**manifest, "created": "later"}))
    before = snapshot(tmp_path)
    ref = ["--ref", str(tiny_export)]
    for policy_dir, args, phrase in (
        (tiny_export, [*ref, "--beta", "0.5"], "beta 0.1 then, 0.5 now"),
        (tiny_export, [*ref, "--beta", "0.1", "--max-tokens", "100"], "max_tokens 512 then, 100 now"),
        (tiny_export, [*ref, "--beta", "0.1", "--max-query-tokens", "99"], "max_query_tokens 2048 then, 99 now"),
        (tiny_export, ["--beta", "0.1"], f"ref_manifest_sha256 {manifest_sha[:12]}... then, none now"),
        (other_export, [*ref, "--beta", "0.1"], f"policy_manifest_sha256 {manifest_sha[:12]}... then"),
    ):
        result = score(policy_dir, str(tmp_path / "rows.jsonl"), "-o", str(out), *args)
        assert_one_line_error(result, f"{out} was written by a job with other settings", phrase)
        assert snapshot(tmp_path) == before
    result = score(tiny_export, str(tmp_path / "rows.jsonl"), *base)
    assert result.exit_code == 0 and "3 rows scored, 0 failed, 3 already done" in result.output
    assert sorted(strict_json(line)["id"] for line in out.read_text().splitlines()) == list(range(6))
