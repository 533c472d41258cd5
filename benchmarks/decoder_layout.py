"""Every decoder layout (single, split, merged): rollout speed and peak RSS, each in its own process.

python benchmarks/decoder_layout.py [--size small] [--batch-sizes 1,16,64] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from t5vh_fast.bench import peak_rss_mb


def worker(export_dir: str, layout: str, batch: int, new_tokens: int, threads: int) -> None:
    import numpy as np

    import t5vh_fast

    policy = t5vh_fast.load(export_dir, providers="cpu", threads=threads, decoder=layout)
    loaded = peak_rss_mb()
    ids = np.random.default_rng(0).integers(3, 32000, size=(batch, 64))
    ids[:, -1] = 1
    policy.respond_to_batch(ids, txt_len=4, seed=0)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        policy.respond_to_batch(ids, txt_len=new_tokens, seed=0)
        best = min(best, time.perf_counter() - start)
    print(
        json.dumps(
            {
                "tokens_per_s": batch * new_tokens / best,
                "rss_after_load_mb": loaded,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        e, layout, b, n, t = args.worker
        return worker(e, layout, int(b), int(n), int(t))

    from pathlib import Path

    from t5vh_fast.demo import default_cache_dir, demo_export

    export_dir = demo_export(args.size, Path(args.cache_dir) if args.cache_dir else default_cache_dir(), log=print)
    print("| decoder | batch | tokens/s | RSS after load MB | peak RSS MB |\n|---|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for layout in ("single", "split", "merged"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(export_dir),
                layout,
                str(batch),
                str(args.new_tokens),
                str(args.threads),
            ]
            r = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
            print(
                f"| {layout} | {batch} | {r['tokens_per_s']:.0f} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
