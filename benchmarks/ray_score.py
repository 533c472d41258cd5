"""t5vh-score on one process against t5vh-score --ray on a local Ray cluster, same rows, same machine.

    python benchmarks/ray_score.py [--size tiny|small] [--rows 20000] [--batch-size 32]

Each job is a fresh `python -m t5vh_fast score` process (the --ray ones start
their own local cluster, as a user's first run would), timed from start to
exit; "job s" is the time the command itself reports in its summary line
(without Python and model start-up). Rows: 8-64 query and 4-64 response
tokens (benchmarks/score_memory.py). Prints a Markdown table and checks that
every run wrote every id once. The baseline runs again last: the difference
between its two runs is how much the machine drifted meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from score_memory import make_rows  # noqa: E402

RUNS = [  # (label, extra arguments, output is a directory); the baseline runs first and last (drift)
    ("one process, 2 threads (t5vh-score)", ["--threads", "2"], False),
    ("one process, 1 thread", ["--threads", "1"], False),
    ("--ray, 1 actor x 1 thread, file output", ["--ray"], False),
    ("--ray, 1 actor x 1 thread, directory output", ["--ray"], True),
    ("--ray, 1 actor x 2 threads, directory output", ["--ray", "--threads", "2"], True),
    ("one process, 2 threads, again", ["--threads", "2"], False),
]


def run(export_dir: Path, src: Path, out: Path, extra: list, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "t5vh_fast", "score", str(export_dir), str(src), "-o", str(out)]
    cmd += ["--providers", "cpu", "--batch-size", str(batch_size), *extra]
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    summary = [line for line in proc.stderr.splitlines() if "rows scored" in line][-1]
    job_s = float(re.search(r"([\d.]+) s,", summary).group(1))
    files = sorted(out.glob("part-*.jsonl")) if out.is_dir() else [out]
    ids = [json.loads(line)["id"] for f in files for line in f.read_text().splitlines()]
    return {"wall_s": wall, "job_s": job_s, "ids": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()

    from t5vh_fast.demo import default_cache_dir, demo_export

    export_dir = demo_export(args.size, args.cache_dir or default_cache_dir(), log=print)
    vocab = json.loads((export_dir / "config.json").read_text())["vocab_size"]
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print(f"{args.size} demo model, {args.rows} rows, --batch-size {args.batch_size}\n")
    print("| run | wall s | rows/s (wall) | job s | rows/s (job) | vs one process (wall) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        make_rows(src, args.rows, vocab)
        base = None
        for k, (label, extra, to_dir) in enumerate(RUNS):
            out = Path(tmp) / (f"out{k}/" if to_dir else f"out{k}.jsonl")
            r = run(export_dir, src, out, extra, args.batch_size)
            assert sorted(r["ids"]) == list(range(args.rows)), f"{label}: ids missing or repeated"
            base = base or r["wall_s"]
            print(
                f"| {label} | {r['wall_s']:.1f} | {args.rows / r['wall_s']:.0f} | {r['job_s']:.1f} | "
                f"{args.rows / r['job_s']:.0f} | {base / r['wall_s']:.2f}x |",
                flush=True,
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
