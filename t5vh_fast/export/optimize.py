"""Exact graph rewrites applied after Optimum's export (the parity check runs after them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def fold_lm_head_scale(path: Path) -> bool:
    """Fold tied T5's ``d_model ** -0.5`` rescale into the LM-head weight.

    Tied T5 computes ``logits = (h * c) @ W``. onnxruntime fuses that Mul into a
    ``FusedMatMul`` which, unlike ``MatMul``, does not use pre-packed weights:
    at batch 1 the LM head (the biggest matrix) ran at about half the memory
    bandwidth. ``h @ (c * W)`` is the same product up to float32 rounding.
    Returns False (and leaves the file alone) when the graph has no such pattern.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer):
        return False  # > 2 GB graphs keep their weights outside; not worth rewriting here
    producer = {out: node for node in graph.node for out in node.output}
    uses = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    initializers = {init.name: init for init in graph.initializer}

    matmul = producer.get("logits")
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in initializers:
        return False
    mul = producer.get(matmul.input[0])
    if mul is None or mul.op_type != "Mul" or uses.get(mul.output[0]) != 1 or uses.get(matmul.input[1]) != 1:
        return False
    scale, hidden = None, None
    for i, name in enumerate(mul.input):
        value = _constant(name, producer, initializers)
        if value is not None and value.size == 1:
            scale, hidden = float(value.reshape(())), mul.input[1 - i]
    if scale is None:
        return False
    weight = initializers[matmul.input[1]]
    folded = numpy_helper.from_array(
        (numpy_helper.to_array(weight) * np.float32(scale)).astype(np.float32), weight.name
    )
    weight.CopyFrom(folded)
    matmul.input[0] = hidden
    graph.node.remove(mul)
    for name in mul.input:  # the scale's Constant node, now unused
        node = producer.get(name)
        if node is not None and node.op_type == "Constant" and uses.get(name) == 1:
            graph.node.remove(node)
    onnx.save(model, str(path))
    return True


def _constant(name, producer, initializers):
    from onnx import numpy_helper

    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producer.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None
