"""score(), KL and reward, and the t5vh-score job (DESIGN.md §6)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import t5vh_fast
from t5vh_fast.cli import score_command
from t5vh_fast.job import score_rows
from t5vh_fast.results import Scores

from .conftest import mixed_queries, tol

# ---------------------------------------------------------------------- score()


def test_score_matches_pytorch(policy, reference):
    ids, mask = mixed_queries(16, 256, seed=30)
    rng = np.random.default_rng(30)
    lengths = rng.integers(1, 12, size=16)
    responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(0, 256, size=n)) for n in lengths])
    ours = policy.score(ids, responses, mask, resp_mask)
    ref = reference.score(ids, responses, mask, resp_mask)
    with torch.no_grad():
        logits = reference(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            decoder_input_ids=reference._shift_right(torch.from_numpy(responses)),
        ).logits.numpy()
    assert np.abs(ours.logprobs - ref.logprobs.numpy()).max() <= tol(logits)
    assert np.abs(ours.values - ref.values.numpy()).max() <= tol(ref.values)
    assert np.abs(ours.entropy - ref.entropy.numpy()).max() <= tol(logits)
    np.testing.assert_array_equal(ours.response_mask, resp_mask)
    assert (ours.logprobs[resp_mask == 0] == 0).all() and (ours.entropy[resp_mask == 1] > 0).all()


def test_kl_to_itself_is_zero_and_reward_formula(policy):
    ids, mask = mixed_queries(8, 256, seed=31)
    rollout = policy.respond_to_batch(ids, mask, txt_len=6, seed=31)
    scores = policy.score(ids, rollout.tokens, mask)
    kl = t5vh_fast.kl(scores, scores)
    assert (kl == 0).all()
    known = Scores(
        logprobs=np.array([[-1.0, -2.0, 0.0]]), values=None, entropy=None, response_mask=np.array([[1, 1, 0]])
    )
    known_ref = Scores(
        logprobs=np.array([[-1.5, -1.0, -9.0]]), values=None, entropy=None, response_mask=np.array([[1, 1, 0]])
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_token = t5vh_fast.kl(known, known_ref)  # 0.5 + (-1.0) + masked = -0.5: negative mean warns
    np.testing.assert_allclose(per_token, [[0.5, -1.0, 0.0]])
    assert any("negative" in str(w.message) for w in caught)
    np.testing.assert_allclose(t5vh_fast.reward([2.0], per_token, beta=0.2), [2.0 - 0.2 * -0.5])


def test_kl_against_a_perturbed_reference_is_nonnegative_on_policy_samples(tiny_dir, tmp_path):
    """E_{x~p}[log p - log q] = KL(p||q) >= 0: sampled from the policy, the mean must not go negative."""
    from t5vh_fast.checkpoint import load_reference
    from t5vh_fast.export import export

    model = load_reference(tiny_dir)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    perturbed_dir = tmp_path / "perturbed"
    model.save_pretrained(perturbed_dir)
    policy = t5vh_fast.load(export(tiny_dir, tmp_path / "p-onnx"), providers="cpu")
    ref = t5vh_fast.load(export(perturbed_dir, tmp_path / "q-onnx"), providers="cpu")
    ids, mask = mixed_queries(256, 256, seed=32)
    rollout = policy.respond_to_batch(ids, mask, txt_len=8, seed=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a negative mean would warn
        kl = t5vh_fast.kl(policy.score(ids, rollout.tokens, mask), ref.score(ids, rollout.tokens, mask))
    assert kl.sum(-1).mean() > 0


# ---------------------------------------------------------------------- the job


def _rows(policy):
    good = [
        {
            "id": "t1",
            "query": "paraphrase: Which course should I take?",
            "response": "What course is best?",
            "score": 1.5,
        },
        {"id": 2, "query_ids": [5, 6, 7, 1], "response_ids": [8, 9, 1, 4]},
        {"id": "t3", "query": "How do I cook rice?", "response_ids": [10, 11]},
    ] + [{"id": f"g{i}", "query_ids": [5 + i, 6, 1], "response_ids": list(range(3, 4 + i % 7))} for i in range(20)]
    bad = [
        ("{not json", "invalid JSON"),
        (json.dumps({"query_ids": [5, 1], "response_ids": [4]}), "missing field 'id'"),
        (json.dumps({"id": "b1", "response_ids": [4]}), "missing field 'query'"),
        (json.dumps({"id": "b2", "query_ids": [5, 1], "response_ids": []}), "empty response"),
        (json.dumps({"id": "b3", "query_ids": [5, 1], "response_ids": [4, 256]}), "outside the vocabulary"),
        (json.dumps({"id": "b4", "query_ids": [5] * 600, "response_ids": [4]}), "too long"),
        (json.dumps({"id": "b5", "query_ids": [5, 1], "response_ids": [4], "score": "high"}), "'score' must be"),
        (json.dumps({"id": 2, "query_ids": [5, 1], "response_ids": [4]}), "duplicate id"),
    ]
    return good, bad


def test_job_scores_good_rows_once_and_reports_bad_rows(tmp_path, tiny_export, policy):
    good, bad = _rows(policy)
    lines = [json.dumps(r) for r in good[:2]] + [b for b, _ in bad] + [json.dumps(r) for r in good[2:]]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    result = CliRunner().invoke(
        score_command,
        [
            str(tiny_export),
            str(src),
            "-o",
            str(out),
            "--errors",
            str(errs),
            "--ref",
            str(tiny_export),
            "--batch-size",
            "4",
            "--providers",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"{len(good)} rows scored, {len(bad)} failed" in result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(map(str, (r["id"] for r in written))) == sorted(map(str, (r["id"] for r in good)))
    by_id = {r["id"]: r for r in written}
    assert by_id["t1"]["reward"] == pytest.approx(1.5)  # KL to itself is 0
    assert "reward" not in by_id[2] and by_id[2]["kl"] == [0.0] * 4
    row = by_id[2]
    expected = policy.score([[5, 6, 7, 1]], [[8, 9, 1, 4]])  # alone, not in a padded batch: within tol, not equal
    state = policy.decoder.encode(np.array([[5, 6, 7, 1]]), np.ones((1, 4), dtype=np.int64))
    logits = policy.decoder.step(state, np.array([[policy.decoder_start_token_id, 8, 9, 1]]))[0]
    np.testing.assert_allclose(row["logprobs"], expected.logprobs[0], rtol=0, atol=tol(logits))
    np.testing.assert_allclose(row["values"], expected.values[0], rtol=0, atol=tol(expected.values))
    errors = [json.loads(line) for line in errs.read_text().splitlines()]
    assert len(errors) == len(bad)
    for (_, reason), error in zip(bad, sorted(errors, key=lambda e: e["line"])):
        assert reason in error["error"], error
    assert sorted(e["line"] for e in errors) == list(range(3, 3 + len(bad)))


def test_job_exits_non_zero_when_every_row_fails_or_fail_fast(tmp_path, tiny_export):
    src = tmp_path / "in.jsonl"
    src.write_text("{broken\n" + json.dumps({"id": 1, "query_ids": [5, 1]}) + "\n")
    result = CliRunner().invoke(score_command, [str(tiny_export), str(src), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1 and "every row failed" in result.output
    src.write_text(json.dumps({"id": 1, "query_ids": [5, 1], "response_ids": [3]}) + "\n{broken\n")
    result = CliRunner().invoke(
        score_command, [str(tiny_export), str(src), "-o", str(tmp_path / "o2.jsonl"), "--fail-fast"]
    )
    assert result.exit_code == 1 and "line 2: invalid JSON" in result.output


def test_score_rows_from_python(policy):
    rows = [{"id": i, "query_ids": [5, 6, 1], "response_ids": [7] * (1 + i % 5)} for i in range(10)] + ["{bad"]
    records = list(score_rows(policy, rows, batch_size=3))
    assert sorted(r["id"] for r in records if "error" not in r) == list(range(10))
    assert [r["line"] for r in records if "error" in r] == [11]


def test_job_resumes_after_kill_and_repairs_a_torn_line(tmp_path, tiny_export):
    rows = [{"id": i, "query_ids": [5 + i % 50, 6, 1], "response_ids": [7 + i % 9] * (4 + i % 13)} for i in range(4000)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "t5vh_fast",
        "score",
        str(tiny_export),
        str(src),
        "-o",
        str(out),
        "--batch-size",
        "4",
        "--sort-window",
        "2",
        "--providers",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 20_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().splitlines()
    assert 0 < len(partial) < len(rows), "the job should have been killed half-way"
    with open(out, "a") as f:
        f.write('{"id": 99999, "response_ids": [1, 2')  # as if killed mid-line
    subprocess.run(cmd, check=True, capture_output=True)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == list(range(len(rows)))  # every id exactly once
