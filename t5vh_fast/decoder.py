"""The graphs of an export under onnxruntime, and one decoder step, per decoder layout.

Two layouts run Optimum's graphs: ``split`` (``decoder_model.onnx`` for the
first step, ``decoder_with_past_model.onnx`` after it) and ``merged``
(``decoder_model_merged.onnx``, one graph with an ``If`` on
``use_cache_branch``). Every layout has the same small interface, ``encode``
once and then ``step`` per call (the scorer also takes ``rows_of`` a state, to
run rows of similar length together), so the sampler and the scorer never
branch on layout.

Every graph runs through IO binding: past key/values stay as ``OrtValue``s
between steps (on the GPU under CUDA); only logits and values come back to the
host as NumPy arrays. No torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import os
import threading
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime as ort

from .errors import ExportError, InputError, ProviderError
from .manifest import (
    DECODER,
    DECODER_GRAPH,
    DECODER_MERGED,
    DECODER_WITH_PAST,
    ENCODER,
    ENCODER_GRAPH,
    LOOKUP_GRAPH,
    PACKED_ENCODER_GRAPH,
    PACKED_GRAPH,
    SAMPLER_GRAPH,
    SCORER_GRAPH,
)
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
from .sampling import draw, token_logprobs
from .weights import ROW_BLOCKS_KEY, with_row_blocks


@dataclass
class DecoderState:
    """What the decoder carries between steps, as ``OrtValue``s on the session's device."""

    # per layer: self-attention key, value (empty before the first step; grows by one position per step)
    self_kv: list
    # per layer: cross-attention key, value (computed once per query, then reused)
    cross_kv: list
    # the encoder output (Optimum's layouts feed it to the decoder; None for the single layout)
    encoder_hidden: object
    # the queries' attention mask, as the decoder graph takes it
    encoder_mask: object
    # decoder rows: queries x samples per query (query-major)
    rows: int = 0
    # positions already in the self-attention cache
    length: int = 0
    # positions the cache can hold (the single layout preallocates it; 0 = grows as needed)
    capacity: int = 0
    # the single layout's IO binding, made at the first step with what stays bound (cache, cross K/V)
    binding: object = None
    # the single layout's step arrays (``StepIO``), bound once and reused while the call's shape holds
    io: object = None


@dataclass(frozen=True)
class StepIO:
    """The single layout's per-call arrays, bound once to a state's IO binding and reused by its next steps
    of the same shape (a fresh B x V logits block per step was 8 MB at batch 64 and t5-small's vocabulary)."""

    # (rows, steps, positions picked, logits on the device) of the calls these fit
    shape: tuple
    # the step's token embeddings (rows x steps x d), on the session's device, overwritten each step
    embeds: object
    # picked x V logits and picked values, in NumPy's memory, written by onnxruntime each step (the logits
    # an OrtValue on the device instead when the step's token is drawn there: ``SingleDecoder.draw_step``)
    logits: object
    values: np.ndarray
    # the positions already in the cache, in NumPy's memory bound on the host: set, not re-bound, each step
    past_length: np.ndarray
    # ``draw_step``'s sampler binding with its u and outputs in NumPy's memory, made at its first step
    draw: dict = field(default_factory=dict)


def named_as(graph, weights: Optional[Dict[str, np.ndarray]]) -> Optional[Dict[str, np.ndarray]]:
    """``weights`` named as the started ``graph``'s file names its tensors: a matrix the file holds as
    blocks of rows (its ``ROW_BLOCKS_KEY`` metadata: the packed graphs' feed-forward output) as those."""
    blocks = graph.session.get_modelmeta().custom_metadata_map.get(ROW_BLOCKS_KEY)
    return with_row_blocks(weights, json.loads(blocks)) if weights is not None and blocks else weights


class Graph:
    """One onnxruntime session, run through IO binding."""

    started = True  # its session exists (a ``LazyGraph``'s starts at its first use)

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int = 0):
        self.session = session
        self.device = device
        self.device_id = device_id
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    def run(
        self, feeds: Dict[str, ort.OrtValue], host: Sequence[str] = (), into: Optional[Dict[str, ort.OrtValue]] = None
    ) -> Dict[str, ort.OrtValue]:
        """Outputs named in ``host`` come back on the CPU, those in ``into`` are written into the given
        ``OrtValue``s, the rest stay on the session's device."""
        binding = self.session.io_binding()
        into = into or {}
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            if name in into:
                binding.bind_ortvalue_output(name, into[name])
            elif name in host:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.get_outputs()))


class LazyGraph:
    """A ``Graph`` whose session starts at its first use (``start`` makes it), once, whichever thread asks.

    A scoring job never starts the sampling decoder and a rollout worker never starts the packed
    scoring decoder: each session holds its weights (~150 MB at t5-small size) once it starts."""

    def __init__(self, start: Callable[[], ort.InferenceSession], device: str, device_id: int = 0):
        self._start, self.device, self.device_id = start, device, device_id
        self._graph: Optional[Graph] = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._graph is not None

    def __getattr__(self, name):  # session, inputs, outputs, run: the started Graph's
        if name.startswith("_"):
            raise AttributeError(name)
        if self._graph is None:
            with self._lock:
                if self._graph is None:
                    self._graph = Graph(self._start(), self.device, self.device_id)
                    self._start = None  # what it captured (new weights) is in the session now
        return getattr(self._graph, name)


