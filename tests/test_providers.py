"""Providers on the CPU: choosing them, their options, the GPU probe, TensorRT profiles, errors, stdout.

Everything here runs without a GPU: the probe is fed fake NVML and fake
nvidia-smi output, onnxruntime's failures are raised by fakes. What needs a
real GPU is in tests/test_gpu.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

import t5vh_fast
from t5vh_fast import gpu
from t5vh_fast import providers as providers_module
from t5vh_fast import tensorrt as trt
from t5vh_fast.errors import ExportError, InputError, ProviderError
from t5vh_fast.manifest import DECODER, DECODER_MERGED, DECODER_WITH_PAST, ENCODER, MANIFEST_NAME
from t5vh_fast.providers import CPU, CUDA, TENSORRT, CudaOptions

H100 = gpu.Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))
V100 = gpu.Gpu(1, "Tesla V100-SXM2-16GB", (7, 0))
GOOD_DRIVER = gpu.GpuReport("580.65.06", 13000, (H100,), "nvml")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend onnxruntime has CUDA and TensorRT and the probe found ``report`` (set the returned dict)."""
    state = {"report": GOOD_DRIVER}
    monkeypatch.setattr(providers_module.ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(gpu, "probe", lambda: state["report"])
    monkeypatch.setattr(gpu, "ort_cuda_major", lambda: 13)
    monkeypatch.setattr(gpu, "missing_libraries", lambda names, load=None: ())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return state


# ---------------------------------------------------------------------- choosing providers


def test_provider_choice(fake_gpu, capsys):
    assert providers_module.resolve_providers("auto") == [CUDA, CPU]
    assert providers_module.resolve_providers("cpu") == [CPU]
    assert providers_module.resolve_providers("cuda") == [CUDA, CPU]
    assert providers_module.resolve_providers("tensorrt") == [TENSORRT, CUDA, CPU]
    assert providers_module.resolve_providers([CPU]) == [CPU]
    fake_gpu["report"] = None  # no GPU at all: "auto" is the CPU, quietly
    assert providers_module.resolve_providers("auto") == [CPU]
    assert capsys.readouterr().err == ""
    with pytest.raises(ProviderError, match="cannot run here: no NVIDIA GPU found.*providers='cpu'"):
        providers_module.resolve_providers("cuda")
    assert providers_module.resolve_providers("auto", probe=False) == [CUDA, CPU]  # trust the GPU
    with pytest.raises(ProviderError, match="not available"):
        providers_module.resolve_providers(["MadeUpExecutionProvider"])
    with pytest.raises(InputError, match="not one of"):
        providers_module.resolve_providers("gpu-please")
    with pytest.raises(InputError, match="empty list"):
        providers_module.resolve_providers([])


def test_an_unsupported_gpu_means_cpu_for_auto_and_an_error_for_cuda(fake_gpu, capsys):
    fake_gpu["report"] = gpu.GpuReport("535.104.05", 12020, (V100,), "nvml")
    assert providers_module.resolve_providers("auto") == [CPU]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "running on the CPU" in err and "runs CUDA up to 12.2" in err
    with pytest.raises(ProviderError, match="R580 or newer: update the driver"):
        providers_module.resolve_providers("cuda")
    fake_gpu["report"] = gpu.GpuReport("580.65.06", 13000, (gpu.Gpu(0, "Tesla V100", (7, 0)),), "nvml")
    with pytest.raises(ProviderError, match=r"compute capability 7\.0.*kernels for 7\.5-9\.0 and 12\.0 only"):
        providers_module.resolve_providers("cuda")
    with pytest.raises(ProviderError, match="device_id=3, but CUDA sees 1 GPU"):
        providers_module.resolve_providers("cuda", device_id=3)


def test_a_missing_provider_is_a_provider_error(monkeypatch):
    monkeypatch.setattr(providers_module.ort, "get_available_providers", lambda: [CPU])
    assert providers_module.resolve_providers("auto") == [CPU]
    with pytest.raises(ProviderError, match="needs CUDAExecutionProvider.*install onnxruntime-gpu"):
        providers_module.resolve_providers("cuda")


def test_tensorrt_without_its_libraries_says_how_to_get_them(fake_gpu, monkeypatch):
    monkeypatch.setattr(gpu, "missing_libraries", lambda names, load=None: ("libnvinfer.so.10",))
    with pytest.raises(
        ProviderError, match=r"TensorRT 10 \(libnvinfer.so.10 not found\).*tensorrt-cu13-libs>=10.13,<11"
    ):
        providers_module.resolve_providers("tensorrt")


# ---------------------------------------------------------------------- provider options


def test_cuda_options():
    assert providers_module.cuda_provider_options(CudaOptions()) == {
        "device_id": "0",
        "use_tf32": "0",
        "arena_extend_strategy": "kSameAsRequested",
    }
    custom = CudaOptions(device_id=1, tf32=True, arena_extend_strategy="kNextPowerOfTwo", gpu_mem_limit=2**30)
    assert providers_module.cuda_provider_options(custom) == {
        "device_id": "1",
        "use_tf32": "1",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "gpu_mem_limit": str(2**30),
    }
    for bad, match in [
        (dict(device_id=-1), "device_id"),
        (dict(device_id=True), "device_id"),
        (dict(arena_extend_strategy="grow"), "arena_extend_strategy"),
        (dict(gpu_mem_limit=0), "gpu_mem_limit"),
        (dict(gpu_mem_limit=1.5), "gpu_mem_limit"),
    ]:
        with pytest.raises(InputError, match=match):
            CudaOptions(**bad)


def test_provider_entries_carry_every_setting(tiny_export, tmp_path):
    options = trt.TensorrtOptions(cache_dir=tmp_path)
    entries = providers_module.provider_entries(
        tiny_export / DECODER_WITH_PAST, [TENSORRT, CUDA, CPU], CudaOptions(device_id=2), options
    )
    (name, trt_options), (cuda_name, cuda_options), cpu = entries
    assert (name, cuda_name, cpu) == (TENSORRT, CUDA, CPU)
    assert cuda_options["device_id"] == trt_options["device_id"] == "2"
    assert trt_options["trt_fp16_enable"] == "False" and "trt_bf16_enable" not in trt_options
    assert trt_options["trt_engine_cache_enable"] == trt_options["trt_timing_cache_enable"] == "True"
    engines = trt.engine_cache_dir(tiny_export, options)
    assert trt_options["trt_engine_cache_path"] == str(engines) and engines.is_dir() and engines.parent == tmp_path
    assert trt_options["trt_profile_min_shapes"].startswith("encoder_attention_mask:1x1,input_ids:1x1,")
    bf16 = providers_module.provider_entries(tiny_export / ENCODER, [TENSORRT], tensorrt=trt.TensorrtOptions(bf16=True))
    assert bf16[0][1]["trt_bf16_enable"] == "True"


def test_no_sessions_threads_spin_after_its_run(policy):
    """Each session owns a thread pool; a pool that spins after its run steals the cores whatever runs next
    needs (the host's draw, the other session). Every session's threads spin only inside a run, and stop
    when it returns; after an update_weights too."""
    ids, responses = [[5, 6, 1]], [[7, 8]]

    def stops(graph) -> bool:
        options = graph.session.get_session_options()
        try:
            spinning = options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except RuntimeError:  # not set: onnxruntime's default, spinning
            spinning = True
        return spinning and options.get_session_config_entry("session.force_spinning_stop") == "1"

    loaded = policy.decoder
    try:
        for decoder in (loaded, loaded.with_weights({})):
            policy.decoder = decoder
            policy.score(ids, responses)  # the packed decoder starts
            policy.respond_to_batch(ids, txt_len=2, seed=0)
            graphs = [*decoder.graphs, *([decoder._packed] if getattr(decoder, "scores_packed", False) else [])]
            assert len(graphs) >= 2 and all(stops(g) for g in graphs)
    finally:
        policy.decoder = loaded


# ---------------------------------------------------------------------- TensorRT profiles and cache

WITH_PAST_INPUTS = {
    "encoder_attention_mask": ["batch_size", "encoder_sequence_length"],
    "input_ids": ["batch_size", "decoder_sequence_length"],
    "past_key_values.0.decoder.key": ["batch_size", 4, "past_decoder_sequence_length", 16],
    "past_key_values.0.encoder.key": ["batch_size", 4, "encoder_sequence_length", 16],
}


def test_tensorrt_profile_strings():
    options = trt.TensorrtOptions(batch=(1, 64, 256), query_len=(1, 64, 512), response_len=(1, 128, 512))
    low, opt, high = trt.tensorrt_profiles(WITH_PAST_INPUTS, trt.profile_ranges(DECODER_WITH_PAST, options))
    assert low == (
        "encoder_attention_mask:1x1,input_ids:1x1,"
        "past_key_values.0.decoder.key:1x4x1x16,past_key_values.0.encoder.key:1x4x1x16"
    )
    assert opt == (
        "encoder_attention_mask:64x64,input_ids:64x1,"
        "past_key_values.0.decoder.key:64x4x64x16,past_key_values.0.encoder.key:64x4x64x16"
    )
    assert high == (
        "encoder_attention_mask:256x512,input_ids:256x1,"
        "past_key_values.0.decoder.key:256x4x511x16,past_key_values.0.encoder.key:256x4x512x16"
    )
    # the first-step graph scores whole responses: its decoder length reaches the longest response
    _, _, first = trt.tensorrt_profiles(
        {"input_ids": ["batch_size", "decoder_sequence_length"]}, trt.profile_ranges(DECODER, options)
    )
    assert first == "input_ids:256x512"


def test_tensorrt_profiles_of_the_merged_graph_start_past_lengths_at_zero():
    inputs = {**WITH_PAST_INPUTS, "use_cache_branch": [1]}
    ranges = trt.profile_ranges(DECODER_MERGED, trt.TensorrtOptions())
    low, opt, _ = trt.tensorrt_profiles(trt.merged_past_dims(inputs), ranges)
    assert "past_key_values.0.decoder.key:1x4x0x16" in low and "past_key_values.0.encoder.key:1x4x0x16" in low
    assert "encoder_attention_mask:1x1" in low and "input_ids:1x1" in low
    assert "use_cache_branch" not in low + opt  # fixed shapes need no profile


def test_tensorrt_profiles_reject_unknown_dimensions():
    with pytest.raises(ExportError, match="'sequence' with no TensorRT profile range"):
        trt.tensorrt_profiles({"input_ids": ["batch_size", "sequence"]}, {"batch_size": (1, 2, 3)})
    with pytest.raises(ExportError, match="dimension None"):
        trt.tensorrt_profiles({"input_ids": ["batch_size", None]}, {"batch_size": (1, 2, 3)})
    assert trt.tensorrt_profiles({"static": [1, 4]}, {}) == ("", "", "")


def test_tensorrt_options_are_checked():
    for bad, match in [
        (dict(batch=(4, 2, 8)), "batch"),
        (dict(query_len=(0, 1, 2)), "query_len"),
        (dict(response_len=(1, 2)), "response_len"),
        (dict(fp16=True, bf16=True), "fp16 or bf16"),
    ]:
        with pytest.raises(InputError, match=match):
            trt.TensorrtOptions(**bad)


def test_graph_input_dims_from_manifest_onnx_or_onnxruntime(tiny_export, tmp_path, monkeypatch):
    from_onnx = trt.graph_input_dims(tiny_export / DECODER_WITH_PAST)
    assert from_onnx["past_key_values.1.decoder.value"] == ["batch_size", 4, "past_decoder_sequence_length", 16]
    assert "use_cache_branch" not in from_onnx
    assert trt.graph_input_dims(tiny_export / DECODER_MERGED)["use_cache_branch"] == [1]
    monkeypatch.setitem(sys.modules, "onnx", None)  # no onnx installed: onnxruntime's metadata
    assert trt.graph_input_dims(tiny_export / DECODER_WITH_PAST) == from_onnx
    copy = tmp_path / "export"
    copy.mkdir()
    shutil.copy(tiny_export / ENCODER, copy / ENCODER)
    manifest = json.loads((tiny_export / MANIFEST_NAME).read_text())
    manifest["graphs"] = {ENCODER: {"inputs": {"input_ids": ["batch_size", "encoder_sequence_length"]}}}
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert trt.graph_input_dims(copy / ENCODER) == {"input_ids": ["batch_size", "encoder_sequence_length"]}


def test_engine_cache_location(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("T5VH_CACHE", str(tmp_path / "cache"))
    default = trt.engine_cache_dir(tiny_export, trt.TensorrtOptions())
    assert default.parent == tmp_path / "cache" / "trt"
    assert trt.engine_cache_dir(tiny_export, trt.TensorrtOptions()) == default  # stable
    assert trt.engine_cache_dir(tiny_export, trt.TensorrtOptions(bf16=True)) != default  # per settings
    assert (
        trt.engine_cache_dir(tiny_export, trt.TensorrtOptions(cache_dir=tmp_path / "mine")).parent == tmp_path / "mine"
    )


def test_inherited_tensorrt_environment_is_hidden_and_named_once(monkeypatch, capsys):
    env = {"ORT_TENSORRT_FP16_ENABLE": "1", "PATH": "/bin"}
    monkeypatch.setattr(trt, "_WARNED", set())
    with trt.without_tensorrt_environment(env) as hidden:
        assert hidden == ["ORT_TENSORRT_FP16_ENABLE"] and env == {"PATH": "/bin"}
    assert env == {"ORT_TENSORRT_FP16_ENABLE": "1", "PATH": "/bin"}
    assert "not applying ORT_TENSORRT_FP16_ENABLE" in capsys.readouterr().err
    with trt.without_tensorrt_environment(env):
        pass
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- the GPU probe

SMI_OUTPUT = """\
0, NVIDIA H100 80GB HBM3, 580.65.06, 9.0
1, NVIDIA RTX A6000, Founders, 580.65.06, 8.6
"""


def test_nvidia_smi_parsing():
    report = gpu.parse_nvidia_smi(SMI_OUTPUT)
    assert report.driver_version == "580.65.06" and report.cuda_driver_version is None
    assert report.gpus == (H100, gpu.Gpu(1, "NVIDIA RTX A6000, Founders", (8, 6)))
    assert gpu.parse_nvidia_smi("No devices were found\n") is None
    assert gpu.parse_nvidia_smi("") is None
    assert gpu.parse_nvidia_smi("0, Some GPU, 580.1, [N/A]\n") is None


def test_nvidia_smi_probe_runs_it_in_a_subprocess():
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=SMI_OUTPUT, stderr="")

    assert gpu.probe_nvidia_smi(run).gpus[0] == H100
    assert calls == [gpu.NVIDIA_SMI_QUERY]

    def missing(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    assert gpu.probe_nvidia_smi(missing) is None
    assert gpu.probe_nvidia_smi(lambda cmd, **kw: subprocess.CompletedProcess(cmd, 9, "", "NVML error")) is None


class FakeNvml:
    """NVML's C calls, writing their answers through the pointers they are given."""

    def __init__(self, gpus, driver="580.65.06", cuda=13000, init=0):
        self.gpus, self.driver, self.cuda, self.init, self.shut = gpus, driver, cuda, init, False

    def nvmlInit_v2(self):
        return self.init

    def nvmlShutdown(self):
        self.shut = True
        return 0

    def nvmlSystemGetDriverVersion(self, buffer, length):
        buffer.value = self.driver.encode()
        return 0

    def nvmlSystemGetCudaDriverVersion_v2(self, pointer):
        pointer.contents.value = self.cuda
        return 0

    def nvmlDeviceGetCount_v2(self, pointer):
        pointer.contents.value = len(self.gpus)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, pointer):
        pointer.contents.value = index.value + 1
        return 0

    def nvmlDeviceGetName(self, handle, buffer, length):
        buffer.value = self.gpus[handle.value - 1][0].encode()
        return 0

    def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor):
        major.contents.value, minor.contents.value = self.gpus[handle.value - 1][1]
        return 0


