"""Group sampling against the repeated batch: N samples per query, the encoder once per query.

    python benchmarks/group_sampling.py [--size small] [--queries 8] [--samples 8] [--new-tokens 64]

For each query length (256 and 64 tokens), the same rollouts two ways, each in
its own process (peak RSS is that process's own): the query batch repeated N
times (what users did before), and ``respond_to_batch(..., num_samples=N)``.
Both draw the same uniforms, so their tokens must agree; the table says how
many did. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from t5vh_fast.bench import peak_rss_mb


def worker(export_dir: str, mode: str, queries: int, samples: int, query_len: int, new_tokens: int, threads: int):
    import numpy as np

    import t5vh_fast

    policy = t5vh_fast.load(export_dir, providers="cpu", threads=threads)
    ids = np.random.default_rng(0).integers(3, min(policy.vocab_size, 32000), size=(queries, query_len))
    ids[:, -1] = 1
    mask = np.ones_like(ids)
    u = np.random.default_rng(1).random((queries * samples, new_tokens))

    def run(n):
        if mode == "group":
            return policy.respond_to_batch(ids, mask, txt_len=n, num_samples=samples, uniforms=u[:, :n])
        repeated = np.repeat(ids, samples, axis=0), np.repeat(mask, samples, axis=0)
        return policy.respond_to_batch(*repeated, txt_len=n, uniforms=u[:, :n])

    run(2)  # warm-up
    best, tokens = float("inf"), None
    for _ in range(2):
        start = time.perf_counter()
        tokens = run(new_tokens).tokens
        best = min(best, time.perf_counter() - start)
    np.save(Path(export_dir).parent / f".group-{mode}-{query_len}.npy", tokens)
    print(json.dumps({"tokens_per_s": tokens.size / best, "seconds": best, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--query-lengths", default="256,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        e, mode, q, n, length, new, t = args.worker
        return worker(e, mode, int(q), int(n), int(length), int(new), int(t))

    import numpy as np

    from t5vh_fast.demo import default_cache_dir, demo_export

    export_dir = demo_export(args.size, args.cache_dir or default_cache_dir(), log=print)
    print(
        f"{args.queries} queries x {args.samples} samples x {args.new_tokens} new tokens, {args.threads} threads\n\n"
        "| query tokens | repeated batch tok/s | group tok/s | speed-up | repeated peak RSS MB | group peak RSS MB "
        "| identical tokens | rows that split (share of draws) |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for length in [int(x) for x in args.query_lengths.split(",")]:
        r = {}
        for mode in ("repeated", "group"):
            spec = [str(export_dir), mode, args.queries, args.samples, length, args.new_tokens, args.threads]
            cmd = [sys.executable, __file__, "--worker", *map(str, spec)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r[mode] = json.loads(out)
        same, rows, split_share = agreement(
            np.load(export_dir.parent / f".group-group-{length}.npy"),
            np.load(export_dir.parent / f".group-repeated-{length}.npy"),
        )
        a, b = r["repeated"], r["group"]
        print(
            f"| {length} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | {b['tokens_per_s'] / a['tokens_per_s']:.2f}x "
            f"| {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {same:.1%} | {rows} ({split_share:.3%}) |",
            flush=True,
        )


def agreement(a, b):
    """(share of identical tokens, rows that split, share of the comparable draws that split).

    After a row's first split its two copies have different histories, so only the draws up to
    and including the first split compare the two computations."""
    import numpy as np

    same = a == b
    split = ~same.all(axis=1)
    first = np.where(split, np.argmin(same, axis=1), a.shape[1] - 1)
    return float(same.mean()), int(split.sum()), float(split.sum() / (first + 1).sum())


if __name__ == "__main__":
    main()
