"""onnxruntime execution providers and session options: which device runs the graphs.

No torch here.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import onnxruntime as ort

from .errors import ExportError, InputError, ProviderError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def cuda_device_present() -> bool:
    """True when the CUDA driver loads and reports at least one device.

    onnxruntime-gpu lists the CUDA provider on every machine; this asks the
    driver instead, so "auto" does not try (and log a failure) where there is no GPU.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1" if os.name != "nt" else "nvcuda.dll")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def resolve_providers(providers: Union[str, Sequence[str]] = "auto") -> List[str]:
    """The onnxruntime provider list for ``"auto"``, ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or an explicit list."""
    available = ort.get_available_providers()
    if isinstance(providers, str):
        choice = providers.lower()
        if choice == "cpu":
            return [CPU]
        if choice == "auto":
            return [CUDA, CPU] if CUDA in available and cuda_device_present() else [CPU]
        wanted = {"cuda": [CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU]}.get(choice)
        if wanted is None:
            raise InputError(
                f"providers={providers!r} is not one of 'auto', 'cpu', 'cuda', 'tensorrt' or a list of provider names"
            )
        if wanted[0] not in available:
            raise InputError(
                f"providers={providers!r} needs {wanted[0]}, which this onnxruntime does not have "
                f"(it has {available}); install onnxruntime-gpu or use providers='cpu'"
            )
        return wanted
    providers = list(providers)
    if not providers:
        raise InputError("providers is an empty list: name at least one onnxruntime provider")
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise InputError(f"providers {unknown} are not available in this onnxruntime (available: {available})")
    return providers


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive integer or None, got {threads!r}")


def make_session(path: Path, providers: List[str], threads: Optional[int]) -> ort.InferenceSession:
    """One onnxruntime session for a graph file, all optimizations on; fails if the first provider fell back."""
    check_threads(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # The CPU arena stays on: without it peak RSS at batch 64 fell by ~450 MB, but every step's
    # new KV buffers then came fresh from the OS (page faults) and rollouts were ~10% slower.
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) derive from Exception
        detail = " ".join(str(exc).split())[:300]
        hint = "re-export the model" if providers[0] == CPU else "re-export the model, or try providers='cpu'"
        raise ExportError(
            f"onnxruntime cannot load {path} ({type(exc).__name__}: {detail}): the file is damaged or not "
            f"an ONNX graph; {hint}"
        ) from None
    if providers[0] != CPU and session.get_providers()[0] != providers[0]:
        raise ProviderError(
            f"{providers[0]} did not start for {path.name} (onnxruntime fell back to {session.get_providers()}): "
            "check the CUDA/cuDNN installation, or use providers='cpu'"
        )
    return session
