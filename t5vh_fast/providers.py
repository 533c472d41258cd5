"""onnxruntime execution providers and session options: which device runs the graphs, and how.

No torch here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnxruntime as ort

from . import gpu, hugepages
from .errors import ExportError, InputError, ProviderError, T5vhError
from .tensorrt import TensorrtOptions, tensorrt_provider_options, without_tensorrt_environment

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
ARENA_STRATEGIES = ("kSameAsRequested", "kNextPowerOfTwo")
GPU_EXTRA_FIX = 'pip install "t5vh_fast[gpu]" (CUDA 13 and cuDNN 9 as pip packages)'


@dataclass(frozen=True)
class CudaOptions:
    """CUDA provider settings (``load(..., cuda=CudaOptions(...))``); TensorRT runs on the same device."""

    # which GPU, as CUDA numbers them (after CUDA_VISIBLE_DEVICES)
    device_id: int = 0
    # TF32 MatMuls on Ampere and newer: faster, but ~1e-3 relative error, outside the fp32 parity tolerance
    tf32: bool = False
    # how each session's memory arena grows (it never shrinks): "kSameAsRequested" (what is asked, no more)
    # or "kNextPowerOfTwo" (onnxruntime's default: fewer, larger blocks, up to half of them unused)
    arena_extend_strategy: str = "kSameAsRequested"
    # bytes each session's arena may hold; None: no limit
    gpu_mem_limit: Optional[int] = None
    # check the driver and the GPU's compute capability before starting CUDA; False: trust the GPU
    probe: bool = True

    def __post_init__(self):
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or self.device_id < 0:
            raise InputError(f"CudaOptions.device_id must be an integer >= 0, got {self.device_id!r}")
        if self.arena_extend_strategy not in ARENA_STRATEGIES:
            raise InputError(
                f"CudaOptions.arena_extend_strategy must be one of {ARENA_STRATEGIES}, got {self.arena_extend_strategy!r}"
            )
        limit = self.gpu_mem_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"CudaOptions.gpu_mem_limit must be a number of bytes >= 1 or None, got {limit!r}")


def cuda_provider_options(cuda: CudaOptions) -> Dict[str, str]:
    """The CUDA provider options for ``cuda``: device, TF32 off unless asked, arena growth and limit."""
    options = {
        "device_id": str(cuda.device_id),
        "use_tf32": "1" if cuda.tf32 else "0",
        "arena_extend_strategy": cuda.arena_extend_strategy,
    }
    if cuda.gpu_mem_limit is not None:
        options["gpu_mem_limit"] = str(cuda.gpu_mem_limit)
    return options


# ---------------------------------------------------------------------- choosing providers


def cuda_device_present() -> bool:
    """True when the NVIDIA driver reports a GPU CUDA can see (asked through NVML, without starting CUDA)."""
    return bool(gpu.visible_gpus(gpu.probe()))


def resolve_providers(
    providers: Union[str, Sequence[str]] = "auto", *, device_id: int = 0, probe: bool = True
) -> List[str]:
    """The onnxruntime provider list for ``"auto"``, ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or an explicit list.

    ``"auto"`` takes CUDA only where onnxruntime has it and the probe finds a
    GPU it can run on (else the CPU, with the reason on stderr when a GPU was
    there). ``"cuda"`` and ``"tensorrt"`` raise ``ProviderError`` saying why they
    cannot run. ``probe=False`` skips the driver and compute-capability check.
    """
    available = ort.get_available_providers()
    if not isinstance(providers, str):
        return _explicit(list(providers), available)
    choice = providers.lower()
    if choice == "cpu":
        return [CPU]
    if choice == "auto":
        return _auto(available, device_id, probe)
    wanted = {"cuda": [CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU]}.get(choice)
    if wanted is None:
        raise InputError(
            f"providers={providers!r} is not one of 'auto', 'cpu', 'cuda', 'tensorrt' or a list of provider names"
        )
    if wanted[0] not in available:
        raise ProviderError(
            f"providers={providers!r} needs {wanted[0]}, which this onnxruntime does not have "
            f"(it has {available}); install onnxruntime-gpu or use providers='cpu'"
        )
    problem = gpu.gpu_problem(gpu.probe(), device_id, gpu.ort_cuda_major()) if probe else None
    if problem:
        raise ProviderError(f"providers={providers!r} cannot run here: {problem}; use providers='cpu'")
    if choice == "tensorrt":
        _check_tensorrt_libraries()
    return wanted


def _auto(available: List[str], device_id: int, probe: bool) -> List[str]:
    if CUDA not in available:
        return [CPU]
    if not probe:
        return [CUDA, CPU]
    report = gpu.probe()
    if not gpu.visible_gpus(report):
        return [CPU]
    problem = gpu.gpu_problem(report, device_id, gpu.ort_cuda_major())
    if problem:
        note_cpu_fallback(problem)
        return [CPU]
    return [CUDA, CPU]


def _explicit(providers: List[str], available: List[str]) -> List[str]:
    if not providers:
        raise InputError("providers is an empty list: name at least one onnxruntime provider")
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ProviderError(f"providers {unknown} are not available in this onnxruntime (available: {available})")
    return providers


def _check_tensorrt_libraries() -> None:
    gpu.preload_tensorrt_libs()
    missing = gpu.missing_libraries(("libnvinfer.so.10", "libnvonnxparser.so.10"))
    if missing:
        raise ProviderError(
            f"providers='tensorrt' needs TensorRT 10 ({', '.join(missing)} not found): {gpu.TENSORRT_FIX}"
        )


def note_cpu_fallback(reason: str) -> None:
    """One line on stderr: "auto" is using the CPU, and why."""
    print(f"t5vh_fast: running on the CPU: {reason}", file=sys.stderr)


# ---------------------------------------------------------------------- sessions


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive integer or None, got {threads!r}")


def session_options(threads: Optional[int], *, memory_patterns: bool = True) -> ort.SessionOptions:
    """All graph optimizations on, errors-only logging, ``threads`` intra-op threads.

    ``memory_patterns=False`` turns off onnxruntime's memory pattern: per set of input shapes it records
    where a run's tensors went, and the next run with those shapes takes them as one block from the
    arena. A scoring process's batches rarely repeat their shapes, and the arena grew again for blocks
    it could not reuse: peak RSS 667 against 587 MB on the scoring benchmark, with its growth in the
    second pass (493 -> 610 -> 666 MB, against 493 -> 580 -> 582), and no pass slower.

    The pool's threads spin between the nodes of a run (each node's parallel work starts without a
    wake-up) and stop when the run returns (``session.force_spinning_stop``): each session owns a
    pool, and threads spinning after a run compete with whatever runs next on the same cores, the
    host's draw between two decoder steps or the decoder's first step after the encoder. Measured on
    2 cores: batch-1 steps 7.0-7.6 against 7.3-8.3 ms (five alternating process pairs, each faster);
    the encoder's threads not spinning at all, as before, cost it ~8% at batch 1 (22.4 against 20.6 ms).
    """
    check_threads(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_mem_pattern = memory_patterns
    if int8_products_may_saturate():
        # int8 graphs multiply uint8 activations by int8 weights; x86 CPUs without VNNI do it with
        # vpmaddubsw, which adds pairs of products in 16 bits and saturates (255 x 127 x 2 > 32767).
        # This makes onnxruntime store the weights as uint8 and use kernels that widen first. On a CPU
        # with VNNI (vpdpbusd sums into 32 bits) it is not needed and cost ~30% at batch 64 here.
        options.add_session_config_entry("session.x64quantprecision", "1")
    # The CPU arena stays on: without it peak RSS at batch 64 fell by ~450 MB, but every step's
    # new KV buffers then came fresh from the OS (page faults) and rollouts were ~10% slower.
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


@functools.cache
def int8_products_may_saturate(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this is an x86-64 CPU whose int8 dot products may saturate: one without VNNI
    (avx512_vnni, avx_vnni or AMX). Where the flags cannot be read (not Linux), assume it may."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # other CPUs have their own kernels; the setting is for x86-64 only
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def provider_entries(
    path: Path, providers: List[str], cuda: Optional[CudaOptions] = None, tensorrt: Optional[TensorrtOptions] = None
) -> list:
    """``providers`` with their options, as onnxruntime takes them: (name, options) or a bare name."""
    cuda = cuda or CudaOptions()
    entries = []
    for name in providers:
        if name == CUDA:
            entries.append((CUDA, cuda_provider_options(cuda)))
        elif name == TENSORRT:
            entries.append((TENSORRT, tensorrt_provider_options(path, tensorrt or TensorrtOptions(), cuda.device_id)))
        else:
            entries.append(name)
    return entries


def make_session(
    path: Path,
    providers: List[str],
    threads: Optional[int],
    *,
    cuda: Optional[CudaOptions] = None,
    tensorrt: Optional[TensorrtOptions] = None,
    initializers: Optional[Dict[str, np.ndarray]] = None,
    memory_patterns: bool = True,
) -> ort.InferenceSession:
    """One onnxruntime session for a graph file; raises ``ProviderError`` if the first provider did not start.

    ``initializers`` replace the graph's stored weights of those names (the graph must
    keep them as external data); onnxruntime copies them, so the arrays may be dropped after.
    ``memory_patterns`` as in ``session_options`` (the CPU's sessions; a GPU's keep them).
    """
    options = session_options(threads, memory_patterns=memory_patterns or providers[0] != CPU)
    if initializers:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in initializers.values()]
        options.add_external_initializers(list(initializers), values)
    entries = provider_entries(path, providers, cuda, tensorrt)
    hide_env = without_tensorrt_environment() if TENSORRT in providers else contextlib.nullcontext()
    before = hugepages.anonymous_mappings() if providers[0] == CPU else None  # what the session will map
    try:
        with stdout_to_stderr(), hide_env, provider_errors(providers, f"starting {path.name}", creating=True):
            session = ort.InferenceSession(str(path), sess_options=options, providers=entries)
    except T5vhError:
        raise
    except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) derive from Exception
        detail = " ".join(str(exc).split())[:300]
        raise ExportError(
            f"onnxruntime cannot load {path} ({type(exc).__name__}: {detail}): the file is damaged or not "
            "an ONNX graph; re-export the model"
        ) from None
    if providers[0] != CPU and session.get_providers()[0] != providers[0]:
        raise ProviderError(_did_not_start(providers[0], path, session.get_providers()))
    hugepages.collapse_later(before)  # its pre-packed weights into 2 MB pages, where the kernel allows
    return session


def _did_not_start(provider: str, path: Path, got: List[str]) -> str:
    missing = gpu.missing_libraries(gpu.shared_libraries(provider, gpu.ort_cuda_major() or 13))
    if any("nvinfer" in m or "nvonnxparser" in m for m in missing):
        fix = gpu.TENSORRT_FIX
    else:
        fix = GPU_EXTRA_FIX if missing else "use providers='cpu'"
    why = f"missing {', '.join(missing)}" if missing else "onnxruntime's log above says why"
    return f"{provider} did not start for {path.name} (onnxruntime fell back to {got}; {why}): {fix}"


def preload_dlls() -> None:
    """CUDA and cuDNN from pip's nvidia-* packages (wherever on sys.path), TensorRT from ``tensorrt_libs``.

    What onnxruntime prints while loading goes to stderr."""
    with stdout_to_stderr():
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        gpu.preload_tensorrt_libs()
        gpu.preload_nvidia_libs(gpu.shared_libraries(TENSORRT, gpu.ort_cuda_major() or 13))


# ---------------------------------------------------------------------- errors and output


def _ort_failures() -> tuple:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, name) for name in ("Fail", "EPFail", "RuntimeException") if hasattr(state, name))


ORT_FAILURES = _ort_failures()  # not RuntimeError subclasses: `except RuntimeError` misses them
IOBINDING_FAILURE = "Error in execution"  # how run_with_iobinding words a failed run, as a plain RuntimeError


@contextlib.contextmanager
def provider_errors(providers: Sequence[str], doing: str, *, creating: bool = False):
    """Turn onnxruntime failures on a GPU provider into ``ProviderError`` naming it; CPU failures pass through.

    ``creating``: a session is being created, where onnxruntime also raises
    plain ``RuntimeError`` for a provider that cannot start. While running, a
    plain ``RuntimeError`` is the provider's only when it is onnxruntime's
    IO-binding failure ("Error in execution: ...", an out-of-memory arena say).
    """
    if not providers or providers[0] == CPU:
        yield
        return
    try:
        yield
    except T5vhError:
        raise
    except (*ORT_FAILURES, RuntimeError) as exc:
        ours = isinstance(exc, ORT_FAILURES) or creating or str(exc).startswith(IOBINDING_FAILURE)
        if not ours:
            raise
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        raise ProviderError(f"{providers[0]} failed {doing}: {message}; {_hint(message)}") from exc


def _hint(message: str) -> str:
    low = message.lower()
    if "out of memory" in low or "failed to allocate" in low or "smaller than requested bytes" in low:
        return "lower the batch size, free GPU memory, or cap the arena with CudaOptions(gpu_mem_limit=...)"
    if "no kernel image" in low or "invalid device function" in low or "no_binary_for_gpu" in low:
        return "this onnxruntime-gpu has no kernels for this GPU: use providers='cpu'"
    return "use providers='cpu' to run on the CPU"


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout (Python prints and native writes to fd 1) to stderr inside the block.

    onnxruntime's ``preload_dlls`` and its provider-fallback banner print to
    stdout, which would corrupt ``t5vh-sample --json`` and ``t5vh-score -o -``.
    """
    _flush_all()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 (a detached process): Python-level redirection only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush_all()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _flush_all() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers
        except (OSError, AttributeError):
            pass
