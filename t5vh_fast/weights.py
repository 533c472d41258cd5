"""The tensors the ``single`` decoder layout runs on, computed from a checkpoint's parameters.

One plan (``tensor_plan``) says, for every tensor, which checkpoint
parameter(s) it comes from and how: copied, transposed (ONNX ``MatMul`` wants
``in x out``), the tied LM head scaled by ``d_model ** -0.5``, the value head of
the ``logits`` layout folded into one vector on the last hidden state, and in
``int8`` every matrix quantized per output column. The exporter writes these
tensors; ``OnnxPolicy.update_weights`` recomputes them from new weights with the
same code, so a refresh gives what a fresh export of the same weights gives.

NumPy only: the runtime imports this without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

from .errors import ExportError, InputError, NonFiniteError

PRECISIONS = ("fp32", "int8", "fp16", "bf16")
# How an int8 export stores its matrices (the plan's dtype): one scale per output column, for onnxruntime's
# MatMulIntegerToFloat. Earlier int8 exports stored "int8" (blocks of 128 inputs, for MatMulNBits): they
# still run, and a weight refresh refuses them with "re-export" because their recorded plan differs.
INT8 = "int8-per-column"
# Value-head layouts, named after what the head reads. "logits": Linear(vocab_size, 1) on the LM logits
# (the layout of the value-head notebook this package started from); "hidden": Linear(d_model, 1) on
# the last decoder hidden state (TRL's layout). The old names "seed" and "trl" are accepted everywhere.
HEAD_LAYOUTS = ("logits", "hidden")
HEAD_LAYOUT_ALIASES = {"seed": "logits", "trl": "hidden"}
# The checkpoint keys of each layout's head (the checkpoint format, so they keep their historic names).
HEAD_KEYS = {
    "logits": ("v_head.state_representation.weight", "v_head.state_representation.bias"),
    "hidden": ("v_head.summary.weight", "v_head.summary.bias"),
}
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")
# Names under which a checkpoint may hold the shared embedding besides "shared.weight"
# (model.state_dict() repeats tied weights under every alias; a saved file keeps one).
EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def canonical_head_layout(name: str) -> str:
    """``"logits"`` or ``"hidden"`` for a layout name, old names included; ``InputError`` otherwise."""
    layout = HEAD_LAYOUT_ALIASES.get(name, name)
    if layout not in HEAD_LAYOUTS:
        choices = ", ".join(repr(n) for n in (*HEAD_LAYOUTS, *HEAD_LAYOUT_ALIASES))
        raise InputError(f"value head layout must be one of {choices}, got {name!r}")
    return layout


@dataclass(frozen=True)
class ModelSpec:
    """The numbers of a T5 model that shape its graphs (from its ``config.json``)."""

    d_model: int  # width of the residual stream
    d_kv: int  # width of one attention head
    num_heads: int  # attention heads per layer
    encoder_layers: int  # encoder blocks
    decoder_layers: int  # decoder blocks
    d_ff: int  # width of the feed-forward layer
    vocab_size: int  # rows of the embedding and columns of the LM head
    activation: str  # feed-forward activation: relu, gelu, gelu_new (tanh), gelu_pytorch_tanh, silu
    gated: bool  # gated feed-forward (T5 v1.1, mT5: act(x wi_0) * (x wi_1))
    tied: bool  # LM head tied to the embedding (T5 v1.0: the decoder output is scaled by d_model**-0.5)
    head_layout: str  # value head: "logits" (Linear(vocab, 1) on the logits) or "hidden" (Linear(d_model, 1))
    eps: float  # RMS-norm epsilon
    num_buckets: int  # relative-position buckets
    max_distance: int  # relative distance at which the buckets saturate

    @property
    def inner(self) -> int:
        """Width of all heads together (q, k, v projections)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_config(cls, config: Mapping) -> ModelSpec:
        """The spec of a T5 ``config.json`` (as a dict)."""
        proj = config.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        gated = parts[0] == "gated" and len(parts) == 2
        activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if activation not in ACTIVATIONS or len(parts) > 2:
            raise ExportError(
                f"feed_forward_proj={proj!r} is not supported; t5vh_fast runs relu, gelu, gelu_new and silu "
                "feed-forward layers, gated or not"
            )
        return cls(
            d_model=int(config["d_model"]),
            d_kv=int(config["d_kv"]),
            num_heads=int(config["num_heads"]),
            encoder_layers=int(config["num_layers"]),
            decoder_layers=int(config.get("num_decoder_layers") or config["num_layers"]),
            d_ff=int(config["d_ff"]),
            vocab_size=int(config["vocab_size"]),
            activation=activation,
            gated=gated,
            tied=bool(config.get("tie_word_embeddings", True)),
            head_layout=canonical_head_layout(config.get("value_head_layout", "logits")),
            eps=float(config.get("layer_norm_epsilon", 1e-6)),
            num_buckets=int(config.get("relative_attention_num_buckets", 32)),
            max_distance=int(config.get("relative_attention_max_distance", 128)),
        )


