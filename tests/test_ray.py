"""Issue 17: batch scoring and rollouts on Ray Data (``t5vh_fast.ray``, ``t5vh-score --ray``).

One local cluster (``ray.init(num_cpus=2)``) serves the module: Ray's start
costs seconds, so the tests are few and each checks a lot. They skip where the
``ray`` extra is not installed, except the two about running without it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import t5vh_fast
from t5vh_fast.cli import score_command

from .conftest import tol

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason='needs the ray extra: pip install "t5vh_fast[ray]"')


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def score(export_dir: Path, *args: str):
    return CliRunner().invoke(score_command, [str(export_dir), *args, "--providers", "cpu"])


def assert_one_line_error(result, *phrases: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), result.output
    for phrase in phrases:
        assert phrase in line, line
    return line


def records(path: Path) -> list:
    """Every record of a JSONL file, or of the part files of a directory."""
    files = sorted(path.glob("part-*.jsonl")) if path.is_dir() else [path]
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def assert_same_records(ours: list, theirs: list) -> None:
    """Same ids, same fields, same tokens; numbers within the parity tolerance of the job's own."""
    by_id = {json.dumps(r["id"]): r for r in theirs}
    assert len(by_id) == len(theirs) == len(ours)
    for record in ours:
        expected = by_id[json.dumps(record["id"])]
        assert record.keys() == expected.keys()
        assert record["response_ids"] == expected["response_ids"]
        for field in record.keys() - {"id", "response_ids"}:
            if isinstance(expected[field], str):  # weights_version, precision
                assert record[field] == expected[field], field
                continue
            np.testing.assert_allclose(record[field], expected[field], rtol=0, atol=tol(expected[field]))


def input_lines(n: int) -> list:
    """``n`` good rows of many lengths with every kind of bad row among them, as bytes lines."""
    rng = np.random.default_rng(17)
    lines = []
    for i in range(n):
        row = {
            "id": i if i % 5 else f"s{i}",
            "query_ids": rng.integers(3, 256, size=int(rng.integers(1, 24))).tolist() + [1],
            "response_ids": rng.integers(0, 256, size=int(rng.integers(1, 40))).tolist(),
        }
        if i % 3 == 0:
            row["score"] = float(rng.normal())
        lines.append(json.dumps(row).encode() + b"\n")
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a BOM before line 1
    bad = [
        b"{not json\n",
        b'{"id": "latin1", "query": "caf\xe9", "response_ids": [7]}\n',  # not UTF-8
        b'{"id": NaN, "query_ids": [5, 1], "response_ids": [7]}\n',
        b'{"id": "oov", "query_ids": [5, 1], "response_ids": [7, 256]}\n',
        b'{"id": "long", "query_ids": [' + b"5, " * 600 + b'1], "response_ids": [7]}\n',
        b'{"id": "noresp", "query_ids": [5, 1]}\n',
        b'{"id": 7, "query_ids": [5, 1], "response_ids": [7]}\n',  # a duplicate, far from its twin
        b"\n",  # blank: skipped, yet counted in line numbers
        b'{"id": "text", "query": "How do I cook rice?", "response": "With water."}\n',
    ]
    for k, line in enumerate(bad):
        lines.insert(300 + 97 * k, line)
    lines.insert(40, json.dumps({"id": n - 1, "query_ids": [9, 1], "response_ids": [4, 4]}).encode() + b"\n")
    return lines  # (the row above comes first: its twin, the last good row, is the duplicate)


# ---------------------------------------------------------------------- without Ray


