"""The NVIDIA GPU of this machine, asked without starting CUDA in this process, and the libraries the GPU providers load.

The probe reads NVML (``libnvidia-ml.so.1``, installed with the driver) and
falls back to ``nvidia-smi`` in a subprocess. Neither creates a CUDA context,
so probing costs milliseconds, leaves no GPU memory behind and keeps a later
``fork`` safe. onnxruntime-gpu only finds out at the first run that a driver is
too old or a GPU has no kernels in its build, long after "auto" could have
chosen the CPU: the probe lets ``resolve_providers`` decide up front.

No torch here.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

# CUDA major version of the onnxruntime-gpu build -> the oldest driver that runs it:
# (NVML's CUDA driver version, 1000 * major + 10 * minor; the Linux driver branch)
REQUIRED_DRIVER = {12: (12000, 525), 13: (13000, 580)}
# onnxruntime-gpu 1.31 for CUDA 13 ships kernels for compute capability 7.5 to 9.0 and 12.0 only
CUDA13_COMPUTE_CAPABILITIES = "7.5-9.0 and 12.0"


def cuda13_has_kernels(cc: Tuple[int, int]) -> bool:
    return (7, 5) <= cc <= (9, 0) or cc == (12, 0)


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML or nvidia-smi numbers it."""

    index: int  # NVML's index (the CUDA device id too, unless CUDA_VISIBLE_DEVICES reorders devices)
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: Tuple[int, int]  # (major, minor), e.g. (9, 0) for Hopper


@dataclass(frozen=True)
class GpuReport:
    """What the probe found."""

    driver_version: str  # e.g. "580.65.06"
    cuda_driver_version: Optional[int]  # the newest CUDA the driver runs (13000 = 13.0); None from nvidia-smi
    gpus: Tuple[Gpu, ...]  # every GPU the driver sees, in NVML order
    source: str  # "nvml" or "nvidia-smi"


# ---------------------------------------------------------------------- probing


def probe_nvml(lib=None) -> Optional[GpuReport]:
    """Ask NVML; None when there is no NVML or it fails. ``lib`` replaces ``libnvidia-ml`` (tests)."""
    try:
        lib = lib or ctypes.CDLL("libnvidia-ml.so.1" if os.name != "nt" else "nvml.dll")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    try:
        return _nvml_report(lib)
    finally:
        lib.nvmlShutdown()


def _nvml_report(lib) -> Optional[GpuReport]:
    version, cuda, count = ctypes.create_string_buffer(96), ctypes.c_int(0), ctypes.c_uint(0)
    if lib.nvmlSystemGetDriverVersion(version, 96) != 0 or lib.nvmlDeviceGetCount_v2(ctypes.pointer(count)) != 0:
        return None
    cuda_version = cuda.value if lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.pointer(cuda)) == 0 else None
    gpus = tuple(_nvml_gpu(lib, i) for i in range(count.value))
    return GpuReport(version.value.decode(), cuda_version, tuple(g for g in gpus if g is not None), "nvml")


def _nvml_gpu(lib, index: int) -> Optional[Gpu]:
    handle, name, major, minor = ctypes.c_void_p(), ctypes.create_string_buffer(96), ctypes.c_int(), ctypes.c_int()
    if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.pointer(handle)) != 0:
        return None
    lib.nvmlDeviceGetName(handle, name, 96)
    if lib.nvmlDeviceGetCudaComputeCapability(handle, ctypes.pointer(major), ctypes.pointer(minor)) != 0:
        return None
    return Gpu(index, name.value.decode(errors="replace"), (major.value, minor.value))


NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,driver_version,compute_cap", "--format=csv,noheader"]


def probe_nvidia_smi(run=subprocess.run) -> Optional[GpuReport]:
    """Ask ``nvidia-smi`` in a subprocess; None when it is missing or fails. ``run`` replaces subprocess.run."""
    try:
        done = run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else None


def parse_nvidia_smi(text: str) -> Optional[GpuReport]:
    """Parse ``index, name, driver_version, compute_cap`` lines (names may hold commas)."""
    gpus, driver = [], None
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        major, _, minor = fields[-1].partition(".")
        if not (major.isdigit() and minor.isdigit()):
            continue
        driver = fields[-2]
        gpus.append(Gpu(int(fields[0]), ", ".join(fields[1:-2]), (int(major), int(minor))))
    return GpuReport(driver, None, tuple(gpus), "nvidia-smi") if gpus else None


@functools.lru_cache(maxsize=1)
def probe() -> Optional[GpuReport]:
    """NVML, else nvidia-smi, else None (no NVIDIA driver here). Cached for the process."""
    return probe_nvml() or probe_nvidia_smi()


