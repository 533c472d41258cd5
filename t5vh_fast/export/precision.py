"""Reduced precision: which sublayers fp16 must keep in fp32, and the precision-gap report.

The report measures what a reduced-precision export costs in distribution,
against the fp32 PyTorch model, on a fixed probe: rollouts sampled from the
fp32 model (shared uniforms), then, on those tokens, teacher-forced:

- per-token KL(p_fp32 || p_prec) over the full vocabulary (mean, max);
- token agreement: the reduced-precision sampler run with the same uniforms,
  the share of tokens equal to the fp32 model's (all tokens, and the first
  token: once a row's tokens differ, the rest of the row is a different
  rollout, so the first-token share is the per-step agreement);
- max |delta log-prob| of the sampled tokens and max |delta value|;
- importance ratios p_fp32 / p_prec of the sampled tokens (mean, min, max,
  share outside [0.8, 1.25]): what a PPO trainer that samples with the fast
  model and trains on fp32 numbers multiplies by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..decoder import open_decoder
from ..errors import NonFiniteError
from ..providers import CPU
from ..rollout import respond
from ..sampling import exp_weights

FP16_MAX = 65504.0
# a sublayer whose activations on the probe reach this share of fp16's range computes in fp32
FP16_HEADROOM = 1 / 8
# precisions whose kernels this CPU provider has (bf16: CUDA/TensorRT only)
CPU_PRECISIONS = ("fp32", "int8", "fp16")
RATIO_BAND = (0.8, 1.25)
# onnxruntime's CPU provider runs most fp16 nodes through fp32 kernels (it inserts casts): there the
# report sees fp16's weight rounding, not its arithmetic; a GPU run (benchmarks/gpu_check) sees both
_FP16_ON_CPU = " (fp16 weights; onnxruntime computes fp16 nodes in fp32 there: activation rounding shows on a GPU)"


def probe(vocab_size: int, *, rows: int = 16, txt_len: int = 24, seed: int = 1234):
    """The fixed probe: right-padded random queries of 6-24 tokens ending in </s>, and the uniforms."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 25, size=rows)
    ids = np.zeros((rows, lengths.max()), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, vocab_size, size=n)
        ids[row, n - 1] = 1
        mask[row, :n] = 1
    return ids, mask, rng.random((rows, txt_len))


def sublayer_peaks(model, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray) -> Dict[str, float]:
    """The largest |activation| entering or leaving each sublayer's linear layers, fp32, on the probe."""
    peaks: Dict[str, float] = {}
    handles = []

    def watch(name, module):
        def hook(_, inputs, output):
            peak = max(float(inputs[0].detach().abs().max()), float(output.detach().abs().max()))
            peaks[name] = max(peaks.get(name, 0.0), peak)

        for linear in module.modules():
            if isinstance(linear, torch.nn.Linear):
                handles.append(linear.register_forward_hook(hook))

    for i, block in enumerate(model.encoder.block):
        watch(f"encoder.{i}.attn", block.layer[0])
        watch(f"encoder.{i}.ff", block.layer[1])
    for i, block in enumerate(model.decoder.block):
        watch(f"decoder.{i}.self", block.layer[0])
        watch(f"decoder.{i}.cross", block.layer[1])
        watch(f"decoder.{i}.ff", block.layer[2])
    watch("lm_head", model.lm_head)
    try:
        with torch.no_grad():
            model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                decoder_input_ids=model._shift_right(torch.from_numpy(tokens)),
            )
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def fp16_keep(peaks: Dict[str, float]) -> tuple:
    """The sublayers whose activations come within ``FP16_HEADROOM`` of fp16's range: they stay fp32."""
    return tuple(sorted(name for name, peak in peaks.items() if peak > FP16_MAX * FP16_HEADROOM))


def fp32_rollout(model, ids, mask, uniforms):
    """The probe's rollouts from the fp32 PyTorch model."""
    return model.respond_to_batch(ids, mask, txt_len=uniforms.shape[1], uniforms=uniforms)


