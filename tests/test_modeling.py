"""The PyTorch reference (docs/contract.md, "The model"): value head, layouts, detach_head, respond_to_batch, score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from t5vh_fast import sampling
from t5vh_fast.checkpoint import load_reference
from t5vh_fast.demo import build_model, write_demo
from t5vh_fast.reference import draw, filter_logits

from .conftest import assert_pad_invariant, assert_same_samples, mixed_queries, teacher_forced, tol

EOS = 1


def _queries():
    ids = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask


# ---------------------------------------------------------------------- the value head


def test_forward_returns_value_per_decoder_position(reference):
    ids, mask = _queries()
    out = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(2, 3, dtype=torch.long))
    assert out.value.shape == (2, 3)
    assert out.logits.shape == (2, 3, reference.config.vocab_size)
    expected = reference.v_head.state_representation(out.logits).squeeze(-1)  # seed layout: Linear(vocab, 1) on logits
    torch.testing.assert_close(out.value, expected)


def test_trl_layout_reads_last_decoder_hidden_state():
    model = build_model("tiny", head_layout="hidden")
    ids, mask = _queries()
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(2, 3, dtype=torch.long))
    assert model.v_head.summary.in_features == model.config.d_model
    expected = model.v_head.summary(out.decoder_hidden_states[-1]).squeeze(-1)
    torch.testing.assert_close(out.value, expected)


@pytest.mark.parametrize("layout", ["logits", "hidden"])
def test_save_load_round_trip_keeps_values(tmp_path, layout):
    model_dir = write_demo(tmp_path / "m", size="tiny", head_layout=layout, seed=3)
    original = build_model("tiny", head_layout=layout, seed=3)
    loaded = load_reference(model_dir)
    assert loaded.head_layout == layout
    assert json.loads((model_dir / "config.json").read_text())["value_head_layout"] == layout
    ids, mask = _queries()
    dec = torch.tensor([[0, 4, 5], [0, 6, 7]])
    for name, weight in original.state_dict().items():  # the weights are exact copies ...
        assert torch.equal(weight, loaded.state_dict()[name]), name
    with torch.no_grad():  # ... the computations agree within the parity tolerance, not bit for bit
        a = original(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).value
        b = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).value
    assert (a - b).abs().max() <= tol(a)


@pytest.mark.parametrize("layout", ["logits", "hidden"])
def test_layout_detected_from_state_dict_keys(tmp_path, layout):
    """A checkpoint whose config says nothing about the head loads into the head its keys name."""
    model_dir = write_demo(tmp_path / "m", size="tiny", head_layout=layout)
    config = json.loads((model_dir / "config.json").read_text())
    del config["value_head_layout"]
    (model_dir / "config.json").write_text(json.dumps(config))
    model = load_reference(model_dir)
    assert model.head_layout == layout
    head = model.v_head.state_representation if layout == "logits" else model.v_head.summary
    saved = build_model("tiny", head_layout=layout).v_head.linear
    assert torch.equal(head.weight, saved.weight)


def test_trl_style_state_dict_loads_into_summary_head(tmp_path):
    """A TRL-saved checkpoint: body keys plus v_head.summary.*, no layout in the config."""
    body = build_model("tiny")
    state = {k: v.contiguous() for k, v in body.state_dict().items() if not k.startswith("v_head.")}
    state.pop("lm_head.weight", None)
    state.pop("encoder.embed_tokens.weight", None)
    state.pop("decoder.embed_tokens.weight", None)
    head = torch.nn.Linear(body.config.d_model, 1)
    state["v_head.summary.weight"] = head.weight.detach().clone()
    state["v_head.summary.bias"] = head.bias.detach().clone()
    tmp_path.mkdir(exist_ok=True)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = body.config.to_dict()
    config.pop("value_head_layout")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_reference(tmp_path)
    assert model.head_layout == "hidden"
    assert torch.equal(model.v_head.summary.weight, head.weight)
    assert torch.equal(model.shared.weight, body.shared.weight)


def test_missing_head_weights_warn_with_their_names_and_strict_raises(tmp_path):
    body = build_model("tiny")
    state = {k: v.contiguous() for k, v in body.state_dict().items() if not k.startswith("v_head.")}
    for key in ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(key)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = body.config.to_dict()
    config.pop("value_head_layout")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"v_head\.state_representation\.weight"):
        model = load_reference(tmp_path)
    assert model.head_layout == "logits"
    assert torch.isfinite(model.v_head.state_representation.weight).all()
    with pytest.raises(ValueError, match=r"strict.*|v_head\.state_representation"):
        load_reference(tmp_path, strict=True)


def test_detach_head_sends_no_gradient_into_the_body():
    model = build_model("tiny")
    model.train()
    ids, mask = _queries()
    dec = torch.tensor([[0, 4, 5], [0, 6, 7]])

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).value.pow(2).sum().backward()
        body = [p.grad for n, p in model.named_parameters() if not n.startswith("v_head.")]
        head = [p.grad for n, p in model.named_parameters() if n.startswith("v_head.")]
        return body, head

    body, head = grads()
    assert any(g is not None and g.abs().sum() > 0 for g in body)  # attached: the body learns from the value loss
    model.detach_head()
    body, head = grads()
    assert all(g is None or g.abs().sum() == 0 for g in body)
    assert all(g is not None and g.abs().sum() > 0 for g in head)


# ---------------------------------------------------------------------- filtering and drawing


@pytest.mark.parametrize(
    "top_k,top_p", [(1, 1.0), (5, 1.0), (50, 1.0), (300, 1.0), (0, 0.9), (0, 0.3), (10, 0.8), (0, 0.001)]
)
def test_filtering_equals_transformers_warpers(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k * 1000 + int(top_p * 100))
    logits = torch.randn(16, 256, generator=gen) * 3
    expected = logits.clone()
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours_torch = filter_logits(logits, top_k=top_k, top_p=top_p)
    ours_numpy = sampling.filter_logits(logits.numpy(), top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isinf(ours_torch), torch.isinf(expected))
    assert np.array_equal(np.isinf(ours_numpy), torch.isinf(expected).numpy())
    assert (~torch.isinf(expected)).sum(-1).min() >= 1


def _tie_rule(logits: np.ndarray, top_k: int, top_p: float):
    """The contract's tie rule, written out plainly in float64: ``(kept, margin)`` per row, where
    ``margin`` is how far the row's cumulative probabilities stay from 1 - top_p (rows closer than
    float32 rounding may go either way in a float32 implementation, and are not compared)."""
    kept = np.zeros(logits.shape, dtype=bool)
    margin = np.full(len(logits), np.inf)
    for r, row in enumerate(logits.astype(np.float64)):
        alive = row.copy()
        if 0 < top_k < len(row):
            alive[row < np.sort(row)[-top_k]] = -np.inf  # >= the k-th largest value: ties all kept
        if top_p < 1.0:
            values = np.sort(alive)
            cumulative = np.cumsum(np.exp(values - values[-1]) / np.exp(values - values[-1]).sum())
            removed = min(int((cumulative <= 1 - top_p).sum()), len(row) - 1)
            alive[alive < values[removed]] = -np.inf  # >= the smallest kept value: ties all kept
            margin[r] = np.abs(cumulative - (1 - top_p)).min()
        kept[r] = np.isfinite(alive)
    return kept, margin


TIED_FILTERS = [(1, 1.0), (5, 1.0), (20, 1.0), (0, 0.9), (0, 0.5), (0, 0.05), (20, 0.8), (5, 0.7), (50, 0.95)]


@pytest.mark.parametrize("top_k,top_p", TIED_FILTERS)
def test_filters_follow_the_tie_rule_on_tied_logits(top_k, top_p):
    """Integer logits (as int8 or fp16 logits often are): NumPy, torch and the plain rule keep the same sets."""
    rng = np.random.default_rng(top_k * 100 + int(top_p * 100))
    logits = np.round(rng.standard_normal((512, 256)) * 2).astype(np.float32)
    expected, margin = _tie_rule(logits, top_k, top_p)
    clear = margin > 1e-5  # rows not decided by float32 rounding
    assert clear.mean() > 0.95
    ours_numpy = np.isfinite(sampling.filter_logits(logits, top_k=top_k, top_p=top_p))
    ours_torch = torch.isfinite(filter_logits(torch.from_numpy(logits), top_k=top_k, top_p=top_p)).numpy()
    np.testing.assert_array_equal(ours_numpy[clear], expected[clear])
    np.testing.assert_array_equal(ours_torch[clear], expected[clear])
    # the rule decides by value: equal logits are kept or removed together
    for row, keep in zip(logits, ours_numpy):
        assert not np.isin(row[keep], row[~keep]).any()
    # the data does exercise ties at the boundary: more than k kept, or a kept value also seen below the cut
    if top_p == 1.0:
        assert (ours_numpy.sum(-1) > top_k).mean() > 0.3
    # transformers' warpers break ties by sort order: they keep a subset of our tokens, and fewer on tied rows
    theirs = torch.from_numpy(logits)
    if top_k > 0:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    theirs = torch.isfinite(theirs).numpy()
    assert not (theirs & ~ours_torch).any()
    if top_p < 1.0:
        assert (theirs != ours_torch).any(-1).mean() > 0.3
    else:
        np.testing.assert_array_equal(theirs, ours_torch)  # top-k alone keeps ties in transformers too


@pytest.mark.parametrize("integer", [False, True])
def test_a_tiny_top_p_keeps_the_top_tokens(integer):
    """top_p -> 0 removes every token but the largest (and those tied with it), never all of them, even
    where the float32 cumulative sum ends below 1 - top_p."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((256, 300)) * 3).astype(np.float32)
    if integer:
        logits = np.round(logits / 2)
    expected = logits == logits.max(axis=-1, keepdims=True)
    for top_k in (0, 40):
        kept_numpy = np.isfinite(sampling.filter_logits(logits, top_k=top_k, top_p=1e-12))
        kept_torch = torch.isfinite(filter_logits(torch.from_numpy(logits), top_k=top_k, top_p=1e-12)).numpy()
        np.testing.assert_array_equal(kept_numpy, expected)
        np.testing.assert_array_equal(kept_torch, expected)
    assert (expected.sum(-1) > 1).any() == integer


