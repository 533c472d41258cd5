"""The ONNX Runtime sampler (docs/contract.md, "Runtime" and "Parity, defined"): parity with PyTorch, distribution, contract, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import t5vh_fast
from t5vh_fast import rollout as rollout_module
from t5vh_fast import sampling
from t5vh_fast.errors import ExportError
from t5vh_fast.manifest import FORMAT_VERSION, MANIFEST_NAME
from t5vh_fast.policy import layout_files
from t5vh_fast.reference import filter_logits as torch_filter

from .conftest import assert_pad_invariant, assert_same_samples, mixed_queries, teacher_forced, tol

EOS = 1
FILTERS = [(0, 1.0), (20, 1.0), (0, 0.85), (30, 0.9)]


# ---------------------------------------------------------------------- token-level parity


@pytest.mark.parametrize("top_k,top_p", FILTERS)
def test_token_parity_with_pytorch_on_shared_uniforms(policy, reference, top_k, top_p):
    ids, mask = mixed_queries(256, 256, seed=10, max_len=20)
    u = np.random.default_rng(11).random((256, 16))
    ours = policy.respond_to_batch(ids, mask, txt_len=16, top_k=top_k, top_p=top_p, uniforms=u)
    ref = reference.respond_to_batch(ids, mask, txt_len=16, top_k=top_k, top_p=top_p, uniforms=u)
    ref_tokens = ref.tokens.numpy()
    assert (ours.tokens == ref_tokens).mean() >= 0.999
    # compare log-probs and values on each row's common prefix
    same = np.cumprod(ours.tokens == ref_tokens, axis=1).astype(bool)
    logits = teacher_forced(reference, ids, mask, ref.tokens).logits.numpy()
    assert np.abs(ours.logprobs - ref.logprobs.numpy())[same].max() <= tol(logits)
    assert np.abs(ours.values - ref.values.numpy())[same].max() <= tol(ref.values)
    if top_k or top_p < 1.0:
        assert np.abs(ours.sampling_logprobs - ref.sampling_logprobs.numpy())[same].max() <= tol(logits)
    else:
        assert ours.sampling_logprobs is None


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A tiny-width model (d_model 64) with t5-small's vocabulary, 32128 ids (126 blocks of the two-level
    draw), and its export: the multi-block draw against the reference in seconds, in the default suite."""
    from t5vh_fast.demo import build_config
    from t5vh_fast.export import export
    from t5vh_fast.modeling import T5HeadWithValueModel

    config = build_config("tiny")
    config.vocab_size = 32128
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5HeadWithValueModel(config).eval()
    root = tmp_path_factory.mktemp("wide")
    model.save_pretrained(root / "model")
    return model, export(root / "model", root / "model-onnx", merged=False)


