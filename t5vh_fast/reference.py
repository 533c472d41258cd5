"""The PyTorch reference sampler and scorer: the oracle the ONNX runtime is held to.

``respond`` is the plain sampler (see ``docs/contract.md``): exactly
``txt_len`` tokens, never stopping at or masking EOS, one inverse-CDF draw per
row per step. The torch sampling math here is written independently of the
NumPy copy in ``t5vh_fast.sampling`` (same signatures, same messages) so that
the tests compare two implementations, not one with itself.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import NonFiniteError
from .inputs import (
    DEFAULT_MAX_QUERY_TOKENS,
    as_token_batch,
    check_num_samples,
    check_query_length,
    check_response_batch,
    check_sampling_options,
    check_uniforms,
    resolve_txt_len,
)
from .results import Rollout, Scores

# ---------------------------------------------------------------------- sampling math (torch)


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p, decided by value (the tie rule of ``docs/contract.md``; one token always kept).

    Top-k keeps every token whose logit is >= the k-th largest (ties at the
    boundary all kept), as transformers' ``TopKLogitsWarper`` does. Top-p sorts
    the logits ascending, removes the prefix whose cumulative probability is
    <= 1 - top_p (never the largest), and keeps every token whose logit is >=
    the smallest kept *value*: tokens tied with it are all kept, where
    transformers' ``TopPLogitsWarper`` keeps or drops them by sort order.
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits = torch.sort(logits, dim=-1).values
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1] = False
        smallest_kept = sorted_logits.gather(-1, remove.sum(dim=-1, keepdim=True))  # `remove` is a prefix
        logits = logits.masked_fill(logits < smallest_kept, -float("inf"))
    return logits


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The RNG contract: the first index whose float64 cumulative probability of the
    renormalised distribution exceeds ``u`` (one uniform per row)."""
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    token = (cdf <= u[:, None] * cdf[:, -1:]).sum(dim=-1)
    overflow = token >= logits.shape[-1]
    if overflow.any():  # u * total rounded up to total: take the last token with mass
        token[overflow] = cdf[overflow].argmax(dim=-1)
    return token


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp."""
    return torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, token: torch.Tensor, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p(token) per row; pass ``lse`` (``logsumexp(logits)``) when it is already known."""
    if lse is None:
        lse = logsumexp(logits)
    return logits.gather(-1, token[:, None]).squeeze(-1) - lse


def check_finite(lse: torch.Tensor, step: int) -> None:
    """A NaN or +inf anywhere in a row makes its log-sum-exp non-finite: fail loudly."""
    bad = torch.nonzero(~torch.isfinite(lse))
    if len(bad):
        raise NonFiniteError(
            f"non-finite logits (NaN or inf) at step {step}, row {int(bad[0])}: "
            "the model or its export is broken (fp16 overflow?); refusing to sample garbage"
        )


# ---------------------------------------------------------------------- the sampler and the scorer


