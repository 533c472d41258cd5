"""score(), KL and reward, and the t5vh-score job (docs/contract.md, "Batch scoring")."""

from __future__ import annotations

import io
import itertools
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
from t5vh_fast import decoder as decoder_module
from t5vh_fast import scoring
from t5vh_fast.cli import score_command
from t5vh_fast.job import score_rows
from t5vh_fast.results import Scores

from .conftest import mixed_queries, teacher_forced, tol

# ---------------------------------------------------------------------- score()


def test_score_matches_pytorch(policy, reference):
    ids, mask = mixed_queries(16, 256, seed=30)
    rng = np.random.default_rng(30)
    lengths = rng.integers(1, 12, size=16)
    responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(0, 256, size=n)) for n in lengths])
    ours = policy.score(ids, responses, mask, resp_mask)
    ref = reference.score(ids, responses, mask, resp_mask)
    logits = teacher_forced(reference, ids, mask, responses).logits.numpy()
    assert np.abs(ours.logprobs - ref.logprobs.numpy()).max() <= tol(logits)
    assert np.abs(ours.values - ref.values.numpy()).max() <= tol(ref.values)
    assert np.abs(ours.entropy - ref.entropy.numpy()).max() <= tol(logits)
    np.testing.assert_array_equal(ours.response_mask, resp_mask)
    assert (ours.logprobs[resp_mask == 0] == 0).all() and (ours.entropy[resp_mask == 1] > 0).all()


@pytest.mark.parametrize("num_samples", [1, 3])
def test_rows_of_similar_length_are_scored_together(policy, reference, monkeypatch, num_samples):
    """Rows cut into length groups (every distinct length its own decoder call here) give the numbers of
    one padded call and of PyTorch; masks with holes included; no padded position
    past a row's last scored one reaches the decoder."""
    ids, mask = mixed_queries(4, 256, seed=33)
    rng = np.random.default_rng(33)
    rows = 4 * num_samples
    responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(2, 256, size=n)) for n in rng.integers(1, 14, rows)])
    resp_mask[1, 0] = 0  # a hole: position 0 unscored, later ones scored
    resp_mask[2, 1:] = 0  # only the first position scored: the row is run one position long
    fed = []
    step = policy.decoder.step

    def counting_step(state, tokens, select=None):
        fed.append(tokens.size)
        return step(state, tokens, select)

    monkeypatch.setattr(policy.decoder, "step", counting_step)
    monkeypatch.setattr(policy.decoder, "_packed", None, raising=False)  # the groups, not the packed decoder
    monkeypatch.setattr(scoring, "CALL_COST", 0)
    grouped = policy.score(ids, responses, mask, resp_mask)
    lengths = scoring.scored_lengths(resp_mask)
    assert len(fed) == len(set(lengths) - {0}) > 2 and sum(fed) == lengths.sum() < responses.size
    monkeypatch.setattr(scoring, "CALL_COST", 10**9)
    fed.clear()
    whole = policy.score(ids, responses, mask, resp_mask)
    assert len(fed) == 1
    queries = np.repeat(ids, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)
    ref = reference.score(*queries[:1], responses, queries[1], resp_mask)
    logits = teacher_forced(reference, queries[0], queries[1], responses).logits.numpy()
    for name, bound in (("logprobs", tol(logits)), ("values", tol(ref.values)), ("entropy", tol(logits))):
        ours = getattr(grouped, name)
        assert np.abs(ours - getattr(whole, name)).max() <= bound
        assert np.abs(ours - getattr(ref, name).numpy()).max() <= bound
        assert (ours[resp_mask == 0] == 0).all() and (ours[resp_mask == 1] != 0).all()


def test_score_by_length_or_in_one_call(policy, monkeypatch):
    """Called directly (as the policy does): one decoder call on the batch as it is, without copies, when
    one group holds every row or ``by_length=False`` (a GPU's default); a row with nothing to score gets
    zeros either way and no decoder work when grouped; the numbers agree."""
    decoder = policy.decoder
    ids, mask = mixed_queries(6, 256, seed=35)
    rng = np.random.default_rng(35)
    responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(2, 256, size=n)) for n in (3, 9, 4, 9, 2, 6)])
    resp_mask[3] = 0  # nothing to score in row 3 (score() refuses it; the scorer must still cope)
    calls = {"step": [], "rows_of": 0, "grown": 0}
    step, rows_of = decoder.step, decoder.rows_of

    def counting_step(state, tokens, select=None):
        calls["step"].append(tokens.shape)
        return step(state, tokens, select)

    def counting_rows_of(*args, **kwargs):
        calls["rows_of"] += 1
        return rows_of(*args, **kwargs)

    monkeypatch.setattr(decoder, "step", counting_step)
    monkeypatch.setattr(decoder, "rows_of", counting_rows_of)
    if hasattr(decoder, "_grown"):  # the single layout's cache copy: a one-call batch gets a cache long enough
        grown = decoder._grown

        def counting_grown(*args):
            calls["grown"] += 1
            return grown(*args)

        monkeypatch.setattr(decoder, "_grown", counting_grown)
    results = {}
    for by_length, cost in ((False, 64), (True, 10**9), (True, 0)):
        monkeypatch.setattr(scoring, "CALL_COST", cost)
        calls.update(step=[], rows_of=0, grown=0)
        results[by_length, cost] = scoring.score(
            decoder, ids, mask, responses, resp_mask, decoder_start_token_id=0, by_length=by_length
        )
        assert calls["grown"] == 0
        if not by_length:  # every row, the empty one too, in one call on the state encode() made
            assert calls["step"] == [(6, 9)] and calls["rows_of"] == 0
        elif cost:  # one group: the five rows that have something to score, taken out of the batch
            assert calls["step"] == [(5, 9)] and calls["rows_of"] == 1
        else:  # a call per distinct length, 2 + 3 + 4 + 6 + 9 positions
            assert sorted(calls["step"]) == [(1, 2), (1, 3), (1, 4), (1, 6), (1, 9)] and calls["rows_of"] == 5
    one_call = results[False, 64]
    for result in results.values():
        for name in ("logprobs", "values", "entropy"):
            ours, reference = getattr(result, name), getattr(one_call, name)
            assert (ours[3] == 0).all() and (ours[resp_mask == 1] != 0).all()
            assert np.abs(ours - reference).max() <= tol(reference)
    scores = policy.score(ids[[0, 2]], responses[[0, 2]], mask[[0, 2]], resp_mask[[0, 2]])
    assert np.abs(scores.logprobs - one_call.logprobs[[0, 2]]).max() <= tol(one_call.logprobs)


