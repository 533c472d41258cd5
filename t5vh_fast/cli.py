"""Command-line entry points: one ``t5vh`` group, and each command also as ``t5vh-<command>``.

Thin: the logic lives in the library. The package's own user errors
(``T5vhError``) become one-line ``click.ClickException``s here, at the
boundary, and nowhere else; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import T5vhError
from .inputs import DEFAULT_MAX_QUERY_TOKENS

_MAX_QUERY_TOKENS_HELP = "Longest query, in tokens: longer ones are refused (memory grows with its square)."


def user_errors(func):
    """Turn the package's user errors into one clean line and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except T5vhError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


# ---------------------------------------------------------------------- t5vh-export


@click.command(name="t5vh-export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Export directory [default: MODEL_DIR-onnx[-PRECISION]]."
)
@click.option("--force", is_flag=True, help="Replace an existing export directory.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="fp32: the reference. int8: for the CPU. fp16/bf16: for CUDA/TensorRT. Reduced precisions are "
    "measured against fp32 (the precision-gap report).",
)
@click.option(
    "--max-kl",
    type=float,
    default=None,
    help="Refuse a reduced-precision export whose mean per-token KL to fp32 is larger than this.",
)
@click.option(
    "--optimum/--no-optimum", default=True, show_default=True, help="Also write Optimum's layout (fp32 only)."
)
@click.option("--merged/--no-merged", default=True, show_default=True, help="Also write decoder_model_merged.onnx.")
@click.option("--opset", type=int, default=None, help="ONNX opset of Optimum's graphs [default: Optimum's for T5].")
@click.option("--allow-pickle", is_flag=True, help="Read a .bin (pickle) checkpoint. Only for files you trust.")
@click.option("--strict", is_flag=True, help="Fail instead of warning when the value-head weights are missing.")
@user_errors
def export_command(model_dir, output, force, precision, max_kl, optimum, merged, opset, allow_pickle, strict):
    """Export a T5 value-head model to ONNX, checked against PyTorch.

    Writes t5vh's own graphs (the runtime's default), Optimum's encoder and
    decoder graphs (the decoders also output `value`), config and tokenizer
    files, and t5vh_manifest.json with hashes and the parity report. A reduced
    precision writes t5vh's graphs only, with a precision-gap report instead
    of the parity check. Nothing is left behind if anything fails.

    \b
    Example:
        t5vh-demo write demo-model
        t5vh-export demo-model            # writes demo-model-onnx/
        t5vh-export demo-model --precision int8 --max-kl 0.01   # writes demo-model-onnx-int8/
        t5vh-export demo-model -o out --force --no-merged
    """
    from .export import export

    start = time.perf_counter()
    out = export(
        model_dir,
        output,
        force=force,
        precision=precision,
        max_kl=max_kl,
        optimum=optimum,
        merged=merged,
        opset=opset,
        allow_pickle=allow_pickle,
        strict=strict,
        log=_echo_err,
    )
    click.echo(f"exported {model_dir} to {out} in {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------- t5vh-demo


@click.group(name="t5vh-demo")
def demo_command():
    """The built-in demo model: seeded random T5 weights and a locally trained tokenizer.

    \b
    Example:
        t5vh-demo write demo-model --size tiny
        t5vh-demo run --size small
    """


@demo_command.command(name="write")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--family", type=click.Choice(["t5", "t5-v1_1", "mt5"]), default="t5", show_default=True)
@click.option(
    "--head-layout",
    type=click.Choice(["logits", "hidden", "seed", "trl"]),
    default="logits",
    show_default=True,
    help="What the value head reads: the LM logits or the last hidden state (seed/trl: old names).",
)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@user_errors
def demo_write(out_dir, size, seed, family, head_layout, force):
    """Write the demo model (safetensors + tokenizer) to OUT_DIR.

    \b
    Example:
        t5vh-demo write demo-model --size small
    """
    from .demo import write_demo

    write_demo(out_dir, size=size, seed=seed, family=family, head_layout=head_layout, force=force)
    click.echo(f"wrote the {size} demo model to {out_dir}")


@demo_command.command(name="run")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=None, help="[default: $T5VH_CACHE or ~/.cache/t5vh_fast]"
)
@click.option("--txt-len", type=int, default=32, show_default=True)
@click.option("--threads", type=int, default=None)
@user_errors
def demo_run(size, cache_dir, txt_len, threads):
    """Export the demo model, sample responses, check parity with PyTorch, time both.

    \b
    Example:
        t5vh-demo run --size tiny --txt-len 16
    """
    import numpy as np
    import torch

    from . import load
    from .bench import rollout_parity
    from .checkpoint import load_reference
    from .demo import default_cache_dir, demo_export

    cache_dir = cache_dir or default_cache_dir()
    export_dir = demo_export(size, cache_dir, log=_echo_err)
    policy = load(export_dir, threads=threads)
    click.echo(f"providers: {policy.providers}")
    queries = ["paraphrase: Which course should I take to get started in data science?", "How do I cook rice?"]
    for query, response in zip(queries, policy.respond_to_text(queries, txt_len=txt_len, seed=0)):
        click.echo(f"  {query!r} -> {response!r}")

    reference = load_reference(cache_dir / f"demo-{size}")
    if threads:
        torch.set_num_threads(threads)
    ids, mask = policy.encode_text(queries * 4)
    uniforms = np.random.default_rng(0).random((ids.shape[0], txt_len))
    p = rollout_parity(policy, reference, ids, mask, uniforms)
    click.echo(
        f"parity vs PyTorch (shared uniforms, {p['rows']} rows x {p['tokens']}): tokens identical "
        f"{p['identical_tokens']:.1%}, max |logprob diff| {p['max_logprob_diff']:.2e}, "
        f"max |value diff| {p['max_value_diff']:.2e}"
    )
    n = p["rows"] * p["tokens"]
    click.echo(
        f"speed: t5vh {n / p['t5vh_s']:.0f} tok/s, PyTorch reference (KV cache) {n / p['torch_s']:.0f} tok/s "
        f"({p['torch_s'] / p['t5vh_s']:.1f}x) at batch {p['rows']}"
    )


