"""Batch scoring: peak RSS stays flat as the input grows; rows/s with and without length bucketing.

    python benchmarks/score_memory.py [--size small] [--rows 2000] [--batch-size 32]

Each job runs in its own process (peak RSS is that process's own). Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from t5vh_fast.bench import peak_rss_mb


def make_rows(path: Path, n: int, vocab: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = rng.integers(3, min(vocab, 32000), size=int(rng.integers(8, 65))).tolist() + [1]
            r = rng.integers(3, min(vocab, 32000), size=int(rng.integers(4, 65))).tolist()
            f.write(json.dumps({"id": i, "query_ids": q, "response_ids": r, "score": float(rng.normal())}) + "\n")


def worker(export_dir: str, src: str, out: str, batch_size: int, sort_window: int, threads: int) -> None:
    import t5vh_fast
    from t5vh_fast.job import run_job

    policy = t5vh_fast.load(export_dir, providers="cpu", threads=threads)
    with open(src) as f:
        summary = run_job(policy, f, Path(out), batch_size=batch_size, sort_window=sort_window)
    print(
        json.dumps(
            {
                "rows": summary.rows_ok,
                "seconds": summary.elapsed_s,
                "rows_per_s": summary.rows_ok / summary.elapsed_s,
                "tokens_per_s": summary.tokens / summary.elapsed_s,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--rows", type=int, default=2000, help="the small input; the large one has 10x")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        e, s, o, b, w, t = args.worker
        return worker(e, s, o, int(b), int(w), int(t))

    from t5vh_fast.demo import default_cache_dir, demo_export

    export_dir = demo_export(args.size, args.cache_dir or default_cache_dir(), log=print)
    vocab = json.loads((export_dir / "config.json").read_text())["vocab_size"]
    print("| rows | sort window | rows/s | tokens/s | peak RSS MB |\n|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n, window in ((args.rows, 16), (10 * args.rows, 16), (args.rows, 1)):
            src, out = Path(tmp) / f"in-{n}.jsonl", Path(tmp) / f"out-{n}-{window}.jsonl"
            if not src.exists():
                make_rows(src, n, vocab)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(export_dir),
                str(src),
                str(out),
                str(args.batch_size),
                str(window),
                str(args.threads),
            ]
            r = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
            print(
                f"| {n} | {window} | {r['rows_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