def test_score_length_groups_are_the_cheapest_cut():
    """Against every way of cutting the sorted rows into consecutive groups (small cases, brute force)."""
    rng = np.random.default_rng(34)
    for _ in range(40):
        lengths = rng.integers(0, 30, size=int(rng.integers(1, 9)))
        cost = int(rng.integers(0, 40))
        groups = scoring.length_groups(lengths, cost)
        assert sorted(np.concatenate(groups).tolist() if groups else []) == np.flatnonzero(lengths).tolist()
        assert all((np.diff(g) > 0).all() for g in groups)
        spent = sum(len(g) * lengths[g].max() + cost for g in groups)
        ordered = np.sort(lengths[lengths > 0])
        best = min(
            (
                sum(len(part) * part.max() + cost for part in np.split(ordered, cuts))
                for k in range(len(ordered))
                for cuts in itertools.combinations(range(1, len(ordered)), k)
            ),
            default=0,
        )
        assert spent == best
    assert len(scoring.length_groups(np.array([3, 3, 10, 10]), 64)) == 1
    assert [g.tolist() for g in scoring.length_groups(np.array([60, 2, 60, 2, 0, 2]), 64)] == [[1, 3, 5], [0, 2]]


def test_kl_and_reward_formulas(policy):
    ids, mask = mixed_queries(8, 256, seed=31)
    rollout = policy.respond_to_batch(ids, mask, txt_len=6, seed=31)
    response_mask = (np.arange(6) < np.array([6, 3, 1, 6, 5, 2, 6, 4])[:, None]).astype(np.int64)
    scores = policy.score(ids, rollout.tokens, mask, response_mask)
    ref_logprobs = np.random.default_rng(31).uniform(-6, 0, size=scores.logprobs.shape).astype(np.float32)
    ref = Scores(logprobs=ref_logprobs, values=None, entropy=None, response_mask=scores.response_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random reference may well have the higher log-probs
        kl = t5vh_fast.kl(scores, ref)
    expected = (scores.logprobs.astype(np.float64) - ref_logprobs) * scores.response_mask  # log p - log p_ref
    np.testing.assert_allclose(kl, expected, rtol=0, atol=1e-6)
    assert (kl[scores.response_mask == 0] == 0).all() and (kl[scores.response_mask == 1] != 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mean KL of exactly 0 is not negative: no warning
        assert (t5vh_fast.kl(scores, scores) == 0).all()
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
    with pytest.raises(ValueError, match="differ in shape"):
        t5vh_fast.kl(known, Scores(logprobs=np.zeros((1, 2)), values=None, entropy=None, response_mask=None))
    for bad_kl, bad_score in (([[0.1, np.nan]], [1.0]), ([[0.1, 0.2]], [1.0, np.inf])):
        with pytest.raises(FloatingPointError, match="NaN or inf"):  # one bad number among good ones is enough
            t5vh_fast.reward(bad_score, bad_kl, beta=0.1)
    for beta in (True, -0.1, float("inf"), "0.1", None):
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            t5vh_fast.reward([1.0], [[0.1]], beta=beta)
    assert t5vh_fast.reward([1.0], [[0.1]], beta=0) == 1.0


def test_kl_against_a_perturbed_reference_is_nonnegative_on_policy_samples(tiny_export, perturbed_export):
    """E_{x~p}[log p - log q] = KL(p||q) >= 0: sampled from the policy, the mean must not go negative."""
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    ref = t5vh_fast.load(perturbed_export, providers="cpu")
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
        (
            json.dumps({"id": "b6", "query_ids": [5.5, 1], "response_ids": [4]}),
            "'query_ids' must be a list of integers",
        ),
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


def test_job_against_a_different_reference_model(tmp_path, tiny_dir, tiny_export, perturbed_dir, perturbed_export):
    """t5vh-score --ref on a model that really differs: every number of every record against an
    independent computation (the PyTorch models' score() and plain NumPy), for two betas."""
    from transformers import AutoTokenizer

    from t5vh_fast.checkpoint import load_reference

    rng = np.random.default_rng(33)
    rows = [
        {
            "id": i,
            "query_ids": [int(t) for t in rng.integers(3, 256, size=rng.integers(2, 10))] + [1],
            "response_ids": [int(t) for t in rng.integers(0, 256, size=rng.integers(1, 12))],
            **({"score": float(rng.normal())} if i % 3 else {}),
        }
        for i in range(23)
    ]
    rows.append({"id": "text", "query": "How do I cook rice?", "response_ids": [10, 11, 12], "score": 0.5})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # the independent computation: both PyTorch models on one padded batch of every row
    queries = [r.get("query_ids") or AutoTokenizer.from_pretrained(tiny_dir)(r["query"]).input_ids for r in rows]
    ids, mask = t5vh_fast.pad_batch(queries)
    responses, resp_mask = t5vh_fast.pad_batch([r["response_ids"] for r in rows])
    policy_model, ref_model = load_reference(tiny_dir), load_reference(perturbed_dir)
    expected = policy_model.score(ids, responses, mask, resp_mask)
    expected_ref = ref_model.score(ids, responses, mask, resp_mask)
    with torch.no_grad():
        logits = [
            m(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                decoder_input_ids=m._shift_right(torch.from_numpy(responses)),
            ).logits.numpy()
            for m in (policy_model, ref_model)
        ]
    atol = tol(np.concatenate(logits))
    true_kl = expected.logprobs.numpy() - expected_ref.logprobs.numpy()
    assert np.abs(true_kl[resp_mask == 1]).mean() > 100 * atol  # the reference really differs: KL is not ~0

    rewards = {}
    for beta in (0.1, 0.7):
        out = tmp_path / f"out-{beta}.jsonl"
        args = [str(tiny_export), str(src), "-o", str(out), "--ref", str(perturbed_export), "--beta", str(beta)]
        result = CliRunner().invoke(score_command, [*args, "--batch-size", "5", "--providers", "cpu"])
        assert result.exit_code == 0, result.output
        records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert sorted(map(str, records)) == sorted(str(r["id"]) for r in rows)
        for i, row in enumerate(rows):
            record, n = records[row["id"]], len(row["response_ids"])
            assert record["response_ids"] == row["response_ids"]
            for name, want, limit in (
                ("logprobs", expected.logprobs, atol),
                ("ref_logprobs", expected_ref.logprobs, atol),
                ("entropy", expected.entropy, atol),
                ("values", expected.values, tol(expected.values)),
                ("kl", true_kl, 2 * atol),
            ):
                assert len(record[name]) == n, name
                np.testing.assert_allclose(record[name], np.asarray(want)[i, :n], rtol=0, atol=limit, err_msg=name)
            # kl is log p - log p_ref of the record's own numbers (float32, as the job computes it)
            own = np.float32(record["logprobs"]) - np.float32(record["ref_logprobs"])
            np.testing.assert_allclose(record["kl"], own, rtol=0, atol=1e-6)
            if "score" in row:
                want = row["score"] - beta * true_kl[i, :n].sum()
                assert record["reward"] == pytest.approx(want, abs=beta * n * 2 * atol + 1e-6)
                assert record["reward"] == pytest.approx(row["score"] - beta * np.sum(own, dtype=np.float64))
                rewards.setdefault(row["id"], []).append(record["reward"])
            else:
                assert "reward" not in record
    assert all(abs(a - b) > 1e-3 for a, b in rewards.values())  # beta reaches the reward


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


def test_run_job_from_python_takes_a_path_a_dash_or_an_open_file(tmp_path, tiny_export, monkeypatch):
    from t5vh_fast.errors import PathNotFound
    from t5vh_fast.job import run_job

    policy = t5vh_fast.load(tiny_export, providers="cpu")
    text = "".join(json.dumps({"id": i, "query_ids": [5 + i, 1], "response_ids": [7, 8]}) + "\n" for i in range(3))
    src = tmp_path / "in.jsonl"
    src.write_text(text)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    for i, source in enumerate([src, str(src), "-", io.StringIO(text), io.BytesIO(text.encode())]):
        out = tmp_path / f"out{i}.jsonl"
        assert run_job(policy, source, out).rows_ok == 3, source
        assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == [0, 1, 2]
    with pytest.raises(PathNotFound, match="input file not found"):
        run_job(policy, tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_score_rows_from_python(policy):
    rows = [{"id": i, "query_ids": [5, 6, 1], "response_ids": [7] * (1 + i % 5)} for i in range(10)] + ["{bad"]
    rows += [[1, 2], {"id": float("nan"), "query_ids": [5, 1], "response_ids": [7]}, {"id": "x", "query_ids": [5, 1]}]
    records = list(score_rows(policy, rows, batch_size=3))
    assert sorted(r["id"] for r in records if "error" not in r) == list(range(10))
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert sorted(errors) == [11, 12, 13, 14]
    assert errors[11].startswith("invalid JSON") and errors[12] == "a row must be a JSON object, got list"
    assert errors[13].startswith("'id' must be a string or a finite number, got nan")
    assert errors[14] == "missing field 'response' or 'response_ids'"


def test_rows_are_scored_in_full_batches_of_similar_length(tiny_export):
    """batch_size rows per score() call (the last batch of a window may be smaller), grouped by length."""
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    calls = []

    class Counting:
        vocab_size, pad_token_id, root = policy.vocab_size, policy.pad_token_id, policy.root

        def score(self, ids, resp, *args, **kwargs):
            calls.append((ids.shape[0], sorted(set(ids.shape[1] - (ids == 0).sum(1)))))
            return policy.score(ids, resp, *args, **kwargs)

    rows = [{"id": i, "query_ids": [5] * (1 + i % 3) + [1], "response_ids": [7, 8]} for i in range(12)]
    records = list(score_rows(Counting(), rows, batch_size=4, sort_window=3))
    assert len(records) == 12 and calls == [(4, [2]), (4, [3]), (4, [4])]  # one query length per batch


def test_parse_query_reads_a_query_to_sample_for(tiny_export):
    """The rows of a rollout job: a query and an id, with the scoring job's checks, and no response."""
    from t5vh_fast.job import BadRow, Row, parse_query

    policy = t5vh_fast.load(tiny_export, providers="cpu")
    row = parse_query(3, json.dumps({"id": "q", "query_ids": [5, 6, 1]}), policy=policy)
    assert row == Row(3, "q", [5, 6, 1], [], None)
    text = parse_query(4, {"id": 7, "query": "How do I cook rice?"}, policy=policy)
    assert isinstance(text, Row) and text.query_ids == policy.encode_text(["How do I cook rice?"])[0][0].tolist()
    for raw, reason in (
        ("{bad", "invalid JSON"),
        ("[1, 2]", "a row must be a JSON object, got list"),
        ({"query_ids": [5, 1]}, "missing field 'id'"),
        ({"id": float("inf"), "query_ids": [5, 1]}, "'id' must be a string or a finite number"),
        ({"id": 1}, "missing field 'query' or 'query_ids'"),
        ({"id": 1, "query_ids": [5.5, 1]}, "'query_ids' must be a list of integers"),
        ({"id": 1, "query_ids": []}, "empty query"),
        ({"id": 1, "query_ids": [5, 256]}, "query token id 256 is outside the vocabulary [0, 256)"),
        ({"id": 1, "query_ids": [5] * 9}, "query too long: 9 tokens > --max-query-tokens 8"),
    ):
        bad = parse_query(9, raw, policy=policy, max_query_tokens=8)
        assert isinstance(bad, BadRow) and bad.line == 9 and bad.reason.startswith(reason), (raw, bad)


def test_resume_with_a_new_errors_file_and_never_past_a_line_it_did_not_write(tmp_path, tiny_export):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": i, "query_ids": [5 + i, 1], "response_ids": [7]}) + "\n" for i in range(4))
    )
    out = tmp_path / "out.jsonl"
    base = [str(tiny_export), str(src), "-o", str(out), "--providers", "cpu"]
    assert CliRunner().invoke(score_command, base).exit_code == 0
    src.write_text(src.read_text() + "{bad\n" + json.dumps({"id": 9, "query_ids": [5, 1], "response_ids": [7]}) + "\n")
    # a resume may name an errors file that does not exist yet
    result = CliRunner().invoke(score_command, [*base, "--errors", str(tmp_path / "new-errors.jsonl")])
    assert result.exit_code == 0 and "1 rows scored, 1 failed, 4 already done" in result.output, result.output
    assert [json.loads(line)["line"] for line in (tmp_path / "new-errors.jsonl").read_text().splitlines()] == [5]
    # a complete line the job did not write (JSON, but not its record) stops the resume; nothing changes
    for foreign in ('{"note": "mine"}\n', "[1, 2]\n"):
        for path in (out, tmp_path / "new-errors.jsonl"):
            before = path.read_bytes()
            path.write_bytes(before + foreign.encode())
            result = CliRunner().invoke(score_command, [*base, "--errors", str(tmp_path / "new-errors.jsonl")])
            assert result.exit_code == 1 and "is not a t5vh-score record" in result.output, result.output
            assert path.read_bytes() == before + foreign.encode()
            path.write_bytes(before)


def _wait_for_lines(path, n: int, proc, timeout: float = 120) -> None:
    """Until ``path`` holds ``n`` complete lines (an observable event, not a sleep of a guessed length)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, f"the job ended early: {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {n} lines in {path}"
        time.sleep(0.02)


def test_job_resumes_after_kill_and_repairs_a_torn_line(tmp_path, tiny_export):
    """Killed (SIGKILL) with rows and bad rows written, and a torn last line in both files: the rerun
    writes every good id exactly once and every bad row exactly once, and keeps what was written."""
    lines = []
    for i in range(200):
        if i % 23 == 5:
            lines.append(
                "{not json" if i % 2 else json.dumps({"id": f"bad{i}", "query_ids": [5, 1], "response_ids": [999]})
            )
        else:
            row = {"id": i, "query_ids": [5 + i % 50, 6, 1], "response_ids": [7 + i % 9] * (1 + i % 13)}
            lines.append(json.dumps(row))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    good = [json.loads(line)["id"] for line in lines if line.startswith('{"id": ') and "999" not in line]
    bad_lines = [n for n, line in enumerate(lines, start=1) if not line.startswith('{"id": ') or "999" in line]
    out, errors = tmp_path / "out.jsonl", tmp_path / "out.jsonl.errors.jsonl"
    options = ["-o", str(out), "--batch-size", "4", "--sort-window", "2", "--providers", "cpu"]
    cmd = [sys.executable, "-m", "t5vh_fast", "score", str(tiny_export)]
    # the first run reads the first 96 lines from a pipe (12 windows of 8 rows), writes them, and waits for more
    first = lines[:96]
    proc = subprocess.Popen([*cmd, "-", *options], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        proc.stdin.write("".join(line + "\n" for line in first).encode())
        proc.stdin.flush()
        n_bad = sum(n <= len(first) for n in bad_lines)
        _wait_for_lines(out, len(first) - n_bad, proc)
        _wait_for_lines(errors, n_bad, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
    assert 0 < n_bad < len(bad_lines)
    written, reported = out.read_bytes(), errors.read_bytes()
    assert len(written.splitlines()) == len(first) - n_bad and len(reported.splitlines()) == n_bad
    for path, torn in ((out, '{"id": 99999, "response_ids": [1, 2'), (errors, '{"line": 150, "id": nu')):
        with open(path, "a") as f:
            f.write(torn)  # as if killed mid-line

    result = subprocess.run([*cmd, str(src), *options], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    done = len(first) - n_bad
    assert f"{len(good) - done} rows scored, {len(bad_lines)} failed, {done} already done" in result.stderr
    assert out.read_bytes().startswith(written) and errors.read_bytes().startswith(reported)  # nothing rewritten
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(good)  # every good id exactly once
    reported_lines = [json.loads(line)["line"] for line in errors.read_text().splitlines()]
    assert sorted(reported_lines) == bad_lines  # every bad row exactly once: not lost, not written twice


def test_log_normalizer_and_entropy_in_row_chunks(monkeypatch):
    """The exp pass runs a few rows at a time; every row, at every chunk edge, equals a float64 computation."""
    from scipy.special import log_softmax as log_softmax64

    from t5vh_fast import scoring

    monkeypatch.setattr(scoring, "ROWS_AT_ONCE", 4)
    logits = (np.random.default_rng(5).standard_normal((11, 300)) * 4).astype(np.float32)
    lse, entropy = scoring.log_normalizer_and_entropy(logits)
    logp = log_softmax64(logits.astype(np.float64), axis=-1)
    np.testing.assert_allclose(lse, (logits - logp)[:, 0], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(entropy, -(np.exp(logp) * logp).sum(-1), rtol=1e-5, atol=1e-5)
    assert len(set(np.round(entropy, 4))) == 11  # every row its own numbers, none copied across a chunk edge
    for threads in (2, 3, 8):  # rows cut among threads: each row its own numbers, in row order
        got = scoring.log_normalizer_and_entropy(logits, threads)
        np.testing.assert_allclose(got[0], lse, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[1], entropy, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- the scorer graph (CUDA's log-softmax)


@pytest.mark.parametrize("vocab", [7, 300, 32128])
def test_scorer_graph_computes_what_the_host_does(vocab):
    """t5vh_scorer.onnx (what CUDA runs instead of the NumPy pass), here on the CPU provider: the chosen
    tokens' log-probs and the entropies of the host's pass; where the host's numbers are not finite (an
    -inf logit, a NaN: the scorer then refuses the row) neither are the graph's."""
    import onnxruntime as ort

    from t5vh_fast.export.sampler import scorer_graph

    session = ort.InferenceSession(scorer_graph(vocab).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((40, vocab)) * 4).astype(np.float32)
    logits[::3, rng.integers(0, vocab, size=vocab // 2)] = -np.inf
    logits[5] = -1e4
    logits[5, 2] = 1.5  # all the mass on one token: log-prob 0, entropy 0
    chosen = rng.integers(0, vocab, size=40)
    chosen[5] = 2
    logprob, entropy = session.run(None, {"logits": logits, "token": chosen})
    lse, host_entropy = scoring.log_normalizer_and_entropy(logits)
    host_logprob = logits[np.arange(40), chosen] - lse
    assert np.isneginf(logprob).sum() == np.isneginf(host_logprob).sum() > 0  # a chosen token without mass
    exact = logits.astype(np.float64)  # the truth both are held to: float64, the parity tolerance
    exact_lse = np.log(np.exp(exact - exact.max(-1, keepdims=True)).sum(-1)) + exact.max(-1)
    with np.errstate(invalid="ignore"):
        exact_entropy = exact_lse - (np.exp(exact - exact_lse[:, None]) * exact).sum(-1)
    exact_logprob = exact[np.arange(40), chosen] - exact_lse
    for ours, host, truth in ((logprob, host_logprob, exact_logprob), (entropy, host_entropy, exact_entropy)):
        finite = np.isfinite(host)
        np.testing.assert_array_equal(np.isfinite(ours), finite)
        assert finite[1:3].all() and finite[5]
        assert np.abs(ours[finite] - truth[finite]).max() <= tol(logits[np.isfinite(logits)])
    assert logprob[5] == 0 and entropy[5] == 0
    logits[7, 1] = np.nan
    logprob, entropy = session.run(None, {"logits": logits, "token": chosen})
    assert np.isnan(logprob[7]) and np.isnan(entropy[7]) and np.isfinite(entropy[8])


def _as_on_cuda(policy):
    """A CPU policy's decoder as CUDA has it: the encoder graph, not the packed one, and no packed decoder."""
    from t5vh_fast.decoder import Graph
    from t5vh_fast.manifest import ENCODER_GRAPH

    decoder = policy.decoder
    decoder._packed, decoder._packed_encoder = None, False
    decoder.graphs[0] = Graph(decoder._session(ENCODER_GRAPH, ["CPUExecutionProvider"]), "cpu")
    return policy


def _with_device_scoring(export_dir):
    """A CPU policy whose decoder runs the GPU path: logits kept in an OrtValue, the scorer graph's pass."""
    import onnxruntime as ort

    from t5vh_fast.manifest import SCORER_GRAPH

    policy = t5vh_fast.load(export_dir, providers="cpu")
    policy.decoder._scorer = ort.InferenceSession(str(export_dir / SCORER_GRAPH), providers=["CPUExecutionProvider"])
    _as_on_cuda(policy)
    assert policy.decoder.scores_on_device
    return policy


@pytest.mark.parametrize("by_length", [False, True])
def test_the_device_scoring_path_gives_the_host_scores(tiny_export, perturbed_dir, monkeypatch, by_length):
    """score() through score_step (what CUDA runs), here on the CPU provider: the host's log-probs, values
    and entropies, with holes in the masks, several samples per query, in one call or length groups,
    and after a weight refresh; only the scored positions come back."""
    from t5vh_fast.checkpoint import load_reference

    host, device = t5vh_fast.load(tiny_export, providers="cpu"), _with_device_scoring(tiny_export)
    ids, mask = mixed_queries(6, 256, seed=36)
    rng = np.random.default_rng(36)
    responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(2, 256, size=n)) for n in rng.integers(1, 11, 18)])
    resp_mask[1, 0] = resp_mask[4, 2] = 0
    calls = []
    score_step = type(device.decoder).score_step

    def counting(self, state, tokens, select, chosen):
        calls.append(len(select))
        return score_step(self, state, tokens, select, chosen)

    monkeypatch.setattr(type(device.decoder), "score_step", counting)
    monkeypatch.setattr(scoring, "CALL_COST", 0)  # by length: a group per distinct length
    for refreshed in (False, True):
        if refreshed:  # update_weights builds new decoder sessions; the scorer graph goes with them
            moved = load_reference(perturbed_dir)
            host.update_weights(moved)
            device.update_weights(moved)
            assert device.decoder.scores_on_device
        for queries, masks in ((ids, mask), (ids[:3], mask[:3])):  # 3 rows per query, then 6
            calls.clear()
            args = {"num_samples": len(responses) // len(queries), "by_length": by_length, "decoder_start_token_id": 0}
            a = scoring.score(device.decoder, queries, masks, responses, resp_mask, **args)
            b = scoring.score(host.decoder, queries, masks, responses, resp_mask, **args)
            assert sum(calls) == resp_mask.sum() and (len(calls) > 1) == by_length
            for name in ("logprobs", "values", "entropy"):
                ours, theirs = getattr(a, name), getattr(b, name)
                assert np.abs(ours - theirs).max() <= tol(theirs)
                assert (ours[resp_mask == 0] == 0).all() and (ours[resp_mask == 1] != 0).all()


def test_device_scores_that_are_not_finite_are_refused(tiny_export, monkeypatch):
    """A NaN the scorer graph returns (broken weights, fp16 overflow) is refused naming the row, as on the host."""
    from t5vh_fast.errors import NonFiniteError

    policy = _with_device_scoring(tiny_export)
    session = policy.decoder._scorer

    class Broken:
        def io_binding(self):
            return session.io_binding()

        def run_with_iobinding(self, binding, *options):
            session.run_with_iobinding(binding, *options)
            logprob, entropy = [np.array(o) for o in binding.copy_outputs_to_cpu()]
            entropy[-1] = np.nan
            binding.copy_outputs_to_cpu = lambda: [logprob, entropy]

    monkeypatch.setattr(policy.decoder, "_scorer", Broken())
    ids, mask = mixed_queries(3, 256, seed=37)
    responses, resp_mask = t5vh_fast.pad_batch([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    with pytest.raises(NonFiniteError, match="row 2, response position 3"):
        policy.score(ids, responses, mask, resp_mask)


def test_the_device_lookup_path_gives_the_host_numbers(tiny_export, monkeypatch):
    """Token embeddings gathered by t5vh_lookup.onnx from a table kept on the device (what CUDA runs), here
    on the CPU provider: the rollouts and scores of the host's lookup. Lookups of more than FEW_ROWS ids
    (the encoder's batch, a scoring call) take the graph, a sampling step's few rows the host; a table
    with new weights is copied to the device again."""
    import onnxruntime as ort

    from t5vh_fast.manifest import LOOKUP_GRAPH

    host, device = t5vh_fast.load(tiny_export, providers="cpu"), t5vh_fast.load(tiny_export, providers="cpu")
    assert host.decoder.host["embedding"]._resident is None  # the CPU reads rows as asked (RSS), CUDA keeps them
    session = ort.InferenceSession(str(tiny_export / LOOKUP_GRAPH), providers=["CPUExecutionProvider"])
    runs = []

    class Counting:
        def io_binding(self):
            return session.io_binding()

        def run_with_iobinding(self, binding):
            runs.append(1)
            session.run_with_iobinding(binding)

    device.decoder._lookup = Counting()
    _as_on_cuda(device)
    ids, mask = mixed_queries(16, 256, seed=38)  # > FEW_ROWS query tokens: the encoder's lookup takes the graph
    a, b = device.respond_to_batch(ids, mask, txt_len=6, seed=8), host.respond_to_batch(ids, mask, txt_len=6, seed=8)
    assert len(runs) == 1  # the encoder's; the steps' 16 rows each were read on the host
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.abs(a.logprobs - b.logprobs).max() <= tol(b.logprobs)
    runs.clear()
    ours, theirs = device.score(ids, a.tokens, mask), host.score(ids, a.tokens, mask)
    assert len(runs) >= 2  # the encoder's and the decoder calls'
    for name in ("logprobs", "values", "entropy"):
        assert np.abs(getattr(ours, name) - getattr(theirs, name)).max() <= tol(getattr(theirs, name))
    monkeypatch.setattr(decoder_module, "FEW_ROWS", 0)  # every lookup through the graph
    table = np.asarray(device.decoder.host["embedding"][np.arange(256)])
    tokens = np.array([[3, 255, 0], [7, 7, 1]])
    assert device.decoder._table is not None
    np.testing.assert_array_equal(device.decoder.embed(tokens).numpy(), table[tokens])
    doubled = device.decoder.with_weights({"host": {"embedding": 2 * table}})
    np.testing.assert_array_equal(doubled.embed(tokens).numpy(), 2 * table[tokens])
    out = doubled.to_device(np.zeros((2, 3, table.shape[1]), dtype=np.float32))
    assert doubled.embed(tokens, out=out) is out and np.array_equal(out.numpy(), 2 * table[tokens])
    np.testing.assert_array_equal(device.decoder.embed(tokens).numpy(), table[tokens])  # the old one unchanged


def test_the_scorer_graph_runs_on_bounded_pieces_of_the_logits(tiny_export, monkeypatch):
    """The scorer graph takes the device logits SCORER_BYTES at a time, each piece bound where it lies (its
    temporaries, which its arena keeps, stay that size): the same numbers as one piece and as the host."""
    policy, host = _with_device_scoring(tiny_export), t5vh_fast.load(tiny_export, providers="cpu")
    ids, mask = mixed_queries(4, 256, seed=39)
    responses, resp_mask = t5vh_fast.pad_batch([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    resp_mask[2, 1] = 0
    expected = host.score(ids, responses, mask, resp_mask)
    scorer, sizes = policy.decoder._scorer, []

    class Counting:
        io_binding = scorer.io_binding

        @staticmethod
        def run_with_iobinding(binding, *args):
            scorer.run_with_iobinding(binding, *args)
            sizes.append(len(binding.copy_outputs_to_cpu()[0]))

    policy.decoder._scorer = Counting
    whole = policy.score(ids, responses, mask, resp_mask)
    assert sizes == [int(resp_mask.sum())]
    sizes.clear()
    monkeypatch.setattr(decoder_module, "SCORER_BYTES", 4 * 4 * policy.decoder.packed_vocab)  # 4 positions a run
    pieces = policy.score(ids, responses, mask, resp_mask)
    assert sizes == [3, 3, 3]  # 9 scored positions, in 3 even pieces
    for name in ("logprobs", "values", "entropy"):
        ours, theirs = getattr(pieces, name), getattr(expected, name)
        assert np.abs(ours - theirs).max() <= tol(theirs)
        assert np.abs(ours - getattr(whole, name)).max() <= tol(theirs)


# ---------------------------------------------------------------------- the packed decoder (CPU)


def _packed_calls(decoder, monkeypatch):
    """Record, per packed_scores call, (positions run, positions scored); make any step() call fail."""
    calls = []
    packed_scores = decoder.packed_scores
    embed = decoder.embed

    def counting(state, tokens, lengths, real):
        calls.append([0, len(real)])
        return packed_scores(state, tokens, lengths, real)

    def counting_embed(ids, out=None):
        if calls and calls[-1][0] == 0:
            calls[-1][0] = np.size(ids)  # the packed call's embeddings: the positions it runs
        return embed(ids, out)

    def no_step(*args, **kwargs):
        raise AssertionError("scoring took a decoder step where the packed decoder was there")

    monkeypatch.setattr(decoder, "packed_scores", counting)
    monkeypatch.setattr(decoder, "embed", counting_embed)
    monkeypatch.setattr(decoder, "step", no_step)
    return calls


@pytest.mark.parametrize("num_samples", [1, 3])
def test_the_packed_decoder_scores_what_the_steps_and_pytorch_do(tiny_export, reference, monkeypatch, num_samples):
    """On the CPU score() runs t5vh_decoder_packed.onnx: one call per batch, each row's positions up to its
    last scored one and no padding, and the numbers of the decoder graph's steps (one padded call and
    length groups) and of PyTorch, holes in the masks and several samples per query included."""
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    decoder = policy.decoder
    assert decoder.scores_packed
    ids, mask = mixed_queries(4, 256, seed=38)
    rng = np.random.default_rng(38)
    rows = 4 * num_samples
    responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(2, 256, size=n)) for n in rng.integers(1, 14, rows)])
    resp_mask[1, 0] = 0  # a hole: position 0 unscored, later ones scored
    resp_mask[2, 1:] = 0  # only the first position scored
    calls = _packed_calls(decoder, monkeypatch)
    packed = policy.score(ids, responses, mask, resp_mask)
    lengths = scoring.scored_lengths(resp_mask)
    assert calls == [[lengths.sum(), resp_mask.sum()]] and lengths.sum() < responses.size
    empty = resp_mask.copy()
    empty[3] = 0  # a row with nothing to score (score() refuses it; the scorer must still cope): zeros, no work
    direct = scoring.score(decoder, ids, mask, responses, empty, decoder_start_token_id=0, num_samples=num_samples)
    assert calls[-1] == [scoring.scored_lengths(empty).sum(), empty.sum()] and (direct.logprobs[3] == 0).all()
    assert np.abs(direct.logprobs - packed.logprobs * empty).max() <= tol(packed.logprobs)
    # a call whose logits would pass the budget: consecutive runs of rows, one packed call each
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 5 * 256 * 4)  # five positions' logits at this vocabulary
    calls.clear()
    chunked = policy.score(ids, responses, mask, resp_mask)
    chunks = scoring.logit_chunks(resp_mask, 256)
    assert len(calls) == len(chunks) > 2 and [c[1] for c in calls] == [resp_mask[c].sum() for c in chunks]
    for name in ("logprobs", "values", "entropy"):
        assert np.abs(getattr(chunked, name) - getattr(packed, name)).max() <= tol(getattr(packed, name))
    monkeypatch.undo()
    queries = np.repeat(ids, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)
    ref = reference.score(queries[0], responses, queries[1], resp_mask)
    logits = teacher_forced(reference, queries[0], queries[1], responses).logits.numpy()
    for by_length in (False, True):
        steps = scoring.score(
            decoder,
            ids,
            mask,
            responses,
            resp_mask,
            decoder_start_token_id=0,
            num_samples=num_samples,
            by_length=by_length,
        )
        for name, bound in (("logprobs", tol(logits)), ("values", tol(ref.values)), ("entropy", tol(logits))):
            ours = getattr(packed, name)
            assert np.abs(ours - getattr(steps, name)).max() <= bound
            assert np.abs(ours - getattr(ref, name).numpy()).max() <= bound
            assert (ours[resp_mask == 0] == 0).all() and (ours[resp_mask == 1] != 0).all()


def test_decoder_sessions_start_when_needed(tiny_export, perturbed_dir, perturbed_export):
    """On the CPU load() starts the encoder and the sampling decoder (for_scoring=True: the encoder only);
    the packed decoder starts at the first score(). A refresh builds again what has started; a lazy
    sampling decoder not yet started starts on the new weights; a packed decoder not yet started is
    dropped (score() then takes decoder steps): every way, the numbers are an export of the new weights'."""
    from t5vh_fast.checkpoint import load_reference

    ids, mask = mixed_queries(3, 256, seed=39)
    responses, resp_mask = t5vh_fast.pad_batch([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    fresh = t5vh_fast.load(perturbed_export, providers="cpu")
    want = fresh.score(ids, responses, mask, resp_mask)
    rollout = fresh.respond_to_batch(ids, mask, txt_len=4, seed=1)
    moved = load_reference(perturbed_dir)

    def started(policy):
        return policy.decoder.graphs[1].started, policy.decoder.scores_packed and policy.decoder._packed.started

    learner = t5vh_fast.load(tiny_export, providers="cpu")
    assert started(learner) == (True, False)
    learner.score(ids, responses, mask, resp_mask)
    assert started(learner) == (True, True)

    scorer = t5vh_fast.load(tiny_export, providers="cpu", for_scoring=True)
    assert started(scorer) == (False, False)
    scorer.score(ids, responses, mask, resp_mask)
    assert started(scorer) == (False, True)
    scorer.update_weights(moved)
    assert started(scorer) == (False, True)  # rebuilt at once; the sampling decoder still waits
    assert np.abs(scorer.score(ids, responses, mask, resp_mask).logprobs - want.logprobs).max() <= tol(want.logprobs)
    again = scorer.respond_to_batch(ids, mask, txt_len=4, seed=1)
    assert started(scorer) == (True, True)
    np.testing.assert_array_equal(again.tokens, rollout.tokens)
    assert np.abs(again.logprobs - rollout.logprobs).max() <= tol(rollout.logprobs)

    sampler = t5vh_fast.load(tiny_export, providers="cpu")
    sampler.respond_to_batch(ids, mask, txt_len=2, seed=0)
    assert started(sampler) == (True, False)
    sampler.update_weights(moved)
    assert sampler.decoder.graphs[1].started and not sampler.decoder.scores_packed  # dropped, not kept
    got = sampler.score(ids, responses, mask, resp_mask)
    for name in ("logprobs", "values", "entropy"):
        assert np.abs(getattr(got, name) - getattr(want, name)).max() <= tol(getattr(want, name))


def test_the_scoring_job_never_starts_the_sampling_decoder(tmp_path, tiny_export, policy, monkeypatch):
    """t5vh-score loads its policy and reference for scoring: on the CPU only the encoder and the packed
    decoder ever start, so the job holds the decoder's weights once."""
    loaded = []
    real_load = t5vh_fast.load

    def recording_load(*args, **kwargs):
        loaded.append((kwargs.get("for_scoring"), real_load(*args, **kwargs)))
        return loaded[-1][1]

    monkeypatch.setattr(t5vh_fast, "load", recording_load)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(policy)[0]))
    args = [str(tiny_export), str(src), "-o", str(out), "--ref", str(tiny_export), "--providers", "cpu"]
    result = CliRunner().invoke(score_command, args)
    assert result.exit_code == 0, result.output
    assert len(loaded) == 2 and all(for_scoring for for_scoring, _ in loaded)
    for _, scored in loaded:
        assert not scored.decoder.graphs[1].started and scored.decoder._packed.started


def test_logit_chunks_bound_each_calls_logits():
    """Consecutive runs of rows whose scored positions' logits fit the budget; a row over it alone; every
    row once, in order; empty rows ride along."""
    mask = np.zeros((7, 6), dtype=np.int64)
    for row, n in enumerate([2, 3, 0, 6, 1, 1, 4]):
        mask[row, :n] = 1
    chunks = scoring.logit_chunks(mask, 10, budget=5 * 10 * 4)  # five positions per call
    assert [c.tolist() for c in chunks] == [[0, 1, 2], [3], [4, 5], [6]]
    assert [c.tolist() for c in scoring.logit_chunks(mask, 10, budget=10**9)] == [list(range(7))]


def test_threads_scoring_at_once_get_their_own_numbers(tiny_export, perturbed_dir):
    """The packed decoder's logits block is kept per thread: two threads scoring different batches on one
    policy at once each get the numbers they get alone, before and after a weight refresh."""
    import concurrent.futures

    from t5vh_fast.checkpoint import load_reference

    policy = t5vh_fast.load(tiny_export, providers="cpu")
    rng = np.random.default_rng(40)
    batches = []
    for seed in range(4):
        ids, mask = mixed_queries(5, 256, seed=40 + seed)
        responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(2, 256, size=n)) for n in rng.integers(1, 12, 5)])
        batches.append((ids, responses, mask, resp_mask))
    for refresh in (False, True):
        if refresh:
            policy.update_weights(load_reference(perturbed_dir))
        alone = [policy.score(*b).logprobs for b in batches]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda b: policy.score(*b).logprobs, batches * 3))
        for i, got in enumerate(together):
            assert np.abs(got - alone[i % 4]).max() <= tol(alone[i % 4])


