"""update_weights on every decoder layout, Optimum's included: the same numbers as a fresh export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import t5vh_fast
from t5vh_fast.checkpoint import load_reference
from t5vh_fast.export import export
from t5vh_fast.manifest import MANIFEST_NAME

from .conftest import mixed_queries, teacher_forced, tol


@pytest.fixture(scope="module")
def moved(tiny_dir, tmp_path_factory):
    """The tiny model with every weight moved, and a fresh export of it."""
    model = load_reference(tiny_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    root = tmp_path_factory.mktemp("moved")
    model.save_pretrained(root / "m")
    return model, export(root / "m", root / "m-onnx")


@pytest.mark.parametrize("layout", ["single", "split", "merged"])
def test_refresh_equals_a_fresh_export_on_every_layout(tiny_export, moved, layout):
    model, fresh_dir = moved
    policy = t5vh_fast.load(tiny_export, providers="cpu", decoder=layout)
    fresh = t5vh_fast.load(fresh_dir, providers="cpu", decoder=layout)
    ids, mask = mixed_queries(64, 256, seed=50)
    u = np.random.default_rng(50).random((64, 10))
    before = policy.respond_to_batch(ids, mask, txt_len=10, uniforms=u)
    policy.update_weights(model)
    after, expected = (p.respond_to_batch(ids, mask, txt_len=10, uniforms=u) for p in (policy, fresh))
    assert (after.tokens != before.tokens).mean() > 0.5  # the weights really changed
    assert (after.tokens == expected.tokens).mean() >= 0.999
    same = np.cumprod(after.tokens == expected.tokens, axis=1).astype(bool)
    assert np.abs(after.logprobs - expected.logprobs)[same].max() <= tol(expected.logprobs)
    assert np.abs(after.values - expected.values)[same].max() <= tol(expected.values)


@pytest.mark.parametrize("layout", ["split", "merged"])
def test_equal_weights_at_export_stay_separate_parameters(tiny_dir, tiny_export, layout):
    """A fresh model's norm weights are all ones: traced as they are, they would share one initializer,
    and a refresh that moves only one of them could not be represented. The exporter traces a
    fingerprinted copy, so each norm keeps its own initializer."""
    maps = json.loads((tiny_export / MANIFEST_NAME).read_text())["weights"][layout]
    sources = [m["source"] for mapping in maps.values() for m in mapping.values()]
    norms = {s for s in sources if s.endswith("layer_norm.weight")}
    assert len(norms) == 2 * 2 + 3 * 2 + 2  # tiny: every norm of 2 encoder and 2 decoder blocks, and the final ones
    model = load_reference(tiny_dir)
    with torch.no_grad():
        model.decoder.block[1].layer[2].layer_norm.weight.mul_(3.0)  # one norm moves, the others stay ones
    policy = t5vh_fast.load(tiny_export, providers="cpu", decoder=layout)
    policy.update_weights(model)
    ids, mask = mixed_queries(8, 256, seed=51)
    ours = policy.score(ids, ids, mask, mask)
    ref = model.score(ids, ids, mask, mask)
    logits = teacher_forced(model, ids, mask, ids).logits
    assert np.abs(ours.logprobs - ref.logprobs.numpy()).max() <= tol(logits)
    assert np.abs(ours.values - ref.values.numpy()).max() <= tol(ref.values)
