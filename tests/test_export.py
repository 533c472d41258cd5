"""t5vh-export (docs/contract.md, "Export layout"): graphs with `value`, parity per graph, manifest, atomic output."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

import t5vh_fast
from t5vh_fast._files import sha256_file
from t5vh_fast.checkpoint import load_reference
from t5vh_fast.cli import export_command
from t5vh_fast.demo import build_model, write_demo
from t5vh_fast.export import ExportParityError, check_export, export
from t5vh_fast.export import convert as convert_module
from t5vh_fast.export.graph import Builder, save
from t5vh_fast.manifest import (
    FORMAT_VERSION,
    LOOKUP_GRAPH,
    MANIFEST_NAME,
    PACKED_ENCODER_GRAPH,
    PACKED_GRAPH,
    SAMPLER_GRAPH,
    SCORER_GRAPH,
)
from t5vh_fast.weights import ModelSpec

from .conftest import assert_same_samples, mixed_queries, teacher_forced, tol

GRAPHS = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx"]
SINGLE_ENCODERS = ["t5vh_encoder.onnx", "t5vh_encoder_packed.onnx"]
SINGLE_DECODERS = ["t5vh_decoder.onnx", "t5vh_decoder_packed.onnx"]
SINGLE_GRAPHS = SINGLE_ENCODERS + SINGLE_DECODERS
SINGLE_FILES = (
    SINGLE_GRAPHS
    + ["t5vh_encoder.onnx.data", "t5vh_decoder.onnx.data"]  # the packed graphs read these weights
    + ["t5vh_embedding.npy", "t5vh_tables.npz", "t5vh_sampler.onnx", "t5vh_scorer.onnx", "t5vh_lookup.onnx"]
)


def _leftovers(parent, name):
    """Anything the export left beside OUT (partial temp dirs, or OUT itself)."""
    return sorted(p.name for p in parent.iterdir() if name in p.name)


@pytest.mark.parametrize("family", ["t5", "t5-v1_1", "mt5"])
@pytest.mark.parametrize("layout", ["logits", "hidden"])
def test_export_each_family_and_layout(tmp_path, family, layout):
    model_dir = write_demo(tmp_path / "m", size="tiny", family=family, head_layout=layout)
    out = export(model_dir)
    assert out == tmp_path / "m-onnx"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["head_layout"] == layout
    assert manifest["model_type"] == ("mt5" if family == "mt5" else "t5")
    assert manifest["tie_word_embeddings"] is (family == "t5")
    assert manifest["precision"] == "fp32" and isinstance(manifest["opset"], int)
    assert {"torch", "transformers", "optimum", "optimum-onnx"} <= set(manifest["versions"])
    assert sorted(manifest["files"]) == sorted(GRAPHS + [f"{g}.data" for g in GRAPHS] + SINGLE_FILES)
    assert sorted(manifest["layouts"]) == ["merged", "single", "split"]
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    graphs = manifest["parity"]["graphs"]
    assert sorted(graphs) == sorted(GRAPHS + SINGLE_GRAPHS)
    for graph, entry in graphs.items():
        compared = {k.replace("_max_abs_diff", "") for k in entry if k.endswith("max_abs_diff")}
        assert compared == COMPARED[graph], graph  # the check compared what each graph computes
        for name in compared:
            assert 0 <= entry[f"{name}_max_abs_diff"] <= entry[f"{name}_tol"] < 1, (graph, name)
    for side in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / side).is_file()
    assert _leftovers(tmp_path, ".partial.") == []
    _assert_export_matches_pytorch(out, load_reference(model_dir))


# what the post-export check must compare per graph file
COMPARED = {
    "encoder_model.onnx": {"hidden"},
    **{g: {"cross_key", "cross_value"} for g in SINGLE_ENCODERS},
    **{g: {"logits", "values"} for g in GRAPHS[1:] + SINGLE_DECODERS},
}


def _assert_export_matches_pytorch(out, model):
    """The export's parity recomputed here, not read from the manifest: every layout through the
    public runtime (teacher-forced scores and a sampled rollout) against the PyTorch model, within tol."""
    ids, mask = mixed_queries(8, model.config.vocab_size, seed=40)
    u = np.random.default_rng(40).random((8, 6))
    for layout in ("single", "split", "merged"):
        policy = t5vh_fast.load(out, providers="cpu", decoder=layout)
        rollout = policy.respond_to_batch(ids, mask, txt_len=6, uniforms=u)
        scores = policy.score(ids, rollout.tokens, mask)
        ref = teacher_forced(model, ids, mask, rollout.tokens)
        logits, values = ref.logits.numpy(), ref.value.numpy()
        chosen = np.take_along_axis(torch.log_softmax(ref.logits, -1).numpy(), rollout.tokens[..., None], -1)[..., 0]
        for name, ours, want, limit in (
            ("score logprobs", scores.logprobs, chosen, tol(logits)),
            ("score values", scores.values, values, tol(values)),
            ("rollout logprobs", rollout.logprobs, chosen, tol(logits)),
            ("rollout values", rollout.values, values, tol(values)),
        ):
            assert np.abs(ours - want).max() <= limit, (layout, name, np.abs(ours - want).max())


def test_check_compares_values(tiny_dir, tiny_export):
    """A value head the export does not have (its bias moved by 0.01) fails every decoder graph's check on
    the values alone; the logits still pass."""
    model = load_reference(tiny_dir)
    assert all(entry["ok"] for entry in check_export(model, tiny_export).values())
    with torch.no_grad():
        model.v_head.linear.bias.add_(0.01)
    report = check_export(model, tiny_export)
    for graph in GRAPHS[1:] + SINGLE_DECODERS:
        entry = report[graph]
        assert not entry["ok"], graph
        assert entry["values_max_abs_diff"] == pytest.approx(0.01, rel=1e-3), graph
        assert entry["logits_max_abs_diff"] <= entry["logits_tol"], graph


@pytest.mark.parametrize("family", ["t5", "t5-v1_1"])
def test_check_catches_wrong_decoder_scaling(tmp_path, family):
    """The d_model**-0.5 rescale applies only to tied models: flipping it must fail the check."""
    model_dir = write_demo(tmp_path / "m", size="tiny", family=family)
    out = export(model_dir, merged=False)
    model = load_reference(model_dir)
    layouts = ("single", "split")
    assert all(entry["ok"] for entry in check_export(model, out, layouts=layouts).values())
    model.config.tie_word_embeddings = not model.config.tie_word_embeddings  # what a buggy exporter assumes
    report = check_export(model, out, layouts=layouts)
    assert not report["decoder_model.onnx"]["ok"]
    assert not report["decoder_with_past_model.onnx"]["ok"]
    assert not report["t5vh_decoder.onnx"]["ok"]
    assert not report["t5vh_decoder_packed.onnx"]["ok"]


def test_check_catches_a_wrong_encoder(tiny_dir, tiny_export):
    """An encoder weight the export does not have fails the check of every encoder graph, the packed
    one included; the single layout's decoders, which the check feeds from the regular encoder, see it too."""
    model = load_reference(tiny_dir)
    with torch.no_grad():
        model.encoder.block[-1].layer[-1].DenseReluDense.wo.weight.mul_(1.5)
    report = check_export(model, tiny_export)
    for graph in ["encoder_model.onnx"] + SINGLE_ENCODERS:
        assert not report[graph]["ok"], graph
        assert report[graph]["cross_key_max_abs_diff" if graph in SINGLE_ENCODERS else "hidden_max_abs_diff"] > 0


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("blocks, d_ff, edges", [(1, 10, None), (3, 10, [0, 3, 6, 10]), (4, 3, [0, 1, 2, 3])])
def test_feed_forward_in_slices_is_the_same_layer(tmp_path, tiny_dir, gated, blocks, d_ff, edges):
    """The packed graphs' feed-forward layer with its output matrix in blocks of rows (10 rows in 3 uneven
    blocks; 3 rows asked for in 4, given 3 of one row) computes the layer: the residual plus the sublayer,
    for the plain and the gated form."""
    spec = ModelSpec.from_config(json.loads((tiny_dir / "config.json").read_text()))
    spec = dataclasses.replace(spec, d_model=8, d_ff=d_ff, gated=gated, activation="gelu_new" if gated else "relu")
    rng = np.random.default_rng(3)
    names = ["ff_wi_0", "ff_wi_1"] if gated else ["ff_wi"]
    weights = {f"encoder.0.{n}": rng.standard_normal((8, d_ff)).astype(np.float32) for n in names}
    weights["encoder.0.ff_wo"] = rng.standard_normal((d_ff, 8)).astype(np.float32)
    weights["encoder.0.ff_norm"] = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    b = Builder("ff", weights, spec)
    b.output(
        b.feed_forward(b.input("x", TensorProto.FLOAT, ["n", 8]), "encoder.0", blocks=blocks),
        "y",
        TensorProto.FLOAT,
        ["n", 8],
    )
    save(b, tmp_path / "ff.onnx")
    assert b.row_blocks == ({} if edges is None else {"encoder.0.ff_wo": edges})
    assert sorted(name for name in b.used if "ff_wo" in name) == (
        ["encoder.0.ff_wo"] if edges is None else sorted(f"encoder.0.ff_wo[{a}:{z}]" for a, z in zip(edges, edges[1:]))
    )
    session = ort.InferenceSession(str(tmp_path / "ff.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, 8)).astype(np.float32)
    h = (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + spec.eps)) * weights["encoder.0.ff_norm"]
    if gated:
        a = h @ weights["encoder.0.ff_wi_0"]
        gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
        hidden = gelu * (h @ weights["encoder.0.ff_wi_1"])
    else:
        hidden = np.maximum(h @ weights["encoder.0.ff_wi"], 0)
    expected = x + hidden @ weights["encoder.0.ff_wo"]
    y = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, expected, rtol=0, atol=tol(expected))


