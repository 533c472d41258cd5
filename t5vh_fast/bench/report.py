"""Running the workers side by side, and the table, JSON and plot they become."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from statistics import median

from .systems import GPU_SYSTEMS, SYSTEMS
from .workers import QUERY_LEN, SCORE_BATCH, SCORE_ROWS

REDUCED = ("t5vh-int8", "ct2-int8", "ct2")  # the systems whose distribution gap to fp32 PyTorch is measured


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

    from ..gpu import probe, visible_gpus

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
    workload: str = "sample",
    base: dict,
    systems: list,
    batch_sizes: list = (),
    new_tokens: int = 128,
    rows: int = SCORE_ROWS,
    cap: float,
    repeat: int = 1,
    progress: bool = True,
) -> dict:
    """Every system of ``systems`` in its own process, then the report as a dict.

    ``base``: ``model_dir``, ``export_dir`` (fp32), ``int8_dir`` (when t5vh-int8
    runs), ``cache_dir``, ``threads``. ``workload``: ``"sample"`` (every system at
    every batch size) or ``"score"`` (every system on the same sorted batches).
    ``repeat``: rounds; each round runs every (system, batch size) once, so a
    ratio is taken between runs of the same round (``ratio_runs``) and a
    machine that slows down for a while slows both sides of it. For the same
    reason the batch-1 bandwidth floor is measured in each round, just before
    t5vh's batch-1 run (``floors``; ``floor`` is the best of them).
    """
    from tqdm import tqdm

    if workload == "score":
        cells = [("score", {**base, "system": s, "rows": rows}) for s in systems]
    else:
        cells = [
            ("run", {**base, "system": s, "batch": b, "new_tokens": new_tokens}) for b in batch_sizes for s in systems
        ]
    jobs = [(kind, spec, i) for i in range(repeat) for kind, spec in cells]
    gaps = [s for s in REDUCED if s in systems and "int8" in " ".join(systems)]
    results, extra = [], {}
    with tqdm(total=len(jobs) + 3, disable=not progress, file=sys.stderr, unit="run") as bar:

        def stage(text: str) -> None:
            bar.set_description(text)
            if not progress:  # a log, not a terminal: a line per stage, so a cut-off run says how far it got
                print(text, file=sys.stderr, flush=True)

        if any(s.startswith("ct2") for s in systems):
            stage("converting for CTranslate2")
            spawn("convert", base, max(cap, 600))
        bar.update()
        cpu = workload == "sample" and any(s not in GPU_SYSTEMS for s in systems)  # floor, parity: the CPU's
        paired = cpu and "t5vh" in systems and 1 in batch_sizes  # a floor beside each round's t5vh batch-1 run
        if cpu:
            if not paired:
                stage("bandwidth floor")
                extra["floors"] = [{**spawn("floor", base, cap), "round": 0}]
            stage("t5vh parity")
            extra["parity"] = spawn("parity", base, cap)
        bar.update()
        if gaps:
            stage("precision gaps")
            extra["gaps"] = spawn("gap", {**base, "systems": gaps}, max(cap, 600))
        bar.update()
        for kind, spec, i in jobs:
            name = (
                f"{spec['system']}"
                + (f" B={spec['batch']}" if "batch" in spec else "")
                + (f" ({i + 1}/{repeat})" if repeat > 1 else "")
            )
            if paired and spec["system"] == "t5vh" and spec.get("batch") == 1:
                stage(f"bandwidth floor ({i + 1}/{repeat})" if repeat > 1 else "bandwidth floor")
                extra.setdefault("floors", []).append({**spawn("floor", base, cap), "round": i})
            stage(name)
            results.append({**spawn(kind, spec, cap), "round": i})
            bar.update()
            if not progress:
                done = results[-1]
                said = done["error"] if "error" in done else f"{done['tokens_per_s']:.0f} tokens/s"
                print(f"  {said}", file=sys.stderr, flush=True)
    measured = [f for f in extra.get("floors", []) if "floor_ms" in f]
    if measured:  # the best the machine streamed in the run
        extra["floor"] = max(measured, key=lambda f: f["read_gb_s"])
    if workload == "score":
        shape = {"rows": rows, "batch_size": SCORE_BATCH, "query_tokens": "8-64", "response_tokens": "4-64"}
    else:
        shape = {"query_tokens": QUERY_LEN, "new_tokens": new_tokens, "top_k": 0, "top_p": 1.0}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(base["threads"]),
        "workload": {"kind": workload, "batch_sizes": list(batch_sizes), "repeat": repeat, **shape},
        "systems": {s: SYSTEMS[s].description for s in systems},
        "precision": {s: SYSTEMS[s].precision for s in systems},
        "results": results,
        **extra,
    }


def baseline_of(system: str) -> str:
    """The t5vh system a system is compared with: same device, same precision."""
    return SYSTEMS[system].baseline if system in SYSTEMS else "t5vh"


def ratio_runs(report: dict) -> dict:
    """``{(other system, batch): [its t5vh baseline's tokens/s / its tokens/s, one per round]}``.

    Only runs of the same round are compared (a result without ``round`` is round 0).
    """
    by = {(r["system"], r.get("batch"), r.get("round", 0)): r for r in report["results"] if "error" not in r}
    out = {}
    for (system, batch, i), r in sorted(by.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0], kv[0][2])):
        ours = by.get((baseline_of(system), batch, i))
        if ours and system != baseline_of(system):
            out.setdefault((system, batch), []).append(ours["tokens_per_s"] / r["tokens_per_s"])
    return out


def ratios(report: dict) -> list:
    """(batch, other system, the median over rounds of its t5vh baseline's tokens/s / its tokens/s)."""
    runs = ratio_runs(report)
    return [(b, s, median(runs[s, b])) for s, b in sorted(runs, key=lambda k: (k[1] or 0, k[0]))]


def summary(report: dict) -> list:
    """One row per (system, batch) over its rounds: the median of every measured number (peak RSS:
    the largest), ``runs``, and ``tokens_per_s_range``; a cell whose every run failed keeps its first error."""
    cells = {}
    for r in report["results"]:
        cells.setdefault((r["system"], r.get("batch")), []).append(r)
    rows = []
    for runs in cells.values():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append(runs[0])
            continue
        row = dict(ok[0], runs=len(ok))
        for key, value in ok[0].items():
            if isinstance(value, float) and key != "round":
                values = [r[key] for r in ok if r[key] == r[key]] or [value]  # NaN (no /proc) only if all are
                row[key] = (max if key == "peak_rss_mb" else median)(values)
        speeds = [r["tokens_per_s"] for r in ok]
        row["tokens_per_s_range"] = (min(speeds), max(speeds))
        rows.append(row)
    return rows


def _spread(values, fmt: str) -> str:
    """`` (low-high)`` when there is more than one value."""
    return f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else ""


def markdown(report: dict) -> str:
    m, w = report["machine"], report["workload"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; providers {', '.join(m['providers'])}",
        *([f"GPU: {', '.join(m['gpus'])}; driver {m.get('driver')}"] if m.get("gpus") else []),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
    precision = report.get("precision", {})
    runs = ratio_runs(report)
    rows = summary(report)
    repeat = w.get("repeat", 1)

    def short(count: int) -> str:  # some rounds of this cell (or of its baseline) failed
        return f", {count} of {repeat} runs" if count < repeat else ""

    def speedup(system, batch) -> str:
        x = runs.get((system, batch))
        return "" if x is None else f"{median(x):.2f}x" + _spread(x, "{:.2f}") + short(len(x))

    def speed(r) -> str:
        spread = _spread(r["tokens_per_s_range"], "{:.0f}") if r["runs"] > 1 else ""
        return f"{r['tokens_per_s']:.0f}" + spread + short(r["runs"])

    if w.get("kind") == "score":
        lines += [
            f"Workload: scoring {w['rows']} rows of {w['query_tokens']} query and {w['response_tokens']} response "
            f"tokens, sorted by length, batches of {w['batch_size']}",
            "",
            "| system | precision | response tokens/s | rows/s | peak RSS MB | t5vh speed-up |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in sorted(rows, key=lambda r: r["system"]):
            if "error" in r:
                lines.append(f"| {r['system']} | {precision.get(r['system'], '')} | {r['error']} | | | |")
                continue
            lines.append(
                f"| {r['system']} | {precision.get(r['system'], '')} | {speed(r)} | {r['rows_per_s']:.1f} "
                f"| {r['peak_rss_mb']:.0f} | {speedup(r['system'], None)} |"
            )
    else:
        lines += [
            f"Workload: query {w['query_tokens']} tokens, exactly {w['new_tokens']} new tokens per row, top_k=0, top_p=1.0",
            "",
            "| system | precision | batch | tokens/s | ms/step p50 | ms/step p95 | first token ms | peak RSS MB | t5vh speed-up |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(rows, key=lambda r: (r["batch"], r["system"])):
            p = precision.get(r["system"], "")
            if "error" in r:
                lines.append(f"| {r['system']} | {p} | {r['batch']} | {r['error']} | | | | | |")
                continue
            p95 = f"{r['step_ms_p95']:.2f}" if r["per_step_timed"] else "n/a (mean)"
            lines.append(
                f"| {r['system']} | {p} | {r['batch']} | {speed(r)} | {r['step_ms_p50']:.2f} | {p95} | "
                f"{r['ttft_ms']:.0f} | {r['peak_rss_mb']:.0f} | {speedup(r['system'], r['batch'])} |"
            )
    lines.append("")
    lines.append("Systems: " + "; ".join(f"`{k}` = {v}" for k, v in report["systems"].items()))
    lines.append(
        "t5vh speed-up: the same-precision t5vh system's tokens/s over this one's "
        "(t5vh for fp32, t5vh-int8 for int8"
        + (", t5vh-cuda for the GPU systems)" if any(s in GPU_SYSTEMS for s in report["systems"]) else ")")
    )
    if w.get("repeat", 1) > 1:
        lines.append(
            f"Every cell ran {w['repeat']} times, round by round: tokens/s and ms are medians with the lowest-highest "
            "tokens/s in brackets, peak RSS the largest, and the speed-up the median (lowest-highest) of the ratios "
            "between runs of the same round (so it need not equal the ratio of the two medians); a cell that "
            "lost runs says how many it rests on"
        )
    lines += _floor_lines(report) + _parity_lines(report) + _gap_lines(report)
    return "\n".join(lines)


def _floor_lines(report: dict) -> list:
    f = report.get("floor", {})
    if "floor_ms" not in f:
        return []
    ours = next(
        (r for r in summary(report) if r["system"] == "t5vh" and r.get("batch") == 1 and "error" not in r), None
    )
    share = (
        f", t5vh at batch 1: {ours['step_ms_p50']:.2f} ms/step = {100 * f['floor_ms'] / ours['step_ms_p50']:.0f}% of the floor"
        if ours
        else ""
    )
    count = len([g for g in report.get("floors", []) if "floor_ms" in g])
    best = f", the best of {count} rounds' measurements" if count > 1 else ""
    lines = [
        f"Bandwidth floor (batch 1{best}): {f['weight_bytes'] / 1e6:.0f} MB of fp32 decoder + LM-head weights / "
        f"{f['read_gb_s']:.1f} GB/s (onnxruntime MatMul streaming the same bytes; NumPy copy {f['copy_gb_s']:.1f} GB/s) "
        f"= {f['floor_ms']:.2f} ms/step{share}"
    ]
    shares = floor_shares(report)
    if len(shares) > 1:
        lines.append(
            f"Round by round (each round's floor measured just before its t5vh batch-1 run, so a machine that slows "
            f"down for a while slows both): t5vh at {100 * median(shares):.0f}% of the floor"
            + _spread([100 * x for x in shares], "{:.0f}%")
        )
    if "matmuls_ms" in f:
        beyond = f"; t5vh's step spends {ours['step_ms_p50'] - f['matmuls_ms']:.2f} ms beyond them" if ours else ""
        lines.append(
            f"The step's matrix products alone (onnxruntime, one graph of only the decoder's {f['weight_bytes'] / 1e6:.0f} MB "
            f"of MatMuls at batch 1, median of 100 runs): {f['matmuls_ms']:.2f} ms = "
            f"{100 * f['floor_ms'] / f['matmuls_ms']:.0f}% of the floor{beyond}"
        )
    return lines


def floor_shares(report: dict) -> list:
    """Per round with both measured: that round's floor ms / that round's t5vh batch-1 ms a step."""
    floors = {f.get("round", 0): f for f in report.get("floors", []) if "floor_ms" in f}
    steps = {
        r.get("round", 0): r["step_ms_p50"]
        for r in report["results"]
        if r["system"] == "t5vh" and r.get("batch") == 1 and "error" not in r
    }
    return [floors[i]["floor_ms"] / steps[i] for i in sorted(floors) if i in steps]


def _parity_lines(report: dict) -> list:
    p = report.get("parity", {})
    if "identical_tokens" not in p:
        return []
    return [
        f"t5vh parity vs PyTorch (shared uniforms, {p['rows']} rows x {p['tokens']} tokens): "
        f"{p['identical_tokens']:.1%} identical tokens, max |logprob diff| {p['max_logprob_diff']:.1e}, "
        f"max |value diff| {p['max_value_diff']:.1e}"
    ]


def _gap_lines(report: dict) -> list:
    gaps = report.get("gaps") or {}
    rows = [(name, g) for name, g in gaps.items() if isinstance(g, dict) and g.get("measured")]
    if not rows:
        return []
    lines = [
        "",
        "Distribution cost against the fp32 PyTorch model (the export's probe: 16 queries, 24 tokens sampled from fp32):",
        "",
        "| system | KL mean | KL max | max abs delta logprob | ratio p_fp32/p min..max | outside [0.8, 1.25] | token agreement |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, g in rows:
        agreement = (
            f"{g['token_agreement']:.1%} (first {g['first_token_agreement']:.1%})" if "token_agreement" in g else "n/a"
        )
        lines.append(
            f"| {name} | {g['kl_mean']:.2e} | {g['kl_max']:.2e} | {g['max_abs_logprob_diff']:.2e} | "
            f"{g['ratio_min']:.3f}..{g['ratio_max']:.3f} | {g['ratio_outside_band']:.2%} | {agreement} |"
        )
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = report["workload"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if w.get("kind") == "score":
        ok = [r for r in summary(report) if "error" not in r]
        names = [r["system"] for r in ok]
        colors = ["C0" if n.startswith("t5vh") else "C7" for n in names]
        ax.barh(names, [r["tokens_per_s"] for r in ok], xerr=_error_bars(ok), capsize=3, color=colors)
        ax.set_xlabel("response tokens / s")
        ax.set_title(f"Scoring {w['rows']} rows, batches of {w['batch_size']} ({report['machine']['threads']} threads)")
    else:
        for system in report["systems"]:
            rows = sorted(
                (r for r in summary(report) if r["system"] == system and "error" not in r), key=lambda r: r["batch"]
            )
            if rows:  # the median, with the lowest..highest run as an error bar when cells ran several times
                speed = [r["tokens_per_s"] for r in rows]
                width = 2.5 if system.startswith("t5vh") else 1.2
                ax.errorbar(
                    [r["batch"] for r in rows],
                    speed,
                    yerr=_error_bars(rows),
                    marker="o",
                    capsize=3,
                    label=system,
                    linewidth=width,
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(w["batch_sizes"], [str(b) for b in w["batch_sizes"]])
        ax.set_xlabel("batch size")
        ax.set_ylabel("new tokens / s")
        ax.set_title(
            f"Sampling {w['new_tokens']} tokens after a {w['query_tokens']}-token query "
            f"({report['machine']['threads']} threads)"
        )
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _error_bars(rows: list) -> list:
    """Matplotlib's [below, above] distances from each summary row's median tokens/s to its lowest and highest run."""
    low = [r["tokens_per_s"] - r["tokens_per_s_range"][0] for r in rows]
    high = [r["tokens_per_s_range"][1] - r["tokens_per_s"] for r in rows]
    return [low, high]