def test_nvml_probe():
    lib = FakeNvml([("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA B200", (10, 0))])
    report = gpu.probe_nvml(lib)
    assert report == gpu.GpuReport("580.65.06", 13000, (H100, gpu.Gpu(1, "NVIDIA B200", (10, 0))), "nvml")
    assert lib.shut
    assert gpu.probe_nvml(FakeNvml([], init=9)) is None  # NVML present but not initialised (no driver)


def test_gpu_problems():
    assert gpu.gpu_problem(GOOD_DRIVER, 0, 13) is None
    assert gpu.gpu_problem(GOOD_DRIVER, 0, None) is None  # a CPU build: nothing to check
    smi_old = gpu.GpuReport("550.54.15", None, (H100,), "nvidia-smi")
    assert "older than R580" in gpu.gpu_problem(smi_old, 0, 13)
    assert gpu.gpu_problem(smi_old, 0, 12) is None
    blackwell = gpu.GpuReport("580.65.06", 13000, (gpu.Gpu(0, "NVIDIA B200", (10, 0)),), "nvml")
    assert "compute capability 10.0" in gpu.gpu_problem(blackwell, 0, 13)
    rtx = gpu.GpuReport("580.65.06", 13000, (gpu.Gpu(0, "RTX 5090", (12, 0)),), "nvml")
    assert gpu.gpu_problem(rtx, 0, 13) is None
    assert "no NVIDIA GPU" in gpu.gpu_problem(None, 0, 13)


