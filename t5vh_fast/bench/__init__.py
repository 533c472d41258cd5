"""``t5vh-bench``: t5vh against the alternatives, side by side, in one run.

Every (system, batch size) runs in its own subprocess, so peak RSS is honest
and a slow system can be cut off at ``--cap`` seconds. Two workloads, the same
for every system: sampling (queries of 64 tokens, exactly N new tokens per
row, top_k=0, top_p=1.0) and scoring (320 query/response pairs, sorted by
length, batches of 32). Every system gets the same thread count.

    systems.py  the systems and how each samples and scores
    workers.py  what one subprocess measures
    report.py   running them, and the table, JSON and plot
"""

from .report import (
    baseline_of,
    floor_shares,
    machine_info,
    markdown,
    plot,
    ratio_runs,
    ratios,
    run_benchmark,
    spawn,
    summary,
)
from .systems import GPU_SYSTEMS, SCORE_SYSTEMS, SYSTEMS, StepClock, available_systems, ct2_model, why_unavailable
from .workers import QUERY_LEN, peak_rss_mb, rollout_parity, rss_mb, score_batches

__all__ = [
    "SYSTEMS",
    "SCORE_SYSTEMS",
    "GPU_SYSTEMS",
    "QUERY_LEN",
    "StepClock",
    "available_systems",
    "baseline_of",
    "ct2_model",
    "floor_shares",
    "machine_info",
    "markdown",
    "peak_rss_mb",
    "plot",
    "ratio_runs",
    "ratios",
    "rollout_parity",
    "rss_mb",
    "run_benchmark",
    "score_batches",
    "spawn",
    "summary",
    "why_unavailable",
]
