"""The PyTorch reference: T5 with a scalar value head, and the seed's plain sampler.

This module needs torch and transformers (the ``export`` extra). The ONNX
runtime reproduces what it computes; the tests hold the two together.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput

from .inputs import as_token_batch, check_sampling_options, check_uniforms
from .results import Rollout, Scores

HEAD_LAYOUTS = ("seed", "trl")
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
_HEAD_KEYS = {
    "seed": ("v_head.state_representation.weight", "v_head.state_representation.bias"),
    "trl": ("v_head.summary.weight", "v_head.summary.bias"),
}


@dataclass
class Seq2SeqLMWithValueOutput(Seq2SeqLMOutput):
    """``Seq2SeqLMOutput`` plus ``value`` (B x T). ``value`` is the last field on
    purpose: ONNX output names are assigned by position and ``value`` comes after
    ``logits`` and ``present.*``."""

    value: Optional[torch.FloatTensor] = None


class ValueHead(nn.Module):
    """A scalar per decoder position, in one of two checkpoint layouts.

    ``seed``: ``state_representation = Linear(vocab_size, 1)`` on the LM logits.
    ``trl``: ``summary = Linear(d_model, 1)`` on the last decoder hidden state
    (TRL's dropout before it is the identity at inference and is left out).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.layout = getattr(config, "value_head_layout", "seed")
        if self.layout not in HEAD_LAYOUTS:
            raise ValueError(f"value_head_layout must be one of {HEAD_LAYOUTS}, got {self.layout!r}")
        if self.layout == "seed":
            self.state_representation = nn.Linear(config.vocab_size, 1)
        else:
            self.summary = nn.Linear(config.d_model, 1)
        self.detached = False

    @property
    def linear(self) -> nn.Linear:
        return self.state_representation if self.layout == "seed" else self.summary

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.detached:
            features = features.detach()
        return self.linear(features).squeeze(-1)


class T5HeadWithValueModel(T5ForConditionalGeneration):
    """T5 language model whose output also carries ``value`` (B x T)."""

    def __init__(self, config: T5Config):
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
        trl = self.head_layout == "trl"
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
            output_hidden_states=True if trl else output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        features = out.decoder_hidden_states[-1] if trl else out.logits
        return Seq2SeqLMWithValueOutput(**out, value=self.v_head(features))

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def respond_to_batch(
        self,
        queries,
        attention_mask=None,
        *,
        txt_len: Optional[int] = None,
        max_length: Optional[int] = None,
        top_k: int = 0,
        top_p: float = 1.0,
        uniforms=None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
    ) -> Rollout:
        """Sample exactly ``txt_len`` tokens per query, the seed's plain way.

        Start from ``decoder_start_token_id``; each step filters the last
        position's logits (top-k, then top-p; 0 and 1.0 turn them off), draws
        one token by inverse CDF from ``uniforms[:, t]`` (or from ``generator``)
        and appends it. Never stops at EOS, never masks EOS, never pads.
        ``max_length`` is the seed's name for ``txt_len``. ``use_cache=False``
        re-runs the whole model on the growing sequence every step, as the seed
        did (the slow baseline).
        """
        txt_len = _resolve_txt_len(txt_len, max_length)
        check_sampling_options(txt_len, top_k, top_p)
        ids, mask = self._batch(queries, attention_mask)
        batch = ids.shape[0]
        u = check_uniforms(uniforms, batch, txt_len)
        if u is None:
            u_t = torch.rand(batch, txt_len, dtype=torch.float64, generator=generator)
        else:
            u_t = torch.from_numpy(u)
        filtering = top_k > 0 or top_p < 1.0

        tokens = torch.empty(batch, txt_len, dtype=torch.long)
        logprobs = torch.empty(batch, txt_len)
        sampling_logprobs = torch.empty(batch, txt_len)
        values = torch.empty(batch, txt_len)
        start = torch.full((batch, 1), self.config.decoder_start_token_id, dtype=torch.long)
        encoder_outputs = self.get_encoder()(input_ids=ids, attention_mask=mask) if use_cache else None
        decoder_input, past = start, None
        for t in range(txt_len):
            if use_cache:
                out = self(
                    encoder_outputs=encoder_outputs,
                    attention_mask=mask,
                    decoder_input_ids=decoder_input,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
            else:
                decoder_input = torch.cat([start, tokens[:, :t]], dim=1)
                out = self(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input, use_cache=False)
            logits = out.logits[:, -1].float()
            _check_finite(logits, t)
            filtered = filter_logits(logits, top_k=top_k, top_p=top_p) if filtering else logits
            token = draw(filtered, u_t[:, t])
            tokens[:, t] = token
            logprobs[:, t] = token_logprobs(logits, token)
            if filtering:
                sampling_logprobs[:, t] = token_logprobs(filtered, token)
            values[:, t] = out.value[:, -1].float()
            decoder_input = token[:, None]
        return Rollout(
            tokens=tokens,
            logprobs=logprobs,
            values=values,
            attention_mask=mask,
            sampling_logprobs=sampling_logprobs if filtering else None,
        )

    @torch.no_grad()
    def score(self, queries, responses, attention_mask=None, response_mask=None) -> Scores:
        """Teacher-forced log-probs, values and entropy of given responses (one pass)."""
        ids, mask = self._batch(queries, attention_mask)
        resp, resp_mask = as_token_batch(
            _to_numpy(responses), _to_numpy(response_mask), vocab_size=self.config.vocab_size, name="response_ids"
        )
        if resp.shape[0] != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} queries but {resp.shape[0]} responses: one response per query")
        resp, resp_mask = torch.from_numpy(resp), torch.from_numpy(resp_mask)
        out = self(input_ids=ids, attention_mask=mask, decoder_input_ids=self._shift_right(resp))
        logits = out.logits.float()
        logz = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, resp[..., None]).squeeze(-1) - logz
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - (probs * logits).sum(-1)
        keep = resp_mask.to(logits.dtype)
        return Scores(
            logprobs=logprobs * keep,
            values=out.value.float() * keep,
            entropy=entropy * keep,
            response_mask=resp_mask,
        )

    def _batch(self, queries, attention_mask):
        ids, mask = as_token_batch(_to_numpy(queries), _to_numpy(attention_mask), vocab_size=self.config.vocab_size)
        device = self.device
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


