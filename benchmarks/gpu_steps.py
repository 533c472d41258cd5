"""The Python steps of ``benchmarks/gpu_check`` (docs/gpu.md): each writes WORK/<step>.json as it goes.

    python benchmarks/gpu_steps.py {probe|parity|transfers|sampling|scoring|tensorrt|summary} --work DIR --out DIR

Every step saves after each part, so one cut off by its time box keeps what it
measured. Parity is the contract's: same tokens under shared uniforms on at
least 99.9% of tokens, log-probs and values within 1e-4 x max(1, max|ref|),
against PyTorch on the same GPU, on the t5-small-shaped demo model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np

ROWS, NEW_TOKENS, QUERY_LEN = 256, 32, 64
TARGETS = {"torch-cuda": 5.0, "optimum-cuda": 2.0}  # t5vh-cuda tokens/s over theirs, batch 64, N = 128


def save(work: Path, name: str, data: dict) -> None:
    (work / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


def tol(reference_max: float) -> float:
    return 1e-4 * max(1.0, float(reference_max))


# ---------------------------------------------------------------------- shared pieces


def small_model(work: Path):
    """The t5-small-shaped demo model and its fp32 export, built once into WORK/cache."""
    from t5vh_fast.demo import demo_export

    export_dir = demo_export("small", work / "cache", log=print)
    return work / "cache" / "demo-small", export_dir


def gpu_reference(model_dir: Path):
    """The PyTorch reference on the GPU in fp32 (TF32 off), or on the CPU where torch has no CUDA."""
    import torch

    from t5vh_fast.checkpoint import load_reference

    model = load_reference(model_dir)
    if not torch.cuda.is_available():
        return model, f"cpu (torch {torch.__version__} has no CUDA)"
    torch.backends.cuda.matmul.allow_tf32 = False
    return model.to("cuda"), f"cuda ({torch.cuda.get_device_name(0)}, torch {torch.__version__})"


def queries(rows: int, vocab: int, seed: int):
    """Right-padded queries of 8 to QUERY_LEN tokens ending in </s>, with their mask."""
    from t5vh_fast import pad_batch

    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, QUERY_LEN + 1, size=rows)
    return pad_batch([list(rng.integers(3, min(vocab, 32000), size=n - 1)) + [1] for n in lengths])


def logits_max(reference, ids, mask, tokens) -> float:
    """max |logits| of the reference on the teacher-forced tokens (the log-prob tolerance's scale)."""
    import torch

    biggest = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            rows = slice(start, start + 32)
            out = reference(
                input_ids=torch.from_numpy(ids[rows]).to(reference.device),
                attention_mask=torch.from_numpy(mask[rows]).to(reference.device),
                decoder_input_ids=reference._shift_right(torch.from_numpy(tokens[rows]).to(reference.device)),
            )
            biggest = max(biggest, float(out.logits.float().abs().max()))
    return biggest


def divergences(reference, ids, mask, ref_tokens, tokens, uniforms) -> dict:
    """Where each row's tokens first differ from the reference's, how near its uniform was to a CDF boundary.

    The margin is the distance, in probability mass, between u * total and the nearer edge of the
    reference token's interval of the float64 CDF (the RNG contract). Logits that agree to ~1e-5 move
    those edges by ~1e-6 or less: divergences with margins that small are near-ties, not a wrong draw.
    """
    import torch

    differ = tokens != ref_tokens
    rows = np.flatnonzero(differ.any(axis=1))
    same_prefix = np.concatenate([np.ones((len(tokens), 1), bool), np.cumprod(~differ, axis=1)[:, :-1] > 0], axis=1)
    report = {"diverged_rows": int(rows.size), "per_step_disagreement": float(rows.size / same_prefix.sum())}
    if rows.size == 0:
        return report
    first = differ[rows].argmax(axis=1)
    with torch.no_grad():
        logits = reference(
            input_ids=torch.from_numpy(ids[rows]).to(reference.device),
            attention_mask=torch.from_numpy(mask[rows]).to(reference.device),
            decoder_input_ids=reference._shift_right(torch.from_numpy(ref_tokens[rows]).to(reference.device)),
        ).logits.float()
    margins = []
    for k, (row, t) in enumerate(zip(rows, first)):
        step = logits[k, t]
        cdf = torch.cumsum(torch.exp(step - step.max()), dim=0, dtype=torch.float64)
        target, token = float(uniforms[row, t]) * float(cdf[-1]), int(ref_tokens[row, t])
        low = float(cdf[token - 1]) if token else 0.0
        margins.append(min(target - low, float(cdf[token]) - target) / float(cdf[-1]))
    report.update(
        max_margin=float(np.max(margins)),
        median_margin=float(np.median(margins)),
        mean_token_mass=float(1 / logits.shape[-1]),
    )
    return report


def compare(policy, reference, ids, mask, uniforms) -> dict:
    """Rollout and score() of ``policy`` against the reference on shared uniforms."""
    start = time.perf_counter()
    ours = policy.respond_to_batch(ids, mask, txt_len=uniforms.shape[1], uniforms=uniforms)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference.respond_to_batch(ids, mask, txt_len=uniforms.shape[1], uniforms=uniforms)
    ref_s = time.perf_counter() - start
    ref_tokens, ref_values = ref.tokens.numpy(), ref.values.numpy()
    same = np.cumprod(ours.tokens == ref_tokens, axis=1).astype(bool)
    lp_tol, v_tol = tol(logits_max(reference, ids, mask, ref_tokens)), tol(np.abs(ref_values).max())
    scored, ref_scored = policy.score(ids, ref_tokens, mask), reference.score(ids, ref_tokens, mask)
    result = {
        "rows": int(ids.shape[0]),
        "tokens": int(uniforms.shape[1]),
        "identical_tokens": float((ours.tokens == ref_tokens).mean()),
        "max_logprob_diff": float(np.abs(ours.logprobs - ref.logprobs.numpy())[same].max()),
        "logprob_tol": lp_tol,
        "max_value_diff": float(np.abs(ours.values - ref_values)[same].max()),
        "value_tol": v_tol,
        "score_max_logprob_diff": float(np.abs(scored.logprobs - ref_scored.logprobs.numpy()).max()),
        "score_max_value_diff": float(np.abs(scored.values - ref_scored.values.numpy()).max()),
        "divergences": divergences(reference, ids, mask, ref_tokens, ours.tokens, uniforms),
        "t5vh_s": ours_s,
        "torch_s": ref_s,
    }
    result["ok"] = (
        result["identical_tokens"] >= 0.999
        and max(result["max_logprob_diff"], result["score_max_logprob_diff"]) <= lp_tol
        and max(result["max_value_diff"], result["score_max_value_diff"]) <= v_tol
    )
    return result


def parity_inputs(vocab: int):
    ids, mask = queries(ROWS, vocab, seed=1)
    return ids, mask, np.random.default_rng(2).random((ROWS, NEW_TOKENS))


# ---------------------------------------------------------------------- steps


def probe_step(work: Path, out: Path) -> None:
    """What onnxruntime, the GPU probe, the library loader and torch see."""
    import onnxruntime as ort

    from t5vh_fast import gpu, providers

    providers.preload_dlls()
    report, major = gpu.probe(), gpu.ort_cuda_major()
    data = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "onnxruntime_cuda": major,
        "probe": dataclasses.asdict(report) if report else None,
        "problem": gpu.gpu_problem(report, 0, major),
        "missing_cuda_libraries": gpu.missing_libraries(gpu.shared_libraries(providers.CUDA, major or 13)),
        "missing_tensorrt_libraries": gpu.missing_libraries(gpu.shared_libraries(providers.TENSORRT, major or 13)),
    }
    save(work, "probe", data)
    try:
        import torch

        data["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "available": torch.cuda.is_available(),
        }
    except ImportError:
        data["torch"] = None
    save(work, "probe", data)
    print(json.dumps(data, indent=1, default=str))


