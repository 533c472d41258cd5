"""The click commands end to end (CliRunner), the demo model's determinism, and t5vh-bench --quick."""

from __future__ import annotations

import json

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


def test_demo_write_and_run(tmp_path):
    runner = CliRunner()
    result = runner.invoke(demo_command, ["write", str(tmp_path / "m"), "--size", "tiny"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    result = runner.invoke(
        demo_command, ["run", "--size", "tiny", "--cache-dir", str(tmp_path / "cache"), "--txt-len", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "tokens identical 100.0%" in result.output and "tok/s" in result.output


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