NEWER_GRAPHS = (SAMPLER_GRAPH, SCORER_GRAPH, LOOKUP_GRAPH, PACKED_GRAPH, PACKED_ENCODER_GRAPH)


@pytest.mark.parametrize("graph", NEWER_GRAPHS)
def test_single_layout_carries_the_newer_graphs_and_older_exports_work_without_them(
    tiny_export, tmp_path, monkeypatch, graph
):
    """The single layout lists t5vh_sampler.onnx, t5vh_scorer.onnx and t5vh_lookup.onnx (the draw, which
    the CPU runs too, and the scorer's log-softmax and the embedding lookup CUDA runs) and
    t5vh_decoder_packed.onnx and t5vh_encoder_packed.onnx (scoring, and the encoder, on the CPU), and load()
    hands them to the decoder; an export made
    before one existed loads without it, samples the same tokens and scores the same numbers."""
    import shutil

    from t5vh_fast import policy as policy_module

    asked = []
    opened = policy_module.open_decoder
    monkeypatch.setattr(
        policy_module,
        "open_decoder",
        lambda *a, **kw: (
            asked.append(tuple(kw.get(k) for k in ("sampler", "scorer", "lookup", "packed", "packed_encoder")))
            or opened(*a, **kw)
        ),
    )

    manifest = json.loads((tiny_export / MANIFEST_NAME).read_text())
    assert graph in manifest["layouts"]["single"] and graph in manifest["files"]
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    assert policy.decoder.samples_on_device and not policy.decoder.scores_on_device
    assert policy.decoder.scores_packed and policy.decoder.encodes_packed
    old = tmp_path / "before-the-graph"
    shutil.copytree(tiny_export, old)
    (old / graph).unlink()
    del manifest["files"][graph]
    manifest["layouts"]["single"].remove(graph)
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    ids, mask = mixed_queries(8, 256, seed=9)
    older = t5vh_fast.load(old, providers="cpu")
    a = older.respond_to_batch(ids, mask, txt_len=6, seed=4)
    b = policy.respond_to_batch(ids, mask, txt_len=6, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    scored = policy.score(ids, a.tokens, mask).logprobs
    assert np.abs(older.score(ids, a.tokens, mask).logprobs - scored).max() <= tol(scored)
    # listed: the decoder may use it; not listed: never read
    assert older.decoder.samples_on_device == (graph != SAMPLER_GRAPH)
    assert older.decoder.scores_packed == (graph != PACKED_GRAPH)
    assert older.decoder.encodes_packed == (graph != PACKED_ENCODER_GRAPH)
    assert asked == [(True,) * 5, tuple(graph != name for name in NEWER_GRAPHS)]


def test_optimum_loads_the_export_and_greedy_tokens_match(tiny_export, reference):
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    ort_model = ORTModelForSeq2SeqLM.from_pretrained(tiny_export)
    ids, mask = mixed_queries(256, 256, seed=41)
    kwargs = dict(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        num_beams=1,
    )
    ours = ort_model.generate(**kwargs)
    theirs = reference.generate(**kwargs)
    assert_same_samples(ours, theirs)  # two computations: >= 99.9% of greedy tokens, as the contract's parity


def test_existing_output_needs_force_and_force_replaces_only_an_export(tmp_path, tiny_dir):
    out = tmp_path / "out"
    out.mkdir()
    export(tiny_dir, out, force=True)  # an empty directory may be filled
    with pytest.raises(FileExistsError, match="--force"):
        export(tiny_dir, out)
    (out / "keep.txt").write_text("mine")  # a previous export is replaced, whatever was put in it
    export(tiny_dir, out, force=True)
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).exists()
    assert _leftovers(tmp_path, "out") == ["out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a t5vh export"):
        export(tiny_dir, mine, force=True)
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def test_parity_failure_leaves_nothing(tmp_path, tiny_dir, monkeypatch):
    def bad_check(model, root, *, layouts):
        return {"decoder_model.onnx": {"logits_max_abs_diff": 1.0, "logits_tol": 1e-4, "ok": False}}

    monkeypatch.setattr(convert_module, "check_export", bad_check)
    with pytest.raises(ExportParityError, match=r"decoder_model.onnx.*1\.00e\+00"):
        export(tiny_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tmp_path, tiny_dir, monkeypatch):
    real = convert_module._save_side_files

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_save_side_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path, tiny_dir):
    runner = CliRunner()
    cases = []
    cases.append((tmp_path / "missing", "model directory not found"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "no config.json"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases.append((bert, "supports T5-family"))
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    cases.append((no_weights, "no weights file"))
    pickled = tmp_path / "pickled"
    build_model("tiny").save_pretrained(pickled, safe_serialization=False)
    cases.append((pickled, "--allow-pickle"))
    for model_dir, message in cases:
        result = runner.invoke(export_command, [str(model_dir)])
        assert result.exit_code == 1, (model_dir, result.output)
        assert message in result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / f"{model_dir.name}-onnx").exists()
    # an OUT whose parent is a file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(export_command, [str(tiny_dir), "-o", str(blocker / "out")])
    assert result.exit_code == 1 and "is a file" in result.output
    # the pickle opt-in works
    result = runner.invoke(export_command, [str(pickled), "--allow-pickle", "--no-merged"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pickled-onnx" / MANIFEST_NAME).is_file()


def test_cli_help_has_a_runnable_example_and_cli_exports(tmp_path, tiny_dir):
    runner = CliRunner()
    help_text = runner.invoke(export_command, ["--help"]).output
    assert "Example:" in help_text and "t5vh-export demo-model" in help_text
    result = runner.invoke(export_command, [str(tiny_dir), "-o", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "exporting decoder_model.onnx" in result.output and "logits" in result.output
    assert t5vh_fast.load(tmp_path / "x", providers="cpu").manifest["head_layout"] == "logits"


@pytest.mark.slow
def test_t5_small_shaped_export_parity(tmp_path):
    """The benchmark-sized demo model: every graph within the contract's tolerance (numbers in the manifest)."""
    model_dir = write_demo(tmp_path / "small", size="small")
    out = export(model_dir, log=print)
    graphs = json.loads((out / MANIFEST_NAME).read_text())["parity"]["graphs"]
    print(json.dumps(graphs, indent=1))
    assert all(entry["ok"] for entry in graphs.values())
    assert np.isfinite([v for e in graphs.values() for k, v in e.items() if k.endswith("diff")]).all()
