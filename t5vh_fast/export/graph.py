"""The ``single`` layout's two ONNX graphs, built node by node from the tensor plan.

Why not trace PyTorch: a hand-built graph uses onnxruntime's fused operators
(``MultiHeadAttention`` with the relative-position bias and the KV cache,
``SimplifiedLayerNormalization`` for T5's RMS norm, ``MatMulIntegerToFloat``
for int8), names every weight after what it is (so weights can be refreshed in
place), and shares the cross-attention keys/values of one query between the N
samples of a group. The post-export check holds it to the PyTorch model.

- ``t5vh_encoder.onnx``: ``inputs_embeds`` (B x S x d), ``attention_mask``
  (B x S int32), ``position_bias`` (1 x H x S x S) -> ``cross_key.i`` and
  ``cross_value.i`` (B x H x S x d_kv) for every decoder layer ``i``.
- ``t5vh_decoder.onnx``: ``inputs_embeds`` (R x T x d) for R = B x N rows (N
  samples per query, query-major), ``position_bias`` (1 x H x T x (P+T), causal
  mask included), ``encoder_mask``, the cross K/V of the B queries, the KV
  cache ``past_key.i`` / ``past_value.i`` (R x H x C x d_kv buffers as long as
  the whole response, C positions) with ``past_length`` P (the positions
  filled), and ``select`` (M flat indices into the R x T positions) ->
  ``logits`` (M x V), ``value`` (M) and ``present_key.i`` / ``present_value.i``:
  the same buffers with the T new positions written at P (the runtime binds
  them in place, so the cache is never copied). One graph for every step: the
  first step runs it with P = 0, scoring with T tokens at once.
- ``t5vh_decoder_packed.onnx``: the decoder for scoring on the CPU, run on each
  row's real positions only, without a KV cache (``packed_decoder_graph``); its
  weights are those of ``t5vh_decoder.onnx.data``.
- ``t5vh_encoder_packed.onnx``: the encoder on the queries' real tokens only
  (``packed_encoder_graph``), on the weights of ``t5vh_encoder.onnx.data``.

Both packed graphs hold each feed-forward output matrix as ``FF_BLOCKS`` blocks
of its rows (``name[start:end]``: stretches of the same ``.data`` bytes, listed in
the graph's ``t5vh_row_blocks`` metadata for a weight refresh), one Gemm each.

Weights live in ``<graph>.data`` beside each graph (onnxruntime memory-maps
them); the embedding and the relative-position tables stay in NumPy files the
runtime reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..weights import ROW_BLOCKS_KEY, ModelSpec, block_edges, row_block_name, sublayer_of

OPSET = 17
QUANTIZED_OPSET = 21  # int8 graphs: QuantizeLinear with one scale per row (blocked quantization)
ENCODER_GRAPH = "t5vh_encoder.onnx"
DECODER_GRAPH = "t5vh_decoder.onnx"
# The packed graphs' feed-forward output matrices, in this many blocks of rows (``Builder.feed_forward``)
FF_BLOCKS = 4
ALIGN = 64  # bytes: each weight starts at a multiple of this in the .data file

_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint16): TensorProto.BFLOAT16,  # bfloat16 bit patterns (NumPy has no bfloat16)
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
}
_COMPUTE_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def sublayer_types(weights: Dict[str, np.ndarray]) -> Dict[str, str]:
    """The type each sublayer computes in, from its matrices' storage: fp16, bf16, else fp32 (int8 included)."""
    kinds = {np.dtype(np.float16): "fp16", np.dtype(np.uint16): "bf16"}
    return {sublayer_of(name): kinds.get(array.dtype, "fp32") for name, array in weights.items() if sublayer_of(name)}


