"""The systems ``t5vh-bench`` compares, and how each one samples and scores.

A system is one engine at one precision. ``sampler(system, spec)`` returns
``run(ids, n) -> (tokens, clock or None)``; ``scorer(system, spec)`` returns
``score(batch) -> response tokens scored``, a batch being a list of
``(query_ids, response_ids)`` pairs. Everything heavy is imported inside the
function that needs it: each system runs in its own process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict


@dataclass(frozen=True)
class System:
    """One engine at one precision."""

    description: str  # what runs, for the table's legend
    precision: str  # fp32, int8, ...
    baseline: str  # the t5vh system it is compared with (same precision and device)
    gpu: bool = False  # needs a GPU
    ct2: bool = False  # needs CTranslate2 (the bench extra)
    score: bool = False  # also in the scoring workload


SYSTEMS: Dict[str, System] = {
    "torch-nocache": System(
        "PyTorch reference, no KV cache (the plain sampler re-running the model on the whole prefix)", "fp32", "t5vh"
    ),
    "torch": System("PyTorch reference with KV cache (and its teacher-forced score())", "fp32", "t5vh", score=True),
    "hf-generate": System("transformers generate(do_sample=True), unreachable eos_token_id", "fp32", "t5vh"),
    "optimum": System("Optimum ORTModelForSeq2SeqLM.generate on the same export", "fp32", "t5vh"),
    "t5vh": System("t5vh ONNX runtime, CPU, single layout (the default)", "fp32", "t5vh", score=True),
    "t5vh-split": System("t5vh ONNX runtime, CPU, Optimum's split graphs (the previous default)", "fp32", "t5vh"),
    "t5vh-int8": System("t5vh ONNX runtime, CPU, int8 export", "int8", "t5vh-int8", score=True),
    "t5vh-cuda": System("t5vh ONNX runtime, CUDA, fp32, TF32 off", "fp32", "t5vh-cuda", gpu=True),
    "torch-cuda": System(
        "transformers generate(do_sample=True) on CUDA, fp32 (TF32 off), unreachable eos_token_id",
        "fp32",
        "t5vh-cuda",
        gpu=True,
    ),
    "optimum-cuda": System(
        "Optimum ORTModelForSeq2SeqLM.generate on CUDAExecutionProvider (TF32 off), same export",
        "fp32",
        "t5vh-cuda",
        gpu=True,
    ),
    "ct2": System(
        "CTranslate2 fp32 (translate_batch, end_token=[]; score_batch)", "fp32", "t5vh", ct2=True, score=True
    ),
    "ct2-int8": System(
        "CTranslate2 int8 (translate_batch, end_token=[]; score_batch)", "int8", "t5vh-int8", ct2=True, score=True
    ),
}
GPU_SYSTEMS = tuple(name for name, s in SYSTEMS.items() if s.gpu)
SCORE_SYSTEMS = tuple(name for name, s in SYSTEMS.items() if s.score)


def available_systems(workload: str = "sample") -> list:
    """The systems that can run here for a workload: the GPU ones only where a GPU is found."""
    from ..providers import cuda_device_present

    names = SCORE_SYSTEMS if workload == "score" else tuple(SYSTEMS)
    gpu = any(SYSTEMS[n].gpu for n in names) and cuda_device_present()
    ct2 = importlib.util.find_spec("ctranslate2") is not None
    return [n for n in names if (gpu or not SYSTEMS[n].gpu) and (ct2 or not SYSTEMS[n].ct2)]


def why_unavailable(system: str, workload: str = "sample") -> str:
    """Why ``available_systems`` leaves ``system`` out."""
    if workload == "score" and system not in SCORE_SYSTEMS:
        return f"not in the scoring workload (those are {', '.join(SCORE_SYSTEMS)})"
    if SYSTEMS[system].gpu:
        return "no GPU found"
    return "needs CTranslate2: pip install t5vh_fast[bench]"


class StepClock:
    """Timestamps of decoder calls: step times, and time to the first token."""

    def __init__(self):
        self.marks = []

    def mark(self, *args, **kwargs):
        self.marks.append(time.perf_counter())

    def steps(self, end: float):
        marks = self.marks + [end]
        return [b - a for a, b in zip(marks[:-1], marks[1:])]


def _policy(system: str, spec: dict, *, for_scoring: bool = False):
    import t5vh_fast

    if system == "t5vh-int8":
        return t5vh_fast.load(spec["int8_dir"], providers="cpu", threads=spec["threads"], for_scoring=for_scoring)
    return t5vh_fast.load(
        spec["export_dir"],
        providers="cuda" if system == "t5vh-cuda" else "cpu",
        threads=spec["threads"],
        decoder="split" if system == "t5vh-split" else None,
        for_scoring=for_scoring,
    )


def sampler(system: str, spec: dict):
    """A function ``run(ids, n) -> (tokens, clock or None)`` for ``system``."""
    import numpy as np

    threads, model_dir = spec["threads"], Path(spec["model_dir"])
    if system.startswith("t5vh"):
        policy = _policy(system, spec)

        def run(ids, n):
            clock = StepClock()  # a mark as each step starts: before the first, then after every step but the last

            def step_done(t, tokens):
                if t < n - 1:
                    clock.mark()

            clock.mark()
            return policy.respond_to_batch(ids, txt_len=n, seed=0, callback=step_done).tokens, clock

        return run

    if system.startswith("ct2"):
        translator, vocab = _ct2_translator(system, spec)
        index = {token: i for i, token in enumerate(vocab)}

        def run(ids, n):
            source = [[vocab[i] for i in row] for row in ids.tolist()]
            results = translator.translate_batch(
                source,
                beam_size=1,
                sampling_topk=0,
                sampling_temperature=1.0,
                max_decoding_length=n,
                end_token=[],
                return_end_token=True,
            )
            return np.array([[index[t] for t in r.hypotheses[0]] for r in results]), None

        return run

    import torch

    if system in ("optimum", "optimum-cuda"):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        on_gpu = system == "optimum-cuda"
        model = ORTModelForSeq2SeqLM.from_pretrained(
            spec["export_dir"],
            session_options=options,
            provider="CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider",
            provider_options={"use_tf32": "0"} if on_gpu else None,  # fp32 against fp32
        )

        def run(ids, n):
            return _generate(model, torch.from_numpy(ids).to(model.device), n), None

        return run

    model = _torch_model(system, model_dir, threads)

    def run(ids, n):
        clock = StepClock()
        handle = model.register_forward_pre_hook(clock.mark)
        ids = torch.from_numpy(ids).to(model.device)
        try:
            if system in ("hf-generate", "torch-cuda"):
                with torch.no_grad():
                    return _generate(model, ids, n), clock
            rollout = model.respond_to_batch(ids, txt_len=n, use_cache=system == "torch")
            return rollout.tokens.numpy(), clock
        finally:
            handle.remove()

    return run


def _generate(model, ids, n: int):
    """``generate`` sampling exactly ``n`` tokens from the unfiltered distribution: its EOS is the vocabulary size,
    an id the model cannot produce (``min_new_tokens`` would mask EOS instead). The new tokens, as NumPy."""
    import torch

    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        max_new_tokens=n,
        eos_token_id=model.config.vocab_size,
        pad_token_id=0,
    )
    return out[:, 1:].cpu().numpy()


def scorer(system: str, spec: dict):
    """A function ``score(batch) -> response tokens scored`` for ``system`` (batch: (query, response) pairs)."""
    from ..inputs import pad_batch

    if system.startswith("t5vh"):
        policy = _policy(system, spec, for_scoring=True)  # as t5vh-score loads it

        def score(batch):
            ids, mask = pad_batch([q for q, _ in batch])
            resp, resp_mask = pad_batch([r for _, r in batch])
            policy.score(ids, resp, mask, resp_mask)
            return int(resp_mask.sum())

        return score

    if system.startswith("ct2"):
        translator, vocab = _ct2_translator(system, spec)

        def score(batch):
            source = [[vocab[i] for i in q] for q, _ in batch]
            target = [[vocab[i] for i in r] for _, r in batch]
            translator.score_batch(source, target)
            return sum(len(r) for _, r in batch)

        return score

    model = _torch_model(system, Path(spec["model_dir"]), spec["threads"])

    def score(batch):
        ids, mask = pad_batch([q for q, _ in batch])
        resp, resp_mask = pad_batch([r for _, r in batch])
        model.score(ids, resp, mask, resp_mask)
        return int(resp_mask.sum())

    return score


def _torch_model(system: str, model_dir: Path, threads: int):
    import torch

    from ..checkpoint import load_reference

    torch.set_num_threads(threads)
    model = load_reference(model_dir)
    if system == "torch-cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (a CPU build?)")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
        model = model.to("cuda")
    return model


def _ct2_translator(system: str, spec: dict):
    import ctranslate2

    converted = ct2_model(Path(spec["model_dir"]), Path(spec["cache_dir"]), int8=system == "ct2-int8")
    translator = ctranslate2.Translator(str(converted), device="cpu", inter_threads=1, intra_threads=spec["threads"])
    return translator, json.loads((converted / "shared_vocabulary.json").read_text())


def ct2_model(model_dir: Path, cache_dir: Path, *, int8: bool) -> Path:
    """The demo model converted for CTranslate2 (body only: CT2 knows T5ForConditionalGeneration)."""
    import shutil
    import tempfile

    out = cache_dir / f"{model_dir.name}-ct2-{'int8' if int8 else 'fp32'}"
    if (out / "model.bin").is_file():
        return out
    import ctranslate2
    from transformers import T5ForConditionalGeneration

    from ..checkpoint import load_reference

    model = load_reference(model_dir)
    body = T5ForConditionalGeneration(model.config)
    body.load_state_dict(model.state_dict(), strict=False)
    with tempfile.TemporaryDirectory() as plain, tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        body.save_pretrained(plain)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, Path(plain) / name)
        target = Path(tmp) / "model"
        ctranslate2.converters.TransformersConverter(plain).convert(str(target), quantization="int8" if int8 else None)
        os.replace(target, out)
    return out