def test_cuda_visible_devices():
    report = gpu.GpuReport("580.65.06", 13000, (H100, V100), "nvml")
    assert gpu.visible_gpus(report, {}) == (H100, V100)
    assert gpu.visible_gpus(report, {"CUDA_VISIBLE_DEVICES": "1"}) == (V100,)
    assert gpu.visible_gpus(report, {"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert gpu.visible_gpus(report, {"CUDA_VISIBLE_DEVICES": "-1"}) == ()
    assert gpu.visible_gpus(report, {"CUDA_VISIBLE_DEVICES": "1,7,0"}) == (V100,)
    assert gpu.visible_gpus(report, {"CUDA_VISIBLE_DEVICES": "GPU-1234abcd"}) == (H100, V100)
    assert "compute capability 7.0" in gpu.gpu_problem(report, 0, 13, env={"CUDA_VISIBLE_DEVICES": "1"})


def test_missing_libraries():
    def load(name):
        if name != "libfound.so.1":
            raise OSError(name)

    assert gpu.missing_libraries(["libfound.so.1", "libnope.so.2"], load=load) == ("libnope.so.2",)
    assert "libnvinfer.so.10" in gpu.shared_libraries(TENSORRT, 13)
    assert "libcublasLt.so.13" in gpu.shared_libraries(CUDA, 13) and "libcudnn.so.9" not in gpu.shared_libraries(
        CUDA, 13
    )


def test_nvidia_libraries_are_found_in_any_site_packages(tmp_path):
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublasLt.so.13").write_bytes(b"")
    loaded = set()

    def load(name, mode=0):
        if name not in loaded and not name.startswith("/"):
            raise OSError(name)
        loaded.add(Path(name).name)

    missing = gpu.preload_nvidia_libs(["libcublasLt.so.13", "libcurand.so.10"], paths=["", str(tmp_path)], load=load)
    assert missing == ("libcurand.so.10",) and loaded == {"libcublasLt.so.13"}


# ---------------------------------------------------------------------- stdout stays clean


def _chatty():
    print("preloading CUDA ...")
    os.write(1, b"native write to fd 1\n")
    ctypes.CDLL(None).printf(b"C printf\n")


@pytest.mark.skipif(os.name != "posix", reason="uses libc's printf")
def test_stdout_to_stderr_moves_python_native_and_c_output(capfd):
    with providers_module.stdout_to_stderr():
        _chatty()
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n"
    assert "preloading CUDA" in err and "native write to fd 1" in err and "C printf" in err


def test_preload_dlls_prints_to_stderr(monkeypatch, capfd):
    monkeypatch.setattr(
        providers_module.ort, "preload_dlls", lambda: print("Failed to load libcublasLt.so.13"), raising=False
    )
    providers_module.preload_dlls()
    out, err = capfd.readouterr()
    assert out == "" and "Failed to load libcublasLt.so.13" in err


def test_json_output_stays_clean_when_onnxruntime_prints(tiny_export):
    """`t5vh-sample --json` in a process whose CUDA preload prints: stdout holds the JSON lines alone."""
    code = f"""
import sys
import onnxruntime
from t5vh_fast import decoder, providers
from t5vh_fast.cli import sample_command

onnxruntime.preload_dlls = lambda: print("Failed to load libcublasLt.so.13")  # what it prints without CUDA
decoder.resolve_providers = lambda *args, **kwargs: [providers.CUDA, providers.CPU]  # take the GPU path ...
decoder.make_session = lambda path, names, threads, **kwargs: providers.make_session(path, [providers.CPU], threads)
sys.argv = ["t5vh-sample", {str(tiny_export)!r}, "hello there", "--json", "--txt-len", "3", "--seed", "0"]
sample_command()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Failed to load libcublasLt.so.13" in out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1 and len(rows[0]["response_ids"]) == 3


# ---------------------------------------------------------------------- onnxruntime failures


def _fail_inside(providers, failure, *, creating=False):
    with providers_module.provider_errors(providers, "while sampling", creating=creating):
        raise failure


def test_gpu_failures_become_provider_errors_naming_the_provider():
    oom = ort_state.RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA out of memory")
    with pytest.raises(ProviderError, match=f"{CUDA} failed while sampling: .*out of memory.*gpu_mem_limit"):
        _fail_inside([CUDA, CPU], oom)
    for failure in (ort_state.Fail("x"), ort_state.EPFail("x")):
        assert not isinstance(failure, RuntimeError)  # why catching RuntimeError is not enough
        with pytest.raises(ProviderError, match=f"{TENSORRT} failed.*use providers='cpu'"):
            _fail_inside([TENSORRT, CUDA, CPU], failure)
    # what onnxruntime 1.31's run_with_iobinding raised on an H100 when the arena was capped below a step's needs
    arena = RuntimeError(
        "Error in execution: Non-zero status code returned while running SimplifiedLayerNormalization node. "
        "Status Message: bfc_arena.cc:360 Available memory of 8057344 is smaller than requested bytes of 134217728"
    )
    with pytest.raises(ProviderError, match=f"{CUDA} failed while sampling: Error in execution.*gpu_mem_limit"):
        _fail_inside([CUDA, CPU], arena)
    no_kernel = RuntimeError("CUDA error cudaErrorNoKernelImageForDevice: no kernel image is available")
    with pytest.raises(ProviderError, match="no kernels for this GPU"):
        _fail_inside([CUDA, CPU], no_kernel, creating=True)


def test_cpu_failures_and_bugs_keep_their_own_exceptions():
    with pytest.raises(ort_state.Fail):
        _fail_inside([CPU], ort_state.Fail("a CPU failure is not a provider problem"))
    with pytest.raises(RuntimeError, match="a bug"):
        _fail_inside([CUDA, CPU], RuntimeError("a bug"))  # only session creation and IO-binding runs are the provider's
    with pytest.raises(InputError):
        _fail_inside([CUDA, CPU], InputError("ours"), creating=True)


def test_a_failure_while_sampling_on_the_gpu_is_one_provider_error(tiny_export):
    policy = t5vh_fast.load(tiny_export, providers="cpu")
    policy.decoder.providers = [CUDA, CPU]  # as if it ran on CUDA (where score() takes decoder steps)
    policy.decoder._packed = None

    def step(state, tokens, select=None, **options):
        raise ort_state.Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory")

    policy.decoder.step = step
    with pytest.raises(ProviderError, match=f"{CUDA} failed while sampling"):
        policy.respond_to_batch([[5, 6, 1]], txt_len=2, seed=0)
    with pytest.raises(ProviderError, match=f"{CUDA} failed while scoring"):
        policy.score([[5, 6, 1]], [[7, 8]])


def _failing_cuda_sessions(monkeypatch, failure):
    real = providers_module.ort.InferenceSession

    def session(path, sess_options=None, providers=()):
        if providers and providers[0] != CPU:
            raise failure
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(providers_module.ort, "InferenceSession", session)


def test_auto_falls_back_to_the_cpu_when_cuda_fails_to_start(tiny_export, fake_gpu, monkeypatch, capsys):
    monkeypatch.setattr(providers_module, "preload_dlls", lambda: None)
    monkeypatch.setattr("t5vh_fast.decoder.preload_dlls", lambda: None)
    _failing_cuda_sessions(monkeypatch, ort_state.EPFail("CUDA driver version is insufficient"))
    policy = t5vh_fast.load(tiny_export, providers="auto")
    assert policy.providers == [CPU]
    err = capsys.readouterr().err
    assert "running on the CPU" in err and f"{CUDA} failed starting" in err and "insufficient" in err
    with pytest.raises(ProviderError, match=f"{CUDA} failed starting t5vh_decoder.onnx: CUDA driver"):
        t5vh_fast.load(tiny_export, providers="cuda")


@pytest.mark.skipif(providers_module.cuda_device_present(), reason="needs a machine without a GPU")
def test_cuda_fallback_is_detected(tiny_export, monkeypatch, capsys):
    """Without a GPU, 'cuda' says so; with the probe off, onnxruntime's silent CPU fallback is caught too."""
    if CUDA not in providers_module.ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    with pytest.raises(ProviderError, match="no NVIDIA GPU found"):
        t5vh_fast.load(tiny_export, providers="cuda")
    with pytest.raises(ProviderError, match=f"{CUDA} (did not start|failed starting)"):
        t5vh_fast.load(tiny_export, providers="cuda", cuda=CudaOptions(probe=False))
    capsys.readouterr()
    policy = t5vh_fast.load(tiny_export, providers="auto", cuda=CudaOptions(probe=False))
    assert policy.providers == [CPU]
    assert "running on the CPU" in capsys.readouterr().err
    assert policy.respond_to_batch(np.array([[5, 6, 1]]), txt_len=3, seed=0).tokens.shape == (1, 3)


@pytest.mark.parametrize(
    "flags, saturates",
    [
        ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # vpdpbusd sums into 32 bits
        ("fpu sse2 avx2 avx_vnni", False),
        ("fpu sse2 avx2 avx512f avx512bw", True),  # vpmaddubsw: pairs of products saturate in 16 bits
        ("fpu sse2 avx2", True),
    ],
)
def test_int8_sessions_avoid_saturating_products_where_the_cpu_lacks_vnni(tmp_path, monkeypatch, flags, saturates):
    """uint8 x int8 products summed in pairs reach 2 x 255 x 127 > 32767: on x86-64 without VNNI every
    session asks onnxruntime for the kernels that widen first; with VNNI (here) it does not pay the ~30%."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert providers_module.int8_products_may_saturate(str(cpuinfo)) is saturates
    assert providers_module.int8_products_may_saturate(str(tmp_path / "not-linux")) is True
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert providers_module.int8_products_may_saturate(str(tmp_path / "arm")) is False
    monkeypatch.setattr(providers_module, "int8_products_may_saturate", lambda: saturates)
    entries = providers_module.session_options(2).get_session_config_entry
    if saturates:
        assert entries("session.x64quantprecision") == "1"
    else:
        with pytest.raises(RuntimeError):  # onnxruntime raises for a key that was never set
            entries("session.x64quantprecision")
