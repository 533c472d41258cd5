"""Precision modes: int8 / fp16 / bf16 exports, the precision-gap report, the gate, and what runs where."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
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
from t5vh_fast.export.graph import DECODER_GRAPH, Builder, save
from t5vh_fast.manifest import MANIFEST_NAME
from t5vh_fast.providers import session_options
from t5vh_fast.weights import INT8, ModelSpec, quantize_int8

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
    # A rollout runs self-attention one step at a time, scoring over the whole response: their floats differ
    # in the last bits, and where an activation sits at an int8 rounding edge that becomes one int8 step
    # (~1/127 of its row's largest value) and spreads. So int8 rollouts equal score() of the same tokens to
    # int8's rounding, not fp32's tolerance (docs/contract.md; t5-small: 3.5e-2 at most, most tokens ~1e-3).
    diff = np.abs(policy.score(ids, rollout.tokens, mask).logprobs - rollout.logprobs)
    assert (diff <= tol(logits)).mean() >= 0.9 and diff.max() < 0.05


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


def _int8_linear(tmp_path, spec, w, *, relu):
    """A one-matrix graph built as the exporter builds int8 layers: (session, dequantized weights)."""
    q, scale = quantize_int8(w)
    b = Builder("t", {"w": q, "w.scale": scale}, spec)
    x = b.input("x", onnx.TensorProto.FLOAT, ["b", "t", w.shape[0]])
    if relu:
        x = b.activation(x)
    b.output(b.linear(x, "w"), "y", onnx.TensorProto.FLOAT, ["b", "t", w.shape[1]])
    save(b, tmp_path / "linear.onnx")
    options = session_options(None)  # as the runtime's: on CPUs without VNNI, products that cannot saturate
    session = ort.InferenceSession(str(tmp_path / "linear.onnx"), options, providers=["CPUExecutionProvider"])
    return session, q.astype(np.float32) * scale


@pytest.mark.parametrize("relu", [False, True])
def test_int8_matmul_quantizes_each_row_by_itself(tmp_path, tiny_dir, relu):
    """Per-row activation scales: a row's result is that row's alone, a zero row gives exactly 0, and a
    row 1000x larger than its neighbours loses no precision to them (a per-tensor scale would)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 24)).astype(np.float32)
    spec = ModelSpec.from_config(json.loads((tiny_dir / "config.json").read_text()))
    assert spec.activation == "relu"
    session, dequantized = _int8_linear(tmp_path, spec, w, relu=relu)
    x = rng.standard_normal((2, 4, 48)).astype(np.float32)
    x[0, 1] = 0.0
    x[1, 2] *= 1000.0
    y = session.run(None, {"x": x})[0]
    if relu:
        x = np.maximum(x, 0)
    exact = x @ w
    assert np.isfinite(y).all() and (y[0, 1] == 0).all()
    for row in [(0, 0), (0, 3), (1, 2)]:  # int8 on both sides: within ~2% of the row's largest output
        err = np.abs(y[row] - exact[row]).max() / np.abs(exact[row]).max()
        assert 0 < err < 0.02, (row, err)
    alone = session.run(None, {"x": np.ascontiguousarray(x[1:2, 2:3])})[0]
    np.testing.assert_allclose(alone[0, 0], y[1, 2], rtol=1e-6, atol=1e-6 * np.abs(y[1, 2]).max())
    assert np.abs(y[0, 0] - x[0, 0] @ dequantized).max() < 0.02 * np.abs(exact[0, 0]).max()


def test_int8_export_runs_matmul_integer_with_row_scales(int8_export):
    """Every matrix of an int8 export is a MatMulIntegerToFloat on int8 weights with one scale per column, fed
    by a per-row QuantizeLinear; nothing is left in fp32 but the value head; the plan records the layout."""
    for name in ("t5vh_encoder.onnx", DECODER_GRAPH):
        model = onnx.load(str(int8_export / name), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        inits = {t.name: t for t in model.graph.initializer}
        assert "MatMulNBits" not in ops and ops.count("MatMulIntegerToFloat") > 0
        assert ops.count("MatMul") == (1 if name == DECODER_GRAPH else 0)  # the folded value head
        for node in model.graph.node:
            if node.op_type == "MatMulIntegerToFloat":
                weight, scale = inits[node.input[1]], inits[node.input[3]]
                assert weight.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [weight.dims[1]]
            if node.op_type == "QuantizeLinear":
                assert {a.name: a.i for a in node.attribute}["axis"] == -1
    plan = _manifest(int8_export)["weights"]["single"]
    assert plan["lm_head"]["dtype"] == INT8 and plan["decoder.0.ff_wo"]["dtype"] == INT8
    assert plan["decoder.0.ff_norm"]["dtype"] == "fp32"


def test_int8_scores_do_not_depend_on_the_batch(int8_export):
    """Rows scored alone equal the same rows scored among 47 others (per-row quantization)."""
    policy = t5vh_fast.load(int8_export)
    ids, mask = mixed_queries(48, 256, seed=44)
    responses = np.random.default_rng(44).integers(3, 256, size=(48, 6))
    together = policy.score(ids, responses, mask)
    for row in (0, 17, 47):
        alone = policy.score(ids[row : row + 1], responses[row : row + 1], mask[row : row + 1])
        np.testing.assert_allclose(alone.logprobs[0], together.logprobs[row], atol=1e-4)
        np.testing.assert_allclose(alone.values[0], together.values[row], atol=1e-4)


def test_int8_refresh_refuses_an_export_of_the_older_int8_layout(int8_export, tmp_path, reference):
    """Exports made before per-column int8 recorded "int8" matrices: a refresh asks for a re-export."""
    import shutil

    old = tmp_path / "old-int8"
    shutil.copytree(int8_export, old)
    manifest = _manifest(old)
    for entry in manifest["weights"]["single"].values():
        if entry["dtype"] == INT8:
            entry["dtype"] = "int8"
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    policy = t5vh_fast.load(old)
    with pytest.raises(ExportError, match="re-export"):
        policy.update_weights(reference)


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
