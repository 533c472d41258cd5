"""The respond_to_batch loop: encoder once, then one decoder call per new token."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .decoder import OnnxDecoder
from .inputs import check_num_samples, check_sampling_options, check_seed, check_uniforms
from .results import Rollout
from .sampling import check_finite, draw, exp_weights, filter_logits, token_logprobs


def respond(
    decoder: OnnxDecoder,
    ids: np.ndarray,
    mask: np.ndarray,
    *,
    decoder_start_token_id: int,
    txt_len: int,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: Optional[int] = None,
    uniforms=None,
    callback: Optional[Callable[[int, np.ndarray], None]] = None,
    precision: str = "fp32",
    weights_version: Optional[str] = None,
) -> Rollout:
    """Sample exactly ``txt_len`` tokens per response (the contract is in ``docs/contract.md``).

    ``ids``/``mask`` are checked B x S int64 arrays; ``num_samples`` responses
    are drawn per query (R = B x num_samples rows, query-major), the encoder
    running once per query. The decoder runs exactly ``txt_len`` times: the
    last token is drawn from the last call's logits. ``callback(t, tokens)`` is
    called after step ``t`` with that step's R tokens.
    """
    check_sampling_options(txt_len, top_k, top_p)
    check_num_samples(num_samples)
    check_seed(seed)
    batch = ids.shape[0] * num_samples
    u = check_uniforms(uniforms, ids.shape[0], txt_len, num_samples)
    rng = np.random.Generator(np.random.PCG64(seed)) if u is None else None
    filtering = top_k > 0 or top_p < 1.0
    in_graph = getattr(decoder, "draws_in_graph", None)
    on_device = not filtering and in_graph is not None and in_graph(batch)  # the sampler graph draws

    tokens = np.empty((batch, txt_len), dtype=np.int64)
    logprobs = np.empty((batch, txt_len), dtype=np.float32)
    values = np.empty((batch, txt_len), dtype=np.float32)
    sampling_logprobs = np.empty((batch, txt_len), dtype=np.float32) if filtering else None

    state = decoder.encode(ids, mask, num_samples=num_samples, capacity=txt_len)
    step_input = np.full((batch, 1), decoder_start_token_id, dtype=np.int64)
    weights = f_weights = None  # each step's exp pass writes into the previous step's arrays
    for t in range(txt_len):
        step_u = u[:, t] if u is not None else rng.random(batch)
        if on_device:
            token, logprob, lse, value, state = decoder.draw_step(state, step_input, step_u)
            check_finite(lse, t)
        else:
            logits, value, state = decoder.step(state, step_input)
            weights, block_sums, lse = exp_weights(logits, out=weights)
            check_finite(lse, t)
            if filtering:
                filtered = filter_logits(logits, top_k=top_k, top_p=top_p)
                f_weights, f_block_sums, f_lse = exp_weights(filtered, out=f_weights)
                token = draw(filtered, step_u, f_weights, f_block_sums)
                sampling_logprobs[:, t] = token_logprobs(filtered, token, f_lse)
            else:
                token = draw(logits, step_u, weights, block_sums)
            logprob = token_logprobs(logits, token, lse)
        tokens[:, t], logprobs[:, t], values[:, t] = token, logprob, value
        step_input = token[:, None]
        if callback is not None:
            callback(t, token)
    return Rollout(
        tokens=tokens,
        logprobs=logprobs,
        values=values,
        attention_mask=mask,
        sampling_logprobs=sampling_logprobs,
        query_index=np.repeat(np.arange(ids.shape[0]), num_samples),
        precision=precision,
        weights_version=weights_version,
    )