def parity_step(work: Path, out: Path) -> None:
    """CUDA fp32 (the target) and TF32, every decoder layout, then fp16/bf16 exports where the exporter makes them."""
    from t5vh_fast import CudaOptions, load
    from t5vh_fast.providers import resolve_providers

    resolve_providers("cuda")  # fail here, before the export, where CUDA cannot run
    model_dir, export_dir = small_model(work)
    reference, where = gpu_reference(model_dir)
    ids, mask, uniforms = parity_inputs(reference.config.vocab_size)
    data = {"reference": where, "model": "demo small (t5-small shape), fp32 export", "runs": {}}
    for name, cuda in (("fp32", CudaOptions()), ("tf32", CudaOptions(tf32=True))):
        for layout in ("single", "split", "merged"):
            policy = load(export_dir, providers="cuda", decoder=layout, cuda=cuda)
            data["runs"][f"cuda {name} {layout}"] = {
                "providers": policy.providers,
                **compare(policy, reference, ids, mask, uniforms),
            }
            save(work, "parity", data)
            print(name, layout, data["runs"][f"cuda {name} {layout}"])
    data["reduced_precision_exports"] = reduced_precision(work, model_dir, reference, ids, mask, uniforms, data)
    save(work, "parity", data)


def reduced_precision(work, model_dir, reference, ids, mask, uniforms, data) -> str:
    """bf16/fp16 exports: the precision-gap report measured on CUDA, and their rollouts against the reference."""
    from t5vh_fast import load
    from t5vh_fast.checkpoint import load_reference
    from t5vh_fast.export import export
    from t5vh_fast.export.precision import fp32_rollout, precision_gap, probe
    from t5vh_fast.providers import resolve_providers

    cpu_model = load_reference(model_dir)  # the report's fp32 side, as t5vh-export measures it
    p_ids, p_mask, p_uniforms = probe(cpu_model.config.vocab_size)
    p_reference = fp32_rollout(cpu_model, p_ids, p_mask, p_uniforms)
    for precision in ("bf16", "fp16"):
        key = f"cuda {precision} export"
        try:
            target = export(model_dir, work / "cache" / f"demo-small-onnx-{precision}", precision=precision, force=True)
            gap = precision_gap(
                cpu_model,
                target,
                precision,
                p_ids,
                p_mask,
                p_uniforms,
                p_reference,
                providers=resolve_providers("cuda"),
            )
            data["runs"][key] = {"precision_gap_on_cuda": gap}
            save(work, "parity", data)
            print(key, gap)
            policy = load(target, providers="cuda")
            data["runs"][key].update(compare(policy, reference, ids, mask, uniforms))
        except Exception as exc:  # a report: record the failure, go on with the next precision
            data["runs"].setdefault(key, {})["error"] = f"{type(exc).__name__}: {exc}"[:500]
        save(work, "parity", data)
        print(key, data["runs"][key])
    return "measured (see runs)"