def test_token_parity_with_a_t5_small_vocabulary(wide_vocab):
    """Unfiltered, so every draw searches the whole 126-block CDF (filtering is held by the tests above)."""
    model, export_dir = wide_vocab
    policy = t5vh_fast.load(export_dir, providers="cpu")
    ids, mask = mixed_queries(256, 32128, seed=19, max_len=12)
    u = np.random.default_rng(19).random((256, 6))
    ours = policy.respond_to_batch(ids, mask, txt_len=6, uniforms=u)
    ref = model.respond_to_batch(ids, mask, txt_len=6, uniforms=u)
    assert np.unique(ours.tokens // sampling.BLOCK).size > 100  # the draws land in most of the 126 blocks
    logits = teacher_forced(model, ids, mask, ref.tokens).logits.numpy()
    assert_same_samples(ours.tokens, ref.tokens, ours.logprobs, ref.logprobs, atol=tol(logits))
    assert_same_samples(ours.tokens, ref.tokens, ours.values, ref.values, atol=tol(ref.values))


class _IntegerLogits:
    """A decoder whose logits are rounded to integers: most rows then tie at the top-k and top-p boundaries."""

    def __init__(self, decoder):
        self.decoder = decoder

    def encode(self, *args, **kwargs):
        return self.decoder.encode(*args, **kwargs)

    def step(self, *args, **kwargs):
        logits, values, state = self.decoder.step(*args, **kwargs)
        return np.round(logits), values, state


@pytest.mark.parametrize("top_k,top_p", [(20, 1.0), (0, 0.85), (5, 0.5)])
def test_token_parity_on_tied_logits(tiny_export, reference, top_k, top_p):
    """With ties everywhere, the runtime and the reference are still the same sampler (the tie rule).
    The filters run on the host after any decoder layout: the default one is enough here."""
    policy = t5vh_fast.load(tiny_export, providers="cpu")

    def round_logits(module, args, out):
        out.logits = torch.round(out.logits)
        return out

    ids, mask = mixed_queries(256, 256, seed=18, max_len=20)
    u = np.random.default_rng(18).random((256, 16))
    options = dict(txt_len=16, top_k=top_k, top_p=top_p, uniforms=u)
    ours = rollout_module.respond(_IntegerLogits(policy.decoder), ids, mask, decoder_start_token_id=0, **options)
    handle = reference.register_forward_hook(round_logits)
    try:
        ref = reference.respond_to_batch(ids, mask, **options)
    finally:
        handle.remove()
    assert (ours.tokens == ref.tokens.numpy()).mean() >= 0.999
    same = np.cumprod(ours.tokens == ref.tokens.numpy(), axis=1).astype(bool)
    np.testing.assert_allclose(ours.sampling_logprobs[same], ref.sampling_logprobs.numpy()[same], atol=1e-4)


# ---------------------------------------------------------------------- distribution parity


def _chi_square_p(samples: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of integer samples to ``probs``, pooling cells expected below 5."""
    n = len(samples)
    observed = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs * n
    assert observed[expected == 0].sum() == 0, "sampled a token the distribution gives zero mass"
    order = np.argsort(expected)
    keep = expected[order] >= 5
    pooled_obs = np.append(observed[order][keep], observed[order][~keep].sum())
    pooled_exp = np.append(expected[order][keep], expected[order][~keep].sum())
    if pooled_exp[-1] == 0:
        pooled_obs, pooled_exp = pooled_obs[:-1], pooled_exp[:-1]
    return float(stats.chisquare(pooled_obs, pooled_exp * pooled_obs.sum() / pooled_exp.sum()).pvalue)


def _reference_probs(reference, query, prefix, top_k, top_p) -> np.ndarray:
    with torch.no_grad():
        out = reference(
            input_ids=torch.tensor([query]),
            decoder_input_ids=torch.tensor([[reference.config.decoder_start_token_id] + list(prefix)]),
        )
    filtered = torch_filter(out.logits[:, -1].float(), top_k=top_k, top_p=top_p)
    return torch.softmax(filtered.double(), -1)[0].numpy()


@pytest.mark.parametrize("top_k,top_p", FILTERS)
def test_sampled_tokens_follow_the_reference_distribution(tiny_export, reference, top_k, top_p):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    query = [17, 42, 99, 5, 1]
    n = 40_000
    rollout = policy.respond_to_batch(np.tile(query, (n, 1)), txt_len=2, top_k=top_k, top_p=top_p, seed=123)
    # first step
    probs0 = _reference_probs(reference, query, [], top_k, top_p)
    assert _chi_square_p(rollout.tokens[:, 0], probs0) > 1e-3
    # the test has power: the same samples against a slightly different distribution are rejected
    assert _chi_square_p(rollout.tokens[:, 0], 0.9 * probs0 + 0.1 * np.roll(probs0, 1)) < 1e-6
    # a later step, conditioned on the most frequent first token
    first = np.bincount(rollout.tokens[:, 0]).argmax()
    later = rollout.tokens[rollout.tokens[:, 0] == first, 1]
    assert len(later) >= 300
    assert _chi_square_p(later, _reference_probs(reference, query, [first], top_k, top_p)) > 1e-3


# ---------------------------------------------------------------------- the sampling contract


def test_exact_length_and_sampling_after_eos(policy, reference):
    ids, mask = mixed_queries(16, 256, seed=12)
    with torch.no_grad():
        logits = (
            reference(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                decoder_input_ids=torch.zeros(16, 1, dtype=torch.long),
            )
            .logits[:, 0]
            .double()
        )
    probs = torch.softmax(logits, -1)
    u = np.random.default_rng(12).random((16, 12))
    u[:, 0] = (probs.cumsum(-1)[:, EOS] - probs[:, EOS] / 2).numpy()  # pick EOS at step 0, as the model allows
    rollout = policy.respond_to_batch(ids, mask, txt_len=12, uniforms=u)
    assert rollout.tokens.shape == (16, 12)
    assert (rollout.tokens[:, 0] == EOS).all()
    after = rollout.tokens[:, 1:]
    assert (after != EOS).mean() > 0.9 and len(np.unique(after)) > 20  # real samples, no padding after EOS
    np.testing.assert_allclose(rollout.logprobs[:, 0], torch.log(probs[:, EOS]).numpy(), atol=tol(logits))


def test_pad_invariance(policy):
    assert_pad_invariant(policy, seed=13)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (25, 0.9)])
def test_rollout_equals_score_on_the_same_tokens(policy, reference, top_k, top_p):
    ids, mask = mixed_queries(32, 256, seed=14)
    rollout = policy.respond_to_batch(ids, mask, txt_len=12, top_k=top_k, top_p=top_p, seed=14)
    scores = policy.score(ids, rollout.tokens, mask)
    # the log-prob tolerance scales with the logits' max
    logits = teacher_forced(reference, ids, mask, rollout.tokens).logits.numpy()
    np.testing.assert_allclose(scores.logprobs, rollout.logprobs, atol=tol(logits))
    np.testing.assert_allclose(scores.values, rollout.values, atol=tol(rollout.values))


def test_num_samples_equals_the_repeated_batch(policy):
    """num_samples responses per query, query-major: the numbers of the query batch repeated (the encoder
    runs once per query instead: a different computation, so the contract's parity), the same draws for
    a seed, ``query_index`` mapping rows to queries, and score() taking the R = B x num_samples rows."""
    ids, mask = mixed_queries(86, 256, seed=20)
    u = np.random.default_rng(20).random((258, 8))
    grouped = policy.respond_to_batch(ids, mask, txt_len=8, num_samples=3, uniforms=u)
    repeated = policy.respond_to_batch(np.repeat(ids, 3, axis=0), np.repeat(mask, 3, axis=0), txt_len=8, uniforms=u)
    np.testing.assert_array_equal(grouped.query_index, np.repeat(np.arange(86), 3))
    assert_same_samples(grouped.tokens, repeated.tokens, grouped.logprobs, repeated.logprobs)
    assert_same_samples(grouped.tokens, repeated.tokens, grouped.values, repeated.values)
    seeded = policy.respond_to_batch(ids, mask, txt_len=8, num_samples=3, seed=9)
    rng = np.random.Generator(np.random.PCG64(9))
    draws = np.stack([rng.random(258) for _ in range(8)], axis=1)
    np.testing.assert_array_equal(
        seeded.tokens, policy.respond_to_batch(ids, mask, txt_len=8, num_samples=3, uniforms=draws).tokens
    )
    scores = policy.score(ids, grouped.tokens, mask)
    np.testing.assert_allclose(scores.logprobs, grouped.logprobs, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores.values, grouped.values, rtol=0, atol=1e-4)


def test_callback_sees_every_step(policy):
    ids, mask = mixed_queries(4, 256, seed=21)
    seen = []
    rollout = policy.respond_to_batch(
        ids, mask, txt_len=5, seed=21, callback=lambda t, tokens: seen.append((t, tokens.copy()))
    )
    assert [t for t, _ in seen] == list(range(5))
    np.testing.assert_array_equal(np.stack([tokens for _, tokens in seen], axis=1), rollout.tokens)


def test_a_rollout_writes_every_step_into_the_same_arrays(tiny_export, monkeypatch):
    """The default layout's steps write their logits into one array and the sampler its exp weights into
    another (no fresh B x V block per step: 8 MB each at t5-small size and batch 64), and the numbers
    are those of fresh arrays every step. The NumPy draw's path (filtered sampling, an export without
    the sampler graph)."""
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    policy.decoder._sampler = None
    ids, mask = mixed_queries(5, 256, seed=3)
    step, exp_weights = policy.decoder.step, rollout_module.exp_weights
    seen = {"logits": [], "weights": []}

    def watched_step(*args, **kwargs):
        logits, values, state = step(*args, **kwargs)
        seen["logits"].append(logits)
        return logits, values, state

    def watched_exp(logits, out=None):
        result = exp_weights(logits, out=out)
        seen["weights"].append(result[0])
        return result

    monkeypatch.setattr(policy.decoder, "step", watched_step)
    monkeypatch.setattr(rollout_module, "exp_weights", watched_exp)
    reused = policy.respond_to_batch(ids, mask, txt_len=6, seed=3)
    for name, arrays in seen.items():
        assert len(arrays) == 6 and all(array is arrays[0] for array in arrays), name

    def fresh_step(*args, **kwargs):
        logits, values, state = step(*args, **kwargs)
        return logits.copy(), values.copy(), state

    monkeypatch.setattr(policy.decoder, "step", fresh_step)
    monkeypatch.setattr(rollout_module, "exp_weights", lambda logits, out=None: exp_weights(logits))
    fresh = policy.respond_to_batch(ids, mask, txt_len=6, seed=3)
    for field in ("tokens", "logprobs", "values"):
        np.testing.assert_array_equal(getattr(reused, field), getattr(fresh, field))


def test_seed_reproducible_and_seeds_differ(policy):
    ids, mask = mixed_queries(4, 256, seed=15)
    a = policy.respond_to_batch(ids, mask, txt_len=8, seed=7)
    b = policy.respond_to_batch(ids, mask, txt_len=8, seed=7)
    c = policy.respond_to_batch(ids, mask, txt_len=8, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)


def test_seed_follows_the_rng_contract(policy):
    """``seed`` = PCG64(seed), one float64 per row per step, rows in order: same as passing those uniforms."""
    ids, mask = mixed_queries(3, 256, seed=16)
    rng = np.random.Generator(np.random.PCG64(5))
    u = np.stack([rng.random(3) for _ in range(6)], axis=1)
    np.testing.assert_array_equal(
        policy.respond_to_batch(ids, mask, txt_len=6, seed=5).tokens,
        policy.respond_to_batch(ids, mask, txt_len=6, uniforms=u).tokens,
    )


def test_text_helpers(policy, tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)  # the checkpoint's own tokenizer, through transformers
    texts = ["paraphrase: Which course should I take?", "How do I cook rice?"]
    ids, mask = policy.encode_text(texts)
    assert ids[0, int(mask[0].sum()) - 1] == EOS and mask[1].sum() < mask[0].sum()
    for row, text in zip(ids[mask.astype(bool).any(1)], texts):
        assert list(row[: len(tokenizer(text).input_ids)]) == tokenizer(text).input_ids
    assert policy.decode_text(ids) == texts  # padding and </s> are skipped: the text comes back
    responses = policy.respond_to_text(texts, txt_len=6, seed=0)
    tokens = policy.respond_to_batch(ids, mask, txt_len=6, seed=0).tokens
    assert responses == tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert all(responses)


# ---------------------------------------------------------------------- bad input


def test_bad_input(policy):
    ids, mask = mixed_queries(2, 256, seed=17)
    cases = [
        (dict(query_ids=[[5, 300, 1]]), r"query_ids\[0, 1\] = 300 is outside the vocabulary"),
        (dict(query_ids=[]), "empty batch"),
        (dict(query_ids=np.zeros((0, 3), dtype=np.int64)), "empty batch"),
        (dict(query_ids=[[5, 6, 1], [7, 1]]), "pad_batch"),
        (dict(query_ids=ids, attention_mask=mask[:, :-1]), "attention_mask has shape"),
        (dict(query_ids=ids, attention_mask=mask, txt_len=0), "txt_len"),
        (dict(query_ids=ids, attention_mask=mask, top_p=0), "top_p"),
        (dict(query_ids=ids, attention_mask=mask, top_k=-2), "top_k"),
        (dict(query_ids=[[1.5, 2.0]]), "integer token ids"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            policy.respond_to_batch(**kwargs)
    with pytest.raises(ValueError, match="response_ids"):
        policy.score(ids, [[5, 999]] * 2, mask)


def test_nan_logits_are_an_error_naming_step_and_row(monkeypatch):
    class NaNDecoder:
        def encode(self, ids, mask, **options):
            return None

        def step(self, state, tokens):
            step = getattr(self, "calls", 0)
            self.calls = step + 1
            logits = np.zeros((3, 8), dtype=np.float32)
            if step == 2:
                logits[1, 4] = np.nan
            return logits, np.zeros(3, dtype=np.float32), state

    ids = np.ones((3, 2), dtype=np.int64)
    with pytest.raises(FloatingPointError, match="step 2, row 1"):
        rollout_module.respond(NaNDecoder(), ids, np.ones_like(ids), decoder_start_token_id=0, txt_len=5, seed=0)


def test_not_an_export_and_tampered_exports(tmp_path, tiny_export, tiny_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        t5vh_fast.load(tmp_path / "nope")
    (tmp_path / "a-file").write_text("{}")
    with pytest.raises(FileNotFoundError, match="a-file is a file, not an export directory"):
        t5vh_fast.load(tmp_path / "a-file")
    with pytest.raises(ExportError, match="not a t5vh export.*t5vh-export"):
        t5vh_fast.load(tiny_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    t5vh_fast.load(copy, providers="cpu")
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="version 99.*Re-export"):
        t5vh_fast.load(copy)
    manifest["format_version"] = FORMAT_VERSION
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    for layout, name in (("split", "decoder_with_past_model.onnx"), ("single", "t5vh_decoder.onnx.data")):
        with open(copy / name, "ab") as f:
            f.write(b"\0")
        with pytest.raises(ExportError, match=f"{name} does not match the sha256"):
            t5vh_fast.load(copy, decoder=layout)
        shutil.copy(tiny_export / name, copy / name)
    (copy / "encoder_model.onnx").unlink()
    with pytest.raises(ExportError, match="lacks encoder_model.onnx"):
        t5vh_fast.load(copy, decoder="split")
    t5vh_fast.load(copy, providers="cpu")  # the single layout does not read it
    no_merged = _without_layout(copy, tmp_path / "no-merged", "merged")
    with pytest.raises(ExportError, match="no 'merged' decoder layout"):
        t5vh_fast.load(no_merged, decoder="merged")
    with pytest.raises(ValueError, match="decoder must be one of"):
        t5vh_fast.load(copy, decoder="fused")


# what each decoder layout reads, written out here (not taken from the code under test)
LAYOUT_FILES = {
    "single": [
        "t5vh_encoder.onnx",
        "t5vh_encoder.onnx.data",
        "t5vh_decoder.onnx",
        "t5vh_decoder.onnx.data",
        "t5vh_embedding.npy",
        "t5vh_tables.npz",
        "t5vh_sampler.onnx",  # the draw; an export without it (older) samples in NumPy
        "t5vh_scorer.onnx",  # read on CUDA only, the same for the scorer's log-softmax
        "t5vh_lookup.onnx",  # and for the embedding lookup
        "t5vh_decoder_packed.onnx",  # scoring on the CPU; its weights are t5vh_decoder.onnx.data's
        "t5vh_encoder_packed.onnx",  # the encoder on the CPU; its weights are t5vh_encoder.onnx.data's
    ],
    "split": [
        "encoder_model.onnx",
        "encoder_model.onnx.data",
        "decoder_model.onnx",
        "decoder_model.onnx.data",
        "decoder_with_past_model.onnx",
        "decoder_with_past_model.onnx.data",
    ],
    "merged": [
        "encoder_model.onnx",
        "encoder_model.onnx.data",
        "decoder_model_merged.onnx",
        "decoder_model_merged.onnx.data",
    ],
}
SIDE_FILES = {
    MANIFEST_NAME,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


@pytest.mark.parametrize("which", ["tiny_export", "perturbed_export"])
def test_the_manifest_lists_every_file_the_export_holds(request, which):
    """Every graph, weight and table file of an export is listed with its hash, and in a layout
    (the perturbed export was made with --no-merged: it has no merged layout and no merged graph)."""
    export_dir = request.getfixturevalue(which)
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text())
    held = {p.name for p in export_dir.iterdir()} - SIDE_FILES
    assert set(manifest["files"]) == held
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((export_dir / name).read_bytes()).hexdigest() == digest, name
    expected = {k: v for k, v in LAYOUT_FILES.items() if which == "tiny_export" or k != "merged"}
    assert {k: sorted(v) for k, v in manifest["layouts"].items()} == {k: sorted(v) for k, v in expected.items()}
    assert set().union(*manifest["layouts"].values()) == held
    for layout, files in expected.items():
        assert layout_files(export_dir, manifest, layout) == sorted(files)  # what load() checks: what it reads


def test_weights_version_names_the_weights(tiny_export, perturbed_export):
    """Two exports of different weights never share a weights_version, on any layout (Optimum's graphs hold
    their weights in .data files: the graphs alone are the same bytes for both)."""
    for layout in ("single", "split"):
        policy = t5vh_fast.load(tiny_export, providers="cpu", decoder=layout)
        again = t5vh_fast.load(tiny_export, providers="cpu", decoder=layout)
        other = t5vh_fast.load(perturbed_export, providers="cpu", decoder=layout)
        assert policy.weights_version == again.weights_version != other.weights_version, layout
        assert policy.respond_to_batch([[5, 6, 1]], txt_len=2, seed=0).weights_version == policy.weights_version
        assert policy.score([[5, 6, 1]], [[7, 8]]).weights_version == policy.weights_version


@pytest.fixture(scope="module")
def export_copy(tiny_export, tmp_path_factory):
    copy = tmp_path_factory.mktemp("manifest") / "copy"
    shutil.copytree(tiny_export, copy)
    return copy


@pytest.mark.parametrize("layout", ["single", "split", "merged"])
def test_load_refuses_any_file_of_its_layout_the_manifest_does_not_vouch_for(
    export_copy, tiny_export, perturbed_export, layout
):
    """For every file the layout reads: changed -> refused; left out of the manifest -> refused even with
    verify=False, and even when the file is a valid graph of another model. Files of other layouts are
    not this layout's business."""
    manifest_path = export_copy / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    t5vh_fast.load(export_copy, providers="cpu", decoder=layout)
    for name in LAYOUT_FILES[layout]:
        with open(export_copy / name, "ab") as f:
            f.write(b"\0")
        with pytest.raises(ExportError, match=f"{name} does not match the sha256"):
            t5vh_fast.load(export_copy, decoder=layout)
        other = perturbed_export / name  # a valid file of another model, where there is one
        shutil.copy(other if other.exists() else tiny_export / name, export_copy / name)
        unlisted = {**manifest, "files": {k: v for k, v in manifest["files"].items() if k != name}}
        for listing in (
            unlisted,
            {**unlisted, "layouts": {k: [f for f in v if f != name] for k, v in manifest["layouts"].items()}},
        ):
            manifest_path.write_text(json.dumps(listing))
            for verify in (True, False):
                newer = (
                    "t5vh_sampler.onnx",
                    "t5vh_scorer.onnx",
                    "t5vh_lookup.onnx",
                    "t5vh_decoder_packed.onnx",
                    "t5vh_encoder_packed.onnx",
                )
                if name in newer and name not in listing["layouts"]["single"]:
                    # an export made before that graph: the file is ignored, not read
                    policy = t5vh_fast.load(export_copy, providers="cpu", decoder=layout, verify=verify)
                    assert policy.decoder.samples_on_device == (name != "t5vh_sampler.onnx")
                    assert not policy.decoder.scores_on_device
                    assert policy.decoder.scores_packed == (name != "t5vh_decoder_packed.onnx")
                    assert policy.decoder.encodes_packed == (name != "t5vh_encoder_packed.onnx")
                    continue
                with pytest.raises(ExportError, match=f"{name} is not listed in {MANIFEST_NAME}"):
                    t5vh_fast.load(export_copy, decoder=layout, verify=verify)
        manifest_path.write_text(json.dumps(manifest))
        shutil.copy(tiny_export / name, export_copy / name)
    for listing, message in (
        ({**manifest, "files": {}}, "is not listed"),
        (_without(manifest, "files"), "no valid 'files'"),
    ):
        manifest_path.write_text(json.dumps(listing))
        with pytest.raises(ExportError, match=message):
            t5vh_fast.load(export_copy, decoder=layout, verify=False)
    manifest_path.write_text(json.dumps(manifest))
    for name in sorted(set(manifest["files"]) - set(LAYOUT_FILES[layout])):
        with open(export_copy / name, "ab") as f:  # damage every file this layout does not read
            f.write(b"\0")
    try:
        policy = t5vh_fast.load(export_copy, providers="cpu", decoder=layout)
        assert policy.respond_to_batch([[5, 6, 1]], txt_len=2, seed=0).tokens.shape == (1, 2)
    finally:
        for name in manifest["files"]:
            shutil.copy(tiny_export / name, export_copy / name)


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _without_layout(src, dst, layout):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    del manifest["layouts"][layout]
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


def test_exports_of_format_1_load_with_optimums_layout(tmp_path, tiny_export):
    """A format-1 manifest (before the single layout and the weight map) loads, on the split layout."""
    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    for key in ("layouts", "weights", "precision"):
        del manifest[key]
    manifest["format_version"] = 1
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    policy = t5vh_fast.load(old, providers="cpu")
    assert policy.decoder.layout == "split"
    assert policy.respond_to_batch([[5, 6, 1]], txt_len=3, seed=0).tokens.shape == (1, 3)
    assert t5vh_fast.load(old, providers="cpu", decoder="merged").decoder.layout == "merged"
    with pytest.raises(ExportError, match="no 'single' decoder layout"):
        t5vh_fast.load(old, decoder="single")  # format 1 had Optimum's graphs only
    del manifest["files"]["decoder_model_merged.onnx"]  # an export made with --no-merged
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"no 'merged' decoder layout \(it has 'split'\)"):
        t5vh_fast.load(old, decoder="merged")


# ---------------------------------------------------------------------- no torch


def test_runtime_path_imports_no_torch(tiny_export):
    code = f"""
import sys, numpy as np, t5vh_fast
p = t5vh_fast.load({str(tiny_export)!r}, providers="cpu")
r = p.respond_to_batch([[5, 6, 1]], txt_len=4, seed=0, top_k=5)
s = p.score([[5, 6, 1]], r.tokens)
p.respond_to_text(["hello there"], txt_len=3, seed=1)
print("torch" in sys.modules, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_row_table_reads_the_rows_numpy_would(tmp_path):
    """The single layout's embedding is read a row at a time from its .npy file, not memory-mapped."""
    from t5vh_fast.decoder import RowTable
    from t5vh_fast.errors import InputError

    table = np.random.default_rng(3).standard_normal((50, 7)).astype(np.float32)
    np.save(tmp_path / "table.npy", table)
    for resident in (False, True):  # read as asked (the CPU), or read once and kept (keep_in_memory: CUDA)
        rows = RowTable(tmp_path / "table.npy")
        if resident:
            rows.keep_in_memory()
        ids = np.array([[4, 49, 4, 0], [7, 7, 7, 2]])
        np.testing.assert_array_equal(rows[ids], table[ids])
        np.testing.assert_array_equal(rows[np.array([49])], table[[49]])
        assert rows[ids].dtype == np.float32 and rows[ids].flags.writeable
        with pytest.raises(InputError, match=r"token ids must be in \[0, 50\)"):
            rows[np.array([3, 50])]
        with pytest.raises(InputError, match=r"token ids must be in \[0, 50\)"):
            rows[np.array([-1])]
        many = np.random.default_rng(4).integers(0, 50, size=(3, 40))  # more ids than a sampling step's batch
        np.testing.assert_array_equal(rows[many], table[many])
        assert rows[many].flags.writeable
        many[1, 7] = 50
        with pytest.raises(InputError, match=r"token ids must be in \[0, 50\)"):
            rows[many]
    data = (tmp_path / "table.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-10])
    with pytest.raises(ExportError, match="shorter than its header says"):
        RowTable(tmp_path / "short.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ExportError, match="not a 2-D table"):
        RowTable(tmp_path / "cube.npy")


# ---------------------------------------------------------------------- the packed encoder (CPU)


def test_the_packed_encoder_runs_only_the_real_tokens_and_gives_the_encoders_numbers(tiny_export, monkeypatch):
    """On the CPU encode() runs t5vh_encoder_packed.onnx on the queries' real tokens only (where the mask
    is 1, a hole in a row included): the cross K/V equal the encoder graph's there and are 0 at the
    padding, and the rollout and scores built on them equal those of a decoder running the encoder graph."""
    from t5vh_fast.decoder import open_decoder

    packed = open_decoder(tiny_export, "single", providers="cpu", packed_encoder=True)
    plain = open_decoder(tiny_export, "single", providers="cpu")
    assert packed.encodes_packed and not plain.encodes_packed
    ids, mask = mixed_queries(6, 256, seed=21, max_len=9)
    mask[1, 1] = 0  # a hole: a masked position before the row's last token
    embedded = []
    embed = packed.embed
    monkeypatch.setattr(
        packed, "embed", lambda tokens, *a, **kw: embedded.append(np.size(tokens)) or embed(tokens, *a, **kw)
    )
    ours, theirs = packed.encode(ids, mask, capacity=None), plain.encode(ids, mask, capacity=None)
    assert embedded == [mask.sum()] and mask.sum() < mask.size  # only the real tokens went in
    real = mask[:, None, :, None] != 0
    for mine, want in zip(ours.cross_kv, theirs.cross_kv):
        mine, want = mine.numpy(), want.numpy()
        assert np.abs(np.where(real, mine - want, 0)).max() <= tol(want)
        assert not np.where(real, 0, mine).any()  # nothing computed for the padding
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    assert policy.decoder.encodes_packed
    rows, rows_mask = mixed_queries(256, 256, seed=22)
    u = np.random.default_rng(22).random((256, 6))
    a = policy.respond_to_batch(rows, rows_mask, txt_len=6, uniforms=u)
    policy.decoder._packed_encoder = False  # the same sessions' numbers through the encoder graph ...
    policy.decoder.graphs[0] = plain.graphs[0]
    b = policy.respond_to_batch(rows, rows_mask, txt_len=6, uniforms=u)
    assert_same_samples(a.tokens, b.tokens, a.logprobs, b.logprobs)
    scored = policy.score(rows, a.tokens, rows_mask)
    policy.decoder._packed_encoder = True
    policy.decoder.graphs[0] = packed.graphs[0]
    assert np.abs(policy.score(rows, a.tokens, rows_mask).logprobs - scored.logprobs).max() <= tol(scored.logprobs)
