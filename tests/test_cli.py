"""The click commands end to end (CliRunner), the demo model's determinism, and t5vh-bench --quick."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from t5vh_fast.cli import bench_command, demo_command, sample_command, score_command
from t5vh_fast.demo import build_model, write_demo


def test_demo_model_is_the_same_every_time(tmp_path):
    a = write_demo(tmp_path / "a", size="tiny", seed=5)
    b = write_demo(tmp_path / "b", size="tiny", seed=5)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = build_model("tiny", seed=6)
    assert not np.array_equal(
        build_model("tiny", seed=5).shared.weight.detach().numpy(), other.shared.weight.detach().numpy()
    )
    with pytest.raises(FileExistsError, match="--force"):
        write_demo(tmp_path / "a", size="tiny")


def test_small_demo_is_t5_small_shaped():
    from t5vh_fast.demo import build_config

    config = build_config("small")
    assert (
        config.d_model,
        config.d_ff,
        config.num_layers,
        config.num_decoder_layers,
        config.num_heads,
        config.vocab_size,
    ) == (
        512,
        2048,
        6,
        6,
        8,
        32128,
    )


def test_the_demo_cache_exports_again_when_its_graphs_are_older(tmp_path, monkeypatch):
    """A cached demo export is reused while it is what this version writes; one made by a version that built
    its graphs otherwise (an older ``graph_revision``, or none) is exported again, not timed as it is."""
    import t5vh_fast.export
    from t5vh_fast.demo import demo_export
    from t5vh_fast.manifest import GRAPH_REVISION, MANIFEST_NAME

    first = demo_export("tiny", tmp_path)
    path = first / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    assert manifest["graph_revision"] == GRAPH_REVISION
    calls = []
    export = t5vh_fast.export.export
    monkeypatch.setattr(t5vh_fast.export, "export", lambda *a, **kw: calls.append(a) or export(*a, **kw))
    assert demo_export("tiny", tmp_path) == first and calls == []
    for older in (GRAPH_REVISION - 1, None):
        manifest["graph_revision"] = older
        if older is None:
            del manifest["graph_revision"]
        path.write_text(json.dumps(manifest))
        assert demo_export("tiny", tmp_path) == first and len(calls) == 1
        assert json.loads(path.read_text())["graph_revision"] == GRAPH_REVISION
        calls.clear()


def test_demo_write_and_run(tmp_path):
    runner = CliRunner()
    result = runner.invoke(demo_command, ["write", str(tmp_path / "m"), "--size", "tiny"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    result = runner.invoke(
        demo_command, ["run", "--size", "tiny", "--cache-dir", str(tmp_path / "cache"), "--txt-len", "8"]
    )
    assert result.exit_code == 0, result.output
    # a smoke test of the report: 8 rows are too few for the contract's 99.9% (held by the parity tests)
    identical = re.search(r"tokens identical (\d+\.\d)%", result.output)
    assert identical and float(identical.group(1)) >= 90.0 and "tok/s" in result.output, result.output


def test_sample_command(tiny_export):
    runner = CliRunner()
    args = [
        str(tiny_export),
        "paraphrase: Which course should I take?",
        "How do I cook rice?",
        "-n",
        "3",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "0",
        "--providers",
        "cpu",
    ]
    result = runner.invoke(sample_command, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("  0: ") == 2 and result.output.count("  2: ") == 2
    again = runner.invoke(sample_command, args)
    assert again.output == result.output  # seeded
    records = [json.loads(line) for line in runner.invoke(sample_command, args + ["--json"]).output.splitlines()]
    assert len(records) == 6 and all(len(r["response_ids"]) == 20 == len(r["logprobs"]) for r in records)
    assert "Example:" in runner.invoke(sample_command, ["--help"]).output


@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=3, top_p=1.0, seed=1, txt_len=7, n=2),
        dict(top_k=0, top_p=0.3, seed=2, txt_len=5, n=1),
        dict(top_k=40, top_p=0.8, seed=3, txt_len=4, n=3),
    ],
)
def test_sample_command_options_reach_the_sampler(tiny_dir, tiny_export, options):
    """t5vh-sample --top-k/--top-p/--seed/--txt-len/-n give exactly what respond_to_batch gives with them
    (the same computation: same export, layout and providers), and the options change the result."""
    from transformers import AutoTokenizer

    import t5vh_fast

    texts = ["paraphrase: Which course should I take?", "How do I cook rice?"]
    args = [str(tiny_export), *texts, "--json", "--providers", "cpu", "-n", str(options["n"])]
    for name in ("top_k", "top_p", "seed", "txt_len"):
        args += [f"--{name.replace('_', '-')}", str(options[name])]
    result = CliRunner().invoke(sample_command, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    repeated = [t for t in texts for _ in range(options["n"])]
    ids, mask = policy.encode_text(repeated)
    sampling = {k: options[k] for k in ("top_k", "top_p", "seed", "txt_len")}
    expected = policy.respond_to_batch(ids, mask, **sampling)
    assert [r["query"] for r in records] == repeated
    np.testing.assert_array_equal([r["response_ids"] for r in records], expected.tokens)
    np.testing.assert_allclose([r["logprobs"] for r in records], expected.logprobs, rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["values"] for r in records], expected.values, rtol=0, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)  # decoded independently of the runtime
    assert [r["response"] for r in records] == tokenizer.batch_decode(expected.tokens, skip_special_tokens=True)
    assert any(r["response"] for r in records)
    unfiltered = policy.respond_to_batch(ids, mask, **{**sampling, "top_k": 0, "top_p": 1.0})
    assert not np.array_equal(unfiltered.tokens, expected.tokens)  # the filter options matter here
    reseeded = policy.respond_to_batch(ids, mask, **{**sampling, "seed": options["seed"] + 10})
    assert not np.array_equal(reseeded.tokens, expected.tokens)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--txt-len", "0"], "txt_len must be a positive integer"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["-n", "0"], "num-return-sequences"),
    ],
)
def test_sample_command_bad_options(tiny_export, args, message):
    result = CliRunner().invoke(sample_command, [str(tiny_export), "hello", "--providers", "cpu", *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_commands_on_a_directory_that_is_not_an_export(tmp_path, tiny_dir):
    for command, args in ((sample_command, ["hi"]), (score_command, ["-", "-o", "-"])):
        result = CliRunner().invoke(command, [str(tiny_dir), *args], input="")
        assert result.exit_code == 1
        assert "not a t5vh export" in result.output and "t5vh-export" in result.output


def test_bench_quick_writes_json_and_png(tmp_path):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(
        bench_command,
        [
            "--quick",
            "--size",
            "tiny",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(json_path),
            "--plot",
            str(png_path),
            "--cap",
            "120",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert {"machine", "workload", "results", "parity", "floor"} <= set(report)
    measured = {(r["system"], r["batch"]) for r in report["results"] if "error" not in r}
    assert {("t5vh", 1), ("t5vh", 4), ("torch", 1), ("torch-nocache", 4)} <= measured
    for r in report["results"]:
        if "error" not in r:
            assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["step_ms_p50"] > 0
    assert report["parity"]["identical_tokens"] >= 0.999
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| t5vh | fp32 | 1 |" in result.output and "Bandwidth floor" in result.output
    floor = report["floor"]
    assert floor["floor_ms"] > 0 and floor["matmuls_ms"] > 0 and "matrix products alone" in result.output
    assert "| t5vh-int8 | int8 | 1 |" in result.output and "Distribution cost" in result.output
    assert report["gaps"]["t5vh-int8"]["kl_mean"] > 0
    bad = CliRunner().invoke(bench_command, ["--systems", "t5vh,warp-drive", "--cache-dir", str(tmp_path / "cache")])
    assert bad.exit_code != 0 and "warp-drive" in bad.output


def test_bench_scoring_workload(tmp_path):
    json_path = tmp_path / "score.json"
    args = ["--workload", "score", "--quick", "--size", "tiny", "--systems", "t5vh,t5vh-int8,torch"]
    result = CliRunner().invoke(
        bench_command, [*args, "--cache-dir", str(tmp_path / "cache"), "--json", str(json_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert report["workload"]["kind"] == "score" and report["workload"]["rows"] == 64
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"t5vh", "t5vh-int8", "torch"}
    assert len({r["tokens"] for r in by.values()}) == 1  # the same rows for every system
    assert all(r["tokens_per_s"] > 0 and r["rows"] == 64 and r["peak_rss_mb"] > 0 for r in by.values())
    assert "| t5vh | fp32 |" in result.output and "response tokens/s" in result.output
    bad = CliRunner().invoke(bench_command, ["--workload", "score", "--systems", "hf-generate"])
    assert bad.exit_code != 0 and "not in the scoring workload" in bad.output