def precision_gap(
    model, root: Path, precision: str, ids, mask, uniforms, reference_rollout, *, providers: Optional[list] = None
) -> dict:
    """The report for the single layout in ``root`` at ``precision`` (see the module docstring).

    ``providers``: onnxruntime's, as ``load`` takes them resolved (default: the CPU, where bf16 is not
    measured). Raises ``NonFiniteError`` when the reduced-precision graphs give NaN or inf on the probe.
    """
    providers = providers or [CPU]
    on_cpu = providers[0] == CPU
    if on_cpu and precision not in CPU_PRECISIONS:
        return {
            "measured": False,
            "why": f"not measured here: onnxruntime's CPU provider has no {precision} kernels; "
            "needs a GPU (benchmarks/gpu_check measures it)",
        }
    decoder = open_decoder(root, "single", providers=providers)
    tokens = reference_rollout.tokens.numpy()
    rows, length = tokens.shape
    start = np.full((rows, 1), model.config.decoder_start_token_id, dtype=np.int64)
    state = decoder.encode(ids, mask, capacity=length)
    logits, values, _ = decoder.step(state, np.concatenate([start, tokens[:, :-1]], axis=1))
    if not (np.isfinite(logits).all() and np.isfinite(values).all()):
        raise NonFiniteError(
            f"the {precision} graphs give NaN or inf logits or values on the probe: reduced precision overflows "
            "for this model; export bf16 (fp32's range) or fp32 instead"
        )
    ref_logits, ref_values = teacher_forced(model, ids, mask, tokens)
    ours = respond(
        decoder,
        ids,
        mask,
        decoder_start_token_id=model.config.decoder_start_token_id,
        txt_len=length,
        uniforms=uniforms,
    )
    return {
        "measured": True,
        "measured_on": ("CPU" + (_FP16_ON_CPU if precision == "fp16" else "")) if on_cpu else providers[0],
        "probe": {"rows": int(rows), "tokens_per_row": int(length), "sampled_from": "fp32 PyTorch model"},
        **gap_stats(ref_logits, logits, tokens),
        "token_agreement": float((ours.tokens == tokens).mean()),
        "first_token_agreement": float((ours.tokens[:, 0] == tokens[:, 0]).mean()),
        "max_abs_value_diff": float(np.abs(values - ref_values).max()),
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    return logits - exp_weights(logits)[2][:, None]


def format_gap(report: dict, keep: Optional[tuple] = None) -> str:
    """The report as the lines ``t5vh-export`` prints."""
    lines = []
    if keep is not None:
        lines.append(f"  kept in fp32 (activations near fp16's range): {', '.join(keep) or 'none'}")
    if not report.get("measured"):
        return "\n".join(lines + [f"  {report.get('why', 'not measured')}"])
    lines += [
        f"  measured on the {report['measured_on']}",
        f"  KL(fp32 || this) per token: mean {report['kl_mean']:.2e}, max {report['kl_max']:.2e}",
        f"  token agreement with fp32 under shared uniforms: {report['token_agreement']:.1%} "
        f"(first token {report['first_token_agreement']:.1%})",
        f"  max |delta logprob| {report['max_abs_logprob_diff']:.2e}, max |delta value| {report['max_abs_value_diff']:.2e}",
        f"  importance ratio p_fp32/p: mean {report['ratio_mean']:.4f}, min {report['ratio_min']:.4f}, "
        f"max {report['ratio_max']:.4f}, outside [{report['ratio_band'][0]}, {report['ratio_band'][1]}]: "
        f"{report['ratio_outside_band']:.2%}",
    ]
    return "\n".join(lines)


def teacher_forced(model, ids, mask, tokens):
    """The fp32 PyTorch model's logits ((rows x T) x V) and values (rows x T) on ``tokens``."""
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            decoder_input_ids=model._shift_right(torch.from_numpy(tokens)),
        )
    return ref.logits.float().numpy().reshape(tokens.size, -1), ref.value.float().numpy().reshape(-1)


def gap_stats(ref_logits: np.ndarray, logits: np.ndarray, tokens: np.ndarray) -> dict:
    """KL(p_ref || p) per position, and |delta log-prob| and the ratios p_ref / p of the sampled ``tokens``.

    ``ref_logits``, ``logits``: (rows x T) x V; ``tokens``: rows x T.
    """
    ref_logp, logp = _log_softmax(ref_logits), _log_softmax(logits)
    kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)
    flat = tokens.reshape(-1)
    delta = ref_logp[np.arange(flat.size), flat] - logp[np.arange(flat.size), flat]
    ratio = np.exp(delta)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_abs_logprob_diff": float(np.abs(delta).max()),
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "ratio_outside_band": float(((ratio < RATIO_BAND[0]) | (ratio > RATIO_BAND[1])).mean()),
        "ratio_band": list(RATIO_BAND),
    }