def test_draw_is_the_inverse_cdf_of_the_rng_contract():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    cases = {0.0: 0, 0.0999: 0, 0.1001: 1, 0.2999: 1, 0.3001: 2, 0.5999: 2, 0.6001: 3, 0.9999: 3}
    for u, token in cases.items():
        assert int(draw(logits, torch.tensor([u], dtype=torch.float64))) == token
        assert sampling.draw(logits.numpy(), np.array([u]))[0] == token
    filtered = torch.tensor([[0.0, -float("inf"), 0.0, -float("inf")]])  # renormalised over the kept two
    assert int(draw(filtered, torch.tensor([0.49], dtype=torch.float64))) == 0
    assert int(draw(filtered, torch.tensor([0.51], dtype=torch.float64))) == 2
    assert sampling.draw(filtered.numpy(), np.array([0.999999999]))[0] == 2


# ---------------------------------------------------------------------- respond_to_batch


def test_respond_returns_exactly_txt_len_tokens_and_accepts_max_length(reference):
    ids, mask = _queries()
    rollout = reference.respond_to_batch(ids, mask, txt_len=7, generator=torch.Generator().manual_seed(0))
    assert rollout.tokens.shape == rollout.logprobs.shape == rollout.values.shape == (2, 7)
    assert rollout.sampling_logprobs is None
    assert reference.respond_to_batch(ids, mask, max_length=5).tokens.shape == (2, 5)


