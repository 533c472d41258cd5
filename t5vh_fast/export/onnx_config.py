"""Optimum ONNX config for T5 whose decoder graphs also output ``value``."""

from __future__ import annotations

from optimum.exporters.onnx.base import ConfigBehavior
from optimum.exporters.onnx.model_configs import T5OnnxConfig

# Optimum's task for a seq2seq LM; with use_past=True it exports the decoder with
# and without past. (The "-with-past" task name raises a KeyError in `outputs`.)
TASK = "text2text-generation"


class T5ValueHeadOnnxConfig(T5OnnxConfig):
    """``T5OnnxConfig`` plus a ``value`` output (batch x decoder_len) on the decoder graphs.

    ONNX output names are assigned by position, so ``value`` must be last here
    and last in the model's output object (``Seq2SeqLMWithValueOutput``).
    """

    @property
    def outputs(self):
        outputs = super().outputs
        if self._behavior is not ConfigBehavior.ENCODER:
            outputs["value"] = dict(outputs["logits"])
        return outputs