def transfers_step(work: Path, out: Path) -> None:
    """Where each step's data lives: onnxruntime's Memcpy nodes (verbose log) and profile, the KV cache's device."""
    from t5vh_fast import load, providers

    profiles = work / "logs" / "ort-profile"
    profiles.mkdir(parents=True, exist_ok=True)
    plain = providers.session_options

    def verbose(threads, **kwargs):
        options = plain(threads, **kwargs)
        options.log_severity_level = 1  # info: which nodes got a Memcpy, and why
        options.enable_profiling = True
        options.profile_file_prefix = str(profiles / "t5vh")
        return options

    providers.session_options = verbose
    providers.resolve_providers("cuda")  # fail here, before the export, where CUDA cannot run
    _, export_dir = small_model(work)
    data = {}
    for layout in ("single", "split", "merged"):
        policy = load(export_dir, providers="cuda", decoder=layout)
        ids, mask = queries(64, policy.vocab_size, seed=3)
        policy.respond_to_batch(ids, mask, txt_len=16, seed=0)
        state = policy.decoder.encode(ids, mask)
        _, _, state = policy.decoder.step(state, np.zeros((64, 1), dtype=np.int64))
        files = [graph.session.end_profiling() for graph in policy.decoder.graphs]
        data[layout] = {
            "kv_cache_devices": sorted({kv.device_name() for kv in state.self_kv + state.cross_kv}),
            "host_bytes_per_step": {"logits": 64 * policy.vocab_size * 4, "values": 64 * 4},
            "profiles": {graph: profile_summary(Path(f)) for graph, f in zip(policy.decoder.files, files)},
        }
        save(work, "transfers", data)
    print(json.dumps(data, indent=1))