# ---------------------------------------------------------------------- t5vh-sample


@click.command(name="t5vh-sample")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True)
@click.option("--txt-len", type=int, default=20, show_default=True, help="Tokens per response (exactly).")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0 = off.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible samples.")
@click.option(
    "-n",
    "--num-return-sequences",
    type=int,
    default=1,
    show_default=True,
    help="Responses per text (one encoder pass).",
)
@click.option("--providers", default="auto", show_default=True, help="auto, cpu, cuda or tensorrt.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines with tokens, logprobs and values.")
@click.option(
    "--max-query-tokens", type=int, default=DEFAULT_MAX_QUERY_TOKENS, show_default=True, help=_MAX_QUERY_TOKENS_HELP
)
@user_errors
def sample_command(
    export_dir, texts, txt_len, top_k, top_p, seed, num_return_sequences, providers, as_json, max_query_tokens
):
    """Sample responses to TEXTS from an export (the seed notebook's paraphrase demo).

    \b
    Example:
        t5vh-sample demo-model-onnx "paraphrase: Which course should I take?" -n 3 --top-k 100 --top-p 0.95 --seed 0
    """
    from . import load

    if num_return_sequences < 1:
        raise click.BadParameter(f"must be >= 1, got {num_return_sequences}", param_hint="--num-return-sequences")
    policy = load(export_dir, providers=providers)
    ids, mask = policy.encode_text(texts, max_query_tokens=max_query_tokens)
    rollout = policy.respond_to_batch(  # the encoder runs once per text, for all its samples
        ids,
        mask,
        txt_len=txt_len,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_return_sequences,
        seed=seed,
        max_query_tokens=max_query_tokens,
    )
    responses = policy.decode_text(rollout.tokens)
    for row, response in enumerate(responses):
        text = texts[rollout.query_index[row]]
        if as_json:
            record = {
                "query": text,
                "response": response,
                "response_ids": rollout.tokens[row].tolist(),
                "logprobs": rollout.logprobs[row].tolist(),
                "values": rollout.values[row].tolist(),
                "weights_version": rollout.weights_version,
                "precision": rollout.precision,
            }
            click.echo(json.dumps(record))
        else:
            if row % num_return_sequences == 0:
                click.echo(f"{text}")
            click.echo(f"  {row % num_return_sequences}: {response}")


