"""``t5vh_sampler.onnx``, ``t5vh_scorer.onnx`` and ``t5vh_lookup.onnx``: the sampler's draw, the
scorer's log-softmax and the embedding lookup as ONNX graphs, for the GPU.

On CUDA the decoder's logits can stay on the device: this graph draws each
row's token there and only B tokens, log-probs and log-sum-exps come back to
the host, instead of B x V logits and a NumPy pass over them. It is the
RNG contract in the same steps as ``t5vh_fast.sampling.draw``:
``exp(logits - max)`` in float32, float64 sums of blocks of ``BLOCK`` tokens
and their cumulative sum, the block holding ``u x total``, then the float64
cumulative sum inside that block; the token is the number of CDF entries <=
``u x total``. The same steps, not the same bits: onnxruntime's and CUDA's
float32 exp differ from NumPy's in the last bit now and then, and CUDA adds
a block in another order, so where ``u x total`` lies within such a rounding
of a token's CDF edge (a near-tie, ~1e-7 of draws) the neighbouring token
can be picked, as between any two fp32 implementations of the model. The runtime uses it for unfiltered sampling (top_k=0,
top_p=1) on CUDA; the CPU keeps NumPy (there the graph was no faster).

Inputs: ``logits`` (B x V float32), ``u`` (B float64). Outputs: ``token`` (B
int64), ``logprob`` (B float32), ``lse`` (B float32: non-finite for a row with
a NaN or +inf logit), ``lost`` (B bool: the draw landed past the row's end or
on a token without mass, where the block sums and the running sum rounded
differently; ``draw`` then decides on the host from the full float64 CDF).

``scorer_graph`` is ``t5vh_fast.scoring``'s pass over the scored positions'
logits, for the same reason: on CUDA only the positions' log-probs and
entropies come back, not P x V logits (2 GB for 16k positions at a 32k
vocabulary) and a NumPy pass over them on one core. ``lookup_graph`` gathers
token embeddings from the table kept on the device, so a batch's ids go up,
not its rows x length x d_model embeddings.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..sampling import BLOCK

OPSET = 17


class _Builder:
    """Nodes and constants of a small graph, each node with one output named by the caller."""

    def __init__(self):
        self.nodes, self.constants = [], []

    def const(self, name, value, dtype=np.int64):
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def model(self, name: str, inputs: list, outputs: dict, rows: str) -> onnx.ModelProto:
        """``inputs``: ``(name, element type, dims)``; ``outputs``: ``{name: (value, element type)}``, each
        value ``rows`` x 1, squeezed to ``rows``."""
        for output, (value, _) in outputs.items():
            self.node("Squeeze", [value, self.const(f"squeeze_{output}", [1])], output)
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(*spec) for spec in inputs],
            [helper.make_tensor_value_info(output, dtype, [rows]) for output, (_, dtype) in outputs.items()],
            self.constants,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="t5vh_fast")
        model.ir_version = 9
        return model


def sampler_graph(vocab_size: int) -> onnx.ModelProto:
    """The draw for a ``vocab_size``-token vocabulary (the padding to whole blocks is fixed in the graph)."""
    blocks = -(-vocab_size // BLOCK)
    builder = _Builder()
    const, node = builder.const, builder.node
    node("ReduceMax", ["logits"], "top", axes=[-1], keepdims=1)  # B x 1
    node("Exp", [node("Sub", ["logits", "top"], "shifted")], "weights")  # B x V float32, as exp_weights
    pads = const("pads", [0, 0, 0, blocks * BLOCK - vocab_size])
    node("Pad", [node("Cast", ["weights"], "weights64", to=TensorProto.DOUBLE), pads], "padded")  # zeros: no mass
    node("Reshape", ["padded", const("block_shape", [0, blocks, BLOCK])], "by_block")  # B x blocks x BLOCK
    node("ReduceSum", ["by_block", const("last", [-1])], "block_sums", keepdims=0)  # B x blocks
    node("CumSum", ["block_sums", const("axis", -1)], "block_cdf")
    node("Slice", ["block_cdf", const("minus1", [-1]), const("end", [blocks]), const("axis1", [1])], "total")
    node("Mul", [node("Unsqueeze", ["u", const("one", [1])], "u_col"), "total"], "threshold")  # B x 1
    below = node(
        "Cast", [node("LessOrEqual", ["block_cdf", "threshold"], "block_le")], "block_le64", to=TensorProto.INT64
    )
    counted = node("ReduceSum", [below, const("last2", [-1])], "blocks_below", keepdims=1)
    block = node("Min", [counted, const("last_block", [blocks - 1])], "block")  # B x 1
    previous = node("Max", [node("Sub", [block, const("one64", [1])], "block_m1"), const("zero64", [0])], "prev")
    before = node(
        "Where",
        [
            node("Greater", [block, const("zero64b", [0])], "has_before"),
            node("GatherElements", ["block_cdf", previous], "cdf_before", axis=1),
            const("zero_double", [0.0], np.float64),
        ],
        "before",
    )
    index = node(
        "Expand", [node("Unsqueeze", [block, const("two", [2])], "block3"), const("pick", [1, 1, BLOCK])], "idx"
    )
    picked = node("GatherElements", ["by_block", index], "picked3", axis=1)  # B x 1 x BLOCK
    local = node("Reshape", [picked, const("row_shape", [0, BLOCK])], "local")
    cdf = node("Add", [node("CumSum", [local, const("axis2", -1)], "local_cdf"), before], "cdf")
    inside = node("Cast", [node("LessOrEqual", [cdf, "threshold"], "le")], "le64", to=TensorProto.INT64)
    offset = node("ReduceSum", [inside, const("last3", [-1])], "offset", keepdims=1)
    token = node("Add", [node("Mul", [block, const("block_len", [BLOCK])], "start"), offset], "token2")  # B x 1
    clamped = node("Min", [token, const("last_token", [vocab_size - 1])], "clamped")
    mass = node("GatherElements", ["weights", clamped], "mass", axis=1)
    lost = node(
        "Or",
        [
            node("Greater", [token, const("last_token2", [vocab_size - 1])], "past_end"),
            node("Equal", [mass, const("zero_float", [0.0], np.float32)], "no_mass"),
        ],
        "lost2",
    )
    # log-sum-exp as exp_weights: max + log(float64 total), cast to float32; log-prob as token_logprobs
    lse = node(
        "Cast",
        [
            node(
                "Add",
                [node("Cast", ["top"], "top64", to=TensorProto.DOUBLE), node("Log", ["total"], "log_total")],
                "lse64",
            )
        ],
        "lse2",
        to=TensorProto.FLOAT,
    )
    logprob = node("Sub", [node("GatherElements", ["logits", clamped], "chosen", axis=1), lse], "logprob2")
    return builder.model(
        "t5vh_sampler",
        [("logits", TensorProto.FLOAT, ["rows", vocab_size]), ("u", TensorProto.DOUBLE, ["rows"])],
        {
            "token": (token, TensorProto.INT64),
            "logprob": (logprob, TensorProto.FLOAT),
            "lse": (lse, TensorProto.FLOAT),
            "lost": (lost, TensorProto.BOOL),
        },
        "rows",
    )


def scorer_graph(vocab_size: int) -> onnx.ModelProto:
    """Log-probs of the scored ``token``s and entropies of P x ``vocab_size`` ``logits``, in the steps of
    ``scoring.log_normalizer_and_entropy``: ``w = exp(logits - max)``, float32 ``total = sum(w)``,
    ``lse = max + log(total)``, ``entropy = lse - sum(w * logits) / total``, ``logprob = logit - lse``.
    A row with a NaN or +inf logit gives non-finite numbers, which the scorer refuses."""
    builder = _Builder()
    const, node = builder.const, builder.node
    node("ReduceMax", ["logits"], "top", axes=[-1], keepdims=1)  # P x 1
    node("Exp", [node("Sub", ["logits", "top"], "shifted")], "weights")
    last = const("last", [-1])
    total = node("ReduceSum", ["weights", last], "total", keepdims=1)
    lse = node("Add", ["top", node("Log", [total], "log_total")], "lse")
    expected = node("ReduceSum", [node("Mul", ["weights", "logits"], "weighted"), last], "expected", keepdims=1)
    entropy = node("Sub", [lse, node("Div", [expected, total], "mean_logit")], "entropy2")
    chosen = node(
        "GatherElements", ["logits", node("Unsqueeze", ["token", const("one", [1])], "token2")], "chosen", axis=1
    )
    logprob = node("Sub", [chosen, lse], "logprob2")
    return builder.model(
        "t5vh_scorer",
        [("logits", TensorProto.FLOAT, ["positions", vocab_size]), ("token", TensorProto.INT64, ["positions"])],
        {"logprob": (logprob, TensorProto.FLOAT), "entropy": (entropy, TensorProto.FLOAT)},
        "positions",
    )


def lookup_graph() -> onnx.ModelProto:
    """``embeds = table[ids]``: ``table`` (vocab x d, kept on the device), ``ids`` (rows x length int64)."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embeds"], axis=0)],
        "t5vh_lookup",
        [
            helper.make_tensor_value_info("table", TensorProto.FLOAT, ["vocab", "d"]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", "length"]),
        ],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["rows", "length", "d"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="t5vh_fast")
    model.ir_version = 9
    return model