@pytest.mark.parametrize("num_samples", [1, 3])
def test_a_scoring_process_scores_parts_of_its_queries_at_once(tiny_export, monkeypatch, num_samples):
    """load(for_scoring=True) on the CPU: every session on one thread, without memory patterns, and score()
    runs `threads` parts of a batch's queries at once, each on a thread of its own (both parts are inside
    the packed decoder together, or the barrier breaks); the numbers of a policy that scores a batch in one
    call on two-thread sessions, holes in the masks and several samples per query included."""
    import threading

    scorer = t5vh_fast.load(tiny_export, providers="cpu", threads=2, for_scoring=True)
    plain = t5vh_fast.load(tiny_export, providers="cpu", threads=2)
    ids, mask = mixed_queries(5, 256, seed=42)
    rng = np.random.default_rng(42)
    rows = 5 * num_samples
    responses, resp_mask = t5vh_fast.pad_batch([list(rng.integers(2, 256, size=n)) for n in rng.integers(1, 14, rows)])
    resp_mask[1, 0] = 0  # a hole
    resp_mask[2, 1:] = 0  # only the first position scored
    decoder = scorer.decoder
    assert decoder.score_workers == 2 and plain.decoder.score_workers == 1
    meeting, seen = threading.Barrier(2, timeout=60), []
    packed_scores = decoder.packed_scores

    def meeting_first(state, tokens, lengths, real):
        if len(seen) < 2:  # each part's first call waits for the other part's
            seen.append((threading.get_ident(), state.rows))
            meeting.wait()
        return packed_scores(state, tokens, lengths, real)

    monkeypatch.setattr(decoder, "packed_scores", meeting_first)
    got = scorer.score(ids, responses, mask, resp_mask)
    assert len({thread for thread, _ in seen}) == 2 and sum(n for _, n in seen) == rows
    want = plain.score(ids, responses, mask, resp_mask)
    for name in ("logprobs", "values", "entropy"):
        assert np.abs(getattr(got, name) - getattr(want, name)).max() <= tol(getattr(want, name))
    sessions = [*decoder.graphs, decoder._packed]
    assert not decoder.graphs[1].started  # the sampling decoder waits for a rollout
    for graph in sessions[:1] + sessions[2:]:
        options = graph.session.get_session_options()
        assert options.intra_op_num_threads == 1 and not options.enable_mem_pattern
    options = plain.decoder.graphs[0].session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.enable_mem_pattern
    # one thread is the CPU's: a GPU session of a scoring process keeps the threads asked for
    assert decoder._session_threads(["CUDAExecutionProvider", "CPUExecutionProvider"]) == 2
    one = scorer.score(ids[:1], responses[:num_samples], mask[:1], resp_mask[:num_samples])  # one query: one part
    assert np.abs(one.logprobs - want.logprobs[:num_samples]).max() <= tol(want.logprobs)