@torch.no_grad()
def respond(
    model,
    queries,
    attention_mask=None,
    *,
    txt_len: Optional[int] = None,
    max_length: Optional[int] = None,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    uniforms=None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
) -> Rollout:
    """Sample exactly ``txt_len`` tokens per query with the plain sampler.

    ``queries``: B x S right-padded token ids (tensor, array or nested lists),
    ``attention_mask`` B x S (1 = token, 0 = padding; all ones when omitted).
    Start from ``decoder_start_token_id``; each step filters the last
    position's logits (top-k, then top-p; 0 and 1.0 turn them off), draws one
    token by inverse CDF from ``uniforms[:, t]`` (B x txt_len float64 in [0, 1))
    or from ``generator``, and appends it. Never stops at EOS, never masks EOS,
    never pads. ``max_length`` is the old name of ``txt_len`` (default 20).
    ``num_samples`` responses are drawn per query, query-major (the reference
    simply repeats each query; the runtime shares its encoder pass), with one
    row of ``uniforms`` per response.
    ``use_cache=False`` re-runs the whole model on the growing sequence every
    step (the slow original loop, kept as a baseline). Queries longer than
    ``max_query_tokens`` are refused.

    Returns a ``Rollout`` of torch tensors: tokens, log-probs under the
    unfiltered distribution, values, and (with filtering) the log-probs under
    the filtered one.
    """
    txt_len = resolve_txt_len(txt_len, max_length)
    check_sampling_options(txt_len, top_k, top_p)
    check_num_samples(num_samples)
    query_ids, query_mask = _batch(model, queries, attention_mask, max_query_tokens)
    ids, mask = query_ids.repeat_interleave(num_samples, 0), query_mask.repeat_interleave(num_samples, 0)
    batch = ids.shape[0]
    u = check_uniforms(uniforms, query_ids.shape[0], txt_len, num_samples)
    if u is None:
        u_t = torch.rand(batch, txt_len, dtype=torch.float64, generator=generator)
    else:
        u_t = torch.from_numpy(u)
    u_t = u_t.to(ids.device)  # the model's device (a GPU too); the results come back on the CPU
    filtering = top_k > 0 or top_p < 1.0

    tokens = torch.empty(batch, txt_len, dtype=torch.long, device=ids.device)
    logprobs = torch.empty(batch, txt_len, device=ids.device)
    sampling_logprobs = torch.empty(batch, txt_len, device=ids.device)
    values = torch.empty(batch, txt_len, device=ids.device)
    start = torch.full((batch, 1), model.config.decoder_start_token_id, dtype=torch.long, device=ids.device)
    encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask) if use_cache else None
    decoder_input, past = start, None
    for t in range(txt_len):
        if use_cache:
            out = model(
                encoder_outputs=encoder_outputs,
                attention_mask=mask,
                decoder_input_ids=decoder_input,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
        else:
            decoder_input = torch.cat([start, tokens[:, :t]], dim=1)
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input, use_cache=False)
        logits = out.logits[:, -1].float()
        lse = logsumexp(logits)
        check_finite(lse, t)
        filtered = filter_logits(logits, top_k=top_k, top_p=top_p) if filtering else logits
        token = draw(filtered, u_t[:, t])
        tokens[:, t] = token
        logprobs[:, t] = token_logprobs(logits, token, lse)
        if filtering:
            sampling_logprobs[:, t] = token_logprobs(filtered, token)
        values[:, t] = out.value[:, -1].float()
        decoder_input = token[:, None]
    return Rollout(
        tokens=tokens.cpu(),
        logprobs=logprobs.cpu(),
        values=values.cpu(),
        attention_mask=query_mask.cpu(),
        sampling_logprobs=sampling_logprobs.cpu() if filtering else None,
        query_index=torch.arange(query_ids.shape[0]).repeat_interleave(num_samples),
        precision=_precision(model),
    )


@torch.no_grad()
def score(
    model, queries, responses, attention_mask=None, response_mask=None, *, max_query_tokens=DEFAULT_MAX_QUERY_TOKENS
) -> Scores:
    """Teacher-forced log-probs, values and entropy of given responses, in one forward pass.

    ``responses``: R x T right-padded token ids, ``response_mask`` R x T (all
    ones when omitted); R may be a multiple of the B queries (the responses of
    each query together, query-major). Returns ``Scores`` of torch tensors, 0
    where masked; raises ``NonFiniteError`` naming the row when a number is NaN or inf.
    """
    ids, mask = _batch(model, queries, attention_mask, max_query_tokens)
    resp, resp_mask, num_samples = check_response_batch(
        _to_numpy(responses), _to_numpy(response_mask), queries=ids.shape[0], vocab_size=model.config.vocab_size
    )
    ids, mask = ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
    resp, resp_mask = torch.from_numpy(resp).to(ids.device), torch.from_numpy(resp_mask).to(ids.device)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=model._shift_right(resp))
    logits = out.logits.float()
    logz = logsumexp(logits)
    logprobs = logits.gather(-1, resp[..., None]).squeeze(-1) - logz
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    values = out.value.float()
    keep = resp_mask.bool()
    bad = keep & ~(torch.isfinite(logprobs) & torch.isfinite(values) & torch.isfinite(entropy))
    if bad.any():
        row, position = map(int, torch.nonzero(bad)[0])
        raise NonFiniteError(
            f"non-finite logits or value (NaN or inf) at row {row}, response position {position}: "
            "the model or its export is broken (fp16 overflow?); refusing to score garbage",
            row=row,
        )
    return Scores(
        logprobs=logprobs.masked_fill(~keep, 0.0).cpu(),
        values=values.masked_fill(~keep, 0.0).cpu(),
        entropy=entropy.masked_fill(~keep, 0.0).cpu(),
        response_mask=resp_mask.cpu(),
        precision=_precision(model),
    )


def _precision(model) -> str:
    names = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
    return names.get(str(model.dtype), str(model.dtype))


def _batch(model, queries, attention_mask, max_query_tokens):
    ids, mask = as_token_batch(_to_numpy(queries), _to_numpy(attention_mask), vocab_size=model.config.vocab_size)
    check_query_length(ids, max_query_tokens)
    device = model.device
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x
