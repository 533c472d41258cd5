"""Post-export check: every graph under onnxruntime against the PyTorch model.

Inputs are seeded: a batch of right-padded queries of different lengths and a
few decoder tokens, run teacher-forced through the first-step graph and step
by step through the KV cache (and, for the single layout, the queries through the
packed encoder and teacher-forced rows of different lengths through the packed
scoring decoder). Tolerance (docs/contract.md, "Parity, defined"):
``1e-4 * max(1, max |reference|)`` per tensor compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..decoder import open_decoder
from ..manifest import (
    DECODER,
    DECODER_GRAPH,
    DECODER_MERGED,
    DECODER_WITH_PAST,
    ENCODER,
    ENCODER_GRAPH,
    PACKED_ENCODER_GRAPH,
    PACKED_GRAPH,
)

TOLERANCE = "1e-4 * max(1, max|reference|)"


def tolerance(reference: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


def _compare(name: str, onnx_value: np.ndarray, reference: np.ndarray, report: dict) -> None:
    """Keep the running max |diff| and tolerance of ``name``; a NaN or inf on either side counts as inf."""
    if np.isfinite(onnx_value).all() and np.isfinite(reference).all():
        diff, tol = float(np.abs(onnx_value - reference).max()), tolerance(reference)
    else:
        diff, tol = float("inf"), 0.0
    report[f"{name}_max_abs_diff"] = max(report.get(f"{name}_max_abs_diff", 0.0), diff)
    report[f"{name}_tol"] = max(report.get(f"{name}_tol", 0.0), tol)


def seeded_inputs(vocab_size: int, *, seed: int = 0, lengths=(9, 5, 7), steps: int = 4):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, vocab_size, size=n)
        ids[row, n - 1] = 1  # </s>
        mask[row, :n] = 1
    decoder_ids = rng.integers(3, vocab_size, size=(len(lengths), steps))
    return ids, mask, decoder_ids


# per layout: (encoder graph, decoder graph of the first step, decoder graph of later steps)
LAYOUT_GRAPHS = {
    "single": (ENCODER_GRAPH, DECODER_GRAPH, DECODER_GRAPH),
    "split": (ENCODER, DECODER, DECODER_WITH_PAST),
    "merged": (ENCODER, DECODER_MERGED, DECODER_MERGED),
}


def check_export(model, root: Path, *, layouts=("single", "split", "merged"), seed: int = 0) -> dict:
    """Max |diff| of the encoder's output, logits and values per graph file; each entry has ``ok``."""
    config = model.config
    ids, mask, decoder_ids = seeded_inputs(config.vocab_size, seed=seed)
    decoder_ids[:, 0] = config.decoder_start_token_id
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            decoder_input_ids=torch.from_numpy(decoder_ids),
        )
    ref_hidden = ref.encoder_last_hidden_state
    ref_logits, ref_values = ref.logits.float().numpy(), ref.value.float().numpy()
    batch, steps = decoder_ids.shape

    report = {}
    for layout in layouts:
        encoder_graph, first, later = LAYOUT_GRAPHS[layout]
        for graph in (encoder_graph, first, later):
            report.setdefault(graph, {})
        packed = layout == "single" and (root / PACKED_GRAPH).is_file()
        decoder = open_decoder(root, layout, providers="cpu", **({"packed": True} if packed else {}))
        if layout == "single" and (root / PACKED_ENCODER_GRAPH).is_file():  # what the CPU runs, padding removed
            report.setdefault(PACKED_ENCODER_GRAPH, {})
            packed_encoder = open_decoder(root, layout, providers="cpu", packed_encoder=True, lazy_decoder=True)
            state = packed_encoder.encode(ids, mask, capacity=None)
            _compare_cross_kv(state, model, ref_hidden, mask, report[PACKED_ENCODER_GRAPH])
        if packed:  # teacher-forced rows of different lengths, padding removed (what scoring does on the CPU)
            report.setdefault(PACKED_GRAPH, {})
            lengths = np.maximum(steps - np.arange(batch), 1)
            real = np.flatnonzero(np.arange(steps)[None, :] < lengths[:, None])
            state = decoder.encode(ids, mask, capacity=None)
            logits, values = decoder.packed_scores(state, decoder_ids, lengths, real)
            _compare("logits", logits, ref_logits.reshape(batch * steps, -1)[real], report[PACKED_GRAPH])
            _compare("values", values, ref_values.reshape(-1)[real], report[PACKED_GRAPH])
        state = decoder.encode(ids, mask, capacity=steps)
        if layout == "single":
            _compare_cross_kv(state, model, ref_hidden, mask, report[encoder_graph])
        else:
            _compare("hidden", state.encoder_hidden.numpy(), ref_hidden.numpy(), report[encoder_graph])
        # teacher-forced, all positions at once (what scoring does)
        logits, values, _ = decoder.step(state, decoder_ids)
        _compare("logits", logits.reshape(batch, steps, -1), ref_logits, report[first])
        _compare("values", values.reshape(batch, steps), ref_values, report[first])
        # step by step through the KV cache (what sampling does)
        for t in range(steps):
            logits, values, state = decoder.step(state, decoder_ids[:, t : t + 1])
            graph = first if t == 0 else later
            _compare("logits", logits, ref_logits[:, t], report[graph])
            _compare("values", values, ref_values[:, t], report[graph])
    for entry in report.values():
        entry["ok"] = all(entry[k] <= entry[k.replace("max_abs_diff", "tol")] for k in entry if k.endswith("diff"))
    return report


def _compare_cross_kv(state, model, hidden, mask, report: dict) -> None:
    """The cross K/V of an encoder's ``state`` against PyTorch's, at the queries' tokens (not their padding)."""
    for name, value, reference in zip(("key", "value") * len(state.cross_kv), state.cross_kv, _cross_kv(model, hidden)):
        _compare(f"cross_{name}", value.numpy() * mask[:, None, :, None], reference * mask[:, None, :, None], report)


def _cross_kv(model, hidden) -> list:
    """PyTorch's cross-attention keys and values of every decoder layer (B x H x S x d_kv), in order."""
    config = model.config
    out = []
    with torch.no_grad():
        for block in model.decoder.block:
            attention = block.layer[1].EncDecAttention
            for projection in (attention.k, attention.v):
                x = projection(hidden)
                out.append(x.view(x.shape[0], x.shape[1], config.num_heads, config.d_kv).transpose(1, 2).numpy())
    return out


def format_report(report: dict) -> str:
    lines = []
    for graph, entry in report.items():
        parts = [
            f"{k.replace('_max_abs_diff', '')} {entry[k]:.2e} (tol {entry[k.replace('max_abs_diff', 'tol')]:.1e})"
            for k in entry
            if k.endswith("diff")
        ]
        lines.append(f"  {graph:30s} {'ok  ' if entry['ok'] else 'FAIL'} " + ", ".join(parts))
    return "\n".join(lines)