class OnnxDecoder(ABC):
    """The sessions of one export directory for one decoder layout.

    ``encode`` runs once per batch of queries, ``step`` once per decoder call;
    subclasses say how each layout is fed.
    """

    layout = ""
    files: Tuple[str, ...] = ()
    memory_patterns = True  # onnxruntime's, per session (``session_options``)

    def __init__(
        self,
        root: Path,
        *,
        providers: Union[str, Sequence[str]] = "auto",
        threads: Optional[int] = None,
        cuda: Optional[CudaOptions] = None,
        tensorrt=None,
    ):
        self.root = Path(root)
        for name in self.files:
            if not (self.root / name).is_file():
                raise ExportError(f"{self.root} has no {name}: re-export with the graphs for decoder={self.layout!r}")
        self.threads, self.cuda, self.tensorrt = threads, cuda or CudaOptions(), tensorrt
        provider_list = resolve_providers(providers, device_id=self.cuda.device_id, probe=self.cuda.probe)
        if provider_list[0] != CPU:
            preload_dlls()  # CUDA/cuDNN from pip's nvidia-* packages, when installed that way
        try:
            sessions = self._sessions(provider_list)
        except ProviderError as exc:
            if providers != "auto":
                raise
            note_cpu_fallback(str(exc))  # "auto": CUDA was there but did not start; .providers says so
            provider_list = [CPU]
            sessions = self._sessions(provider_list)
        self.providers: List[str] = sessions[0].get_providers()
        self.device = "cuda" if self.providers[0] in (CUDA, TENSORRT) else "cpu"
        self.device_id = self.cuda.device_id if self.device == "cuda" else 0
        self.graphs = [Graph(s, self.device, self.device_id) if s is not None else None for s in sessions]

    def _sessions(self, provider_list: List[str]) -> List[ort.InferenceSession]:
        # the largest graph first: while a session is built its weight file is mapped and its packed copy
        # grows, so building it while the fewest other packed weights exist keeps the peak RSS lowest
        order = sorted(self.files, key=lambda name: -_data_size(self.root / name))
        built = {name: self._session(name, provider_list) for name in order}
        return [built[name] for name in self.files]

    def _session_threads(self, provider_list: List[str]) -> Optional[int]:
        """The intra-op threads of a session on ``provider_list``."""
        return self.threads

    def _session(self, name: str, provider_list: List[str], initializers=None) -> ort.InferenceSession:
        return make_session(
            self.root / name,
            provider_list,
            self._session_threads(provider_list),
            cuda=self.cuda,
            tensorrt=self.tensorrt,
            initializers=initializers,
            memory_patterns=self.memory_patterns,
        )

    def with_weights(self, arrays: Dict[str, Dict[str, np.ndarray]]) -> OnnxDecoder:
        """A new decoder on the same files whose named tensors are replaced: ``{graph file: {name: array}}``.

        The new sessions are built beside the old ones; this decoder is not
        changed, so a failure leaves it running on its old weights, and a rollout
        that started on it finishes on it.
        """
        new = copy.copy(self)
        new.graphs = [
            Graph(self._session(name, self.providers, arrays.get(name)), self.device, self.device_id)
            for name in self.files
        ]
        return new

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    @abstractmethod
    def encode(self, ids: np.ndarray, mask: np.ndarray, *, num_samples: int = 1, capacity: int = 0) -> DecoderState:
        """Run the encoder once on checked B x S ``ids``/``mask``, for ``num_samples`` decoder rows per query
        and at most ``capacity`` decoder positions (the response length; 0 = no limit known)."""

    @abstractmethod
    def rows_of(self, state: DecoderState, rows: np.ndarray, *, capacity: int) -> DecoderState:
        """A fresh state (nothing decoded yet) for the decoder ``rows`` of ``state``, made right after
        ``encode``: the scorer runs rows of similar length together, so padding costs no decoder work.
        Reads the encoder's outputs on the host (the scorer calls it on the CPU only)."""

    @abstractmethod
    def step(self, state: DecoderState, tokens: np.ndarray, select: Optional[np.ndarray] = None):
        """One decoder call on ``tokens`` (rows x T): the first step or one with the KV cache.

        Returns ``(logits M x V, values M, new state)`` as NumPy arrays for the
        ``select``-ed flat positions of the rows x T grid (all of them, row-major,
        when ``select`` is None). The arrays may be reused by the next step on the
        new state: copy them to keep them past it.
        """


