"""``OnnxPolicy.update_weights`` (mostly the single layout; every layout: test_refresh_layouts.py): a refresh equals
a fresh export, a failed one changes nothing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import t5vh_fast
from t5vh_fast.checkpoint import load_reference
from t5vh_fast.demo import build_config, write_demo
from t5vh_fast.errors import ExportError, InputError, NonFiniteError, OutputError, T5vhError
from t5vh_fast.export import export
from t5vh_fast.job import job_fingerprint, run_job, score_rows
from t5vh_fast.modeling import T5HeadWithValueModel

from .conftest import mixed_queries, teacher_forced, tol

TXT_LEN = 12


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """The tiny demo model with other weights (seed 1): what the policy is refreshed to."""
    return write_demo(tmp_path_factory.mktemp("models") / "tiny-seed1", size="tiny", seed=1)


@pytest.fixture(scope="module")
def other_model(other_dir):
    return load_reference(other_dir)


@pytest.fixture(scope="module")
def fresh(other_dir, tmp_path_factory):
    """A fresh export of the other weights: what a refresh must equal."""
    out = export(other_dir, tmp_path_factory.mktemp("exports") / "tiny-seed1-onnx", optimum=False)
    return t5vh_fast.load(out, providers="cpu")


@pytest.fixture(scope="module")
def queries():
    ids, mask = mixed_queries(32, 256, seed=5)
    return ids, mask, np.random.default_rng(6).random((32, TXT_LEN))


def outputs(policy, queries):
    ids, mask, u = queries
    rollout = policy.respond_to_batch(ids, mask, txt_len=TXT_LEN, uniforms=u)
    scores = policy.score(ids, rollout.tokens, mask)
    return rollout, scores


def assert_same_numbers(policy, fresh, model, queries):
    """Tokens identical under shared uniforms; log-probs and values within tol of the fresh export's."""
    ours, our_scores = outputs(policy, queries)
    theirs, their_scores = outputs(fresh, queries)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    ids, mask, _ = queries
    out = teacher_forced(model, ids, mask, theirs.tokens)
    logit_tol, value_tol = tol(out.logits), tol(out.value)
    assert np.abs(ours.logprobs - theirs.logprobs).max() <= logit_tol
    assert np.abs(ours.values - theirs.values).max() <= value_tol
    assert np.abs(our_scores.logprobs - their_scores.logprobs).max() <= logit_tol
    assert np.abs(our_scores.values - their_scores.values).max() <= value_tol
    # and both are the PyTorch model's numbers
    torch_logprobs = torch.log_softmax(out.logits, -1).gather(-1, torch.from_numpy(theirs.tokens)[..., None])[..., 0]
    assert np.abs(ours.logprobs - torch_logprobs.numpy()).max() <= logit_tol
    assert np.abs(ours.values - out.value.numpy()).max() <= value_tol
    assert ours.weights_version == our_scores.weights_version == policy.weights_version


def sources(model, model_dir):
    """The same weights in every form update_weights takes."""
    state = model.state_dict()
    return {
        "model": model,
        "state_dict": state,
        "numpy": {name: t.detach().numpy().copy() for name, t in state.items()},
        "safetensors": load_file(str(model_dir / "model.safetensors")),
    }


# ---------------------------------------------------------------------- a refresh equals a fresh export


@pytest.mark.parametrize("form", ["model", "state_dict", "numpy", "safetensors"])
def test_refresh_equals_a_fresh_export(tiny_export, other_model, other_dir, fresh, queries, form):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    old = policy.weights_version
    version = policy.update_weights(sources(other_model, other_dir)[form])
    assert version == policy.weights_version != old
    assert version == fresh.weights_version  # a hash of the weights: the fresh export's too
    assert_same_numbers(policy, fresh, other_model, queries)


def test_versions_are_the_weights_and_a_name_given_is_kept(tiny_export, tiny_dir, reference, other_model, queries):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    exported = policy.weights_version
    other = policy.update_weights(other_model)
    assert policy.update_weights(other_model.state_dict()) == other  # equal weights, equal versions
    assert policy.update_weights(reference) == exported  # back to the exported weights
    assert policy.update_weights(other_model, version="ppo-step-7") == "ppo-step-7"
    rollout, scores = outputs(policy, queries)
    assert rollout.weights_version == scores.weights_version == "ppo-step-7"
    for bad in ("", "  ", 7):
        with pytest.raises(InputError, match="version must be a non-empty string"):
            policy.update_weights(reference, version=bad)
    assert policy.weights_version == "ppo-step-7"
    assert t5vh_fast.load(tiny_export, providers="cpu", decoder="split").weights_version == exported