def profile_summary(path: Path) -> dict:
    """Node runs per provider, Memcpy runs and their time, and the ops that ran on the CPU."""
    events = [e for e in json.loads(path.read_text()) if e.get("cat") == "Node" and "args" in e]
    by_provider, cpu_ops, memcpy_runs, memcpy_us = {}, set(), 0, 0
    for event in events:
        provider, op = event["args"].get("provider", "?"), event["args"].get("op_name", "?")
        by_provider[provider] = by_provider.get(provider, 0) + 1
        if provider == "CPUExecutionProvider":
            cpu_ops.add(op)
        if op.startswith("Memcpy"):
            memcpy_runs += 1
            memcpy_us += int(event.get("dur", 0))
    return {"node_runs": by_provider, "cpu_ops": sorted(cpu_ops), "memcpy_runs": memcpy_runs, "memcpy_us": memcpy_us}


def sampling_step(work: Path, out: Path) -> None:
    """MEASUREMENT: does sampling on the device pay at batch 256 (B x V logits never leave the GPU)?

    Host path (today): copy B x V fp32 logits to the host, NumPy log-softmax and
    inverse-CDF draw. Device path (a candidate): the PyTorch reference's draw on
    the GPU (float64 cumulative sums, the same RNG contract), only B tokens and
    B log-probs come back. Same logits, same uniforms: tokens must agree.
    """
    import torch

    from t5vh_fast import sampling
    from t5vh_fast.reference import draw, logsumexp, token_logprobs

    if not torch.cuda.is_available():
        raise SystemExit(
            f"torch {torch.__version__} has no CUDA: set T5VH_TORCH_SPEC / T5VH_TORCH_INDEX for a CUDA build"
        )
    batch, vocab = 256, 32128
    logits = 3 * torch.randn(batch, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    u = np.random.default_rng(0).random(batch)
    u_gpu = torch.from_numpy(u).cuda()
    pinned = torch.empty(batch, vocab, pin_memory=True)

    def host():
        x = logits.cpu().numpy()
        weights, block_sums, lse = sampling.exp_weights(x)
        token = sampling.draw(x, u, weights, block_sums)
        return token, sampling.token_logprobs(x, token, lse)

    def device():
        token = draw(logits, u_gpu)
        return token.cpu().numpy(), token_logprobs(logits, token, logsumexp(logits)).cpu().numpy()

    data = {"batch": batch, "vocab": vocab, "logits_mb": batch * vocab * 4 / 1e6}
    for name, fn in (
        ("copy_pageable", lambda: logits.cpu()),
        ("copy_pinned", lambda: pinned.copy_(logits)),
        ("host_sampling", host),
        ("device_sampling", device),
    ):
        data[f"{name}_ms"] = median_ms(fn, torch)
        save(work, "sampling", data)
    host_token, host_lp = host()
    device_token, device_lp = device()
    data["token_mismatches"] = int((host_token != device_token).sum())
    data["max_logprob_diff"] = float(np.abs(host_lp - device_lp).max())
    save(work, "sampling", data)
    print(json.dumps(data, indent=1))


def scoring_step(work: Path, out: Path) -> None:
    """MEASUREMENT: score() on CUDA with the log-softmax on the device (t5vh_scorer.onnx) against the host
    pass over P x V logits copied back (the path before it), and the PyTorch reference's score() on the
    same GPU; the same rows for all three, numbers checked against each other."""
    import torch

    from t5vh_fast import load, pad_batch
    from t5vh_fast.providers import resolve_providers

    resolve_providers("cuda")
    model_dir, export_dir = small_model(work)
    reference, where = gpu_reference(model_dir)
    device, host = load(export_dir, providers="cuda"), load(export_dir, providers="cuda")
    host.decoder._scorer = None  # the host pass, as on an export without t5vh_scorer.onnx
    data = {"reference": where, "scores_on_device": device.decoder.scores_on_device, "runs": {}}
    rng = np.random.default_rng(31)
    for rows, response_len in ((64, 128), (256, 64)):
        ids, mask = queries(rows, reference.config.vocab_size, seed=rows)
        responses, resp_mask = pad_batch(
            [list(rng.integers(3, 32000, size=n)) for n in rng.integers(4, response_len + 1, rows)]
        )
        tokens = int(resp_mask.sum())
        run = {"rows": rows, "response_tokens": tokens}
        got = {}
        for name, model in (("device", device), ("host", host), ("torch", reference)):
            fn = functools.partial(model.score, ids, responses, mask, resp_mask)
            got[name] = fn()
            ms = median_ms(fn, torch, repeats=5)
            run[f"{name}_ms"], run[f"{name}_tokens_per_s"] = ms, tokens / ms * 1000
            data["runs"][f"{rows}x{response_len}"] = run
            save(work, "scoring", data)
        run["device_phases_ms"] = scoring_phases(device, ids, responses, mask, resp_mask)
        data["runs"][f"{rows}x{response_len}"] = run
        save(work, "scoring", data)
        ref_lp = got["torch"].logprobs.cpu().numpy()
        run["max_logprob_diff_device_vs_torch"] = float(np.abs(got["device"].logprobs - ref_lp).max())
        run["max_logprob_diff_device_vs_host"] = float(np.abs(got["device"].logprobs - got["host"].logprobs).max())
        run["max_entropy_diff_device_vs_host"] = float(np.abs(got["device"].entropy - got["host"].entropy).max())
        run["logprob_tol"] = tol(np.abs(ref_lp).max())
        save(work, "scoring", data)
        print(json.dumps(run))


def scoring_phases(policy, ids, responses, mask, resp_mask) -> dict:
    """Where one device score() call spends its time: the encoder, the decoder calls, the scorer graph,
    the rest (host work between them); and the whole call with the rows cut into length groups."""
    from t5vh_fast import scoring

    decoder = policy.decoder
    spent = {"encode": 0.0, "decoder": 0.0, "scorer": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    scorer = decoder._scorer
    decoder.encode, decoder.step = timed("encode", decoder.encode), timed("decoder", decoder.step)
    decoder._scorer = type(
        "Timed",
        (),
        {
            "io_binding": scorer.io_binding,
            "run_with_iobinding": staticmethod(timed("scorer", scorer.run_with_iobinding)),
        },
    )()
    try:
        policy.score(ids, responses, mask, resp_mask)
        for key in spent:
            spent[key] = 0.0
        start = time.perf_counter()
        policy.score(ids, responses, mask, resp_mask)
        total = time.perf_counter() - start
    finally:
        del decoder.encode, decoder.step
        decoder._scorer = scorer
    phases = {key: 1000 * value for key, value in spent.items()}
    phases["other"] = 1000 * total - sum(phases.values())
    args = {"decoder_start_token_id": policy.decoder_start_token_id, "by_length": True}
    scoring.score(decoder, ids, mask, responses, resp_mask, **args)
    start = time.perf_counter()
    scoring.score(decoder, ids, mask, responses, resp_mask, **args)
    phases["whole_call_by_length"] = 1000 * (time.perf_counter() - start)
    return phases


def median_ms(fn, torch, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def tensorrt_step(work: Path, out: Path) -> None:
    """TensorRT with explicit profiles and the engine cache: build time, cached start, parity, speed, bf16."""
    from t5vh_fast import TensorrtOptions, gpu, providers
    from t5vh_fast.tensorrt import engine_cache_dir

    providers.preload_dlls()
    missing = gpu.missing_libraries(gpu.shared_libraries(providers.TENSORRT, gpu.ort_cuda_major() or 13))
    if missing:
        save(work, "tensorrt", {"skipped": f"missing {', '.join(missing)}: {gpu.TENSORRT_FIX}"})
        print("skipped: missing", missing)
        return
    model_dir, export_dir = small_model(work)
    reference, _ = gpu_reference(model_dir)
    ids, mask, uniforms = parity_inputs(reference.config.vocab_size)
    ranges = dict(batch=(1, 64, ROWS), query_len=(1, QUERY_LEN, QUERY_LEN), response_len=(1, NEW_TOKENS, 128))
    data = {}
    for name, options in (
        ("fp32", TensorrtOptions(cache_dir=work / "trt", **ranges)),
        ("bf16", TensorrtOptions(cache_dir=work / "trt", bf16=True, **ranges)),
    ):
        data[name] = {"cache_dir": str(engine_cache_dir(export_dir, options))}
        tensorrt_run(
            export_dir, options, reference, (ids, mask, uniforms), data[name], lambda: save(work, "tensorrt", data)
        )
    print(json.dumps(data, indent=1))


def tensorrt_run(export_dir, options, reference, inputs, data: dict, checkpoint) -> None:
    from t5vh_fast import load

    start = time.perf_counter()
    policy = load(export_dir, providers="tensorrt", tensorrt=options)
    data["first_load_s"] = time.perf_counter() - start  # engines built here (explicit profiles) ...
    start = time.perf_counter()
    policy.respond_to_batch(inputs[0][:1], inputs[1][:1], txt_len=2, seed=0)
    data["first_call_s"] = time.perf_counter() - start  # ... or here, on the first run
    data["providers"] = policy.providers
    checkpoint()
    data["parity"] = compare(policy, reference, *inputs)
    checkpoint()
    start = time.perf_counter()
    policy = load(export_dir, providers="tensorrt", tensorrt=options)
    data["cached_load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    policy.respond_to_batch(inputs[0][:64], inputs[1][:64], txt_len=128, seed=0)
    data["tokens_per_s_batch64_n128"] = 64 * 128 / (time.perf_counter() - start)
    checkpoint()


# ---------------------------------------------------------------------- summary


def summary_step(work: Path, out: Path) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
    bench_path = out / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines() if line.strip()]
    memcpy = memcpy_lines(work / "logs" / "transfers.log")
    lines = ["# t5vh_fast GPU check", "", f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    lines += machine_lines(results.get("probe"), bench)
    lines += target_lines(results.get("parity"), bench)
    lines += parity_lines(results.get("parity"))
    lines += bench_lines(bench)
    lines += transfer_lines(results.get("transfers"), memcpy)
    lines += sampling_lines(results.get("sampling"))
    lines += scoring_lines(results.get("scoring"))
    lines += tensorrt_lines(results.get("tensorrt"))
    lines += ["## Steps", "", "| step | status | seconds | last log line when not ok |", "|---|---|---:|---|"]
    lines += [f"| {s[0]} | {s[1]} | {s[2]} | {last_line(work, s[0]) if s[1] != 'ok' else ''} |" for s in steps]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    everything = {**results, "bench": bench, "steps": steps, "memcpy_log_lines": memcpy}
    (out / "results.json").write_text(json.dumps(everything, indent=1, default=str))


def last_line(work: Path, step: str) -> str:
    log = work / "logs" / f"{step}.log"
    lines = (
        [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    )
    return lines[-1][:200].replace("|", "/") if lines else ""


def memcpy_lines(log: Path) -> list:
    if not log.is_file():
        return []
    return [
        line.strip()[:300] for line in log.read_text(errors="replace").splitlines() if "Memcpy nodes are added" in line
    ]


def machine_lines(probe, bench) -> list:
    if not probe:
        return ["Probe: no result (see logs/probe.log)", ""]
    report = probe.get("probe") or {}
    gpus = ", ".join(f"{g['name']} (cc {'.'.join(map(str, g['compute_capability']))})" for g in report.get("gpus", []))
    torch_info = probe.get("torch") or {}
    return [
        f"GPU: {gpus or 'none found'}; driver {report.get('driver_version')}; problem: {probe.get('problem')}",
        f"onnxruntime {probe.get('onnxruntime')} (CUDA {probe.get('onnxruntime_cuda')}), "
        f"providers {probe.get('available_providers')}; torch {torch_info.get('version')} "
        f"(CUDA {torch_info.get('cuda')}, available: {torch_info.get('available')})",
        f"Missing libraries: CUDA provider {probe.get('missing_cuda_libraries')}, "
        f"TensorRT provider {probe.get('missing_tensorrt_libraries')}",
        "",
    ]


def target_lines(parity, bench) -> list:
    lines = ["## Targets", ""]
    for layout in ("single", "split", "merged"):
        run = ((parity or {}).get("runs") or {}).get(f"cuda fp32 {layout}")
        if run:
            verdict = "PASS" if run["identical_tokens"] >= 0.999 else "FAIL"
            lines.append(f"- {verdict}: CUDA fp32 ({layout}) identical tokens {run['identical_tokens']:.4%} (>= 99.9%)")
        else:
            lines.append(f"- NOT RUN: CUDA fp32 ({layout}) parity")
    for other, target in TARGETS.items():
        ratio = bench_ratio(bench, other, 64)
        if ratio is None:
            lines.append(f"- NOT RUN: t5vh-cuda vs {other} at batch 64")
        else:
            verdict = "PASS" if ratio >= target else "FAIL"
            lines.append(f"- {verdict}: t5vh-cuda = {ratio:.2f}x {other} at batch 64, N = 128 (target >= {target:g}x)")
    return lines + [""]


def bench_ratio(bench, other: str, batch: int):
    rows = {(r["system"], r["batch"]): r for r in (bench or {}).get("results", []) if "error" not in r}
    ours, theirs = rows.get(("t5vh-cuda", batch)), rows.get((other, batch))
    return ours["tokens_per_s"] / theirs["tokens_per_s"] if ours and theirs else None


def parity_lines(parity) -> list:
    if not parity:
        return ["## Parity", "", "no result (see logs/parity.log)", ""]
    lines = [
        "## Parity against PyTorch on the same GPU",
        "",
        f"Reference: {parity.get('reference')}; {ROWS} rows x {NEW_TOKENS} tokens, shared uniforms; "
        f"reduced-precision exports: {parity.get('reduced_precision_exports', 'not reached')}",
        "",
        "| run | identical tokens | max logprob diff / tol | max value diff / tol | score logprob / value diff | ok |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in parity.get("runs", {}).items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {r['identical_tokens']:.4%} | {r['max_logprob_diff']:.1e} / {r['logprob_tol']:.1e} | "
            f"{r['max_value_diff']:.1e} / {r['value_tol']:.1e} | "
            f"{r['score_max_logprob_diff']:.1e} / {r['score_max_value_diff']:.1e} | {r['ok']} |"
        )
    gaps = {
        name: r["precision_gap_on_cuda"] for name, r in parity.get("runs", {}).items() if "precision_gap_on_cuda" in r
    }
    if gaps:
        from t5vh_fast.export.precision import format_gap

        lines += ["", "Precision-gap reports (t5vh-export's probe, measured on CUDA against the fp32 PyTorch model):"]
        for name, gap in gaps.items():
            lines += ["", f"- {name}:", "```", format_gap(gap), "```"]
    return lines + [""]


def bench_lines(bench) -> list:
    if not bench:
        return ["## Benchmark", "", "no result (see logs/bench.log)", ""]
    from t5vh_fast.bench import markdown

    return ["## Benchmark (t5vh-bench, t5-small shape, fp32)", "", markdown(bench), ""]


def transfer_lines(transfers, memcpy) -> list:
    lines = ["## Host transfers per step", ""]
    lines += [f"- onnxruntime: {line}" for line in memcpy] or ["- onnxruntime logged no 'Memcpy nodes are added'"]
    for layout, t in (transfers or {}).items():
        lines.append(
            f"- {layout}: KV cache on {t['kv_cache_devices']}; to the host each step: {t['host_bytes_per_step']}"
        )
        for graph, p in t["profiles"].items():
            lines.append(
                f"  - {graph}: node runs {p['node_runs']}, Memcpy runs {p['memcpy_runs']} ({p['memcpy_us']} us), "
                f"CPU ops {p['cpu_ops']}"
            )
    return lines + [""]


def sampling_lines(sampling) -> list:
    if not sampling:
        return ["## Sampling on the device (measurement)", "", "no result (see logs/device-sampling.log)", ""]
    s = sampling
    return [
        "## Sampling on the device (measurement)",
        "",
        f"Batch {s['batch']} x vocab {s['vocab']} ({s['logits_mb']:.0f} MB of logits per step): "
        f"copy to host {s.get('copy_pageable_ms', float('nan')):.2f} ms (pinned {s.get('copy_pinned_ms', float('nan')):.2f}); "
        f"host path (copy + NumPy) {s.get('host_sampling_ms', float('nan')):.2f} ms; "
        f"device path (torch draw, B ids back) {s.get('device_sampling_ms', float('nan')):.2f} ms; "
        f"token mismatches {s.get('token_mismatches')}, max logprob diff {s.get('max_logprob_diff')}",
        "",
    ]


def scoring_lines(scoring) -> list:
    lines = ["## Scoring on CUDA (t5vh_scorer.onnx against the host pass, and PyTorch)", ""]
    if not scoring or not scoring.get("runs"):
        return lines + ["no result (see logs/scoring.log)", ""]
    lines += [
        f"scores on the device: {scoring.get('scores_on_device')}; reference: {scoring.get('reference')}",
        "",
        "| rows | response tokens | device tok/s | host pass tok/s | torch tok/s | device / host | device / torch "
        "| max logprob diff vs torch (tol) | vs host |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    nan = float("nan")
    for r in scoring["runs"].values():
        d, h, t = (r.get(f"{k}_tokens_per_s", nan) for k in ("device", "host", "torch"))
        lines.append(
            f"| {r['rows']} | {r['response_tokens']} | {d:.0f} | {h:.0f} | {t:.0f} | {d / h:.2f}x | {d / t:.2f}x "
            f"| {r.get('max_logprob_diff_device_vs_torch', nan):.1e} ({r.get('logprob_tol', nan):.1e}) "
            f"| {r.get('max_logprob_diff_device_vs_host', nan):.1e} |"
        )
    return lines + [""]


def tensorrt_lines(tensorrt) -> list:
    lines = ["## TensorRT", ""]
    if not tensorrt:
        return lines + ["no result (see logs/tensorrt.log)", ""]
    if "skipped" in tensorrt:
        return lines + [f"skipped: {tensorrt['skipped']}", ""]
    for name, t in tensorrt.items():
        p = t.get("parity", {})
        lines.append(
            f"- {name}: first load {t.get('first_load_s', float('nan')):.1f} s, first call "
            f"{t.get('first_call_s', float('nan')):.1f} s, cached load {t.get('cached_load_s', float('nan')):.1f} s; "
            f"identical tokens {p.get('identical_tokens')}, logprob diff {p.get('max_logprob_diff')} "
            f"(tol {p.get('logprob_tol')}); batch 64 x 128: {t.get('tokens_per_s_batch64_n128', float('nan')):.0f} tok/s; "
            f"engines in {t.get('cache_dir')}"
        )
    return lines + [""]


STEPS = {
    "probe": probe_step,
    "parity": parity_step,
    "transfers": transfers_step,
    "sampling": sampling_step,
    "scoring": scoring_step,
    "tensorrt": tensorrt_step,
    "summary": summary_step,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    STEPS[args.step](args.work, args.out)