@dataclass(frozen=True)
class Tensor:
    """One tensor of the single layout and where it comes from."""

    name: str  # its name in its graph (or in the host tables)
    place: str  # "encoder" or "decoder" (an ONNX graph), or "host" (kept in NumPy by the runtime)
    sources: Tuple[str, ...]  # the checkpoint parameters it is computed from
    transform: str  # how: "copy", "transpose", "lm_head", "value_weight", "value_bias"
    dtype: str = "fp32"  # stored as: "fp32", "fp16", "bf16", or INT8 (see quantize_int8: NAME and NAME.scale)


def _block(stack: str, i: int, j: int, name: str) -> str:
    return f"{stack}.block.{i}.layer.{j}.{name}"


def _ffn(stack: str, i: int, j: int, spec: ModelSpec) -> List[Tuple[str, str]]:
    """(tensor suffix, parameter) pairs of a feed-forward sublayer."""
    names = ["wi_0", "wi_1", "wo"] if spec.gated else ["wi", "wo"]
    return [(name, _block(stack, i, j, f"DenseReluDense.{name}.weight")) for name in names]


def tensor_plan(spec: ModelSpec, precision: str = "fp32", keep_fp32: Tuple[str, ...] = ()) -> List[Tensor]:
    """Every tensor of the single layout, in a fixed order.

    Matrices are stored in ``precision`` (norms, the value head and the host
    tables stay fp32), except those of the sublayers named in ``keep_fp32``.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    rel_bias = "SelfAttention.relative_attention_bias.weight"
    plan: List[Tensor] = [
        Tensor("embedding", "host", ("shared.weight",), "copy"),
        Tensor("encoder_position_bias", "host", (_block("encoder", 0, 0, rel_bias),), "copy"),
        Tensor("decoder_position_bias", "host", (_block("decoder", 0, 0, rel_bias),), "copy"),
    ]

    def add(name: str, place: str, param: str, transform: str = "copy") -> None:
        matrix = transform in ("transpose", "lm_head") and sublayer_of(name) not in keep_fp32
        dtype = (INT8 if precision == "int8" else precision) if matrix else "fp32"
        plan.append(Tensor(name, place, (param,), transform, dtype))

    for i in range(spec.encoder_layers):
        p = f"encoder.{i}"
        add(f"{p}.attn_norm", "encoder", _block("encoder", i, 0, "layer_norm.weight"))
        for w in ("q", "k", "v", "o"):
            add(f"{p}.attn_{w}", "encoder", _block("encoder", i, 0, f"SelfAttention.{w}.weight"), "transpose")
        add(f"{p}.ff_norm", "encoder", _block("encoder", i, 1, "layer_norm.weight"))
        for name, param in _ffn("encoder", i, 1, spec):
            add(f"{p}.ff_{name}", "encoder", param, "transpose")
    add("encoder.final_norm", "encoder", "encoder.final_layer_norm.weight")
    for i in range(spec.decoder_layers):  # the cross-attention keys and values are computed with the encoder
        for w in ("k", "v"):
            add(
                f"decoder.{i}.cross_{w}", "encoder", _block("decoder", i, 1, f"EncDecAttention.{w}.weight"), "transpose"
            )
    for i in range(spec.decoder_layers):
        p = f"decoder.{i}"
        add(f"{p}.self_norm", "decoder", _block("decoder", i, 0, "layer_norm.weight"))
        for w in ("q", "k", "v", "o"):
            add(f"{p}.self_{w}", "decoder", _block("decoder", i, 0, f"SelfAttention.{w}.weight"), "transpose")
        add(f"{p}.cross_norm", "decoder", _block("decoder", i, 1, "layer_norm.weight"))
        for w in ("q", "o"):
            add(f"{p}.cross_{w}", "decoder", _block("decoder", i, 1, f"EncDecAttention.{w}.weight"), "transpose")
        add(f"{p}.ff_norm", "decoder", _block("decoder", i, 2, "layer_norm.weight"))
        for name, param in _ffn("decoder", i, 2, spec):
            add(f"{p}.ff_{name}", "decoder", param, "transpose")
    add("decoder.final_norm", "decoder", "decoder.final_layer_norm.weight")
    lm_source = "shared.weight" if spec.tied else "lm_head.weight"
    add("lm_head", "decoder", lm_source, "lm_head")
    head = HEAD_KEYS[spec.head_layout][0].rsplit(".", 1)[0]
    value_sources = (lm_source, f"{head}.weight") if spec.head_layout == "logits" else (f"{head}.weight",)
    plan.append(Tensor("value_weight", "decoder", value_sources, "value_weight"))
    plan.append(Tensor("value_bias", "decoder", (f"{head}.bias",), "value_bias"))
    return plan


def expected_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """The shape of every checkpoint parameter the plan reads."""
    d, inner, ff, vocab = spec.d_model, spec.inner, spec.d_ff, spec.vocab_size
    shapes = {"shared.weight": (vocab, d)}
    if not spec.tied:
        shapes["lm_head.weight"] = (vocab, d)
    for stack, layers in (("encoder", spec.encoder_layers), ("decoder", spec.decoder_layers)):
        shapes[f"{stack}.final_layer_norm.weight"] = (d,)
        shapes[_block(stack, 0, 0, "SelfAttention.relative_attention_bias.weight")] = (spec.num_buckets, spec.num_heads)
        for i in range(layers):
            attentions = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
            for j, attention in enumerate(attentions):
                shapes[_block(stack, i, j, "layer_norm.weight")] = (d,)
                for w in ("q", "k", "v"):
                    shapes[_block(stack, i, j, f"{attention}.{w}.weight")] = (inner, d)
                shapes[_block(stack, i, j, f"{attention}.o.weight")] = (d, inner)
            j = len(attentions)
            shapes[_block(stack, i, j, "layer_norm.weight")] = (d,)
            for name, param in _ffn(stack, i, j, spec):
                shapes[param] = (d, ff) if name == "wo" else (ff, d)
    head_in = vocab if spec.head_layout == "logits" else d
    head = HEAD_KEYS[spec.head_layout][0].rsplit(".", 1)[0]
    shapes[f"{head}.weight"] = (1, head_in)
    shapes[f"{head}.bias"] = (1,)
    return shapes


def compute(tensor: Tensor, params: Mapping[str, np.ndarray], spec: ModelSpec) -> Dict[str, np.ndarray]:
    """The array(s) of ``tensor`` from checked float32 ``params``: ``{name: array}`` (plus ``name.scale`` for int8)."""
    if tensor.transform == "value_weight":
        if spec.head_layout == "logits":  # value = logits . v + b = h . (W_lm v) + b: one vector on the hidden state
            lm = transformed("lm_head", params[tensor.sources[0]], spec)
            out = (lm.astype(np.float64) @ params[tensor.sources[-1]][0].astype(np.float64))[:, None]
        else:
            out = params[tensor.sources[0]].T
    elif tensor.transform == "value_bias":
        out = params[tensor.sources[0]].reshape(1)
    else:
        out = transformed(tensor.transform, params[tensor.sources[0]], spec)
    out = np.ascontiguousarray(out, dtype=np.float32)
    if any(np.may_share_memory(out, params[name]) for name in tensor.sources):
        out = out.copy()  # never a view of the caller's tensors: they may change after (an optimizer step)
    if tensor.dtype == INT8:
        quantized, scale = quantize_int8(out)
        return {tensor.name: quantized, f"{tensor.name}.scale": scale}
    if tensor.dtype == "fp16":
        peak = float(np.abs(out).max()) if out.size else 0.0
        if peak > float(np.finfo(np.float16).max):  # a float comparison: numpy 2 would cast peak to fp16
            raise NonFiniteError(
                f"{tensor.name} holds weights up to {peak:.3g}, beyond fp16's range (65504): export bf16 or fp32"
            )
        return {tensor.name: out.astype(np.float16)}
    if tensor.dtype == "bf16":
        return {tensor.name: to_bfloat16(out)}
    return {tensor.name: out}


def _transposed(w: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy of ``w.T``, copied in row blocks (~1.5x faster than one strided copy)."""
    if w.ndim != 2:
        return np.array(w.T, dtype=np.float32, order="C")
    out = np.empty(w.shape[::-1], dtype=np.float32)
    for start in range(0, w.shape[0], 64):
        out[:, start : start + 64] = w[start : start + 64].T
    return out