@pytest.fixture
def eos_heavy(reference):
    """The reference with +3 on the EOS logit: EOS becomes likely (p ~ 0.2) at every step."""
    handle = reference.lm_head.register_forward_hook(
        lambda module, args, out: out + 3.0 * (torch.arange(out.shape[-1]) == EOS)
    )
    yield reference
    handle.remove()


def test_sampling_continues_after_eos(eos_heavy):
    ids, mask = mixed_queries(32, 256, seed=1)
    rollout = eos_heavy.respond_to_batch(ids, mask, txt_len=12, generator=torch.Generator().manual_seed(1))
    tokens = rollout.tokens.numpy()
    rows_with_early_eos = [r for r in tokens if EOS in r[:-1]]
    assert rows_with_early_eos, "EOS should be sampled at least once before the last step"
    after = np.concatenate([r[list(r).index(EOS) + 1 :] for r in rows_with_early_eos])
    assert (after != EOS).any() and (after != 0).any()  # real samples after EOS, not padding


def test_eos_is_not_masked_its_probability_is_the_models(reference):
    ids, mask = _queries()
    with torch.no_grad():
        logits = reference(
            input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)
        ).logits[:, 0]
    probs = torch.softmax(logits.double(), -1)
    cdf = probs.cumsum(-1)
    u = (cdf[:, EOS] - probs[:, EOS] / 2).numpy()[:, None]  # the middle of EOS's slice of the CDF
    rollout = reference.respond_to_batch(ids, mask, txt_len=1, uniforms=u)
    assert rollout.tokens[:, 0].tolist() == [EOS, EOS]
    expected = torch.log_softmax(logits, -1)[:, EOS]
    assert torch.allclose(rollout.logprobs[:, 0], expected, atol=tol(logits))