@pytest.mark.parametrize("family,head", [("t5-v1_1", "hidden"), ("mt5", "logits")])
def test_refresh_of_other_families_and_heads(tmp_path, family, head):
    """Untied LM head, gated feed-forward, the hidden-state value head: every transform of the plan."""
    base = write_demo(tmp_path / "base", size="tiny", seed=0, family=family, head_layout=head)
    new = write_demo(tmp_path / "new", size="tiny", seed=1, family=family, head_layout=head)
    policy = t5vh_fast.load(export(base, tmp_path / "base-onnx", optimum=False), providers="cpu")
    fresh = t5vh_fast.load(export(new, tmp_path / "new-onnx", optimum=False), providers="cpu")
    model = load_reference(new)
    assert policy.update_weights(load_file(str(new / "model.safetensors"))) == fresh.weights_version
    ids, mask = mixed_queries(16, 256, seed=8)
    assert_same_numbers(policy, fresh, model, (ids, mask, np.random.default_rng(9).random((16, TXT_LEN))))


@pytest.mark.parametrize("layout", ["single", "split", "merged"])
def test_later_changes_to_the_source_do_not_reach_the_policy(tiny_export, other_model, queries, layout):
    """An optimizer step changes the model in place after update_weights(model): the policy keeps its copy."""
    policy = t5vh_fast.load(tiny_export, providers="cpu", decoder=layout)
    model = copy.deepcopy(other_model)
    arrays = {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}
    for source in (model, arrays):
        version = policy.update_weights(source)
        before, before_scores = outputs(policy, queries)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        for a in arrays.values():
            a *= 1.5
        after, after_scores = outputs(policy, queries)
        np.testing.assert_array_equal(after.tokens, before.tokens)
        np.testing.assert_array_equal(after.logprobs, before.logprobs)
        np.testing.assert_array_equal(after_scores.values, before_scores.values)
        assert policy.weights_version == version


# ---------------------------------------------------------------------- one call, one set of weights


def test_an_update_during_a_rollout_does_not_touch_it(tiny_export, other_model, fresh, queries):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    ids, mask, u = queries
    old_version = policy.weights_version
    expected = policy.respond_to_batch(ids, mask, txt_len=TXT_LEN, seed=3)
    updated = []

    def update_mid_rollout(t, tokens):
        if t == 3:
            updated.append(policy.update_weights(other_model))

    rollout = policy.respond_to_batch(ids, mask, txt_len=TXT_LEN, seed=3, callback=update_mid_rollout)
    assert updated == [fresh.weights_version] == [policy.weights_version]
    assert rollout.weights_version == old_version
    np.testing.assert_array_equal(rollout.tokens, expected.tokens)  # every step ran on the old weights
    np.testing.assert_array_equal(rollout.logprobs, expected.logprobs)
    np.testing.assert_array_equal(rollout.values, expected.values)
    after = policy.respond_to_batch(ids, mask, txt_len=TXT_LEN, seed=3)
    np.testing.assert_array_equal(after.tokens, fresh.respond_to_batch(ids, mask, txt_len=TXT_LEN, seed=3).tokens)
    assert after.weights_version == fresh.weights_version


# ---------------------------------------------------------------------- bad input changes nothing


@pytest.fixture(scope="module")
def target(tiny_export, queries):
    """One policy every bad update is tried on, with its numbers before any."""
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    return policy, outputs(policy, queries), policy.weights_version


def _with(state: dict, **changes) -> dict:
    out = dict(state)
    for name, value in changes.items():
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def _poisoned(state: dict, name: str, value: float) -> dict:
    tensor = state[name].clone()
    tensor.view(-1)[7] = value
    return _with(state, **{name: tensor})