def test_the_core_package_does_not_import_ray():
    code = "import sys, t5vh_fast, t5vh_fast.cli, t5vh_fast.job, t5vh_fast.bench; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_ray_the_command_says_how_to_install_it(tmp_path, tiny_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.delitem(sys.modules, "t5vh_fast.ray", raising=False)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "query_ids": [5, 1], "response_ids": [7]}\n')
    result = score(tiny_export, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--ray")
    assert_one_line_error(result, 'pip install "t5vh_fast[ray]"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@needs_ray
def test_an_unreachable_address_is_one_line_within_seconds(tmp_path, tiny_export):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "in.jsonl").write_text('{"id": 1, "query_ids": [5, 1], "response_ids": [7]}\n')
    start = time.monotonic()
    result = score(tiny_export, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), f"--ray=127.0.0.1:{port}")
    assert_one_line_error(result, f"cannot reach the Ray cluster at 127.0.0.1:{port}", "ray start --head")
    assert time.monotonic() - start < 15
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------- on a local cluster


@needs_ray
def test_ray_writes_the_records_the_job_writes_and_resumes_without_duplicates(tmp_path, tiny_export, cluster):
    (tmp_path / "in.jsonl").write_bytes(b"".join(input_lines(2500)))
    common = ["--ref", str(tiny_export), "--batch-size", "16", "--sort-window", "4"]
    job = score(tiny_export, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "job.jsonl"), *common)
    assert job.exit_code == 0, job.output
    expected, expected_errors = records(tmp_path / "job.jsonl"), records(tmp_path / "job.jsonl.errors.jsonl")
    assert len(expected_errors) == 8 and sum("duplicate id" in e["error"] for e in expected_errors) == 2

    # a file output: the driver writes it as the job does (a second job's file; a rerun resumes it)
    result = score(tiny_export, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "ray.jsonl"), *common, "--ray")
    assert result.exit_code == 0, result.output
    assert f"{len(expected)} rows scored, 8 failed, 0 already done" in result.output
    assert_same_records(records(tmp_path / "ray.jsonl"), expected)
    assert sorted(records(tmp_path / "ray.jsonl.errors.jsonl"), key=lambda e: e["line"]) == sorted(
        expected_errors, key=lambda e: e["line"]
    )

    # a directory output: Ray writes it; a rerun writes nothing twice
    out = tmp_path / "scored"
    result = score(tiny_export, str(tmp_path / "in.jsonl"), "-o", f"{out}/", *common, "--ray")
    assert result.exit_code == 0, result.output
    assert_same_records(records(out), expected)
    assert sorted(records(tmp_path / "scored.errors"), key=lambda e: e["line"]) == sorted(
        expected_errors, key=lambda e: e["line"]
    )
    before = {p: p.read_bytes() for p in [*out.iterdir(), *(tmp_path / "scored.errors").iterdir()]}
    (out / ".part-0123456789abcdef0123456789abcdef.jsonl.tmp").write_text('{"id": "half')  # a killed run's
    result = score(tiny_export, str(tmp_path / "in.jsonl"), "-o", str(out), *common, "--ray")
    assert result.exit_code == 0, result.output
    assert f"0 rows scored, 6 failed, {len(expected) + 2} already done" in result.output  # duplicates of done ids
    assert {p: p.read_bytes() for p in [*out.iterdir(), *(tmp_path / "scored.errors").iterdir()]} == before

    result = score(tiny_export, str(tmp_path / "in.jsonl"), "-o", str(out), "--beta", "0.5", "--ray")
    assert_one_line_error(result, "was written by a job with other settings", "beta 0.1 then, 0.5 now")