class OptimumDecoder(OnnxDecoder):
    """Optimum's graphs: the decoder computes the cross-attention K/V at its first step."""

    def __init__(self, root: Path, **kwargs):
        super().__init__(root, **kwargs)
        self.num_layers = sum(1 for o in self.graphs[1].outputs if o.endswith(".decoder.key"))
        layers = range(self.num_layers)
        self._self_in = [f"past_key_values.{i}.decoder.{p}" for i in layers for p in ("key", "value")]
        self._cross_in = [f"past_key_values.{i}.encoder.{p}" for i in layers for p in ("key", "value")]
        self._self_out = [f"present.{i}.decoder.{p}" for i in layers for p in ("key", "value")]
        self._cross_out = [f"present.{i}.encoder.{p}" for i in layers for p in ("key", "value")]

    def encode(self, ids, mask, *, num_samples=1, capacity=0):
        out = self.graphs[0].run({"input_ids": self.to_device(ids), "attention_mask": self.to_device(mask)})
        hidden = out["last_hidden_state"]
        if num_samples > 1:  # the encoder ran once per query; each sample's row gets a copy of its output
            hidden = self.to_device(np.repeat(hidden.numpy(), num_samples, axis=0))
            mask = np.repeat(mask, num_samples, axis=0)
        return DecoderState([], [], hidden, self.to_device(mask), rows=ids.shape[0] * num_samples)

    def rows_of(self, state, rows, *, capacity):
        hidden = self.to_device(state.encoder_hidden.numpy()[rows])  # one row per decoder row already
        return DecoderState([], [], hidden, self.to_device(state.encoder_mask.numpy()[rows]), rows=len(rows))

    def step(self, state, tokens, select=None):
        first = not state.self_kv
        graph, feeds = self._feeds(state, tokens, first)
        out = graph.run(feeds, host=("logits", "value"))
        cross_kv = [out[n] for n in self._cross_out] if first else state.cross_kv
        self_kv = [out[n] for n in self._self_out]
        new_state = DecoderState(
            self_kv,
            cross_kv,
            state.encoder_hidden,
            state.encoder_mask,
            state.rows,
            state.length + tokens.shape[1],
            state.capacity,
        )
        logits, values = out["logits"].numpy(), out["value"].numpy()
        logits, values = logits.reshape(-1, logits.shape[-1]), values.reshape(-1)
        if select is not None:
            logits, values = logits[select], values[select]
        return logits, values, new_state

    def _past_feeds(self, state: DecoderState) -> dict:
        return dict(zip(self._self_in + self._cross_in, state.self_kv + state.cross_kv))

    @abstractmethod
    def _feeds(self, state: DecoderState, tokens: np.ndarray, first: bool) -> Tuple[Graph, dict]:
        """The graph to run for this step and its inputs."""


class SplitDecoder(OptimumDecoder):
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


class MergedDecoder(OptimumDecoder):
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


def _data_size(graph: Path) -> int:
    """Bytes of a graph file and its external-data file."""
    data = graph.with_name(graph.name + ".data")
    return graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)