def quantize_int8(w: np.ndarray):
    """Symmetric int8 with one scale per output column: ``(int8 K x N, float32 scales N)``.

    ``w`` is ``in x out`` (K x N); ``w ~ stored * scale`` with ``scale = max|w[:, n]| / 127``.
    At run time the activations are quantized per row (``export.graph.Builder.quantize_rows``),
    so a row's result does not depend on the rest of its batch (per-tensor dynamic quantization
    would make rollout and scoring numbers differ with the batch).
    """
    scale = (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def checkpoint_params(weights, spec: ModelSpec) -> Dict[str, np.ndarray]:
    """Checked float32 NumPy copies of the parameters the plan reads.

    ``weights``: a state dict (torch tensors or NumPy arrays) with the
    checkpoint's parameter names, as ``model.state_dict()`` gives it (tied
    weights under every alias) or as a saved ``model.safetensors`` holds it
    (tied weights under one name); or a model with ``state_dict()``. Every
    name, shape and value is checked before anything is returned: a missing,
    extra or misshapen parameter raises ``InputError`` naming it, a NaN or inf
    raises ``NonFiniteError``.
    """
    if hasattr(weights, "state_dict") and callable(weights.state_dict):
        weights = weights.state_dict()
    if not isinstance(weights, Mapping):
        raise InputError(f"weights must be a state dict or a model, got {type(weights).__name__}")
    shapes = expected_shapes(spec)
    given = {str(k): v for k, v in weights.items()}
    aliases = [a for a in EMBEDDING_ALIASES if a in given]
    if spec.tied and "lm_head.weight" in given:
        aliases.append("lm_head.weight")
    if "shared.weight" not in given and aliases:
        given["shared.weight"] = given[aliases[0]]
    missing = [name for name in shapes if name not in given]
    if missing:
        raise InputError(
            f"weights lack {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": pass the full state dict of a model of this export's architecture"
        )
    extra = [name for name in given if name not in shapes and name not in aliases]
    if extra:
        raise InputError(
            f"weights have a parameter {extra[0]!r} that this export's model does not have"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + ": is it a model of another architecture or head layout?"
        )
    params = {}
    for name, shape in shapes.items():
        array = _as_float32(given[name], name)
        if array.shape != shape:
            raise InputError(f"parameter {name} has shape {array.shape}, this export's model needs {shape}")
        if not np.isfinite(array).all():
            raise NonFiniteError(f"parameter {name} holds NaN or inf values: refusing to load broken weights")
        params[name] = array
    for alias in aliases:
        if not np.array_equal(_as_float32(given[alias], alias), params["shared.weight"]):
            raise InputError(f"{alias} differs from shared.weight, but this export's model ties them")
    return params


def _as_float32(value, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    try:
        return np.ascontiguousarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"parameter {name} is not an array of numbers ({type(value).__name__})") from None


def plan_arrays(
    params: Mapping[str, np.ndarray], spec: ModelSpec, precision: str, keep_fp32: Tuple[str, ...] = ()
) -> Dict[str, Dict[str, np.ndarray]]:
    """``{place: {tensor name: array}}`` for every tensor of the plan."""
    return {place: place_arrays(params, spec, precision, place, keep_fp32) for place in ("host", "encoder", "decoder")}


def place_arrays(
    params: Mapping[str, np.ndarray], spec: ModelSpec, precision: str, place: str, keep_fp32: Tuple[str, ...] = ()
) -> Dict[str, np.ndarray]:
    """``{tensor name: array}`` for the tensors of one place ("host", "encoder" or "decoder")."""
    out: Dict[str, np.ndarray] = {}
    for tensor in tensor_plan(spec, precision, keep_fp32):
        if tensor.place == place:
            out.update(compute(tensor, params, spec))
    return out


def weights_digest(params: Mapping[str, np.ndarray]) -> str:
    """A short content hash of checked parameters: what ``OnnxPolicy.weights_version`` reports.

    sha256 over every parameter's name, shape and float32 bytes, in name order,
    cut to 16 hex digits: equal weights give equal versions, whatever their
    source (a model, a state dict, NumPy arrays, a saved file) or decoder
    layout, and any changed number changes it. sha256 because it is the
    fastest full hash in hashlib here (~2 GB/s with SHA extensions: ~0.13 s
    for t5-small's 240 MB, against ~0.26 s for blake2b).
    """
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(params):
        array = np.ascontiguousarray(params[name], dtype=np.float32)
        digest.update(f"{name}:{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()[:16]


def plan_record(spec: ModelSpec, precision: str, keep_fp32: Tuple[str, ...] = ()) -> Dict[str, dict]:
    """The plan as JSON for the manifest: tensor -> {place, sources, transform, dtype}."""
    return {
        t.name: {"place": t.place, "sources": list(t.sources), "transform": t.transform, "dtype": t.dtype}
        for t in tensor_plan(spec, precision, keep_fp32)
    }


ROW_BLOCKS_KEY = "t5vh_row_blocks"  # a graph's metadata: {matrix: edges} of the row blocks it holds instead


def block_edges(rows: int, blocks: int) -> List[int]:
    """Where ``rows`` rows are cut into ``blocks`` blocks as equal as can be: ``blocks + 1`` edges."""
    return [int(e) for e in np.linspace(0, rows, blocks + 1).astype(np.int64)]


def row_block_name(matrix: str, start: int, end: int) -> str:
    """The name of rows ``start:end`` of ``matrix`` stored as a tensor of their own."""
    return f"{matrix}[{start}:{end}]"


def with_row_blocks(arrays: Mapping[str, np.ndarray], blocks: Mapping[str, List[int]]) -> Dict[str, np.ndarray]:
    """``arrays`` named as a graph whose ``blocks`` ({matrix: edges}, its ``ROW_BLOCKS_KEY`` metadata)
    holds those matrices as blocks of rows: each such matrix replaced by its blocks (views)."""
    out = {name: array for name, array in arrays.items() if name not in blocks}
    for matrix, edges in blocks.items():
        if matrix in arrays:
            for start, end in zip(edges[:-1], edges[1:]):
                out[row_block_name(matrix, start, end)] = arrays[matrix][start:end]
    return out


def sublayer_of(tensor_name: str) -> str:
    """The sublayer a matrix belongs to ("decoder.3.ff" for "decoder.3.ff_wo"); "" for other tensors.

    Sublayers: ``encoder.<i>.attn``, ``encoder.<i>.ff``, ``decoder.<i>.self``,
    ``decoder.<i>.cross``, ``decoder.<i>.ff`` and ``lm_head``: the units a
    reduced-precision export may keep in fp32 where fp16 would overflow.
    """
    match = re.match(r"^((?:encoder|decoder)\.\d+\.(?:attn|self|cross|ff))_|^(lm_head)$", tensor_name)
    return (match.group(1) or match.group(2)) if match else ""


def to_bfloat16(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (as uint16, which NumPy can hold), rounded to nearest even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def transformed(transform: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """One parameter as a graph stores it: ``copy``, ``transpose`` (MatMul wants in x out), or ``lm_head``
    (transposed, and for a tied model scaled by ``d_model ** -0.5`` as T5 scales the decoder output)."""
    if transform == "copy":  # a copy, never a view of the caller's array
        return np.array(w, dtype=np.float32, order="C")
    if transform == "transpose":
        return _transposed(w)
    if transform == "lm_head":
        out = _transposed(w)
        if spec.tied:
            out *= np.float32(spec.d_model**-0.5)
        return out
    raise ValueError(f"unknown transform {transform!r}")  # a bug in the plan or the manifest, not user input