def test_query_parts_share_the_work():
    """Every query with scored positions in exactly one part, none without; at most `parts` parts, each
    ascending; largest first to the least loaded part, so no two parts differ by more than one query's work."""
    tokens = np.array([10, 3, 8, 8, 1, 20, 5, 7])
    scored = np.array([4, 0, 9, 2, 1, 30, 6, 3])
    cost = tokens + scoring.DECODER_COST * scored
    for parts in (1, 2, 3, 7, 20):
        cut = scoring.query_parts(tokens, scored, parts)
        assert len(cut) == min(parts, 7)
        members = np.concatenate(cut)
        assert sorted(members.tolist()) == [0, 2, 3, 4, 5, 6, 7]
        assert all((np.diff(part) > 0).all() for part in cut)
        loads = [cost[part].sum() for part in cut]
        assert max(loads) - min(loads) <= cost.max()
    assert scoring.query_parts(tokens, np.zeros(8), 2) == []
    small = scoring.query_parts(np.ones(4), np.ones(4), 2)  # equal work: two and two
    assert [len(part) for part in small] == [2, 2]


def test_at_once_raises_only_after_every_part_ended():
    """A part that fails is raised once the others have ended (none still writes into a shared result);
    results come back in the parts' order."""
    import threading
    import time as clock

    ended = threading.Event()

    def work(part):
        if part == 0:
            raise ValueError("part 0 failed")
        clock.sleep(0.3)
        ended.set()
        return part

    with pytest.raises(ValueError, match="part 0"):
        scoring.at_once(work, [0, 1])
    assert ended.is_set()
    assert scoring.at_once(lambda part: part * 2, [1, 2, 3]) == [2, 4, 6]
    assert scoring.at_once(lambda part: part, []) == []


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_scores_with_threads_of_its_own(tiny_export):
    """The threaded log-softmax pass keeps a thread pool; a child forked after it was made (multiprocessing's
    fork) must not wait on the parent's threads, which it does not have: it scores, and the same numbers."""
    import os

    policy = t5vh_fast.load(tiny_export, providers="cpu", threads=2)
    logits = (np.random.default_rng(6).standard_normal((4 * scoring.ROWS_AT_ONCE, 50)) * 3).astype(np.float32)
    lse, _ = scoring.log_normalizer_and_entropy(logits, 2)  # the pool exists now
    ids, mask = mixed_queries(2, 256, seed=41)
    want = policy.score(ids, [[5, 6, 7], [8, 9, 10]], mask).logprobs
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: a hang here fails the test by its timeout below
        try:
            again, _ = scoring.log_normalizer_and_entropy(logits, 2)
            got = policy.score(ids, [[5, 6, 7], [8, 9, 10]], mask).logprobs
            ok = np.allclose(again, lse, rtol=1e-6, atol=1e-6) and np.abs(got - want).max() <= tol(want)
            os.write(write, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    deadline, status = time.monotonic() + 60, (0, 0)
    while status == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
        status = os.waitpid(child, os.WNOHANG)
    if status == (0, 0):  # still waiting on threads it does not have
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert os.read(read, 8) == b"ok"
