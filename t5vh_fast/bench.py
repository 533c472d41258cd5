"""``t5vh-bench``: the t5vh sampler against the alternatives, side by side, in one run.

Every (system, batch size) runs in its own subprocess, so peak RSS is honest
and a slow system can be cut off at ``--cap`` seconds. The same workload for
all: queries of 64 tokens, exactly N new tokens per row, top_k=0, top_p=1.0,
the same thread count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

SYSTEMS = {
    "torch-nocache": "PyTorch reference, no KV cache (the plain sampler re-running the model on the whole prefix)",
    "torch": "PyTorch reference with KV cache",
    "hf-generate": "transformers generate(do_sample=True), unreachable eos_token_id",
    "optimum": "Optimum ORTModelForSeq2SeqLM.generate on the same export",
    "t5vh": "t5vh ONNX sampler (CPU)",
    "t5vh-cuda": "t5vh ONNX sampler (CUDA, fp32, TF32 off)",
    "torch-cuda": "transformers generate(do_sample=True) on CUDA, fp32 (TF32 off), unreachable eos_token_id",
    "optimum-cuda": "Optimum ORTModelForSeq2SeqLM.generate on CUDAExecutionProvider (TF32 off), same export",
    "ct2": "CTranslate2 fp32, end_token=[]",
    "ct2-int8": "CTranslate2 int8, end_token=[]",
}
QUERY_LEN = 64
GPU_SYSTEMS = ("t5vh-cuda", "torch-cuda", "optimum-cuda")


# ---------------------------------------------------------------------- worker side (one system, one batch)


class StepClock:
    """Timestamps of decoder calls: step times, and time to the first token."""

    def __init__(self):
        self.marks = []

    def mark(self, *args, **kwargs):
        self.marks.append(time.perf_counter())

    def steps(self, end: float):
        marks = self.marks + [end]
        return [b - a for a, b in zip(marks[:-1], marks[1:])]


def _queries(batch: int, vocab: int, seed: int = 0):
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, min(vocab, 32000), size=(batch, QUERY_LEN))
    ids[:, -1] = 1
    return ids


def _runner(system: str, model_dir: Path, export_dir: Path, threads: int, cache_dir: Path):
    """A function ``run(ids, n) -> (tokens, clock or None)`` for ``system``."""
    import numpy as np

    if system in ("t5vh", "t5vh-cuda"):
        import t5vh_fast

        policy = t5vh_fast.load(export_dir, providers="cuda" if system == "t5vh-cuda" else "cpu", threads=threads)

        def run(ids, n):
            clock = StepClock()  # a mark as each step starts: before the first, then after every step but the last

            def step_done(t, tokens):
                if t < n - 1:
                    clock.mark()

            clock.mark()
            return policy.respond_to_batch(ids, txt_len=n, seed=0, callback=step_done).tokens, clock

        return run

    if system in ("ct2", "ct2-int8"):
        import ctranslate2

        converted = _ct2_model(model_dir, cache_dir, int8=system == "ct2-int8")
        translator = ctranslate2.Translator(str(converted), device="cpu", inter_threads=1, intra_threads=threads)
        vocab = json.loads((converted / "shared_vocabulary.json").read_text())

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
            index = {token: i for i, token in enumerate(vocab)}
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
            export_dir,
            session_options=options,
            provider="CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider",
            provider_options={"use_tf32": "0"} if on_gpu else None,  # fp32 against fp32
        )
        vocab = model.config.vocab_size

        def run(ids, n):
            ids = torch.from_numpy(ids).to(model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n,
                eos_token_id=vocab,
                pad_token_id=0,
            )
            return out[:, 1:].cpu().numpy(), None

        return run

    from .checkpoint import load_reference

    torch.set_num_threads(threads)
    model = load_reference(model_dir)
    if system == "torch-cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (a CPU build?)")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
        model = model.to("cuda")

    def run(ids, n):
        clock = StepClock()
        handle = model.register_forward_pre_hook(clock.mark)
        ids = torch.from_numpy(ids).to(model.device)
        try:
            if system in ("hf-generate", "torch-cuda"):
                with torch.no_grad():
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
                return out[:, 1:].cpu().numpy(), clock
            rollout = model.respond_to_batch(ids, txt_len=n, use_cache=system == "torch")
            return rollout.tokens.numpy(), clock
        finally:
            handle.remove()

    return run


def _ct2_model(model_dir: Path, cache_dir: Path, *, int8: bool) -> Path:
    """The demo model converted for CTranslate2 (body only: CT2 knows T5ForConditionalGeneration)."""
    import shutil
    import tempfile

    out = cache_dir / f"{model_dir.name}-ct2-{'int8' if int8 else 'fp32'}"
    if (out / "model.bin").is_file():
        return out
    import ctranslate2
    from transformers import T5ForConditionalGeneration

    from .checkpoint import load_reference

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


def convert_worker(spec: dict) -> dict:
    """Convert the demo model for CTranslate2 (fp32 and int8) before any timed run."""
    for int8 in (False, True):
        _ct2_model(Path(spec["model_dir"]), Path(spec["cache_dir"]), int8=int8)
    return {"converted": True}


def run_worker(spec: dict) -> dict:
    """Time one system at one batch size; returns the measurements as a dict."""
    import numpy as np

    system, batch, n = spec["system"], spec["batch"], spec["new_tokens"]
    run = _runner(system, Path(spec["model_dir"]), Path(spec["export_dir"]), spec["threads"], Path(spec["cache_dir"]))
    vocab = json.loads((Path(spec["model_dir"]) / "config.json").read_text())["vocab_size"]
    ids = _queries(batch, vocab)
    run(ids, min(n, 3))  # warm-up
    start = time.perf_counter()
    first, _ = run(ids, 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    tokens, clock = run(ids, n)
    end = time.perf_counter()
    if tokens.shape != (batch, n):
        raise RuntimeError(f"{system} returned {tokens.shape} tokens, expected exactly {(batch, n)}")
    total = end - start
    if clock is not None and len(clock.marks) >= n:
        steps = clock.steps(end)[-n:]
    else:  # a black box: the mean step after the first token
        steps = [(total - ttft) / max(n - 1, 1)]
    return {
        "system": system,
        "batch": batch,
        "new_tokens": n,
        "seconds": total,
        "tokens_per_s": batch * n / total,
        "step_ms_p50": 1000 * float(np.percentile(steps, 50)),
        "step_ms_p95": 1000 * float(np.percentile(steps, 95)),
        "per_step_timed": clock is not None and len(clock.marks) >= n,
        "ttft_ms": 1000 * ttft,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def rollout_parity(policy, reference, ids, mask, uniforms) -> dict:
    """The t5vh sampler against the PyTorch reference on shared uniforms, and both timed.

    Log-prob and value differences are taken on each row's common prefix (where
    the two samplers chose the same tokens so far).
    """
    import numpy as np

    start = time.perf_counter()
    ours = policy.respond_to_batch(ids, mask, txt_len=uniforms.shape[1], uniforms=uniforms)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference.respond_to_batch(ids, mask, txt_len=uniforms.shape[1], uniforms=uniforms)
    ref_s = time.perf_counter() - start
    ref_tokens = ref.tokens.numpy()
    same = np.cumprod(ours.tokens == ref_tokens, axis=1).astype(bool)
    return {
        "rows": int(ids.shape[0]),
        "tokens": int(uniforms.shape[1]),
        "identical_tokens": float((ours.tokens == ref_tokens).mean()),
        "max_logprob_diff": float(np.abs(ours.logprobs - ref.logprobs.numpy())[same].max()),
        "max_value_diff": float(np.abs(ours.values - ref.values.numpy())[same].max()),
        "t5vh_s": ours_s,
        "torch_s": ref_s,
    }


def parity_worker(spec: dict) -> dict:
    """The t5vh sampler against the PyTorch reference on shared uniforms (8 rows x 32 tokens)."""
    import numpy as np

    import t5vh_fast

    from .checkpoint import load_reference

    reference = load_reference(Path(spec["model_dir"]))
    policy = t5vh_fast.load(spec["export_dir"], providers="cpu", threads=spec["threads"])
    ids = _queries(8, reference.config.vocab_size, seed=1)
    return rollout_parity(policy, reference, ids, np.ones_like(ids), np.random.default_rng(1).random((8, 32)))


def floor_worker(spec: dict) -> dict:
    """The memory-bandwidth floor of one batch-1 decode step: decoder + LM-head bytes / read bandwidth.

    The bandwidth is measured in this run: the best of onnxruntime MatMuls
    (batch 1, same thread count) streaming a matrix as big as those weights;
    NumPy's copy bandwidth is reported beside it.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx.load(str(Path(spec["export_dir"]) / "decoder_with_past_model.onnx"), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}  # embedding tables: one row read per token
    weights = sum(
        int(np.prod(init.dims)) * 4
        for init in graph.initializer
        if init.data_type == TensorProto.FLOAT and init.name not in gathered and len(init.dims) == 2
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    read_gb_s, matrix = 0.0, None
    for k in (512, 1024, 2048, 4096):  # MLAS streams some shapes faster than others: take the best
        cols = max(weights // 4 // k, 1)
        matrix = np.random.default_rng(0).random((k, cols), dtype=np.float32)
        model = helper.make_model(
            helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                "gemv",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
                [numpy_helper.from_array(matrix, "w")],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        model.ir_version = 9
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = np.ones((1, k), dtype=np.float32)
        for _ in range(3):
            session.run(None, {"x": x})
        best = min(_timed(session.run, None, {"x": x}) for _ in range(10))
        read_gb_s = max(read_gb_s, matrix.nbytes / best / 1e9)
    copy = np.empty_like(matrix)
    copy_best = min(_timed(np.copyto, copy, matrix) for _ in range(5))
    return {
        "weight_bytes": weights,
        "read_gb_s": read_gb_s,
        "copy_gb_s": 2 * matrix.nbytes / copy_best / 1e9,
        "floor_ms": 1000 * weights / (read_gb_s * 1e9),
    }


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# ---------------------------------------------------------------------- parent side


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in (
        "t5vh_fast",
        "torch",
        "transformers",
        "optimum",
        "optimum-onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "numpy",
        "ctranslate2",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import onnxruntime as ort

    from .gpu import probe, visible_gpus

    report = probe()
    gpus = [f"{g.name} (compute capability {'.'.join(map(str, g.compute_capability))})" for g in visible_gpus(report)]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "gpus": gpus,
        "driver": report.driver_version if report else None,
        "providers": ort.get_available_providers(),
        "python": platform.python_version(),
        "versions": versions,
    }


def available_systems() -> list:
    """The systems that can run here: the GPU ones only where the probe finds a GPU."""
    from .providers import cuda_device_present

    systems = ["torch-nocache", "torch", "hf-generate", "optimum", "t5vh"]
    if cuda_device_present():
        systems += list(GPU_SYSTEMS)
    if importlib.util.find_spec("ctranslate2") is not None:
        systems += ["ct2", "ct2-int8"]
    return systems


def spawn(kind: str, spec: dict, cap: float) -> dict:
    """Run a worker in a fresh interpreter; a run past ``cap`` seconds is reported, not waited for."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(spec["threads"]),
        MKL_NUM_THREADS=str(spec["threads"]),
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [sys.executable, "-m", "t5vh_fast.bench", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"over the {cap:.0f} s cap"}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {**spec, "error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    *,
    model_dir: Path,
    export_dir: Path,
    cache_dir: Path,
    systems: list,
    batch_sizes: list,
    new_tokens: int,
    threads: int,
    cap: float,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    base = {"model_dir": str(model_dir), "export_dir": str(export_dir), "cache_dir": str(cache_dir), "threads": threads}
    jobs = [(s, b) for b in batch_sizes for s in systems]
    results = []
    with tqdm(total=len(jobs) + 2, disable=not progress, file=sys.stderr, unit="run") as bar:
        if any(s.startswith("ct2") for s in systems):
            bar.set_description("converting for CTranslate2")
            spawn("convert", base, max(cap, 600))
        bar.set_description("bandwidth floor")
        floor = spawn("floor", base, cap)
        bar.update()
        bar.set_description("t5vh parity")
        parity = spawn("parity", base, cap)
        bar.update()
        for system, batch in jobs:
            bar.set_description(f"{system} B={batch}")
            results.append(spawn("run", {**base, "system": system, "batch": batch, "new_tokens": new_tokens}, cap))
            bar.update()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(threads),
        "workload": {
            "query_tokens": QUERY_LEN,
            "new_tokens": new_tokens,
            "top_k": 0,
            "top_p": 1.0,
            "batch_sizes": batch_sizes,
        },
        "systems": {s: SYSTEMS[s] for s in systems},
        "results": results,
        "parity": parity,
        "floor": floor,
    }


def baseline_of(system: str) -> str:
    """The t5vh system a system is compared with: t5vh-cuda for the GPU systems, t5vh for the rest."""
    return "t5vh-cuda" if system in GPU_SYSTEMS else "t5vh"


def ratios(report: dict) -> list:
    """(batch, other system, t5vh tok/s / other tok/s) for every measured pair, on the same device."""
    by = {(r["system"], r["batch"]): r for r in report["results"] if "error" not in r}
    out = []
    for (system, batch), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ours = by.get((baseline_of(system), batch))
        if ours and system != baseline_of(system):
            out.append((batch, system, ours["tokens_per_s"] / r["tokens_per_s"]))
    return out


def markdown(report: dict) -> str:
    m, w = report["machine"], report["workload"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; providers {', '.join(m['providers'])}",
        *([f"GPU: {', '.join(m['gpus'])}; driver {m.get('driver')}"] if m.get("gpus") else []),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"Workload: query {w['query_tokens']} tokens, exactly {w['new_tokens']} new tokens per row, top_k=0, top_p=1.0",
        "",
        "| system | batch | tokens/s | ms/step p50 | ms/step p95 | first token ms | peak RSS MB | t5vh speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    speedups = {(s, b): x for b, s, x in ratios(report)}
    for r in sorted(report["results"], key=lambda r: (r["batch"], r["system"])):
        if "error" in r:
            lines.append(f"| {r['system']} | {r['batch']} | {r['error']} | | | | | |")
            continue
        p95 = f"{r['step_ms_p95']:.2f}" if r["per_step_timed"] else "n/a (mean)"
        x = speedups.get((r["system"], r["batch"]))
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['step_ms_p50']:.2f} | {p95} | "
            f"{r['ttft_ms']:.0f} | {r['peak_rss_mb']:.0f} | {'' if x is None else f'{x:.2f}x'} |"
        )
    lines.append("")
    lines.append("Systems: " + "; ".join(f"`{k}` = {v}" for k, v in report["systems"].items()))
    if any(s in GPU_SYSTEMS for s in report["systems"]):
        lines.append("t5vh speed-up: t5vh-cuda's tokens/s over each GPU system's, t5vh's over each CPU system's")
    f = report.get("floor", {})
    if "floor_ms" in f:
        ours = next(
            (r for r in report["results"] if r["system"] == "t5vh" and r["batch"] == 1 and "error" not in r), None
        )
        share = (
            f", t5vh at batch 1: {ours['step_ms_p50']:.2f} ms/step = {100 * f['floor_ms'] / ours['step_ms_p50']:.0f}% of the floor"
            if ours
            else ""
        )
        lines.append(
            f"Bandwidth floor (batch 1): {f['weight_bytes'] / 1e6:.0f} MB of decoder + LM-head weights / "
            f"{f['read_gb_s']:.1f} GB/s (onnxruntime MatMul streaming the same bytes; NumPy copy {f['copy_gb_s']:.1f} GB/s) "
            f"= {f['floor_ms']:.2f} ms/step{share}"
        )
    p = report.get("parity", {})
    if "identical_tokens" in p:
        lines.append(
            f"t5vh parity vs PyTorch (shared uniforms, {p['rows']} rows x {p['tokens']} tokens): "
            f"{p['identical_tokens']:.1%} identical tokens, max |logprob diff| {p['max_logprob_diff']:.1e}, "
            f"max |value diff| {p['max_value_diff']:.1e}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in report["systems"]:
        points = sorted(
            (r["batch"], r["tokens_per_s"]) for r in report["results"] if r["system"] == system and "error" not in r
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=system, linewidth=2.5 if system.startswith("t5vh") else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = report["workload"]["batch_sizes"]
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("new tokens / s")
    w = report["workload"]
    ax.set_title(
        f"Sampling {w['new_tokens']} tokens after a {w['query_tokens']}-token query ({report['machine']['threads']} threads)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":  # worker entry: python -m t5vh_fast.bench {run|parity|floor|convert} SPEC_JSON
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    worker = {"run": run_worker, "parity": parity_worker, "floor": floor_worker, "convert": convert_worker}[kind]
    print(json.dumps(worker(spec)))