@needs_ray
def test_a_directory_of_inputs_names_the_file_of_each_bad_row(tmp_path, tiny_export, cluster):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "query_ids": [5 + i, 1], "response_ids": [7] * (1 + i % 4)}) + "\n" for i in range(30)
        )
    )
    (tmp_path / "in" / "b.jsonl").write_text(
        json.dumps({"id": 3, "query_ids": [5, 1], "response_ids": [7]}) + "\n{bad\n"  # 3 is a.jsonl's
    )
    result = score(tiny_export, str(tmp_path / "in"), "-o", str(tmp_path / "out.jsonl"), "--ray")
    assert result.exit_code == 0 and "30 rows scored, 2 failed" in result.output, result.output
    errors = sorted(records(tmp_path / "out.jsonl.errors.jsonl"), key=lambda e: e["line"])
    assert errors == [
        {"file": "b.jsonl", "line": 1, "id": 3, "error": "duplicate id: an earlier row has the same id"},
        {"file": "b.jsonl", "line": 2, "id": None, "error": errors[1]["error"]},
    ]
    result = score(tiny_export, str(tmp_path / "in"), "-o", str(tmp_path / "in" / "out.jsonl"), "--ray")
    assert_one_line_error(result, "is inside the input directory")


@needs_ray
def test_respond_dataset_gives_each_row_the_same_tokens_however_it_is_batched(tiny_export, cluster):
    import ray

    from t5vh_fast.ray import respond_dataset, row_uniforms, score_dataset

    rng = np.random.default_rng(3)
    rows = [
        {"id": f"q{i}", "query_ids": rng.integers(3, 256, size=int(rng.integers(1, 20))).tolist() + [1]}
        for i in range(96)
    ]
    rows.append({"id": "bad", "query_ids": [5, 999]})
    options = dict(txt_len=12, top_k=50, top_p=0.9, seed=11, providers="cpu")
    one = respond_dataset(ray.data.from_items(rows), tiny_export, batch_size=4, sort_window=1, **options)
    two = respond_dataset(
        ray.data.from_items(rows).repartition(7), tiny_export, batch_size=16, concurrency=2, num_cpus=0.5, **options
    )
    a, b = ({json.loads(r["record"])["id"]: json.loads(r["record"]) for r in ds.take_all()} for ds in (one, two))
    assert a.keys() == b.keys() and len(a) == 97
    assert "outside the vocabulary" in a["bad"]["error"]
    for key in a.keys() - {"bad"}:
        assert a[key]["response_ids"] == b[key]["response_ids"], key
        np.testing.assert_allclose(a[key]["logprobs"], b[key]["logprobs"], rtol=0, atol=1e-4)

    policy = t5vh_fast.load(tiny_export, providers="cpu")  # the documented random numbers, by hand
    u = np.stack([row_uniforms(11, r["id"], 12) for r in rows[:8]])
    ids, mask = t5vh_fast.pad_batch([r["query_ids"] for r in rows[:8]])
    direct = policy.respond_to_batch(ids, mask, txt_len=12, top_k=50, top_p=0.9, uniforms=u)
    assert [a[r["id"]]["response_ids"] for r in rows[:8]] == direct.tokens.tolist()

    # the rollouts score as they were sampled: score_dataset takes respond_dataset's records
    scored = score_dataset(
        ray.data.from_items([r for r in a.values() if "error" not in r][:16]), tiny_export, providers="cpu"
    )
    for row in scored.take_all():
        record = json.loads(row["record"])
        np.testing.assert_allclose(record["logprobs"], a[record["id"]]["logprobs"], rtol=0, atol=1e-4)

    with pytest.raises(t5vh_fast.InputError, match="starves the reads"):
        respond_dataset(ray.data.from_items(rows), tiny_export, concurrency=2, **options)


@needs_ray
def test_an_actor_that_cannot_load_the_export_stops_the_job(tmp_path, tiny_export, cluster):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_export, tampered)
    with open(tampered / "t5vh_decoder.onnx.data", "ab") as f:
        f.write(b"\0")
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "query_ids": [5, 1], "response_ids": [7]}) + "\n" for i in range(50))
    )
    start = time.monotonic()
    result = score(tampered, str(tmp_path / "in.jsonl"), "-o", f"{tmp_path / 'out'}/", "--ray")
    assert_one_line_error(result, "t5vh_decoder.onnx.data does not match the sha256", "re-export")
    assert time.monotonic() - start < 60
    assert not list((tmp_path / "out").glob("part-*"))