class Builder:
    """A graph under construction: nodes, inputs, outputs and external weights.

    The residual stream, the norms and the value head stay fp32; a sublayer
    whose matrices are fp16/bf16 casts the normed input to that type, computes
    in it, and casts its output back before the residual add (T5's residual
    stream outgrows fp16; its sublayers mostly do not, and those that would are
    kept fp32 by the exporter).
    """

    def __init__(self, name: str, weights: Dict[str, np.ndarray], spec: ModelSpec):
        self.name = name
        self.weights = dict(weights)  # row blocks are added (``feed_forward``), not to the caller's dict
        self.spec = spec
        self.types = sublayer_types(weights)
        self.nodes: List[onnx.NodeProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.constants: List[onnx.TensorProto] = []
        self.used: List[str] = []
        self._count = 0
        self._casts: Dict[tuple, str] = {}
        self._quantized: Dict[str, tuple] = {}
        self._zeros: Dict[str, str] = {}
        self._nonnegative: set = set()  # values known to be >= 0 (ReLU outputs)
        self._masks: Dict[str, str] = {}  # int32 key masks -> their additive forms (grid_attention)
        self.row_blocks: Dict[str, List[int]] = {}  # matrix -> the edges of its row blocks (``feed_forward``)

    def input(self, name: str, dtype, dims) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, dims))
        return name

    def output(self, value: str, name: str, dtype, dims) -> None:
        self.node("Identity", [value], name=name)
        self.outputs.append(helper.make_tensor_value_info(name, dtype, dims))

    def weight(self, name: str) -> str:
        if name not in self.weights:
            raise KeyError(f"no weight {name!r} in the plan for {self.name}")
        if name not in self.used:
            self.used.append(name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        name = f"const_{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: List[str], *, outputs: int = 1, name: str = None, domain: str = "", **attrs):
        self._count += 1
        names = [name] if name else [f"{op.lower()}_{self._count}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=f"{op}_{self._count}", domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def cast(self, x: str, kind: str) -> str:
        """``x`` (fp32) in ``kind`` ("fp32", "fp16" or "bf16"); one Cast per value and type."""
        if kind == "fp32":
            return x
        if (x, kind) not in self._casts:
            self._casts[(x, kind)] = self.node("Cast", [x], to=_COMPUTE_TYPES[kind])
        return self._casts[(x, kind)]

    def to_fp32(self, x: str, kind: str) -> str:
        return x if kind == "fp32" else self.node("Cast", [x], to=TensorProto.FLOAT)

    # -------------------------------------------------------------- T5 pieces

    def linear(self, x: str, weight: str, *, rows: str = "positions") -> str:
        """``x @ weight``; ``rows`` names the shape of ``x`` but its last axis (int8 shares zero points by it)."""
        if f"{weight}.scale" in self.weights:  # int8: one scale per weight column and per activation row
            xq, row_scale, zero = self.quantize_rows(x, self.weights[weight].shape[0], rows)
            # a row scale of shape (..., 1) is applied to the output by the op itself (onnxruntime >= 1.18)
            inputs = [xq, self.weight(weight), row_scale, self.weight(f"{weight}.scale"), zero]
            return self.node("MatMulIntegerToFloat", inputs, domain="com.microsoft")
        return self.node("MatMul", [x, self.weight(weight)])

    def quantize_rows(self, x: str, width: int, rows: str) -> tuple:
        """``x`` as uint8 with one scale per row (over its last axis): ``(quantized, scale, zero point)``.

        A row's numbers never depend on the other rows of its batch. Values known to be
        non-negative (ReLU outputs) use all 256 levels with zero point 0; others are symmetric
        around 128. One quantization per value: the q/k/v projections of one input share it.
        A row of zeros gets scale 0: whatever QuantizeLinear makes of 0/0, the row's product
        is multiplied by that 0, so its output is exactly 0 (a NaN or inf in ``x`` stays one)."""
        if x not in self._quantized:
            nonnegative = x in self._nonnegative
            peak = self.node("ReduceMax", [x if nonnegative else self.node("Abs", [x]), self.const([-1])], keepdims=1)
            scale = self.node("Mul", [peak, self.const(1.0 / (255.0 if nonnegative else 127.0), np.float32)])
            if nonnegative:
                zero = ""
                xq = self.node("QuantizeLinear", [x, scale], axis=-1, block_size=width)
            else:
                zero = self.const(128, np.uint8)
                if rows not in self._zeros:  # one zero-point tensor for every value of these rows
                    self._zeros[rows] = self.node("Expand", [zero, self.node("Shape", [scale])])
                xq = self.node("QuantizeLinear", [x, scale, self._zeros[rows]], axis=-1, block_size=width)
            self._quantized[x] = (xq, scale, zero)
        return self._quantized[x]

    def norm(self, x: str, weight: str) -> str:
        return self.node(
            "SimplifiedLayerNormalization", [x, self.weight(weight)], axis=-1, epsilon=self.spec.eps, stash_type=1
        )

    def feed_forward(self, x: str, prefix: str, *, blocks: int = 1) -> str:
        """The residual stream after ``prefix``'s feed-forward sublayer.

        ``blocks`` > 1 (fp32 only): the hidden layer is split into that many parts, each multiplied by
        its rows of the output matrix (``row_blocks``: the same bytes of the ``.data`` file, no copy)
        and added to the stream one after another. onnxruntime fuses each product with its add into a
        Gemm that accumulates onto the stream, so the sum is the one-MatMul sum in the same order, but at
        a thousand positions four K = 512 products run ~10% faster than one K = 2048."""
        kind = self.types[f"{prefix}.ff"]
        h = self.cast(self.norm(x, f"{prefix}.ff_norm"), kind)
        inner = [f"{prefix}.ff_wi_0", f"{prefix}.ff_wi_1"] if self.spec.gated else [f"{prefix}.ff_wi"]
        hidden = self._ff_hidden(h, [self.linear(h, w) for w in inner])
        outer = f"{prefix}.ff_wo"
        blocks = min(blocks, self.weights[outer].shape[0])  # never an empty block
        if blocks == 1 or kind != "fp32" or f"{outer}.scale" in self.weights:
            return self.node("Add", [x, self.to_fp32(self.linear(hidden, outer), kind)])
        edges = block_edges(self.weights[outer].shape[0], blocks)
        self.row_blocks[outer] = edges
        parts = self.node("Split", [hidden, self.const(np.diff(edges))], axis=-1, outputs=blocks)
        for part, start, end in zip(parts, edges[:-1], edges[1:]):
            name = row_block_name(outer, start, end)
            self.weights[name] = self.weights[outer][start:end]
            x = self.node("Add", [x, self.node("MatMul", [part, self.weight(name)])])
        return x

    def _ff_hidden(self, h: str, projected: List[str]) -> str:
        """The hidden layer from the input's one (or, gated, two) projections."""
        if len(projected) == 2:
            return self.node("Mul", [self.activation(projected[0]), projected[1]])
        return self.activation(projected[0])

    def activation(self, x: str) -> str:
        act = self.spec.activation
        if act == "relu":
            out = self.node("Relu", [x])
            self._nonnegative.add(out)
            return out
        if act in ("gelu_new", "gelu_pytorch_tanh"):
            return self.node("FastGelu", [x], domain="com.microsoft")
        if act == "gelu":
            return self.node("Gelu", [x], domain="com.microsoft")
        return self.node("Mul", [x, self.node("Sigmoid", [x])])  # silu

    def attention(self, query: str, key: str, value: str, **inputs) -> str:
        """``MultiHeadAttention`` without T5's 1/sqrt(d) scaling; ``inputs`` by the op's input names."""
        order = ["bias", "key_padding_mask", "attention_bias", "past_key", "past_value", "past_sequence_length"]
        args = [query, key, value] + [inputs.get(name, "") for name in order]
        while args[-1] == "":
            args.pop()
        outputs = 3 if "past_key" in inputs else 1
        return self.node(
            "MultiHeadAttention",
            args,
            outputs=outputs,
            domain="com.microsoft",
            num_heads=self.spec.num_heads,
            scale=1.0,
        )

    def grid_indices(self, flat: str, rows: str, length: str, *, zeros: bool = False) -> dict:
        """Where P packed positions sit in an X x H x L x d grid: ``flat`` holds their P indices into
        X x L (row-major; ``rows`` = [X], ``length`` = [L]). Returns what ``to_grid`` and ``from_grid``
        take: ``cells`` (X x H x L), the one of the P x H packed rows of d each grid cell reads (the heads
        are split where the positions are gathered, so attention needs no Transpose on either side; a
        cell without a position reads position 0's), and ``positions`` (P x H), where each packed row
        sits among the grid's X x H x L rows of d. With ``zeros``, also what ``to_grid(..., zeros=True)``
        needs: the grid's zeros and the P x H x 3 (row, head, position) indices to scatter into them.
        The indices are made by broadcasting, so onnxruntime knows the shapes that follow (P x H*d after
        ``from_grid``), and fuses the output projection with its residual Add into one Gemm."""
        H, d = self.spec.num_heads, self.spec.d_kv
        row, position = self.node("Div", [flat, length]), self.node("Mod", [flat, length])
        grid = {}
        # P x H: ((row x H) + head) x L + position
        head_rows = self.node(
            "Add", [self.node("Mul", [self._column(row), self.const(H)]), self.const(np.arange(H).reshape(1, H))]
        )
        grid["positions"] = self.node("Add", [self.node("Mul", [head_rows, length]), self._column(position)])
        # X x L: the packed position at each cell (0 where none), then X x H x L: its row of d for each head
        count = self.node("Squeeze", [self.node("Shape", [flat])])
        packed = self.node("Range", [self.const(0), count, self.const(1)])
        at = self.node(
            "ConstantOfShape", [self.node("Mul", [rows, length])], value=numpy_helper.from_array(np.zeros(1, np.int64))
        )
        at = self.node("ScatterElements", [at, flat, packed], axis=0)
        at = self.node("Reshape", [at, self.node("Concat", [rows, self.const([1]), length], axis=0)])
        grid["cells"] = self.node(
            "Add", [self.node("Mul", [at, self.const(H)]), self.const(np.arange(H).reshape(1, H, 1))]
        )
        if zeros:
            heads = np.zeros((1, H, 3), dtype=np.int64)
            heads[0, :, 1] = np.arange(H)

            def place(index: str, axis: int) -> str:  # P -> P x 1 x 3, the index at ``axis`` of the last
                unit = np.zeros((1, 1, 3), dtype=np.int64)
                unit[0, 0, axis] = 1
                return self.node("Mul", [self.node("Unsqueeze", [index, self.const([1, 2])]), self.const(unit)])

            spread = self.node("Add", [place(row, 0), place(position, 2)])
            grid["scatter"] = self.node("Add", [spread, self.const(heads)])
            shape = self.node("Concat", [rows, self.const([H]), length, self.const([d])], axis=0)
            grid["zeros"] = self.node(
                "ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32))
            )
        return grid

    def _column(self, x: str) -> str:
        return self.node("Unsqueeze", [x, self.const([1])])

    def to_grid(self, x: str, grid: dict, *, zeros: bool = False) -> str:
        """P x H*d fp32 -> the X x H x L x d grid of ``grid_indices``. The cells without a position hold a
        copy of position 0's numbers, which attention never weighs (they are masked or after every position
        of their row, and -1e9 leaves exp() exactly 0); with ``zeros`` (a ``grid_indices(..., zeros=True)``)
        they hold zeros, for outputs others read and attention that masks with less (``MultiHeadAttention``)."""
        if zeros:
            split = self.node("Reshape", [x, self.const([0, self.spec.num_heads, self.spec.d_kv])])
            return self.node("ScatterND", [grid["zeros"], grid["scatter"], split])
        return self.node("Gather", [self.node("Reshape", [x, self.const([-1, self.spec.d_kv])]), grid["cells"]], axis=0)

    def from_grid(self, x: str, grid: dict) -> str:
        """The P positions of an X x H x L x d grid, as P x H*d."""
        rows = self.node("Reshape", [x, self.const([-1, self.spec.d_kv])])
        return self.node(
            "Reshape", [self.node("Gather", [rows, grid["positions"]], axis=0), self.const([0, self.spec.inner])]
        )

    def grid_attention(self, query: str, key: str, value: str, *, bias: str = "", mask: str = "", kind: str = "fp32"):
        """Attention of ``query`` (X x H x L x d) over ``key``/``value`` (X x H x L' x d), in that layout,
        without T5's 1/sqrt(d) scaling: ``bias`` (1 x H x L x L') added to the scores, keys where the int32
        ``mask`` (X x L') is 0 left out. For the packed graphs, whose attention runs over a grid of rows:
        MatMul and Softmax nodes, which onnxruntime's CPU runs faster than its ``MultiHeadAttention``
        there (32 rows x 64 positions, causal bias: 3.6 against 5.6 ms a call). ``MultiHeadAttention``
        for types other than fp32."""
        if kind != "fp32":
            merged = self.node("Transpose", [query], perm=[0, 2, 1, 3])
            merged = self.node("Reshape", [merged, self.const([0, 0, self.spec.inner])])
            return self.heads(self.attention(merged, key, value, attention_bias=bias, key_padding_mask=mask))
        scores = self.node("FusedMatMul", [query, key], domain="com.microsoft", transB=1, alpha=1.0)
        for extra in (bias, mask and self._additive(mask)):
            if extra:
                scores = self.node("Add", [scores, extra])
        return self.node("MatMul", [self.node("Softmax", [scores], axis=-1), value])

    def _additive(self, mask: str) -> str:
        """B x L int32 (1 = token) -> B x 1 x 1 x L float32: 0 on tokens, -1e9 on padding (once per mask)."""
        if mask not in self._masks:
            padding = self.node("Sub", [self.node("Cast", [mask], to=TensorProto.FLOAT), self.const(1.0, np.float32)])
            additive = self.node("Mul", [padding, self.const(1e9, np.float32)])
            self._masks[mask] = self.node("Unsqueeze", [additive, self.const([1, 2])])
        return self._masks[mask]

    def heads_at(self, picked: str) -> None:
        """The outputs ``logits`` (M x V, the LM head) and ``value`` (M) of the M ``picked`` hidden states."""
        kind = self.types["lm_head"]
        logits = self.to_fp32(self.linear(self.cast(picked, kind), "lm_head", rows="picked"), kind)
        self.output(logits, "logits", TensorProto.FLOAT, ["picked", self.spec.vocab_size])
        value = self.node(
            "Add", [self.node("MatMul", [picked, self.weight("value_weight")]), self.weight("value_bias")]
        )
        self.output(self.node("Squeeze", [value, self.const([1])]), "value", TensorProto.FLOAT, ["picked"])

    def heads(self, x: str) -> str:
        """(B, L, H*d) -> (B, H, L, d)."""
        shaped = self.node("Reshape", [x, self.const([0, -1, self.spec.num_heads, self.spec.d_kv])])
        return self.node("Transpose", [shaped], perm=[0, 2, 1, 3])

    def model(self) -> onnx.ModelProto:
        initializers = [_external(name, self.weights[name]) for name in self.used] + self.constants
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        model = helper.make_model(
            graph,
            opset_imports=[
                helper.make_opsetid("", QUANTIZED_OPSET if self._quantized else OPSET),
                helper.make_opsetid("com.microsoft", 1),
            ],
            producer_name="t5vh_fast",
        )
        model.ir_version = 10 if self._quantized else 9  # opset 21 needs IR 10
        if self.row_blocks:  # what a weight refresh needs to name them (``weights.with_row_blocks``)
            helper.set_model_props(model, {ROW_BLOCKS_KEY: json.dumps(self.row_blocks)})
        return model


def _external(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A weight whose bytes live in the graph's .data file (offsets filled in by ``save``)."""
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = _ONNX_TYPES[array.dtype]
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def encoder_graph(spec: ModelSpec, weights: Dict[str, np.ndarray]) -> Builder:
    """Encoder blocks, then every decoder layer's cross-attention keys and values."""
    b = Builder("t5vh_encoder", weights, spec)
    x = b.input("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", spec.d_model])
    mask = b.input("attention_mask", TensorProto.INT32, ["batch", "seq"])
    bias = b.input("position_bias", TensorProto.FLOAT, [1, spec.num_heads, "seq", "seq"])
    for i in range(spec.encoder_layers):
        p = f"encoder.{i}"
        kind = b.types[f"{p}.attn"]
        h = b.cast(b.norm(x, f"{p}.attn_norm"), kind)
        q, k, v = (b.linear(h, f"{p}.attn_{w}") for w in ("q", "k", "v"))
        a = b.attention(q, k, v, key_padding_mask=mask, attention_bias=b.cast(bias, kind))
        x = b.node("Add", [x, b.to_fp32(b.linear(a, f"{p}.attn_o"), kind)])
        x = b.feed_forward(x, p)
    hidden = b.norm(x, "encoder.final_norm")
    for i in range(spec.decoder_layers):
        kind = b.types[f"decoder.{i}.cross"]
        for name in ("key", "value"):
            projected = b.linear(b.cast(hidden, kind), f"decoder.{i}.cross_{name[0]}")
            dims = ["batch", spec.num_heads, "seq", spec.d_kv]
            b.output(b.heads(projected), f"cross_{name}.{i}", _COMPUTE_TYPES[kind], dims)
    return b


def decoder_graph(spec: ModelSpec, weights: Dict[str, np.ndarray]) -> Builder:
    """Decoder blocks over R rows sharing the cross K/V of B queries, then the LM head and value at ``select``."""
    b = Builder("t5vh_decoder", weights, spec)
    H, dkv = spec.num_heads, spec.d_kv
    x = b.input("inputs_embeds", TensorProto.FLOAT, ["rows", "steps", spec.d_model])
    bias = b.input("position_bias", TensorProto.FLOAT, [1, H, "steps", "total"])
    enc_mask = b.input("encoder_mask", TensorProto.INT32, ["batch", "seq"])
    cross = []
    for i in range(spec.decoder_layers):
        kind = _COMPUTE_TYPES[b.types[f"decoder.{i}.cross"]]
        k = b.input(f"cross_key.{i}", kind, ["batch", H, "seq", dkv])
        v = b.input(f"cross_value.{i}", kind, ["batch", H, "seq", dkv])
        cross.append((k, v))
    # one buffer per layer and kind, as long as the whole response: the step writes at past_length. Always
    # fp32, and self-attention with it: onnxruntime 1.31's CUDA MultiHeadAttention for 16-bit types read the
    # buffer's unwritten positions (an H100 gave NaN from an uninitialized cache, wrong numbers from a zeroed
    # one, at the first step of every rollout); its fp32 kernel reads only the past_length + 1 written ones.
    past = []
    for i in range(spec.decoder_layers):
        k = b.input(f"past_key.{i}", TensorProto.FLOAT, ["rows", H, "capacity", dkv])
        v = b.input(f"past_value.{i}", TensorProto.FLOAT, ["rows", H, "capacity", dkv])
        past.append((k, v))
    past_length = b.input("past_length", TensorProto.INT32, [1])
    select = b.input("select", TensorProto.INT64, ["picked"])
    # the N samples of a query attend to its keys/values as N x T query positions of one row
    group_shape = b.node("Concat", [b.node("Shape", [enc_mask], start=0, end=1), b.const([-1, spec.inner])], axis=0)
    for i in range(spec.decoder_layers):
        p = f"decoder.{i}"
        kind = b.types[f"{p}.self"]
        h = b.cast(b.norm(x, f"{p}.self_norm"), kind)
        q, k, v = (b.to_fp32(b.linear(h, f"{p}.self_{w}"), kind) for w in ("q", "k", "v"))
        a, present_k, present_v = b.attention(
            q,
            k,
            v,
            attention_bias=bias,
            past_key=past[i][0],
            past_value=past[i][1],
            past_sequence_length=past_length,
        )
        b.output(present_k, f"present_key.{i}", TensorProto.FLOAT, ["rows", H, "capacity", dkv])
        b.output(present_v, f"present_value.{i}", TensorProto.FLOAT, ["rows", H, "capacity", dkv])
        x = b.node("Add", [x, b.to_fp32(b.linear(b.cast(a, kind), f"{p}.self_o"), kind)])
        kind = b.types[f"{p}.cross"]
        q = b.linear(b.cast(b.norm(x, f"{p}.cross_norm"), kind), f"{p}.cross_q")
        grouped = b.node("Reshape", [q, group_shape])
        a = b.attention(grouped, cross[i][0], cross[i][1], key_padding_mask=enc_mask)
        a = b.node("Reshape", [a, b.node("Shape", [q])])
        x = b.node("Add", [x, b.to_fp32(b.linear(a, f"{p}.cross_o"), kind)])
        x = b.feed_forward(x, p)
    hidden = b.norm(x, "decoder.final_norm")
    flat = b.node("Reshape", [hidden, b.const([-1, spec.d_model])])
    picked = b.node("Gather", [flat, select], axis=0)
    b.heads_at(picked)
    return b


def packed_decoder_graph(spec: ModelSpec, weights: Dict[str, np.ndarray]) -> Builder:
    """The decoder for teacher-forced scoring: the decoder graph's numbers for ragged rows, without their
    padding in the position-wise layers and without a KV cache.

    Inputs: ``inputs_embeds`` (P x d) for the P ``active`` positions (flat indices into the R x T grid
    ``grid`` = (R, T), each row's positions up to its last scored one), ``position_bias`` (1 x H x T x T,
    causal), ``encoder_mask`` and the cross K/V as in the decoder graph, and ``select`` (M indices into
    the P positions). Outputs ``logits`` (M x V) and ``value`` (M). Only attention sees the grid: q, k, v
    are gathered into it, split into heads (copies of position 0 elsewhere, which causality hides from
    every active position), and the result gathered back; the projections, norms and feed-forward
    layers run on the P positions. Its weights are the decoder graph's, read from that graph's ``.data`` file (``save_beside``),
    the feed-forward output matrices as ``FF_BLOCKS`` blocks of rows.
    """
    b = Builder("t5vh_decoder_packed", weights, spec)
    H, dkv = spec.num_heads, spec.d_kv
    x = b.input("inputs_embeds", TensorProto.FLOAT, ["positions", spec.d_model])
    active = b.input("active", TensorProto.INT64, ["positions"])
    grid = b.input("grid", TensorProto.INT64, [2])
    bias = b.input("position_bias", TensorProto.FLOAT, [1, H, "steps", "steps"])
    enc_mask = b.input("encoder_mask", TensorProto.INT32, ["batch", "seq"])
    cross = []
    for i in range(spec.decoder_layers):
        kind = _COMPUTE_TYPES[b.types[f"decoder.{i}.cross"]]
        cross.append(tuple(b.input(f"cross_{name}.{i}", kind, ["batch", H, "seq", dkv]) for name in ("key", "value")))
    select = b.input("select", TensorProto.INT64, ["picked"])
    rows, steps = (b.node("Slice", [grid, b.const([k]), b.const([k + 1])]) for k in (0, 1))
    queries = b.node("Shape", [enc_mask], start=0, end=1)
    # self-attention on the R x T grid; cross-attention on B x (N x T), the N samples of a query as one row
    grid_self = b.grid_indices(active, rows, steps)
    grid_cross = b.grid_indices(active, queries, b.node("Div", [b.node("ReduceProd", [grid], keepdims=1), queries]))
    for i in range(spec.decoder_layers):
        p = f"decoder.{i}"
        kind = b.types[f"{p}.self"]
        h = b.cast(b.norm(x, f"{p}.self_norm"), kind)
        q, k, v = (b.to_grid(b.to_fp32(b.linear(h, f"{p}.self_{w}"), kind), grid_self) for w in "qkv")
        a = b.from_grid(b.grid_attention(q, k, v, bias=bias), grid_self)
        x = b.node("Add", [x, b.to_fp32(b.linear(b.cast(a, kind), f"{p}.self_o"), kind)])
        kind = b.types[f"{p}.cross"]
        q = b.linear(b.cast(b.norm(x, f"{p}.cross_norm"), kind), f"{p}.cross_q")
        q = b.cast(b.to_grid(b.to_fp32(q, kind), grid_cross), kind)
        a = b.from_grid(b.grid_attention(q, *cross[i], mask=enc_mask, kind=kind), grid_cross)
        x = b.node("Add", [x, b.to_fp32(b.linear(a, f"{p}.cross_o"), kind)])
        x = b.feed_forward(x, p, blocks=FF_BLOCKS)
    hidden = b.norm(x, "decoder.final_norm")
    picked = b.node("Gather", [hidden, select], axis=0)
    b.heads_at(picked)
    return b


def packed_encoder_graph(spec: ModelSpec, weights: Dict[str, np.ndarray]) -> Builder:
    """The encoder graph's numbers without the queries' padding: ``inputs_embeds`` holds only the P real
    tokens, at the flat ``active`` indices into B x S (where ``attention_mask`` is 1). The projections,
    norms and feed-forward layers run on those P positions, attention on the B x S grid (q, k, v
    gathered into it, split into heads; at the padding, which the mask hides as keys, copies of position
    0, or zeros where the sublayer is 16-bit). Outputs the cross K/V of the encoder graph (B x H x S x d),
    zeros at the padding. Its weights are the encoder graph's, read from that graph's ``.data`` file
    (``save_beside``), the feed-forward output matrices as ``FF_BLOCKS`` blocks of rows."""
    b = Builder("t5vh_encoder_packed", weights, spec)
    x = b.input("inputs_embeds", TensorProto.FLOAT, ["positions", spec.d_model])
    active = b.input("active", TensorProto.INT64, ["positions"])
    mask = b.input("attention_mask", TensorProto.INT32, ["batch", "seq"])
    bias = b.input("position_bias", TensorProto.FLOAT, [1, spec.num_heads, "seq", "seq"])
    grid = b.grid_indices(
        active, b.node("Shape", [mask], start=0, end=1), b.node("Shape", [mask], start=1, end=2), zeros=True
    )
    for i in range(spec.encoder_layers):
        p = f"encoder.{i}"
        kind = b.types[f"{p}.attn"]
        h = b.cast(b.norm(x, f"{p}.attn_norm"), kind)
        projected = (b.to_fp32(b.linear(h, f"{p}.attn_{w}"), kind) for w in "qkv")
        q, k, v = (b.cast(b.to_grid(value, grid, zeros=kind != "fp32"), kind) for value in projected)
        a = b.from_grid(b.grid_attention(q, k, v, bias=b.cast(bias, kind), mask=mask, kind=kind), grid)
        x = b.node("Add", [x, b.to_fp32(b.linear(a, f"{p}.attn_o"), kind)])
        x = b.feed_forward(x, p, blocks=FF_BLOCKS)
    hidden = b.norm(x, "encoder.final_norm")
    for i in range(spec.decoder_layers):
        kind = b.types[f"decoder.{i}.cross"]
        for name in ("key", "value"):  # projected at the P positions, then into the grid the decoder reads
            projected = b.to_fp32(b.linear(b.cast(hidden, kind), f"decoder.{i}.cross_{name[0]}"), kind)
            dims = ["batch", spec.num_heads, "seq", spec.d_kv]
            b.output(
                b.cast(b.to_grid(projected, grid, zeros=True), kind), f"cross_{name}.{i}", _COMPUTE_TYPES[kind], dims
            )
    return b


def save(builder: Builder, path: Path) -> List[str]:
    """Write ``path`` (the graph) and ``path.data`` (its weights); returns the two file names."""
    model = builder.model()
    data_name = f"{path.name}.data"
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            raw = np.ascontiguousarray(builder.weights[tensor.name]).tobytes()
            pad = (-offset) % ALIGN
            data.write(b"\0" * pad)
            offset += pad
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            data.write(raw)
            offset += len(raw)
    onnx.save(model, str(path))
    return [path.name, data_name]


def save_beside(builder: Builder, path: Path, graph: Path) -> List[str]:
    """Write ``path``, a graph whose weights are all stored in ``graph``'s ``.data`` file already (the
    same tensors under the same names); returns the one file name."""
    stored = onnx.load(str(graph), load_external_data=False).graph.initializer
    places = {
        t.name: {e.key: e.value for e in t.external_data} for t in stored if t.data_location == TensorProto.EXTERNAL
    }
    for matrix, edges in builder.row_blocks.items():  # a block of rows is a stretch of its matrix's bytes
        row = builder.weights[matrix][:1].nbytes
        for start, end in zip(edges[:-1], edges[1:]):
            offset = int(places[matrix]["offset"]) + start * row
            places[row_block_name(matrix, start, end)] = {
                **places[matrix],
                "offset": str(offset),
                "length": str((end - start) * row),
            }
    model = builder.model()
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            for key, value in places[tensor.name].items():
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return [path.name]