def visible_gpus(report: Optional[GpuReport], env=None) -> Tuple[Gpu, ...]:
    """The GPUs CUDA numbers 0, 1, ... after ``CUDA_VISIBLE_DEVICES`` (a list of indices; UUIDs keep all)."""
    if report is None:
        return ()
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return report.gpus
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.lstrip("-").isdigit() for v in wanted):
        return report.gpus
    by_index = {g.index: g for g in report.gpus}
    chosen = []
    for value in wanted:  # CUDA stops at the first invalid index
        if int(value) not in by_index:
            break
        chosen.append(by_index[int(value)])
    return tuple(chosen)


# ---------------------------------------------------------------------- what onnxruntime-gpu needs


def ort_cuda_major() -> Optional[int]:
    """The CUDA major version this onnxruntime was built for (None for a CPU build)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    version = getattr(info, "cuda_version", "") or ""
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else None


def gpu_problem(report: Optional[GpuReport], device_id: int = 0, cuda_major: Optional[int] = None, env=None):
    """Why onnxruntime-gpu cannot run on GPU ``device_id`` (one line), or None when it can."""
    gpus = visible_gpus(report, env)
    if not gpus:
        return "no NVIDIA GPU found (no NVML, no nvidia-smi, or CUDA_VISIBLE_DEVICES hides them all)"
    if not 0 <= device_id < len(gpus):
        return f"device_id={device_id}, but CUDA sees {len(gpus)} GPU(s) here"
    gpu = gpus[device_id]
    if cuda_major in REQUIRED_DRIVER:
        old = _driver_too_old(report, *REQUIRED_DRIVER[cuda_major])
        if old:
            return (
                f"the NVIDIA driver {report.driver_version} {old}; onnxruntime-gpu is built for CUDA {cuda_major} "
                f"and needs driver R{REQUIRED_DRIVER[cuda_major][1]} or newer: update the driver"
            )
    if cuda_major == 13 and not cuda13_has_kernels(gpu.compute_capability):
        cc = ".".join(map(str, gpu.compute_capability))
        return (
            f"GPU {device_id} ({gpu.name}) has compute capability {cc}; onnxruntime-gpu for CUDA 13 has kernels "
            f"for {CUDA13_COMPUTE_CAPABILITIES} only"
        )
    return None


def _driver_too_old(report: GpuReport, cuda_needed: int, branch_needed: int) -> Optional[str]:
    if report.cuda_driver_version is not None:
        if report.cuda_driver_version < cuda_needed:
            cuda = report.cuda_driver_version
            return f"runs CUDA up to {cuda // 1000}.{cuda % 1000 // 10}"
        return None
    branch = report.driver_version.split(".")[0]
    if branch.isdigit() and int(branch) < branch_needed:
        return f"is older than R{branch_needed}"
    return None


def shared_libraries(provider: str, cuda_major: int) -> Tuple[str, ...]:
    """The libraries onnxruntime's provider library is linked against (its DT_NEEDED entries)."""
    cuda = (
        f"libcudart.so.{cuda_major}",
        f"libcublasLt.so.{cuda_major}",
        f"libcublas.so.{cuda_major}",
        "libcurand.so.10",
    )
    if provider == "TensorrtExecutionProvider":
        return cuda + ("libcudnn.so.9", "libnvinfer.so.10", "libnvonnxparser.so.10")
    return cuda


def missing_libraries(names: Sequence[str], load=ctypes.CDLL) -> Tuple[str, ...]:
    """Those of ``names`` the dynamic loader cannot find (already loaded ones count as found)."""
    missing = []
    for name in names:
        try:
            load(name)
        except OSError:
            missing.append(name)
    return tuple(missing)


def preload_nvidia_libs(names: Sequence[str], paths: Optional[Sequence[str]] = None, load=ctypes.CDLL):
    """Load those of ``names`` the loader cannot find from any ``nvidia/*/lib`` folder on ``sys.path``.

    ``onnxruntime.preload_dlls`` only looks beside onnxruntime itself; CUDA's
    pip packages may sit in another site-packages (a venv over the system's, a
    PYTHONPATH install). Returns the names still missing afterwards.
    """
    for name in missing_libraries(names, load):
        for folder in sys.path if paths is None else paths:
            hits = sorted(Path(folder).glob(f"nvidia/*/lib/{name}")) if folder else []
            if hits:
                try:
                    load(str(hits[0]), mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    continue
    return missing_libraries(names, load)


TENSORRT_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
TENSORRT_FIX = (
    'pip install "t5vh_fast[tensorrt]" (tensorrt-cu13-libs>=10.13,<11: TensorRT 10, which onnxruntime-gpu 1.31 '
    "links; its PyPI stub fetches the wheel from NVIDIA's index), or put TensorRT 10's lib folder on LD_LIBRARY_PATH"
)


def preload_tensorrt_libs() -> Optional[Path]:
    """Load TensorRT 10 from the ``tensorrt_libs`` pip package, if installed, so onnxruntime finds it.

    Returns the folder loaded from, or None. Like ``onnxruntime.preload_dlls``
    for CUDA: libraries loaded by soname first satisfy the provider's own links.
    """
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    for name in TENSORRT_LIBS:
        if (folder / name).is_file():
            try:
                ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
    return folder
