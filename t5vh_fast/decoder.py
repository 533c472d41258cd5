"""The graphs of an export under onnxruntime, and one decoder step, per decoder layout.

Two layouts run Optimum's graphs: ``split`` (``decoder_model.onnx`` for the
first step, ``decoder_with_past_model.onnx`` after it) and ``merged``
(``decoder_model_merged.onnx``, one graph with an ``If`` on
``use_cache_branch``). Both have the same small interface, ``encode`` once and
then ``step`` per call, so the sampler and the scorer never branch on layout.

Every graph runs through IO binding: past key/values stay as ``OrtValue``s
between steps (on the GPU under CUDA); only logits and values come back to the
host as NumPy arrays. No torch here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime as ort

from .errors import ExportError, InputError, ProviderError
from .manifest import DECODER, DECODER_MERGED, DECODER_WITH_PAST, ENCODER
from .providers import (
    CPU,
    CUDA,
    TENSORRT,
    CudaOptions,
    make_session,
    note_cpu_fallback,
    preload_dlls,
    resolve_providers,
)


@dataclass
class DecoderState:
    """What the decoder carries between steps, as ``OrtValue``s on the session's device."""

    # per layer: self-attention key, value (empty before the first step; grows by one position per step)
    self_kv: list
    # per layer: cross-attention key, value (computed by the first step, then reused)
    cross_kv: list
    # the encoder output and its mask
    encoder_hidden: object
    encoder_mask: object


class Graph:
    """One onnxruntime session, run through IO binding."""

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int = 0):
        self.session = session
        self.device = device
        self.device_id = device_id
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, feeds: Dict[str, ort.OrtValue], host: Sequence[str] = ()) -> Dict[str, ort.OrtValue]:
        """Outputs named in ``host`` come back on the CPU, the rest stay on the session's device."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cpu" if name in host else self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.get_outputs()))


class OnnxDecoder(ABC):
    """The encoder and decoder sessions of one export directory. Subclasses feed the steps."""

    layout = ""
    files: Tuple[str, ...] = ()

    def __init__(
        self,
        root: Path,
        *,
        providers: Union[str, Sequence[str]] = "auto",
        threads: Optional[int] = None,
        cuda: Optional[CudaOptions] = None,
        tensorrt=None,
    ):
        for name in self.files:
            if not (root / name).is_file():
                raise ExportError(f"{root} has no {name}: re-export with the graphs for decoder={self.layout!r}")
        cuda = cuda or CudaOptions()
        provider_list = resolve_providers(providers, device_id=cuda.device_id, probe=cuda.probe)
        if provider_list[0] != CPU:
            preload_dlls()  # CUDA/cuDNN from pip's nvidia-* packages, when installed that way
        try:
            sessions = [
                make_session(root / n, provider_list, threads, cuda=cuda, tensorrt=tensorrt) for n in self.files
            ]
        except ProviderError as exc:
            if providers != "auto":
                raise
            note_cpu_fallback(str(exc))  # "auto": CUDA was there but did not start; .providers says so
            provider_list = [CPU]
            sessions = [make_session(root / name, provider_list, threads) for name in self.files]
        self.providers: List[str] = sessions[0].get_providers()
        self.device = "cuda" if self.providers[0] in (CUDA, TENSORRT) else "cpu"
        self.device_id = cuda.device_id if self.device == "cuda" else 0
        self.graphs = [Graph(s, self.device, self.device_id) for s in sessions]
        self.encoder = self.graphs[0]
        decoder_outputs = self.graphs[1].outputs
        self.num_layers = sum(1 for o in decoder_outputs if o.endswith(".decoder.key"))
        layers = range(self.num_layers)
        self._self_in = [f"past_key_values.{i}.decoder.{p}" for i in layers for p in ("key", "value")]
        self._cross_in = [f"past_key_values.{i}.encoder.{p}" for i in layers for p in ("key", "value")]
        self._self_out = [f"present.{i}.decoder.{p}" for i in layers for p in ("key", "value")]
        self._cross_out = [f"present.{i}.encoder.{p}" for i in layers for p in ("key", "value")]

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> DecoderState:
        """Run the encoder once on checked B x S ``ids``/``mask``; the state has no KV cache yet."""
        mask_value = self.to_device(mask)
        out = self.encoder.run({"input_ids": self.to_device(ids), "attention_mask": mask_value})
        return DecoderState(self_kv=[], cross_kv=[], encoder_hidden=out["last_hidden_state"], encoder_mask=mask_value)

    def step(self, state: DecoderState, tokens: np.ndarray):
        """One decoder call on ``tokens`` (B x T): the first step or a step with the KV cache.

        Returns ``(logits B x T x V, values B x T, new state)`` with logits and
        values as NumPy arrays. The first call also computes the cross-attention
        K/V, which every later call reuses.
        """
        first = not state.self_kv
        graph, feeds = self._feeds(state, tokens, first)
        out = graph.run(feeds, host=("logits", "value"))
        cross_kv = [out[n] for n in self._cross_out] if first else state.cross_kv
        new_state = DecoderState([out[n] for n in self._self_out], cross_kv, state.encoder_hidden, state.encoder_mask)
        return out["logits"].numpy(), out["value"].numpy(), new_state

    def _past_feeds(self, state: DecoderState) -> dict:
        return dict(zip(self._self_in + self._cross_in, state.self_kv + state.cross_kv))

    @abstractmethod
    def _feeds(self, state: DecoderState, tokens: np.ndarray, first: bool) -> Tuple[Graph, dict]:
        """The graph to run for this step and its inputs."""


class SplitDecoder(OnnxDecoder):
    """Optimum's split layout: one graph for the first step, one with the KV cache for the rest."""

    layout = "split"
    files = (ENCODER, DECODER, DECODER_WITH_PAST)

    def _feeds(self, state, tokens, first):
        feeds = {"encoder_attention_mask": state.encoder_mask, "input_ids": self.to_device(tokens)}
        if first:
            feeds["encoder_hidden_states"] = state.encoder_hidden
            return self.graphs[1], feeds
        feeds.update(self._past_feeds(state))
        return self.graphs[2], feeds