# ---------------------------------------------------------------------- sampling math (torch)
# The NumPy twins live in t5vh_fast.sampling; the tests hold both to transformers' warpers.


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p, with transformers' TopK/TopPLogitsWarper semantics (one token always kept)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return logits


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw (the RNG contract): the first index whose float64 cumulative
    probability of the renormalised distribution exceeds ``u``."""
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    token = (cdf <= u[:, None] * cdf[:, -1:]).sum(dim=-1)
    overflow = token >= logits.shape[-1]
    if overflow.any():  # u * total rounded up to total: take the last token with mass
        token[overflow] = cdf[overflow].argmax(dim=-1)
    return token


def token_logprobs(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _check_finite(logits: torch.Tensor, step: int) -> None:
    bad = ~torch.isfinite(logits.max(dim=-1).values)
    if bad.any():
        row = int(torch.nonzero(bad)[0])
        raise FloatingPointError(f"non-finite logits (NaN or inf) at step {step}, row {row}: the model is broken")


# ---------------------------------------------------------------------- loading


def load_reference(
    model_dir: Union[str, os.PathLike],
    *,
    strict: bool = False,
    allow_pickle: bool = False,
    head_layout: Optional[str] = None,
) -> T5HeadWithValueModel:
    """Load a T5 value-head model from a local directory (or a hub name where there is a network).

    Only safetensors weights are read unless ``allow_pickle=True`` (``.bin``
    files are pickles: never unpickle a file you did not make). The head layout
    is taken from the checkpoint's keys, else from the config, else ``seed``.
    Missing head weights are initialised freshly with a warning naming them;
    ``strict=True`` makes that an error.
    """
    path = resolve_model_dir(model_dir)
    config = read_t5_config(path)
    weights = _weight_files(path, allow_pickle=allow_pickle)
    keys = _checkpoint_keys(weights)
    layout = head_layout or _layout_from_keys(keys) or getattr(config, "value_head_layout", None) or "seed"
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {layout!r}")
    config.value_head_layout = layout
    use_safetensors = weights[0].suffix == ".safetensors" or weights[0].name.endswith(".safetensors.index.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = T5HeadWithValueModel.from_pretrained(
                path, config=config, use_safetensors=use_safetensors, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    if missing:
        body = [k for k in missing if not k.startswith("v_head.")]
        msg = f"{path}: weights missing from the checkpoint and freshly initialised: {missing}"
        if strict or body:
            raise ValueError(msg + (" (strict mode)" if strict else " (the T5 body must be complete)"))
        warnings.warn(msg + "; train the value head before trusting its values", stacklevel=2)
    model.eval()
    return model


def resolve_model_dir(model_dir) -> Path:
    """A local directory, or a hub name fetched where a network exists."""
    path = Path(model_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file, not a model directory")
    name = str(model_dir)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
            )
        except Exception as exc:  # offline, unknown repo, ...
            raise FileNotFoundError(
                f"{name} is not a local directory and could not be fetched from the hub ({type(exc).__name__}): "
                "pass the path of a saved model directory"
            ) from None
    raise FileNotFoundError(f"model directory not found: {path}")


def read_t5_config(path: Path) -> T5Config:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: is it a saved model directory?")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{path} holds a {model_type!r} model; t5vh_fast supports T5-family seq2seq models only "
            f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}: T5 v1.0, T5 v1.1, Flan-T5, mT5)"
        )
    if model_type == "mt5":
        from transformers import MT5Config

        return MT5Config.from_pretrained(path)
    return T5Config.from_pretrained(path)


def _weight_files(path: Path, *, allow_pickle: bool) -> list:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (path / name).is_file():
            return [path / name]
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            if allow_pickle:
                return [path / name]
            raise ValueError(
                f"{path} has only {name}, a pickle file, and pickles are not loaded by default "
                "(they can run code). Convert it to safetensors, or pass allow_pickle=True "
                "(--allow-pickle) if you trust where it came from."
            )
    raise FileNotFoundError(f"{path} has no weights file (model.safetensors)")


def _checkpoint_keys(weights: list) -> set:
    first = weights[0]
    if first.name.endswith(".index.json"):
        return set(json.loads(first.read_text())["weight_map"])
    if first.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(first), framework="pt") as f:
            return set(f.keys())
    return set(torch.load(first, map_location="cpu", weights_only=True))  # opted in, weights only


def _layout_from_keys(keys: set) -> Optional[str]:
    for layout, head_keys in _HEAD_KEYS.items():
        if head_keys[0] in keys:
            return layout
    return None


def _resolve_txt_len(txt_len, max_length):
    if txt_len is not None and max_length is not None and txt_len != max_length:
        raise ValueError(f"txt_len={txt_len} and max_length={max_length} disagree: pass one of them")
    return 20 if txt_len is None and max_length is None else (txt_len if txt_len is not None else max_length)


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


__all__ = [
    "T5HeadWithValueModel",
    "ValueHead",
    "load_reference",
    "filter_logits",
    "draw",
    "token_logprobs",
]
