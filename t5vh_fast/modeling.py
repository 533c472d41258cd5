"""The PyTorch model: T5 with a scalar value head (two checkpoint layouts) and ``detach_head``.

Needs torch and transformers (the ``export`` extra). The sampler and scorer
that run it are in ``t5vh_fast.reference``; loading from a directory is in
``t5vh_fast.checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput

from . import reference
from .weights import HEAD_LAYOUTS, canonical_head_layout


@dataclass
class Seq2SeqLMWithValueOutput(Seq2SeqLMOutput):
    """``Seq2SeqLMOutput`` plus ``value`` (B x T). ``value`` is the last field on
    purpose: ONNX output names are assigned by position and ``value`` comes after
    ``logits`` and ``present.*``."""

    value: Optional[torch.FloatTensor] = None


class ValueHead(nn.Module):
    """A scalar per decoder position, in one of two checkpoint layouts.

    ``logits``: ``state_representation = Linear(vocab_size, 1)`` on the LM logits.
    ``hidden``: ``summary = Linear(d_model, 1)`` on the last decoder hidden state
    (TRL's dropout before it is the identity at inference and is left out).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.layout = canonical_head_layout(getattr(config, "value_head_layout", "logits"))
        if self.layout == "logits":
            self.state_representation = nn.Linear(config.vocab_size, 1)
        else:
            self.summary = nn.Linear(config.d_model, 1)
        self.detached = False

    @property
    def linear(self) -> nn.Linear:
        return self.state_representation if self.layout == "logits" else self.summary

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.detached:
            features = features.detach()
        return self.linear(features).squeeze(-1)


class T5HeadWithValueModel(T5ForConditionalGeneration):
    """T5 language model whose output also carries ``value`` (B x T)."""

    def __init__(self, config: T5Config):
        config.value_head_layout = canonical_head_layout(getattr(config, "value_head_layout", "logits"))
        super().__init__(config)
        self.v_head = ValueHead(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, ValueHead):
            linear = module.linear
            linear.weight.data.normal_(0.0, self.config.initializer_factor * linear.in_features**-0.5)
            linear.bias.data.zero_()
        else:
            super()._init_weights(module)

    @property
    def head_layout(self) -> str:
        """``"logits"`` or ``"hidden"``: what the value head reads."""
        return self.v_head.layout

    def detach_head(self) -> None:
        """From now on the value loss trains only the head: no gradient reaches the T5 body."""
        self.v_head.detached = True

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        head_mask=None,
        decoder_head_mask=None,
        cross_attn_head_mask=None,
        encoder_outputs=None,
        past_key_values=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ) -> Seq2SeqLMWithValueOutput:
        # Same positional order as T5ForConditionalGeneration.forward: Optimum calls it positionally.
        reads_hidden = self.head_layout == "hidden"
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            head_mask=head_mask,
            decoder_head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=True if reads_hidden else output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        features = out.decoder_hidden_states[-1] if reads_hidden else out.logits
        return Seq2SeqLMWithValueOutput(**out, value=self.v_head(features))

    # ------------------------------------------------------------------ the reference sampler and scorer

    def respond_to_batch(self, queries, attention_mask=None, **options):
        """The plain sampler: see ``t5vh_fast.reference.respond`` for the contract and options."""
        return reference.respond(self, queries, attention_mask, **options)

    def score(self, queries, responses, attention_mask=None, response_mask=None, **options):
        """Teacher-forced scoring: see ``t5vh_fast.reference.score`` (``max_query_tokens``)."""
        return reference.score(self, queries, responses, attention_mask, response_mask, **options)


__all__ = ["T5HeadWithValueModel", "ValueHead", "HEAD_LAYOUTS", "canonical_head_layout"]
