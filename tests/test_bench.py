"""t5vh-bench's GPU systems, without running them: which are offered, how they are compared, the table."""

from __future__ import annotations

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
    table = bench.markdown({"machine": machine, "workload": workload, "systems": systems, "results": [result]})
    assert "GPU: NVIDIA H100 80GB HBM3 (compute capability 9.0); driver 580.65.06" in table
    assert "| t5vh-cuda |  | 256 |" in table and "t5vh-cuda for the GPU systems" in table


def test_gpu_systems_are_refused_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(providers_module, "cuda_device_present", lambda: False)
    result = CliRunner().invoke(bench_command, ["--systems", "torch-cuda", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0 and "cannot run here (torch-cuda: no GPU" in result.output