# ---------------------------------------------------------------------- t5vh-score


class _ScoreInput(click.File):
    """A JSONL file, opened as ``click.File("rb")`` opens it, or (for ``--ray``) a directory: its path."""

    def convert(self, value, param, ctx):
        if isinstance(value, (str, Path)) and str(value) != "-" and os.path.isdir(value):
            return Path(value)
        return super().convert(value, param, ctx)


@click.command(name="t5vh-score")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("input_file", type=_ScoreInput("rb"))
@click.option(
    "-o",
    "--output",
    required=True,
    help="Output JSONL path, or - for stdout. An output this command wrote is resumed, with the same settings only. "
    "With --ray, also a directory (one that exists, or a name ending in /): Ray writes part-*.jsonl files there.",
)
@click.option(
    "--ref", "ref_dir", type=click.Path(path_type=Path), default=None, help="Reference export for KL and reward."
)
@click.option(
    "--beta", type=float, default=0.1, show_default=True, help="KL coefficient: reward = score - beta * sum(kl)."
)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Longest query + response, in tokens.")
@click.option(
    "--max-query-tokens", type=int, default=DEFAULT_MAX_QUERY_TOKENS, show_default=True, help=_MAX_QUERY_TOKENS_HELP
)
@click.option(
    "--sort-window", type=int, default=16, show_default=True, help="Batches read ahead and sorted by length (1 = off)."
)
@click.option(
    "--errors",
    "errors_path",
    default=None,
    help="Bad rows go here [default: OUTPUT.errors.jsonl, or stderr; for a directory OUTPUT, the directory "
    "OUTPUT.errors].",
)
@click.option(
    "--batch-tokens",
    type=int,
    default=None,
    help="Also bound each batch by its padded tokens (rows x longest query + response): flat memory whatever "
    "the lengths. A row alone over it goes to the errors file.",
)
@click.option("--fail-fast", is_flag=True, help="Stop with an error at the first bad row.")
@click.option("--providers", default="auto", show_default=True, help="auto, cpu, cuda or tensorrt.")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="onnxruntime threads (with --ray: per actor) [default: all cores; with --ray: 1].",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[auto|ADDRESS]",
    help='Run on Ray Data (pip install "t5vh_fast[ray]"): auto joins the cluster RAY_ADDRESS or `ray start` names, '
    "else starts one here; ADDRESS is a head node's host:port (write --ray=ADDRESS, or put a bare --ray last: "
    "it takes the next word as its ADDRESS). INPUT_FILE may then be a directory of JSONL files.",
)
@click.option(
    "--concurrency",
    type=int,
    default=None,
    help="With --ray: actors, each holding one loaded policy [default: one per GPU, else one per CPU less one].",
)
@user_errors
def score_command(
    export_dir,
    input_file,
    output,
    ref_dir,
    beta,
    batch_size,
    max_tokens,
    max_query_tokens,
    sort_window,
    errors_path,
    batch_tokens,
    fail_fast,
    providers,
    threads,
    ray_address,
    concurrency,
):
    """Score query/response pairs from a JSONL file: log-probs, values, KL, reward.

    Rows: {"id": ..., "query": "..." or "query_ids": [...], "response": "..."
    or "response_ids": [...], "score": 1.0 (optional)}. Run it again with the
    same OUTPUT after an interruption: scored ids are skipped. OUTPUT must be
    new or written by this command with the same exports and options (they
    are recorded in OUTPUT.t5vh-job.json), and one job at a time writes it.

    With --ray the same rows are scored by a pool of Ray actors into the same
    records; INPUT_FILE and OUTPUT may be directories (see README, "Scaling
    out on Ray").

    \b
    Example:
        t5vh-score demo-model-onnx rows.jsonl -o scored.jsonl --ref demo-model-onnx --beta 0.1
        t5vh-score demo-model-onnx rows/ -o scored/ --ray
    """
    options = dict(
        beta=beta,
        batch_size=batch_size,
        max_tokens=max_tokens,
        max_query_tokens=max_query_tokens,
        sort_window=sort_window,
        batch_tokens=batch_tokens,
        fail_fast=fail_fast,
        progress=_stderr_is_terminal(),
    )
    if ray_address is not None:
        summary, errors_at = _score_on_ray(
            export_dir, input_file, output, ref_dir, errors_path, providers, threads, ray_address, concurrency, options
        )
    else:
        if isinstance(input_file, Path):
            raise click.ClickException(
                f"{input_file} is a directory: name a JSONL file, or pass --ray to read a directory"
            )
        if concurrency is not None:
            raise click.BadParameter("only with --ray", param_hint="--concurrency")
        from . import load
        from .job import default_errors_path, run_job

        policy = load(export_dir, providers=providers, threads=threads, for_scoring=True)
        ref_policy = (
            load(ref_dir, providers=providers, threads=threads, for_scoring=True) if ref_dir is not None else None
        )
        output_path = None if output == "-" else Path(output)
        errors_at = default_errors_path(output_path) if errors_path is None else errors_path
        errors_file = None if errors_at in (None, "-") else Path(errors_at)
        summary = run_job(policy, input_file, output_path, errors_path=errors_file, ref_policy=ref_policy, **options)
    click.echo(summary.line(), err=True)
    if summary.rows_failed and not summary.rows_ok and not summary.rows_skipped:
        raise click.ClickException(f"every row failed: see {errors_at or 'stderr'}")


