"""Weight refresh: ``policy.update_weights`` against re-exporting the same weights, and a rollout for scale.

    python benchmarks/refresh.py [--size small] [--threads 2] [--repeats 3] [--cache-dir DIR]

t5-small-shaped demo model. The policy runs the exported weights (seed 0) and
is refreshed to other weights (the demo model with seed 1); the re-export
baseline is what a PPO loop would do without ``update_weights``: save the
trained model, export it, load the export. Each measurement runs in its own
process, so peak RSS is that process's own. Prints a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from t5vh_fast.bench import peak_rss_mb, rss_mb

QUERY_LEN, BATCH, NEW_TOKENS = 64, 16, 128


def refresh_worker(spec: dict) -> dict:
    import t5vh_fast
    from t5vh_fast.checkpoint import load_reference

    policy = t5vh_fast.load(spec["export_dir"], providers="cpu", threads=spec["threads"])
    model = load_reference(spec["new_dir"])
    before = rss_mb()
    times, version = [], None
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        version = policy.update_weights(model)
        times.append(time.perf_counter() - start)
    return {
        "seconds": sorted(times)[len(times) // 2],
        "first_s": times[0],
        "all_s": times,
        "rss_before_mb": before,
        "rss_after_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "weights_version": version,
    }


def export_worker(spec: dict) -> dict:
    import t5vh_fast
    from t5vh_fast.checkpoint import load_reference
    from t5vh_fast.export import export

    model = load_reference(spec["new_dir"])
    with tempfile.TemporaryDirectory(dir=spec["tmp"]) as tmp:
        start = time.perf_counter()
        model.save_pretrained(Path(tmp) / "model", safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            source = Path(spec["new_dir"]) / name
            if source.is_file():
                (Path(tmp) / "model" / name).write_bytes(source.read_bytes())
        saved = time.perf_counter()
        out = export(Path(tmp) / "model", Path(tmp) / "onnx", optimum=spec["optimum"])
        exported = time.perf_counter()
        policy = t5vh_fast.load(out, providers="cpu", threads=spec["threads"])
        loaded = time.perf_counter()
    return {
        "seconds": loaded - start,
        "save_s": saved - start,
        "export_s": exported - saved,
        "load_s": loaded - exported,
        "peak_rss_mb": peak_rss_mb(),
        "weights_version": policy.weights_version,
    }


def rollout_worker(spec: dict) -> dict:
    import numpy as np

    import t5vh_fast

    policy = t5vh_fast.load(spec["export_dir"], providers="cpu", threads=spec["threads"])
    ids = np.random.default_rng(0).integers(3, min(policy.vocab_size, 32000), size=(BATCH, QUERY_LEN))
    ids[:, -1] = 1
    policy.respond_to_batch(ids, txt_len=4, seed=0)  # warm-up
    times = []
    for _ in range(2):
        start = time.perf_counter()
        policy.respond_to_batch(ids, txt_len=NEW_TOKENS, seed=0)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "all_s": times, "peak_rss_mb": peak_rss_mb()}


WORKERS = {"refresh": refresh_worker, "export": export_worker, "rollout": rollout_worker}


def spawn(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="refreshes timed in the refresh process (median)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return

    from t5vh_fast.demo import default_cache_dir, demo_export, write_demo

    cache = args.cache_dir or default_cache_dir()
    export_dir = demo_export(args.size, cache, log=print)
    new_dir = cache / f"demo-{args.size}-seed1"
    if not (new_dir / "model.safetensors").is_file():
        write_demo(new_dir, size=args.size, seed=1, force=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    spec = {"export_dir": str(export_dir), "new_dir": str(new_dir), "threads": args.threads, "tmp": str(cache)}
    results = {
        "refresh": spawn("refresh", {**spec, "repeats": args.repeats}),
        "export_single": spawn("export", {**spec, "optimum": False}),
        "export_full": spawn("export", {**spec, "optimum": True}),
        "rollout": spawn("rollout", spec),
    }
    refresh = results["refresh"]
    same = {refresh["weights_version"]} == {results[k]["weights_version"] for k in ("export_single", "export_full")}
    rows = [
        (f"`update_weights(model)` (median of {args.repeats})", refresh),
        ("save + `export(optimum=False)` + `load` (single layout only)", results["export_single"]),
        ("save + `export()` + `load` (default: single + Optimum's graphs)", results["export_full"]),
        (f"one rollout, batch {BATCH} x {NEW_TOKENS} tokens (query {QUERY_LEN})", results["rollout"]),
    ]
    print(f"\n{args.size} demo model, {args.threads} threads, load average {load} at the start\n")
    print("| what | seconds | refresh is faster by | peak RSS MB |\n|---|---:|---:|---:|")
    for name, r in rows:
        ratio = f"{r['seconds'] / refresh['seconds']:.1f}x" if r is not refresh else ""
        print(f"| {name} | {r['seconds']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    print(
        f"\nrefresh: first {refresh['first_s']:.2f} s, all {', '.join(f'{t:.2f}' for t in refresh['all_s'])} s; "
        f"RSS {refresh['rss_before_mb']:.0f} MB before (policy + torch model), {refresh['rss_after_mb']:.0f} MB "
        f"after, peak {refresh['peak_rss_mb']:.0f} MB"
    )
    for key in ("export_single", "export_full"):
        r = results[key]
        print(f"{key}: save {r['save_s']:.2f} s, export {r['export_s']:.2f} s, load {r['load_s']:.2f} s")
    print(f"weights_version after the refresh equals the re-exports': {same}")
    results["load_average"] = load
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