class SingleDecoder(OnnxDecoder):
    """t5vh's own layout: the encoder also computes the cross-attention K/V (once per query, shared by
    its samples); one decoder graph runs every step; the embedding and position-bias tables are NumPy."""

    layout = "single"
    files = (ENCODER_GRAPH, DECODER_GRAPH)

    def __init__(
        self,
        root: Path,
        *,
        sampler: bool = False,
        scorer: bool = False,
        lookup: bool = False,
        packed: bool = False,
        packed_encoder: bool = False,
        lazy_decoder: bool = False,
        rows_at_once: bool = False,
        **kwargs,
    ):
        """``sampler`` / ``scorer`` / ``lookup``: the export lists ``t5vh_sampler.onnx`` /
        ``t5vh_scorer.onnx`` / ``t5vh_lookup.onnx``; unfiltered draws then run in the sampler graph (on the
        CPU, small batches), and on CUDA the scorer's log-softmax and large embedding lookups on the device. ``packed``: it lists ``t5vh_decoder_packed.onnx``,
        which scores on the CPU (``packed_scores``; its session starts at the first call, so a process
        that only samples never holds its weights). ``packed_encoder``: it lists
        ``t5vh_encoder_packed.onnx``, which the CPU runs instead of the encoder graph: the same weights
        and numbers, without the work of the queries' padding. ``lazy_decoder`` (the CPU only): the
        sampling decoder's session, too, starts at its first step, so a process that only scores never
        holds its weights. Started at load, it is built first: its weights are the largest, and a
        session briefly holds its weights twice while it starts (peak RSS at batch 1: 308 MB built
        first, 357 built after the encoder). ``rows_at_once`` (a scoring process, with ``packed``),
        on the CPU: every session runs on one thread, and ``score_workers`` (``threads``, default all
        cores) runs that many parts of a batch's rows at once, each on its own thread (``scoring.score``);
        the sessions keep no memory patterns (``session_options``)."""
        self._lazy_decoder = lazy_decoder
        self._packed_encoder = packed_encoder  # asked for; then whether the encoder session runs it
        workers = (kwargs.get("threads") or os.cpu_count() or 1) if rows_at_once and packed else 1
        self._one_thread = workers > 1  # the CPU's sessions (``_session_threads``)
        self.memory_patterns = not (rows_at_once and packed)
        super().__init__(root, **kwargs)
        encoder_graph = self.graphs[0].session.get_modelmeta().graph_name
        self._packed_encoder = encoder_graph == Path(PACKED_ENCODER_GRAPH).stem
        self.host = load_host_tables(self.root)
        cross_keys = [o for o in self.graphs[0].session.get_outputs() if o.name.startswith("cross_key.")]
        self.num_layers = len(cross_keys)
        self._heads, self._d_kv = int(cross_keys[0].shape[1]), int(cross_keys[0].shape[3])
        layers = range(self.num_layers)
        self._cross = [f"cross_{kind}.{i}" for i in layers for kind in ("key", "value")]
        self._past = [f"past_{kind}.{i}" for i in layers for kind in ("key", "value")]
        self._present = [f"present_{kind}.{i}" for i in layers for kind in ("key", "value")]
        if self.graphs[1] is None:
            self.graphs[1] = self._lazy(DECODER_GRAPH)
        else:
            check_cache_types(self.root, self.device, self._cache_types)
        self._encoder_bias, self._decoder_bias, self._positions = {}, {}, {}
        self._vocab = int(self.host["embedding"].shape[0])
        self._sampler = self._draw_graph() if sampler else None
        self._scorer = self._device_graph(SCORER_GRAPH) if scorer else None
        self._lookup = self._device_graph(LOOKUP_GRAPH) if lookup else None
        self._packed = self._lazy(PACKED_GRAPH) if packed and self.device == "cpu" else None
        self.score_workers = workers if self._packed is not None else 1
        self._table = None  # the embedding on the device, for the lookup graph: copied there at its first use
        self._logits = threading.local()  # packed_scores' logits block (.block), kept between calls
        if self.device == "cuda":  # a GPU's batches look up thousands of rows a call; its host has the RAM
            self.host["embedding"].keep_in_memory()

    def _sessions(self, provider_list: List[str]) -> List[Optional[ort.InferenceSession]]:
        if not self._lazy_decoder or provider_list[0] != CPU:
            return super()._sessions(provider_list)
        return [self._session(ENCODER_GRAPH, provider_list), None]  # the decoder starts at its first step

    def _session_threads(self, provider_list):
        return 1 if self._one_thread and provider_list[0] == CPU else self.threads

    def _session(self, name, provider_list, initializers=None):
        if name == ENCODER_GRAPH and self._packed_encoder and provider_list[0] == CPU:  # (CUDA: the encoder graph)
            name = PACKED_ENCODER_GRAPH  # the encoder's weights (the same names), without the padding's work
        return super()._session(name, provider_list, initializers)

    def _lazy(self, name: str, weights: Optional[Dict[str, np.ndarray]] = None) -> LazyGraph:
        """A decoder graph's session, to start at its first use (not holding on to this decoder)."""
        start = functools.partial(
            make_session,
            self.root / name,
            list(self.providers),
            self._session_threads(self.providers),
            cuda=self.cuda,
            tensorrt=self.tensorrt,
            initializers=weights,
            memory_patterns=self.memory_patterns,
        )
        return LazyGraph(start, self.device, self.device_id)

    @property
    def _cache_types(self) -> list:
        """The KV cache's element types, as the decoder graph declares them: fp32 (an fp16/bf16 export made
        before self-attention moved to fp32 declares 16 bits: the CPU runs it, CUDA does not run it right)."""
        names = self.graphs[1].inputs
        return [_ELEMENT_TYPES[names[name].type] for name in self._past]

    def _device_graph(self, name: str) -> Optional[ort.InferenceSession]:
        """The session of a small graph that does on the device what NumPy does on the host (the draw, the
        scorer's log-softmax, the embedding lookup), or None where the host does it: on CUDA only (the CPU
        runs the sampler graph alone, ``_draw_graph``; it scores in the packed decoder), and on CUDA's own kernels, not
        TensorRT's (float64 CumSum); where it cannot start, the host does the work as before."""
        if CUDA not in self.providers:
            return None
        try:
            return self._session(name, [CUDA, CPU])
        except ProviderError as exc:
            warnings.warn(f"{name} did not start on CUDA ({exc}): its work runs on the host", stacklevel=3)
            return None

    def _draw_graph(self) -> Optional[ort.InferenceSession]:
        """The sampler graph's session: on CUDA one of the device graphs; on the CPU a one-thread session of
        its own, for small batches (``draws_in_graph``)."""
        if CUDA in self.providers:
            return self._device_graph(SAMPLER_GRAPH)
        return make_session(self.root / SAMPLER_GRAPH, [CPU], 1)

    @property
    def samples_on_device(self) -> bool:
        """Whether ``draw_step`` can draw in the sampler graph, where the logits are (an export with it;
        not when CUDA could not start it)."""
        return self._sampler is not None

    def draws_in_graph(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows draws in the sampler graph (``draw_step``): always on CUDA; on
        the CPU up to ``GRAPH_DRAW_ROWS`` rows. At batch 1 the graph draws faster than NumPy inside the
        decode loop, whose passes over the logits come right after a step has streamed the weights
        through the caches (the same exp pass took 0.17 ms after a 160 MB read against 0.04 warm): 6.50
        against 6.77 ms a token (20 alternating rounds). At 64 rows it was ~5% faster too, but its
        float64 copies of the R x V weights raised the rollout's peak RSS by 91 MB (benchmarks/RESULTS.md)."""
        return self._sampler is not None and (self.device != "cpu" or rows <= GRAPH_DRAW_ROWS)

    @property
    def scores_on_device(self) -> bool:
        """Whether ``score_step`` is there (CUDA, and an export with the scorer graph)."""
        return self._scorer is not None

    def with_weights(self, arrays):
        """As ``OnnxDecoder.with_weights``; ``arrays["host"]`` replaces the NumPy tables.

        A session that has started is built again at once. A lazy sampling decoder that has not starts
        on the new weights at its first step (keeping them until then); the packed decoder, if it has
        not, is dropped: a process that refreshes weights before it ever scores (a rollout worker)
        would otherwise keep the decoder's weights for it, and ``score`` takes decoder steps instead."""
        new = copy.copy(self)
        new.graphs = [
            self._lazy(name, arrays.get(name))
            if isinstance(graph, LazyGraph) and not graph.started
            else Graph(
                self._session(name, self.providers, named_as(graph, arrays.get(name))), self.device, self.device_id
            )
            for name, graph in zip(self.files, self.graphs)
        ]
        new._packed = None
        if self._packed is not None and self._packed.started:  # the decoder's tensors
            session = self._session(PACKED_GRAPH, self.providers, named_as(self._packed, arrays.get(DECODER_GRAPH)))
            new._packed = Graph(session, self.device, self.device_id)
        new.host = {**self.host, **arrays.get("host", {})}
        new._encoder_bias, new._decoder_bias, new._positions = {}, {}, {}
        new._table = None
        new._logits = threading.local()  # a call still running on this decoder keeps writing its own
        return new

    def embed(self, ids: np.ndarray, out: Optional[ort.OrtValue] = None) -> ort.OrtValue:
        """The token embeddings of ``ids`` on the session's device, written into ``out`` when given.

        With the lookup graph (CUDA) a lookup of more than ``FEW_ROWS`` ids gathers them on the device
        from the table kept there, so only the ids go up; a sampling step's few rows are read on the
        host and copied, which costs less than one more session run."""
        if self._lookup is None or ids.size <= FEW_ROWS:
            embeds = self.host["embedding"][ids]
            if out is None:
                return self.to_device(embeds)
            out.update_inplace(embeds)
            return out
        if self._table is None:
            self._table = self.to_device(np.asarray(self.host["embedding"][np.arange(self._vocab)]))
        binding = self._lookup.io_binding()
        binding.bind_ortvalue_input("table", self._table)
        binding.bind_cpu_input("ids", np.ascontiguousarray(ids, dtype=np.int64))
        if out is None:
            binding.bind_output("embeds", self.device, self.device_id)
        else:
            binding.bind_ortvalue_output("embeds", out)
        self._lookup.run_with_iobinding(binding)
        return binding.get_outputs()[0] if out is None else out

    def encode(self, ids, mask, *, num_samples=1, capacity=0):
        feeds = {
            "attention_mask": self.to_device(mask.astype(np.int32)),
            "position_bias": self.to_device(self._encoder_position_bias(ids.shape[1])),
        }
        if self._packed_encoder:  # the real tokens only, and where they are
            active = np.flatnonzero(mask)
            feeds.update(inputs_embeds=self.embed(ids.reshape(-1)[active]), active=self.to_device(active))
        else:
            feeds["inputs_embeds"] = self.embed(ids)
        out = self.graphs[0].run(feeds)
        rows = ids.shape[0] * num_samples
        cross = [out[n] for n in self._cross]
        if capacity is None:  # for packed_scores, which keeps no cache
            return DecoderState([], cross, None, feeds["attention_mask"], rows, 0, 0)
        capacity = capacity or 1
        return DecoderState(self._cache(rows, capacity), cross, None, feeds["attention_mask"], rows, 0, capacity)

    def rows_of(self, state, rows, *, capacity):
        # cross K/V are per query; each picked row gets its query's, so the new state has one sample per query
        query = rows // (state.rows // state.encoder_mask.shape()[0])
        cross = [self.to_device(value.numpy()[query]) for value in state.cross_kv]
        mask = self.to_device(state.encoder_mask.numpy()[query])
        cache = [] if capacity is None else self._cache(len(rows), capacity)  # None: for packed_scores
        return DecoderState(cache, cross, None, mask, len(rows), 0, capacity or 0)

    def step(self, state, tokens, select=None, *, logits_on_device: bool = False):
        rows, steps = tokens.shape
        if state.length + steps > state.capacity:
            state = self._grown(state, state.length + steps)
        binding = state.binding or self._binding(state)
        picked = rows * steps if select is None else len(select)
        if select is None:
            select = self._all_positions(rows * steps)
        else:
            select = self.to_device(select)
        io = state.io
        if state.binding is None or io is None or io.shape != (rows, steps, picked, logits_on_device):
            # logits and values land in NumPy's memory, not onnxruntime's arena: NumPy hands a large block
            # back to the system when it is freed, where the arena keeps it, and grew to fit each new size
            # (scoring's calls of every size: job peak 797 -> 711 MB)
            logits = (
                ort.OrtValue.ortvalue_from_shape_and_type(
                    (picked, self._vocab), np.float32, self.device, self.device_id
                )
                if logits_on_device
                else np.empty((picked, self._vocab), dtype=np.float32)
            )
            io = StepIO(
                (rows, steps, picked, logits_on_device),
                self.embed(tokens),
                logits,
                np.empty(picked, dtype=np.float32),
                np.zeros(1, dtype=np.int32),
            )
            binding.bind_ortvalue_input("inputs_embeds", io.embeds)
            binding.bind_ortvalue_input("past_length", ort.OrtValue.ortvalue_from_numpy(io.past_length))
            binding.bind_ortvalue_output(
                "logits", io.logits if logits_on_device else ort.OrtValue.ortvalue_from_numpy(io.logits)
            )
            binding.bind_ortvalue_output("value", ort.OrtValue.ortvalue_from_numpy(io.values))
        else:
            self.embed(tokens, out=io.embeds)
        binding.bind_ortvalue_input("position_bias", self._decoder_position_bias(state.length, steps))
        binding.bind_ortvalue_input("select", select)
        io.past_length[0] = state.length
        self.graphs[1].session.run_with_iobinding(binding)
        # the cache is written in place; the next step on new_state writes into the same `io` arrays
        new_state = dataclasses.replace(state, length=state.length + steps, binding=binding, io=io)
        return io.logits, io.values, new_state

    def draw_step(self, state, tokens, u):
        """One decoder step whose next tokens are drawn by the sampler graph where the logits are (the RNG
        contract, as ``sampling.draw``): ``(tokens, log-probs, log-sum-exps, values, new state)``, all R
        long; on CUDA only these come back to the host, not the R x V logits. Call when ``samples_on_device``."""
        _, values, state = self.step(state, tokens, logits_on_device=True)
        kept = state.io.draw
        if not kept:  # bound once per rollout (a new binding and outputs each step: ~0.1 ms of a 6.5 ms step)
            kept["u"] = np.empty(len(values), dtype=np.float64)
            kept["out"] = [np.empty(len(values), dtype=t) for t in (np.int64, np.float32, np.float32, np.bool_)]
            kept["binding"] = binding = self._sampler.io_binding()
            binding.bind_ortvalue_input("logits", state.io.logits)
            binding.bind_ortvalue_input("u", ort.OrtValue.ortvalue_from_numpy(kept["u"]))
            for name, array in zip(("token", "logprob", "lse", "lost"), kept["out"]):
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        kept["u"][:] = u
        self._sampler.run_with_iobinding(kept["binding"])
        token, logprob, lse, lost = (array.copy() for array in kept["out"])
        lost &= np.isfinite(lse)  # a NaN row is refused by the caller's check_finite
        if lost.any():  # u x total fell between two roundings of the CDF: the full float64 CDF decides, on the host
            logits = state.io.logits.numpy()[lost]
            token[lost] = draw(logits, u[lost])
            logprob[lost] = token_logprobs(logits, token[lost])
        return token, logprob, lse, values, state

    def score_step(self, state, tokens, select, chosen):
        """One decoder call for scoring whose log-softmax runs on the device (``scoring`` does it on the
        host otherwise): ``(log-probs of the chosen ids, values, entropies)`` of the ``select``-ed
        positions; only these come back to the host, not the P x V logits. Call when ``scores_on_device``.

        The scorer graph runs on at most ``SCORER_BYTES`` of the logits at a time, bound where they lie:
        its temporaries (about two such pieces), which its arena keeps, stay that size whatever P is."""
        _, values, state = self.step(state, tokens, select, logits_on_device=True)
        logits, count = state.io.logits, len(chosen)
        chosen = np.ascontiguousarray(chosen, dtype=np.int64)
        logprobs, entropy = np.empty(count, dtype=np.float32), np.empty(count, dtype=np.float32)
        runs = -(-count * 4 * self._vocab // SCORER_BYTES)  # pieces of even size: one shape for its arena
        binding = self._scorer.io_binding()
        for start, stop in itertools.pairwise(count * i // runs for i in range(runs + 1)):
            where = logits.data_ptr() + start * self._vocab * 4
            binding.bind_input("logits", self.device, self.device_id, np.float32, [stop - start, self._vocab], where)
            binding.bind_cpu_input("token", chosen[start:stop])
            for name in ("logprob", "entropy"):
                binding.bind_output(name, "cpu")
            self._scorer.run_with_iobinding(binding)
            logprobs[start:stop], entropy[start:stop] = binding.copy_outputs_to_cpu()
        return logprobs, values, entropy

    @property
    def packed_vocab(self) -> int:
        """The width of the logits ``packed_scores`` returns per position."""
        return self._vocab

    @property
    def encodes_packed(self) -> bool:
        """Whether ``encode`` runs the packed encoder (the CPU, and an export with it): only the queries'
        real tokens go in, and the work of their padding is not done."""
        return self._packed_encoder

    @property
    def scores_packed(self) -> bool:
        """Whether ``packed_scores`` is there (the CPU, and an export with the packed decoder)."""
        return self._packed is not None

    def packed_scores(self, state, tokens, lengths, real):
        """One call of the packed decoder for scoring: ``(logits M x V, values M)`` at the ``real``
        positions (ascending flat indices into the R x T grid of ``tokens``, each before its row's
        ``lengths``). Only each row's first ``lengths`` positions run, and only those reach the
        projections and feed-forward layers: a batch of ragged rows pays them no padding. ``state``
        from ``encode(..., capacity=None)``. Call when ``scores_packed``. The logits are a view of a block
        that this thread's next call overwrites: use them (or copy them) before it."""
        rows, steps = tokens.shape
        active = np.flatnonzero(np.arange(steps)[None, :] < np.asarray(lengths)[:, None])
        logits = self._packed_logits(len(real))
        values = np.empty(len(real), dtype=np.float32)
        binding = self._packed.session.io_binding()
        binding.bind_ortvalue_input("inputs_embeds", self.embed(tokens.reshape(-1)[active]))
        binding.bind_cpu_input("active", active.astype(np.int64))
        binding.bind_cpu_input("grid", np.array([rows, steps], dtype=np.int64))
        binding.bind_ortvalue_input("position_bias", self._decoder_position_bias(0, steps))
        binding.bind_ortvalue_input("encoder_mask", state.encoder_mask)
        for name, value in zip(self._cross, state.cross_kv):
            binding.bind_ortvalue_input(name, value)
        binding.bind_cpu_input("select", np.searchsorted(active, real).astype(np.int64))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        binding.bind_ortvalue_output("value", ort.OrtValue.ortvalue_from_numpy(values))
        self._packed.session.run_with_iobinding(binding)
        return logits, values

    def _packed_logits(self, count: int) -> np.ndarray:
        """A ``count`` x V block for ``packed_scores``' logits: a view of one block per thread, kept between
        calls and grown when a call needs more. Memory the system maps afresh for each call (NumPy hands a
        large block back when it is freed) is faulted in and zeroed page by page while onnxruntime writes
        it: the packed decoder's calls of the scoring benchmark took 20.0-21.0 s reusing the block against
        22.3-22.9 s with a fresh one (40 calls, alternating). The block is at most what one call needs
        (``scoring.LOGITS_BUDGET`` bytes, or one row's logits), which the call's peak held anyway."""
        block = getattr(self._logits, "block", None)
        if block is None or len(block) < count:
            self._logits.block = None  # the old block goes before the new one is made
            self._logits.block = block = np.empty((count, self._vocab), dtype=np.float32)
        return block[:count]

    def _binding(self, state: DecoderState):
        """An IO binding for one rollout: the encoder mask, cross K/V and the cache (read and written in place)
        stay bound; each step binds only its tokens, position bias, positions and past length, and the
        NumPy arrays its logits and values are written into."""
        binding = self.graphs[1].session.io_binding()
        binding.bind_ortvalue_input("encoder_mask", state.encoder_mask)
        for name, value in zip(self._cross, state.cross_kv):
            binding.bind_ortvalue_input(name, value)
        for past, present, value in zip(self._past, self._present, state.self_kv):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def _all_positions(self, count: int) -> ort.OrtValue:
        if count not in self._positions:
            self._positions[count] = self.to_device(np.arange(count, dtype=np.int64))
        return self._positions[count]

    def _cache(self, rows: int, capacity: int) -> list:
        shape = (rows, self._heads, capacity, self._d_kv)
        return [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, kind, self.device, self.device_id)
            for kind in self._cache_types
        ]

    def _grown(self, state: DecoderState, capacity: int) -> DecoderState:
        """The state with a longer KV cache (a copy through the host: callers that pass ``capacity``
        to ``encode`` never need this)."""
        cache = self._cache(state.rows, capacity)
        for old, new in zip(state.self_kv, cache):
            grown = np.zeros(new.shape(), dtype=old.numpy().dtype)
            grown[:, :, : state.length] = old.numpy()[:, :, : state.length]
            new.update_inplace(grown)
        return dataclasses.replace(state, self_kv=cache, capacity=capacity, binding=None, io=None)

    def _encoder_position_bias(self, length: int) -> np.ndarray:
        """1 x H x S x S: the bias of key position k for query position q, by bucket of k - q."""
        if length not in self._encoder_bias:
            reach = (len(self.host["encoder_buckets"]) - 1) // 2
            positions = np.arange(length)
            relative = np.clip(positions[None, :] - positions[:, None], -reach, reach) + reach
            bias = self.host["encoder_position_bias"][self.host["encoder_buckets"][relative]]
            self._encoder_bias = {length: np.ascontiguousarray(bias.transpose(2, 0, 1)[None])}
        return self._encoder_bias[length]

    def _decoder_position_bias(self, past: int, steps: int) -> ort.OrtValue:
        """1 x H x T x (P+T) on the device: bucket of how far back each key is, -1e9 on future keys (causal).

        Kept per (past, steps): a rollout asks for the same ones again and again."""
        key = (past, steps)
        if key not in self._decoder_bias:
            if len(self._decoder_bias) > 4096:
                self._decoder_bias.clear()
            reach = len(self.host["decoder_buckets"]) - 1
            queries = np.arange(past, past + steps)[:, None]
            keys = np.arange(past + steps)[None, :]
            back = np.minimum(np.maximum(queries - keys, 0), reach)
            bias = self.host["decoder_position_bias"][self.host["decoder_buckets"][back]].transpose(2, 0, 1)
            if steps > 1:
                bias = bias + np.where(keys > queries, np.float32(-1e9), np.float32(0))[None]
            self._decoder_bias[key] = self.to_device(np.ascontiguousarray(bias[None], dtype=np.float32))
        return self._decoder_bias[key]


# onnxruntime's names of the KV-cache element types -> what OrtValue allocation takes (16 = ONNX BFLOAT16)
_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": 16}


def check_cache_types(root: Path, device: str, types: list) -> None:
    """Refuse a 16-bit self-attention cache on CUDA: onnxruntime 1.31's 16-bit CUDA MultiHeadAttention read its
    unwritten positions (measured on an H100: every rollout differed from the model's from its first token)."""
    if device == "cuda" and any(kind != np.float32 for kind in types):
        raise ExportError(
            f"{root} keeps its self-attention cache in 16 bits, which onnxruntime's CUDA attention reads "
            "wrongly (rollouts that differ from the model's from the first token): re-export it with this "
            "version of t5vh-export, whose reduced-precision exports keep that cache in fp32"
        )


EMBEDDING_FILE = "t5vh_embedding.npy"
TABLES_FILE = "t5vh_tables.npz"


def load_host_tables(root: Path) -> Dict[str, np.ndarray]:
    """The single layout's NumPy side: the embedding (read a row at a time) and the position-bias tables."""
    tables = {"embedding": RowTable(root / EMBEDDING_FILE)}
    with np.load(root / TABLES_FILE, allow_pickle=False) as npz:
        tables.update({name: npz[name] for name in npz.files})
    return tables


GRAPH_DRAW_ROWS = 4  # the CPU's draws in the sampler graph, up to this many rows a step (draws_in_graph)
SCORER_BYTES = 512 * 2**20  # logits the scorer graph takes per run: its arena keeps about twice this
FEW_ROWS = 64  # up to this many ids (a sampling step's batch) a lookup reads them as asked, repeats included


class RowTable:
    """A 2-D ``.npy`` table on disk whose rows are read when indexed (``table[ids]``), like an array.

    Not a memory map: where the kernel caches files in large folios, every row looked up in a
    mapped file brought its neighbours into the process's RSS (30 MB of t5-small's 66 MB
    embedding after one batch-1 rollout, all of it at batch 64). Reading only the rows asked
    for keeps it at what they need; the page cache is shared by every process anyway.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, self.dtype = read_header(file)
            self.offset = file.tell()
        if len(shape) != 2 or fortran_order or self.dtype.hasobject:
            raise ExportError(f"{self.path} is not a 2-D table of numbers: re-export the model")
        self.shape = shape
        self.row_bytes = shape[1] * self.dtype.itemsize
        if self.path.stat().st_size < self.offset + shape[0] * self.row_bytes:
            raise ExportError(f"{self.path} is shorter than its header says: re-export the model")
        self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the policy's lifetime
        self._lock = threading.Lock()  # for platforms without os.pread (seek + read)
        self._resident: Optional[np.ndarray] = None

    def keep_in_memory(self) -> None:
        """Read the whole table once and index it in memory from now on: where a lookup takes thousands
        of rows (scoring on a GPU: a batch's every token) reading them one at a time is slow, and the
        RSS that saves matters less there."""
        if self._resident is None:
            self._resident = np.fromfile(
                self._file.name, dtype=self.dtype, count=int(np.prod(self.shape)), offset=self.offset
            ).reshape(self.shape)

    def _read(self, row: int) -> bytes:
        position = self.offset + row * self.row_bytes
        if hasattr(os, "pread"):
            return os.pread(self._file.fileno(), self.row_bytes, position)
        with self._lock:
            self._file.seek(position)
            return self._file.read(self.row_bytes)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if self._resident is not None:
            if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
                raise InputError(f"token ids must be in [0, {self.shape[0]}), got {ids.min()}..{ids.max()}")
            return self._resident[ids]
        if ids.size <= FEW_ROWS:  # a sampling step: read each row as asked, in order (no sort to find repeats)
            wanted = ids.reshape(-1).tolist()
            if wanted and (min(wanted) < 0 or max(wanted) >= self.shape[0]):
                raise InputError(f"token ids must be in [0, {self.shape[0]}), got {min(wanted)}..{max(wanted)}")
            rows = np.frombuffer(bytearray().join(map(self._read, wanted)), dtype=self.dtype)  # writeable
            return rows.reshape(*ids.shape, self.shape[1])
        unique, inverse = np.unique(ids, return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= self.shape[0]):
            raise InputError(f"token ids must be in [0, {self.shape[0]}), got {int(unique[0])}..{int(unique[-1])}")
        rows = np.frombuffer(b"".join(self._read(int(row)) for row in unique), dtype=self.dtype)
        return rows.reshape(len(unique), self.shape[1])[inverse.reshape(-1)].reshape(*ids.shape, self.shape[1])


LAYOUTS = {cls.layout: cls for cls in (SingleDecoder, SplitDecoder, MergedDecoder)}


def _layout_class(layout: str):
    if layout not in LAYOUTS:
        raise InputError(f"decoder must be one of {tuple(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout]


def graph_files(layout: str) -> List[str]:
    """The files a decoder layout reads (graphs, their weights, host tables)."""
    cls = _layout_class(layout)
    if cls is SingleDecoder:
        return [*cls.files, *(f"{name}.data" for name in cls.files), EMBEDDING_FILE, TABLES_FILE]
    return list(cls.files)


def open_decoder(root: Path, layout: str = "split", **kwargs) -> OnnxDecoder:
    """The sessions of ``root`` for a decoder layout (``providers``, ``threads``, ``cuda``, ``tensorrt`` as in ``load``)."""
    return _layout_class(layout)(Path(root), **kwargs)
