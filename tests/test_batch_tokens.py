"""A token budget per scoring batch (--batch-tokens): bounded padded size, same numbers, too-long rows reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from t5vh_fast.cli import score_command
from t5vh_fast.errors import InputError
from t5vh_fast.job import score_rows


def _rows(n: int = 40):
    rng = np.random.default_rng(60)
    rows = []
    for i in range(n):
        query = rng.integers(3, 256, size=int(rng.integers(2, 30))).tolist() + [1]
        response = rng.integers(3, 256, size=int(rng.integers(1, 30))).tolist()
        rows.append({"id": i, "query_ids": query, "response_ids": response})
    return rows


class Recording:
    """A policy whose score() calls are recorded (padded shapes)."""

    def __init__(self, policy):
        self.policy, self.shapes = policy, []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def score(self, ids, resp, *args, **kwargs):
        self.shapes.append((ids.shape[0], ids.shape[1] + resp.shape[1]))
        return self.policy.score(ids, resp, *args, **kwargs)


def test_batches_stay_within_the_budget_and_numbers_do_not_change(policy):
    rows = _rows()
    plain = {r["id"]: r for r in score_rows(policy, rows, batch_size=16)}
    recording = Recording(policy)
    budgeted = {r["id"]: r for r in score_rows(recording, rows, batch_size=16, batch_tokens=120)}
    assert all(rows * width <= 120 for rows, width in recording.shapes)
    assert len(recording.shapes) > len(rows) / 16  # the budget, not batch_size, cut the batches
    assert set(plain) == set(budgeted) == set(range(40))
    for i in plain:
        np.testing.assert_allclose(budgeted[i]["logprobs"], plain[i]["logprobs"], atol=1e-4)
        np.testing.assert_allclose(budgeted[i]["values"], plain[i]["values"], atol=1e-4)


def test_a_row_over_the_budget_is_a_bad_row_and_the_rest_is_scored(policy, tmp_path, tiny_export):
    rows = _rows(10) + [{"id": "long", "query_ids": [5] * 60 + [1], "response_ids": [7] * 50}]
    records = list(score_rows(policy, rows, batch_tokens=100))
    errors = [r for r in records if "error" in r]
    assert [e["id"] for e in errors] == ["long"] and "too long for --batch-tokens 100" in errors[0]["error"]
    assert sorted(r["id"] for r in records if "error" not in r) == list(range(10))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    args = [str(tiny_export), str(src), "-o", str(out), "--errors", str(errs), "--batch-tokens", "100"]
    result = CliRunner().invoke(score_command, [*args, "--providers", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 10
    reported = [json.loads(line) for line in errs.read_text().splitlines()]
    assert [(e["id"], e["line"]) for e in reported] == [("long", 11)] and "raise --batch-tokens" in reported[0]["error"]


def test_a_bad_budget_is_refused_up_front(policy):
    with pytest.raises(InputError, match="batch_tokens"):
        score_rows(policy, _rows(2), batch_tokens=0)