def _score_on_ray(
    export_dir, input_file, output, ref_dir, errors, providers, threads, ray_address, concurrency, options
):
    """``t5vh-score --ray``: the same job on Ray Data (``t5vh_fast.ray.run_job``); returns its
    ``(JobSummary, where the bad rows went)``."""
    if not isinstance(input_file, Path):
        if input_file.name in ("-", "<stdin>") or not os.path.isfile(input_file.name):
            raise click.ClickException("--ray reads files, not stdin: name the input file or directory")
        input_file.close()
        input_file = Path(input_file.name)
    from .ray import run_job

    return run_job(
        export_dir,
        input_file,
        output,
        errors=errors,
        ref_dir=ref_dir,
        address=ray_address,
        concurrency=concurrency,
        providers=providers,
        threads=threads,
        **options,
    )


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


# ---------------------------------------------------------------------- t5vh-bench


def _int_list(ctx, param, value):
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return numbers


@click.command(name="t5vh-bench")
@click.option(
    "--size",
    type=click.Choice(["tiny", "small"]),
    default="small",
    show_default=True,
    help="Demo model size (small = t5-small shape).",
)
@click.option(
    "--workload",
    type=click.Choice(["sample", "score"]),
    default="sample",
    show_default=True,
    help="sample: rollouts at each batch size. score: teacher-forced scoring of the same query/response rows.",
)
@click.option("--systems", default=None, help="Comma-separated subset [default: every system installed here].")
@click.option("--batch-sizes", default="1,16,64", show_default=True, callback=_int_list)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--rows", type=int, default=320, show_default=True, help="Rows of the scoring workload.")
@click.option("--threads", type=int, default=None, help="Threads for every system [default: all cores].")
@click.option(
    "--cap",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds one run may take before it is reported as too slow.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Rounds: every cell runs this many times, round by round; the table gives medians and ranges, "
    "and each speed-up is the median of ratios between runs of the same round.",
)
@click.option("--quick", is_flag=True, help="Batch sizes 1,4, 16 new tokens, 64 scoring rows: a minute or two.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="[default: $T5VH_CACHE or ~/.cache/t5vh_fast]",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write every number here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG of the results.")
@user_errors
def bench_command(
    size, workload, systems, batch_sizes, new_tokens, rows, threads, cap, repeat, quick, cache_dir, json_path, plot_path
):
    """Compare t5vh with PyTorch, transformers generate, Optimum and CTranslate2, side by side.

    Runs on the built-in demo model (exported into the cache on first use),
    each system and batch size in its own process, and prints a Markdown table
    (with each system's precision, and for int8 its distribution cost against
    the fp32 model).

    \b
    Example:
        t5vh-bench --quick --size tiny --json bench.json --plot bench.png
        t5vh-bench --systems t5vh,t5vh-int8,ct2,ct2-int8 --batch-sizes 1,16 --new-tokens 64
        t5vh-bench --workload score --systems t5vh,ct2,torch
        t5vh-bench --systems t5vh-int8,ct2-int8 --batch-sizes 64 --repeat 3   # a noisy machine
    """
    from ._files import write_json_atomic
    from .bench import SYSTEMS, available_systems, markdown, plot, run_benchmark, why_unavailable
    from .demo import default_cache_dir, demo_export

    if quick:
        batch_sizes, new_tokens, rows = [1, 4], 16, 64
    if new_tokens < 2:
        raise click.BadParameter("must be at least 2", param_hint="--new-tokens")
    if rows < 1:
        raise click.BadParameter("must be at least 1", param_hint="--rows")
    installed = available_systems(workload)
    chosen = installed if systems is None else [s.strip() for s in systems.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(SYSTEMS)}", param_hint="--systems")
    missing = [s for s in chosen if s not in installed]
    if missing:
        reasons = "; ".join(f"{s}: {why_unavailable(s, workload)}" for s in missing)
        raise click.BadParameter(f"{missing} cannot run here ({reasons})", param_hint="--systems")
    threads = threads or os.cpu_count() or 1
    cache_dir = cache_dir or default_cache_dir()
    base = {
        "model_dir": str(cache_dir / f"demo-{size}"),
        "export_dir": str(demo_export(size, cache_dir, log=_echo_err)),
        "cache_dir": str(cache_dir),
        "threads": threads,
    }
    if "t5vh-int8" in chosen:
        base["int8_dir"] = str(demo_export(size, cache_dir, precision="int8", log=_echo_err))
    report = run_benchmark(
        workload=workload,
        base=base,
        systems=chosen,
        batch_sizes=batch_sizes,
        new_tokens=new_tokens,
        rows=rows,
        cap=cap,
        repeat=repeat,
        progress=_stderr_is_terminal(),
    )
    report["command"] = " ".join(["t5vh-bench", *sys.argv[1:]])
    report["model"] = size
    click.echo(markdown(report))
    if json_path is not None:
        write_json_atomic(json_path, report)
    if plot_path is not None:
        plot(report, plot_path)
    if not any("error" not in r for r in report["results"]):
        raise click.ClickException("every run failed: " + "; ".join(r["error"] for r in report["results"][:3]))


# ---------------------------------------------------------------------- the t5vh group


@click.group(name="t5vh", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="t5vh_fast")
def main():
    """Fast, parity-checked ONNX Runtime inference for T5 policies with a value head.

    \b
    Example:
        t5vh demo write demo-model --size tiny
        t5vh export demo-model
        t5vh sample demo-model-onnx "paraphrase: Which course should I take?" --seed 0
    """


for _name, _command in (
    ("export", export_command),
    ("sample", sample_command),
    ("score", score_command),
    ("bench", bench_command),
    ("demo", demo_command),
):
    main.add_command(_command, name=_name)