class MergedDecoder(OnnxDecoder):
    """Optimum's merged layout: one graph whose ``If`` picks the first-step or the cached branch."""

    layout = "merged"
    files = (ENCODER, DECODER_MERGED)

    def __init__(self, root: Path, **kwargs):
        super().__init__(root, **kwargs)
        shape = self.graphs[1].inputs["past_key_values.0.decoder.key"].shape
        self._heads, self._d_kv = int(shape[1]), int(shape[3])
        # the If node reads its condition on the host: keep it there on every provider
        self._branch = {flag: ort.OrtValue.ortvalue_from_numpy(np.array([flag])) for flag in (False, True)}

    def _feeds(self, state, tokens, first):
        feeds = {
            "encoder_attention_mask": state.encoder_mask,
            "input_ids": self.to_device(tokens),
            "encoder_hidden_states": state.encoder_hidden,
            "use_cache_branch": self._branch[not first],
        }
        if first:
            empty = self.to_device(np.zeros((tokens.shape[0], self._heads, 0, self._d_kv), dtype=np.float32))
            feeds.update({name: empty for name in self._self_in + self._cross_in})
        else:
            feeds.update(self._past_feeds(state))
        return self.graphs[1], feeds


LAYOUTS = {cls.layout: cls for cls in (SplitDecoder, MergedDecoder)}


def _layout_class(layout: str):
    if layout not in LAYOUTS:
        raise InputError(f"decoder must be one of {tuple(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout]


def graph_files(layout: str) -> List[str]:
    """The graph files a decoder layout runs."""
    return list(_layout_class(layout).files)


def open_decoder(root: Path, layout: str = "split", **kwargs) -> OnnxDecoder:
    """The sessions of ``root`` for a decoder layout (``providers``, ``threads``, ``cuda``, ``tensorrt`` as in ``load``)."""
    return _layout_class(layout)(Path(root), **kwargs)