def test_pad_invariance(reference):
    assert_pad_invariant(reference, seed=2)


def test_cached_and_uncached_paths_agree(reference):
    """Two computations (KV cache, or the whole prefix every step): the contract's rollout parity."""
    ids, mask = mixed_queries(256, 256, seed=4)
    u = np.random.default_rng(4).random((256, 6))
    cached = reference.respond_to_batch(ids, mask, txt_len=6, uniforms=u)
    plain = reference.respond_to_batch(ids, mask, txt_len=6, uniforms=u, use_cache=False)
    assert_same_samples(cached.tokens, plain.tokens, cached.logprobs, plain.logprobs)
    assert_same_samples(cached.tokens, plain.tokens, cached.values, plain.values)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 1.0), (0, 0.9)])
def test_rollout_logprobs_and_values_equal_score(reference, top_k, top_p):
    ids, mask = mixed_queries(8, 256, seed=5)
    rollout = reference.respond_to_batch(
        ids, mask, txt_len=10, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(5)
    )
    scores = reference.score(ids, rollout.tokens, mask)
    logits = teacher_forced(reference, ids, mask, rollout.tokens).logits
    assert torch.allclose(scores.logprobs, rollout.logprobs, atol=tol(logits))
    assert torch.allclose(scores.values, rollout.values, atol=tol(rollout.values))
    if top_k or top_p < 1.0:
        assert rollout.sampling_logprobs is not None
        assert (
            rollout.sampling_logprobs >= rollout.logprobs - 1e-5
        ).all()  # filtering only moves mass onto kept tokens


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(txt_len=0), "txt_len"),
        (dict(txt_len=-3), "txt_len"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(txt_len=3, max_length=4), "disagree"),
        (dict(uniforms=np.zeros((2, 3))), "uniforms"),
    ],
)
def test_bad_sampling_options(reference, kwargs, match):
    ids, mask = _queries()
    with pytest.raises(ValueError, match=match):
        reference.respond_to_batch(ids, mask, **kwargs)


def test_bad_queries(reference):
    ids, mask = _queries()
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        reference.respond_to_batch(torch.tensor([[5, 256]]), txt_len=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        reference.respond_to_batch(torch.tensor([[-1, 5]]), txt_len=2)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        reference.respond_to_batch(ids, mask[:, :3], txt_len=2)
    with pytest.raises(ValueError, match="pad_batch"):
        reference.respond_to_batch([[5, 6, 1], [7, 1]], txt_len=2)
    with pytest.raises(ValueError, match="empty batch"):
        reference.respond_to_batch([], txt_len=2)
    with pytest.raises(ValueError, match="one response per query"):
        reference.score(ids, torch.tensor([[4, 5]]), mask)


def test_bad_model_directories(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reference(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_reference(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"'bert'.*T5-family"):
        load_reference(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_reference(tmp_path)


def test_pickle_checkpoints_need_explicit_opt_in(tmp_path, tiny_dir):
    model = build_model("tiny")
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="allow_pickle"):
        load_reference(tmp_path)
    loaded = load_reference(tmp_path, allow_pickle=True)
    assert torch.equal(loaded.v_head.state_representation.weight, model.v_head.state_representation.weight)
