"""TensorRT settings: shape profiles for every dynamic graph input, the engine cache, precision.

Without explicit profiles TensorRT builds an engine for the shapes it first
sees and rebuilds whenever a shape leaves them; the decoder's past length grows
by one every step, so it would rebuild every step. With profiles
(min/opt/max for each dynamic input) it builds once per graph, and with the
engine cache on, once per machine. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ExportError, InputError
from .manifest import DECODER_GRAPH, DECODER_MERGED, DECODER_WITH_PAST, ENCODER_GRAPH, MANIFEST_NAME

Dim = Union[int, str, None]
Range = Tuple[int, int, int]


@dataclass(frozen=True)
class TensorrtOptions:
    """How TensorRT builds and caches its engines (``load(..., providers="tensorrt", tensorrt=...)``)."""

    # engines and timing cache; None: $T5VH_CACHE/trt (else ~/.cache/t5vh_fast/trt), one folder per export and settings
    cache_dir: Optional[Path] = None
    # fp16 kernels: T5's activations overflow fp16 (NaN logits), so off unless asked for
    fp16: bool = False
    # bf16 kernels: T5's own reduced precision; faster, but outside the fp32 parity tolerance
    bf16: bool = False
    # (min, opt, max) batch size the engines accept; opt is the shape TensorRT tunes its kernels for
    batch: Range = (1, 64, 256)
    # (min, opt, max) query length in tokens (the encoder sequence)
    query_len: Range = (1, 64, 512)
    # (min, opt, max) response length in tokens: sampled (txt_len) or scored
    response_len: Range = (1, 128, 512)

    def __post_init__(self):
        for name in ("batch", "query_len", "response_len"):
            value = getattr(self, name)
            ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) for v in value)
            if not ok or not 1 <= value[0] <= value[1] <= value[2]:
                raise InputError(
                    f"TensorrtOptions.{name} must be (min, opt, max) with 1 <= min <= opt <= max, got {value!r}"
                )
        if self.fp16 and self.bf16:
            raise InputError("TensorrtOptions: choose fp16 or bf16, not both")


# ---------------------------------------------------------------------- shape profiles


def profile_ranges(graph: str, options: TensorrtOptions) -> Dict[str, Range]:
    """(min, opt, max) per symbolic dimension name of the export's graphs, for one graph file."""
    longest = options.response_len[2]
    past = (1, max(1, options.response_len[1] // 2), max(1, longest - 1))  # step t sees t past positions
    ranges = {
        "batch_size": tuple(options.batch),
        "encoder_sequence_length": tuple(options.query_len),
        "decoder_sequence_length": (1, 1, longest),  # 1 while sampling, the response length while scoring
        "past_decoder_sequence_length": past,
    }
    if graph in (ENCODER_GRAPH, DECODER_GRAPH):  # the single layout's own names
        ranges = {
            "batch": tuple(options.batch),
            "rows": tuple(options.batch),
            "seq": tuple(options.query_len),
            "steps": (1, 1, longest),
            "total": (1, options.response_len[1], longest),
            "capacity": (1, options.response_len[1], longest),
            "picked": (1, options.batch[1], options.batch[2] * longest),
        }
    if graph == DECODER_WITH_PAST:
        ranges["decoder_sequence_length"] = (1, 1, 1)
    if graph == DECODER_MERGED:  # the first step feeds empty past tensors
        ranges["empty_or_encoder_sequence_length"] = (0,) + tuple(options.query_len[1:])
        ranges["empty_or_past_decoder_sequence_length"] = (0,) + past[1:]
    return ranges


def merged_past_dims(inputs: Mapping[str, Sequence[Dim]]) -> Dict[str, List[Dim]]:
    """The merged graph's past inputs start empty: give their lengths names whose range starts at 0."""
    renamed = {}
    for name, dims in inputs.items():
        past = name.startswith("past_key_values.")
        renamed[name] = [f"empty_or_{d}" if past and isinstance(d, str) and d != "batch_size" else d for d in dims]
    return renamed


def tensorrt_profiles(inputs: Mapping[str, Sequence[Dim]], ranges: Mapping[str, Range]) -> Tuple[str, str, str]:
    """The ``trt_profile_{min,opt,max}_shapes`` strings for every input with a symbolic dimension.

    ``inputs`` maps input name -> dims (ints, or symbolic names looked up in
    ``ranges``); inputs with fixed shapes need no profile and are left out.
    Raises ``ExportError`` for a symbolic or unknown dimension ``ranges`` lacks.
    """
    shapes: Tuple[List[str], List[str], List[str]] = ([], [], [])
    for name, dims in inputs.items():
        if all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            continue
        for k in range(3):
            shapes[k].append(f"{name}:" + "x".join(str(_size(name, d, ranges, k)) for d in dims))
    return tuple(",".join(s) for s in shapes)


def _size(name: str, dim: Dim, ranges: Mapping[str, Range], k: int) -> int:
    if isinstance(dim, int) and not isinstance(dim, bool):
        return dim
    if dim not in ranges:
        raise ExportError(
            f"graph input {name} has a dimension {dim!r} with no TensorRT profile range "
            f"(known: {sorted(ranges)}): re-export with t5vh-export, or use providers='cuda'"
        )
    return ranges[dim][k]


# ---------------------------------------------------------------------- graph inputs


def graph_input_dims(path: Path) -> Dict[str, List[Dim]]:
    """Input name -> dims of a graph: from the manifest (``graphs.<file>.inputs``), else onnx, else onnxruntime."""
    manifest_path = path.parent / MANIFEST_NAME
    if manifest_path.is_file():
        graphs = json.loads(manifest_path.read_text()).get("graphs", {})
        inputs = graphs.get(path.name, {}).get("inputs") if isinstance(graphs, dict) else None
        if inputs:
            return {name: list(dims) for name, dims in inputs.items()}
    try:
        import onnx
    except ImportError:
        return _ort_input_dims(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return {i.name: [_onnx_dim(d) for d in i.type.tensor_type.shape.dim] for i in graph.input if i.name not in weights}


def _onnx_dim(dim) -> Dim:
    if dim.dim_param:
        return dim.dim_param
    return dim.dim_value if dim.HasField("dim_value") else None


def _ort_input_dims(path: Path) -> Dict[str, List[Dim]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {i.name: list(i.shape) for i in session.get_inputs()}


# ---------------------------------------------------------------------- cache and provider options


def cache_root() -> Path:
    """``$T5VH_CACHE``, else ``~/.cache/t5vh_fast`` (the demo models' cache too)."""
    return Path(os.environ.get("T5VH_CACHE", Path.home() / ".cache" / "t5vh_fast"))


def engine_cache_dir(export_dir: Path, options: TensorrtOptions) -> Path:
    """Where the engines of this export under these settings live: ``<trt>/<export id>-<settings id>``.

    The export id hashes the manifest (so a re-export gets new engines) and
    the settings id the precision and profile ranges.
    """
    root = Path(options.cache_dir).expanduser() if options.cache_dir is not None else cache_root() / "trt"
    manifest = export_dir / MANIFEST_NAME
    export_id = hashlib.sha256(manifest.read_bytes() if manifest.is_file() else str(export_dir).encode())
    settings = {k: v for k, v in asdict(options).items() if k != "cache_dir"}
    settings_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    return root / f"{export_id.hexdigest()[:16]}-{settings_id.hexdigest()[:8]}"


def tensorrt_provider_options(path: Path, options: TensorrtOptions, device_id: int = 0) -> Dict[str, str]:
    """The TensorRT provider options for one graph file: profiles, caches on, precision as asked."""
    engines = engine_cache_dir(path.parent, options)
    engines.mkdir(parents=True, exist_ok=True)
    inputs = graph_input_dims(path)
    if path.name == DECODER_MERGED:
        inputs = merged_past_dims(inputs)
    low, opt, high = tensorrt_profiles(inputs, profile_ranges(path.name, options))
    settings = {
        "device_id": str(device_id),
        "trt_fp16_enable": str(options.fp16),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(engines.parent),
    }
    if options.bf16:  # only when asked: older onnxruntime builds reject the key
        settings["trt_bf16_enable"] = "True"
    if low:
        settings.update(trt_profile_min_shapes=low, trt_profile_opt_shapes=opt, trt_profile_max_shapes=high)
    return settings


_WARNED: set = set()


@contextlib.contextmanager
def without_tensorrt_environment(env=None):
    """Hide inherited ``ORT_TENSORRT_*`` variables (fp16, workspace, cache ...) while a session starts.

    Settings come from ``TensorrtOptions`` alone; each hidden variable is named
    once on stderr so a setting that used to apply does not vanish silently.
    """
    env = os.environ if env is None else env
    hidden = {k: env.pop(k) for k in sorted(env) if k.startswith("ORT_TENSORRT_")}
    if set(hidden) - _WARNED:
        print(
            f"t5vh_fast: not applying {', '.join(hidden)}: TensorRT settings come from TensorrtOptions", file=sys.stderr
        )
        _WARNED.update(hidden)
    try:
        yield list(hidden)
    finally:
        env.update(hidden)
