"""t5vh-bench's GPU systems, without running them: which are offered, how they are compared, the table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from t5vh_fast import bench
from t5vh_fast import providers as providers_module
from t5vh_fast.cli import _int_list, bench_command


@pytest.mark.parametrize("present", [False, True])
def test_gpu_systems_are_offered_only_with_a_gpu(monkeypatch, present):
    monkeypatch.setattr(providers_module, "cuda_device_present", lambda: present)
    systems = bench.available_systems()
    assert all((s in systems) == present for s in ("t5vh-cuda", "torch-cuda", "optimum-cuda"))
    assert {"t5vh", "torch", "hf-generate", "optimum"} <= set(systems)


def test_gpu_systems_are_compared_with_t5vh_cuda():
    def row(system, batch, tps):
        return {"system": system, "batch": batch, "tokens_per_s": tps}

    report = {
        "results": [
            row("t5vh", 64, 1000.0),
            row("torch", 64, 500.0),
            row("t5vh-cuda", 64, 60000.0),
            row("torch-cuda", 64, 10000.0),
            row("optimum-cuda", 64, 20000.0),
            {"system": "t5vh-cuda", "batch": 256, "error": "over the 120 s cap"},
            row("torch-cuda", 256, 30000.0),
        ]
    }
    assert bench.ratios(report) == [(64, "optimum-cuda", 3.0), (64, "torch", 2.0), (64, "torch-cuda", 6.0)]


def test_batch_256_and_the_gpu_line_of_the_table():
    assert _int_list(None, None, "1,16,64,256") == [1, 16, 64, 256]
    machine = {"cpu": "x", "cores": 16, "threads": 16, "providers": ["CUDAExecutionProvider"], "versions": {}}
    machine.update(gpus=["NVIDIA H100 80GB HBM3 (compute capability 9.0)"], driver="580.65.06")
    workload = {"query_tokens": 64, "new_tokens": 128, "batch_sizes": [256]}
    systems = {s: bench.SYSTEMS[s].description for s in ("t5vh-cuda", "torch-cuda")}
    result = {
        "system": "t5vh-cuda",
        "batch": 256,
        "tokens_per_s": 1.0,
        "step_ms_p50": 1.0,
        "step_ms_p95": 1.0,
        "per_step_timed": True,
        "ttft_ms": 1.0,
        "peak_rss_mb": 1.0,
    }
    torch_cuda = {**result, "system": "torch-cuda", "tokens_per_s": 0.5}
    results = [result, torch_cuda]
    table = bench.markdown({"machine": machine, "workload": workload, "systems": systems, "results": results})
    assert "GPU: NVIDIA H100 80GB HBM3 (compute capability 9.0); driver 580.65.06" in table
    assert (
        "| t5vh-cuda |  | 256 | 1 | 1.00 |" in table and "t5vh-cuda for the GPU systems" in table
    )  # one run: no range
    assert "| 2.00x |" in table and "Every cell ran" not in table


def test_gpu_systems_are_refused_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(providers_module, "cuda_device_present", lambda: False)
    result = CliRunner().invoke(bench_command, ["--systems", "torch-cuda", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0 and "cannot run here (torch-cuda: no GPU" in result.output


def test_repeated_runs_are_compared_round_by_round():
    def row(system, i, tps, rss=100.0):
        return {
            "system": system,
            "batch": 64,
            "round": i,
            "tokens_per_s": tps,
            "step_ms_p50": 1000.0 / tps,
            "step_ms_p95": 2000.0 / tps,
            "per_step_timed": True,
            "ttft_ms": 10.0,
            "peak_rss_mb": rss,
        }

    # the machine slows down in round 1 for both; round 3's torch run failed
    results = [row("t5vh", 0, 1000.0), row("torch", 0, 500.0), row("t5vh", 1, 500.0, rss=120.0), row("torch", 1, 250.0)]
    results += [row("t5vh", 2, 900.0), row("torch", 2, 300.0), row("t5vh", 3, 950.0)]
    results.append({"system": "torch", "batch": 64, "round": 3, "error": "over the 120 s cap"})
    report = {"results": results}
    assert bench.ratio_runs(report) == {("torch", 64): [2.0, 2.0, 3.0]}
    assert bench.ratios(report) == [(64, "torch", 2.0)]  # not median(t5vh) / median(torch) = 925 / 300
    rows = {r["system"]: r for r in bench.summary(report)}
    assert rows["t5vh"]["tokens_per_s"] == 925.0 and rows["t5vh"]["tokens_per_s_range"] == (500.0, 1000.0)
    assert rows["t5vh"]["runs"] == 4 and rows["t5vh"]["peak_rss_mb"] == 120.0  # memory: the largest run
    assert rows["torch"]["runs"] == 3 and rows["torch"]["tokens_per_s"] == 300.0
    machine = {"cpu": "x", "cores": 2, "threads": 2, "providers": ["CPUExecutionProvider"], "versions": {}}
    workload = {"query_tokens": 64, "new_tokens": 128, "batch_sizes": [64], "repeat": 4}
    systems = {s: bench.SYSTEMS[s].description for s in ("t5vh", "torch")}
    table = bench.markdown({**report, "machine": machine, "workload": workload, "systems": systems})
    # torch lost a run: its cell and its speed-up say how many of the 4 they rest on
    assert "| torch |  | 64 | 300 (250-500), 3 of 4 runs |" in table and "| 2.00x (2.00-3.00), 3 of 4 runs |" in table
    assert "| t5vh |  | 64 | 925 (500-1000) |" in table and "Every cell ran 4 times" in table
    # every run of a cell failed: the cell shows the error
    failed = {**report, "results": [{"system": "torch", "batch": 64, "round": i, "error": "boom"} for i in range(2)]}
    assert bench.summary(failed) == [failed["results"][0]]
    assert "| torch |  | 64 | boom |" in bench.markdown(
        {**failed, "machine": machine, "workload": workload, "systems": systems}
    )


def test_bench_repeat_runs_every_cell_in_rounds(tmp_path):
    json_path = tmp_path / "bench.json"
    args = ["--size", "tiny", "--systems", "t5vh,torch", "--batch-sizes", "1", "--new-tokens", "2", "--repeat", "2"]
    result = CliRunner().invoke(
        bench_command, [*args, "--cache-dir", str(tmp_path / "cache"), "--json", str(json_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert report["workload"]["repeat"] == 2
    # round by round: every cell once, then every cell again (not one cell's runs back to back)
    assert [(r["round"], r["system"]) for r in report["results"]] == [
        (0, "t5vh"),
        (0, "torch"),
        (1, "t5vh"),
        (1, "torch"),
    ]
    assert all(r["tokens_per_s"] > 0 for r in report["results"])
    # the floor in every round, beside t5vh's batch-1 run; the report's ``floor`` is the best of them
    assert [f["round"] for f in report["floors"]] == [0, 1] and report["floor"] in report["floors"]
    assert report["floor"]["read_gb_s"] == max(f["read_gb_s"] for f in report["floors"])
    assert (
        "| t5vh | fp32 | 1 |" in result.output
        and "Round by round" in result.output
        and "Every cell ran 2 times" in result.output
    )
    bad = CliRunner().invoke(bench_command, ["--repeat", "0"])
    assert bad.exit_code != 0 and "--repeat" in bad.output


def test_time_to_first_token_is_the_median_of_several_runs(tmp_path, monkeypatch):
    import numpy as np

    from t5vh_fast.bench import workers

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100}))
    calls = []

    def run(ids, n):
        calls.append(n)
        return np.zeros((ids.shape[0], n), dtype=np.int64), None

    durations = iter([0.5, 0.1, 0.2, 9.0])  # three one-token runs, then anything later
    monkeypatch.setattr(workers, "sampler", lambda system, spec: run)
    monkeypatch.setattr(workers, "_timed", lambda fn, *args: (fn(*args), next(durations))[1])
    spec = {"system": "t5vh", "batch": 2, "new_tokens": 4, "model_dir": str(tmp_path)}
    result = workers.run_worker(spec)
    assert calls[1 : 1 + workers.TTFT_RUNS] == [1] * workers.TTFT_RUNS and workers.TTFT_RUNS == 3
    assert result["ttft_ms"] == pytest.approx(200.0)  # the median of 500, 100 and 200 ms (not the mean)


def test_the_floor_share_is_taken_round_by_round():
    def step(i, ms):
        timing = {"step_ms_p50": ms, "step_ms_p95": ms, "per_step_timed": True, "ttft_ms": 20.0, "peak_rss_mb": 300.0}
        return {"system": "t5vh", "batch": 1, "round": i, "tokens_per_s": 1000.0 / ms, **timing}

    def floor(i, ms, gb_s):
        return {"round": i, "floor_ms": ms, "read_gb_s": gb_s, "weight_bytes": 154e6, "copy_gb_s": 20.0}

    # round 1: the machine slowed down for both the floor and the step; round 2's floor failed
    results = [step(0, 5.0), step(1, 8.0), step(2, 5.0)]
    floors = [floor(0, 4.5, 34.0), floor(1, 7.2, 21.0), {"round": 2, "error": "over the 120 s cap"}]
    report = {"results": results, "floors": floors, "floor": floors[0]}
    assert bench.floor_shares(report) == pytest.approx(
        [0.9, 0.9]
    )  # not 4.5 / median(5, 8, 5) against the best floor alone
    machine = {"cpu": "x", "cores": 2, "threads": 2, "providers": ["CPUExecutionProvider"], "versions": {}}
    workload = {"query_tokens": 64, "new_tokens": 128, "batch_sizes": [1], "repeat": 3}
    table = bench.markdown({**report, "machine": machine, "workload": workload, "systems": {"t5vh": ""}})
    assert "the best of 2 rounds' measurements" in table and "= 90% of the floor" in table
    assert "Round by round" in table and "t5vh at 90% of the floor (90%-90%)" in table