def _model(**changes):
    """A tiny value-head model whose config differs from the demo's in ``changes``."""
    config = build_config("tiny")
    for name, value in changes.items():
        setattr(config, name, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T5HeadWithValueModel(config)


def bad_inputs(state: dict) -> dict:
    """name -> (weights, the parameter the error must name, the error class)."""
    ffn = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    wi = "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    norm = "decoder.block.0.layer.1.layer_norm.weight"
    return {
        "missing": (_with(state, **{ffn: None}), ffn, InputError),
        "extra": (
            _with(state, **{"decoder.block.2.layer.0.SelfAttention.q.weight": state[ffn]}),
            "block.2",
            InputError,
        ),
        "wrong shape": (_with(state, **{wi: torch.zeros(100, 64)}), wi, InputError),
        "NaN": (_poisoned(state, norm, float("nan")), norm, NonFiniteError),
        "inf": (_poisoned(state, wi, float("inf")), wi, NonFiniteError),
        "-inf in the value head": (
            _poisoned(state, "v_head.state_representation.weight", float("-inf")),
            "v_head.state_representation.weight",
            NonFiniteError,
        ),
        "untied alias": (
            _with(state, **{"decoder.embed_tokens.weight": state["shared.weight"] + 1}),
            "decoder.embed_tokens.weight",
            InputError,
        ),
        "other vocabulary": (_model(vocab_size=300), "shared.weight", InputError),
        "more layers": (_model(num_layers=3, num_decoder_layers=3), "block.2", InputError),
        "hidden value head": (
            _model(value_head_layout="hidden"),
            "v_head.state_representation.weight",
            InputError,
        ),
        "not a T5": (torch.nn.Linear(4, 4), "shared.weight", InputError),
        "not weights": ([1, 2, 3], "state dict or a model", InputError),
        "not numbers": (_with(state, **{norm: "zeros"}), norm, InputError),
    }


CASES = [
    "missing",
    "extra",
    "wrong shape",
    "NaN",
    "inf",
    "-inf in the value head",
    "untied alias",
    "other vocabulary",
    "more layers",
    "hidden value head",
    "not a T5",
    "not weights",
    "not numbers",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_weights_are_refused_naming_the_parameter_and_change_nothing(target, other_model, queries, case):
    policy, (rollout, scores), version = target
    weights, named, error = bad_inputs(other_model.state_dict())[case]
    with pytest.raises(error) as caught:
        policy.update_weights(weights)
    assert isinstance(caught.value, T5vhError) and named in str(caught.value), str(caught.value)
    assert policy.weights_version == version
    now, now_scores = outputs(policy, queries)
    np.testing.assert_array_equal(now.tokens, rollout.tokens)
    np.testing.assert_array_equal(now.logprobs, rollout.logprobs)
    np.testing.assert_array_equal(now.values, rollout.values)
    np.testing.assert_array_equal(now_scores.logprobs, scores.logprobs)
    assert now.weights_version == now_scores.weights_version == version


def test_a_failure_while_loading_the_new_sessions_changes_nothing(target, other_model, queries, monkeypatch):
    from t5vh_fast import decoder as decoder_module

    policy, (rollout, _), version = target
    real, calls = decoder_module.make_session, []

    def fail_on_the_decoder(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 2:
            raise ExportError(f"onnxruntime cannot load {path}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decoder_module, "make_session", fail_on_the_decoder)
    with pytest.raises(ExportError, match="cannot load"):
        policy.update_weights(other_model)
    # the encoder's new session (the CPU runs the packed encoder) was built, then dropped
    assert calls == ["t5vh_encoder_packed.onnx", "t5vh_decoder.onnx"]
    monkeypatch.undo()
    assert policy.weights_version == version
    np.testing.assert_array_equal(outputs(policy, queries)[0].logprobs, rollout.logprobs)


# ---------------------------------------------------------------------- the scoring job records the weights


def test_the_job_records_the_weights_and_refuses_to_resume_on_others(tmp_path, tiny_export, other_model):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    ref = t5vh_fast.load(tiny_export, providers="cpu")
    exported = policy.weights_version
    rows = [{"id": i, "query_ids": [5 + i, 6, 1], "response_ids": [7, 8 + i], "score": 1.0} for i in range(6)]
    records = list(score_rows(policy, rows, ref_policy=ref))
    assert {(r["weights_version"], r["precision"], r["ref_weights_version"]) for r in records} == {
        (exported, "fp32", exported)
    }
    new = policy.update_weights(other_model)
    assert {r["weights_version"] for r in score_rows(policy, rows)} == {new}

    src, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    run_job(policy, src, out, ref_policy=ref)
    fingerprint = json.loads((tmp_path / "out.jsonl.t5vh-job.json").read_text())["fingerprint"]
    assert (fingerprint["policy_weights_version"], fingerprint["ref_weights_version"]) == (new, exported)
    assert fingerprint["precision"] == "fp32"
    before = out.read_bytes()
    policy.update_weights(other_model, version="another-step")
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(OutputError, match=f"policy_weights_version {new} then, another-step now"):
        run_job(policy, src, out, ref_policy=ref)
    assert out.read_bytes() == before
    policy.update_weights(other_model)  # the same weights again: the resume goes on
    summary = run_job(policy, src, out, ref_policy=ref)
    assert (summary.rows_ok, summary.rows_skipped) == (3, 3)
    assert {json.loads(line)["weights_version"] for line in out.read_text().splitlines()} == {new}


def test_the_fingerprint_of_an_export_directory_is_that_of_its_fresh_load(tiny_export, other_model):
    """t5vh-score --ray fingerprints the export directories its actors load: the same entries as a loaded policy."""
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    assert job_fingerprint(tiny_export, tiny_export, beta=0.1) == job_fingerprint(policy, policy, beta=0.1)
    policy.update_weights(other_model)
    assert (
        job_fingerprint(policy, beta=0.1)["policy_weights_version"]
        != job_fingerprint(tiny_export, beta=0.1)["policy_weights_version"]
    )
