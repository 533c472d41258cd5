"""ONNX Runtime sessions for an export: providers, threads, IO binding, the KV cache.

Every graph is run through IO binding. Past key/values stay as ``OrtValue``s
between steps (on the GPU under CUDA); only logits and values come back to the
host as NumPy arrays. No torch here.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import onnxruntime as ort

from .manifest import DECODER, DECODER_MERGED, DECODER_WITH_PAST, ENCODER, ExportError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DECODER_LAYOUTS = ("split", "merged")


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
            raise ValueError(
                f"providers={providers!r} is not one of 'auto', 'cpu', 'cuda', 'tensorrt' or a list of provider names"
            )
        if wanted[0] not in available:
            raise ValueError(
                f"providers={providers!r} needs {wanted[0]}, which this onnxruntime does not have "
                f"(it has {available}); install onnxruntime-gpu or use providers='cpu'"
            )
        return wanted
    providers = list(providers)
    if not providers:
        raise ValueError("providers is an empty list: name at least one onnxruntime provider")
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ValueError(f"providers {unknown} are not available in this onnxruntime (available: {available})")
    return providers


def graph_files(decoder: str) -> List[str]:
    """The graph files a decoder layout runs."""
    if decoder not in DECODER_LAYOUTS:
        raise ValueError(f"decoder must be one of {DECODER_LAYOUTS}, got {decoder!r}")
    return [ENCODER] + ([DECODER_MERGED] if decoder == "merged" else [DECODER, DECODER_WITH_PAST])


def make_session(path: Path, providers: List[str], threads: Optional[int]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # The CPU arena stays on: without it peak RSS at batch 64 fell by ~450 MB, but every step's
    # new KV buffers then came fresh from the OS (page faults) and rollouts were ~10% slower.
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if providers[0] != CPU and session.get_providers()[0] != providers[0]:
        raise RuntimeError(
            f"{providers[0]} did not start for {path.name} (onnxruntime fell back to {session.get_providers()}): "
            "check the CUDA/cuDNN installation, or use providers='cpu'"
        )
    return session


@dataclass
class DecoderState:
    """The KV cache between decoder steps, as OrtValues on the session's device."""

    # per layer: self-attention key, value (grows by one position per step)
    self_kv: list
    # per layer: cross-attention key, value (computed once, at the first step)
    cross_kv: list
    # the encoder output and its mask (the merged graph wants them every step)
    encoder_hidden: object
    encoder_mask: object


class Graphs:
    """The encoder and decoder sessions of one export directory."""

    def __init__(
        self,
        root: Path,
        *,
        providers: Union[str, Sequence[str]] = "auto",
        threads: Optional[int] = None,
        decoder: str = "split",
    ):
        names = graph_files(decoder)
        requested = providers
        provider_list = resolve_providers(providers)
        if provider_list[0] != CPU and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* packages, when installed that way
        for name in names:
            if not (root / name).is_file():
                raise ExportError(f"{root} has no {name}: re-export with the graphs for decoder={decoder!r}")
        try:
            sessions = [make_session(root / n, provider_list, threads) for n in names]
        except RuntimeError:
            if requested != "auto":
                raise
            provider_list = [CPU]  # "auto": CUDA was there but did not start; say so via .providers
            sessions = [make_session(root / n, provider_list, threads) for n in names]
        self._output_names = {id(s): [o.name for o in s.get_outputs()] for s in sessions}
        self.providers = sessions[0].get_providers()
        self.device = "cuda" if self.providers[0] in (CUDA, TENSORRT) else "cpu"
        self.decoder_layout = decoder
        self.encoder = sessions[0]
        self.first_decoder = sessions[1]
        self.next_decoder = sessions[-1]
        outputs = [o.name for o in self.first_decoder.get_outputs()]
        self.num_layers = sum(1 for o in outputs if o.endswith(".decoder.key"))
        past = {i.name: i for i in self.first_decoder.get_inputs()} if decoder == "merged" else None
        self._past_shape = None
        if past:
            shape = past["past_key_values.0.decoder.key"].shape
            self._past_shape = (int(shape[1]), int(shape[3]))  # heads, d_kv

    # ------------------------------------------------------------------ helpers

    def _value(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _run(self, session, feeds: dict, host: Sequence[str]):
        """Run with IO binding: outputs named in ``host`` come back as NumPy, the rest stay OrtValues."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        names = self._output_names[id(session)]
        for name in names:
            binding.bind_output(name, "cpu" if name in host else self.device)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs()))

    # ------------------------------------------------------------------ graphs

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> DecoderState:
        """Run the encoder once; returns a state with no KV cache yet."""
        mask_value = self._value(mask)
        out = self._run(self.encoder, {"input_ids": self._value(ids), "attention_mask": mask_value}, host=())
        return DecoderState(self_kv=[], cross_kv=[], encoder_hidden=out["last_hidden_state"], encoder_mask=mask_value)

    def decode(self, state: DecoderState, decoder_ids: np.ndarray):
        """One decoder call on ``decoder_ids`` (B x T), first step or with past.

        Returns ``(logits B x T x V, value B x T, new state)``; the first call also
        computes the cross-attention K/V, reused by every later call.
        """
        first = not state.self_kv
        feeds = {"encoder_attention_mask": state.encoder_mask, "input_ids": self._value(decoder_ids)}
        session = self.first_decoder if first else self.next_decoder
        if self.decoder_layout == "merged" or first:
            feeds["encoder_hidden_states"] = state.encoder_hidden
        if not first:
            for i in range(self.num_layers):
                feeds[f"past_key_values.{i}.decoder.key"] = state.self_kv[2 * i]
                feeds[f"past_key_values.{i}.decoder.value"] = state.self_kv[2 * i + 1]
                feeds[f"past_key_values.{i}.encoder.key"] = state.cross_kv[2 * i]
                feeds[f"past_key_values.{i}.encoder.value"] = state.cross_kv[2 * i + 1]
        if self.decoder_layout == "merged":
            feeds["use_cache_branch"] = self._value(np.array([not first]))
            if first:
                batch = decoder_ids.shape[0]
                heads, d_kv = self._past_shape
                empty = self._value(np.zeros((batch, heads, 0, d_kv), dtype=np.float32))
                for i in range(self.num_layers):
                    for kind in ("decoder", "encoder"):
                        for part in ("key", "value"):
                            feeds[f"past_key_values.{i}.{kind}.{part}"] = empty
        out = self._run(session, feeds, host=("logits", "value"))
        self_kv = [out[f"present.{i}.decoder.{p}"] for i in range(self.num_layers) for p in ("key", "value")]
        if first:
            cross_kv = [out[f"present.{i}.encoder.{p}"] for i in range(self.num_layers) for p in ("key", "value")]
        else:
            cross_kv = state.cross_kv
        new_state = DecoderState(self_kv, cross_kv, state.encoder_hidden, state.encoder_mask)
        return out["logits"].numpy(), out["value"].numpy(), new_state
