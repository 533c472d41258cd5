"""Precision modes: int8 / fp16 / bf16 exports, the precision-gap report, the gate, and what runs where."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import t5vh_fast
from t5vh_fast.checkpoint import load_reference
from t5vh_fast.cli import export_command
from t5vh_fast.decoder import check_cache_types
from t5vh_fast.demo import build_model
from t5vh_fast.errors import ExportError, InputError, NonFiniteError, ParityError
from t5vh_fast.export import export
from t5vh_fast.export import precision as precision_module
from t5vh_fast.export.graph import DECODER_GRAPH
from t5vh_fast.manifest import MANIFEST_NAME

from .conftest import mixed_queries, tol

REPORT_FIELDS = (
    "kl_mean",
    "kl_max",
    "token_agreement",
    "first_token_agreement",
    "max_abs_logprob_diff",
    "max_abs_value_diff",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "ratio_outside_band",
)


@pytest.fixture(scope="module")
def int8_export(tiny_dir, tmp_path_factory):
    return export(tiny_dir, tmp_path_factory.mktemp("int8") / "tiny-int8", precision="int8")


def _manifest(root):
    return json.loads((root / MANIFEST_NAME).read_text())


def test_int8_export_reports_a_small_nonzero_gap(int8_export):
    manifest = _manifest(int8_export)
    assert manifest["precision"] == "int8" and list(manifest["layouts"]) == ["single"]
    report = manifest["precision_report"]
    assert report["measured"] and all(np.isfinite(report[k]) for k in REPORT_FIELDS)
    assert 0 < report["kl_mean"] <= report["kl_max"] < 0.05  # small, but int8 is not fp32: never exactly 0
    assert report["max_abs_logprob_diff"] > 0 and report["first_token_agreement"] >= 0.75
    assert report["ratio_min"] <= report["ratio_mean"] <= report["ratio_max"]
    # the .data files really hold int8 matrices: far smaller than fp32's
    fp32_bytes = 4 * sum(np.prod(a.shape) for a in build_model("tiny").state_dict().values())
    assert (int8_export / "t5vh_decoder.onnx.data").stat().st_size < 0.5 * fp32_bytes


def test_int8_report_agrees_with_an_independent_measurement(int8_export, reference):
    """Recompute the KL of the int8 policy's first-step distribution to fp32 PyTorch's, by hand."""
    policy = t5vh_fast.load(int8_export)
    assert policy.precision == "int8" and policy.providers[0] == "CPUExecutionProvider"
    ids, mask = mixed_queries(64, 256, seed=40)
    start = np.zeros((64, 1), dtype=np.int64)
    logits, _, _ = policy.decoder.step(policy.decoder.encode(ids, mask, capacity=1), start)
    with torch.no_grad():
        ref = reference(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            decoder_input_ids=torch.from_numpy(start),
        )
    p = torch.log_softmax(ref.logits[:, 0].double(), -1).numpy()
    q = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert policy.precision_report == _manifest(int8_export)["precision_report"]
    assert 0 < kl.mean() < 10 * policy.precision_report["kl_max"]
    rollout = policy.respond_to_batch(ids, mask, txt_len=4, seed=1)
    assert rollout.precision == "int8" and policy.score(ids, rollout.tokens, mask).precision == "int8"
    np.testing.assert_allclose(policy.score(ids, rollout.tokens, mask).logprobs, rollout.logprobs, atol=tol(logits))


def test_int8_refresh_equals_a_fresh_int8_export(tiny_dir, int8_export, tmp_path):
    model = load_reference(tiny_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    model.save_pretrained(tmp_path / "moved")
    fresh = t5vh_fast.load(export(tmp_path / "moved", tmp_path / "moved-int8", precision="int8"))
    policy = t5vh_fast.load(int8_export)
    policy.update_weights(model)
    ids, mask = mixed_queries(32, 256, seed=41)
    u = np.random.default_rng(41).random((32, 10))
    a, b = (
        policy.respond_to_batch(ids, mask, txt_len=10, uniforms=u),
        fresh.respond_to_batch(ids, mask, txt_len=10, uniforms=u),
    )
    assert (a.tokens == b.tokens).mean() >= 0.999
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_fp16_export_keeps_overflowing_sublayers_in_fp32(tmp_path, tiny_dir, monkeypatch):
    model = build_model("tiny")
    with torch.no_grad():  # the same function, but decoder layer 1's feed-forward goes far past fp16's range inside
        ff = model.decoder.block[1].layer[2].DenseReluDense  # (its weights too: stored as fp16 they would be inf)
        ff.wi.weight.mul_(1e6)
        ff.wo.weight.mul_(1e-6)
    model.save_pretrained(tmp_path / "big")
    out = export(tmp_path / "big", precision="fp16")
    manifest = _manifest(out)
    assert manifest["kept_fp32"] == ["decoder.1.ff"]
    assert manifest["weights"]["single"]["decoder.1.ff_wi"]["dtype"] == "fp32"
    assert manifest["weights"]["single"]["decoder.0.ff_wi"]["dtype"] == "fp16"
    report = manifest["precision_report"]
    assert report["measured"] and 0 < report["kl_mean"] < 1e-4 and report["first_token_agreement"] >= 0.9
    policy = t5vh_fast.load(out, providers="cpu")
    assert np.isfinite(policy.respond_to_batch([[5, 6, 7, 1]], txt_len=6, seed=0).logprobs).all()
    # without keeping it, fp16 overflows: the export refuses, names the sublayer and suggests bf16
    monkeypatch.setattr(precision_module, "fp16_keep", lambda peaks: ())
    with pytest.raises(NonFiniteError, match=r"decoder\.1\.ff.*fp16.*bf16"):
        export(tmp_path / "big", tmp_path / "overflowing", precision="fp16")
    assert not (tmp_path / "overflowing").exists()


def test_reduced_precision_keeps_self_attention_and_its_cache_in_fp32(tiny_dir, tmp_path):
    """fp16/bf16 sublayers compute in 16 bits except self-attention, whose cache onnxruntime's 16-bit CUDA
    attention read past the written positions; an export with a 16-bit cache is refused on CUDA."""
    out = export(tiny_dir, tmp_path / "fp16", precision="fp16")
    graph = onnx.load(out / DECODER_GRAPH, load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    caches = [name for name in types if name.startswith(("past_key", "past_value", "present_"))]
    assert caches and all(types[name] == onnx.TensorProto.FLOAT for name in caches)
    weights = {w.name: w.data_type for w in graph.initializer}
    assert weights["decoder.0.self_q"] == onnx.TensorProto.FLOAT16  # the projections stay fp16
    policy = t5vh_fast.load(out, providers="cpu")
    assert set(policy.decoder._cache_types) == {np.float32}
    check_cache_types(out, "cpu", [np.float16])  # the CPU runs an older 16-bit cache right
    check_cache_types(out, "cuda", [np.float32])
    with pytest.raises(ExportError, match="16 bits.*re-export"):
        check_cache_types(out, "cuda", [np.float32, np.float16])
    with pytest.raises(ExportError, match="16 bits"):
        check_cache_types(out, "cuda", [16])  # bfloat16


def test_bf16_exports_here_and_says_it_needs_a_gpu(tiny_dir, tmp_path):
    out = export(tiny_dir, tmp_path / "bf16", precision="bf16")
    report = _manifest(out)["precision_report"]
    assert not report["measured"] and "needs a GPU" in report["why"]
    with pytest.raises(InputError, match="precision is bf16.*CPUExecutionProvider cannot run"):
        t5vh_fast.load(out, providers="cpu")


def test_max_kl_gate_refuses_and_writes_nothing(tiny_dir, tmp_path):
    with pytest.raises(ParityError, match="mean per-token KL.*--max-kl"):
        export(tiny_dir, tmp_path / "gated", precision="int8", max_kl=1e-12)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(
        export_command, [str(tiny_dir), "-o", str(tmp_path / "x"), "--precision", "int8", "--max-kl", "1e-12"]
    )
    assert result.exit_code == 1 and "--max-kl" in result.output and "Traceback" not in result.output


def test_unknown_precision_is_one_line(tiny_dir, tmp_path):
    result = CliRunner().invoke(export_command, [str(tiny_dir), "-o", str(tmp_path / "x"), "--precision", "int4"])
    assert result.exit_code == 2 and "int4" in result.output and "fp32" in result.output and "int8" in result.output
    with pytest.raises(InputError, match="precision must be one of"):
        export(tiny_dir, tmp_path / "y", precision="int4")
    with pytest.raises(InputError, match="max_kl"):
        export(tiny_dir, tmp_path / "y", precision="int8", max_kl=-1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
