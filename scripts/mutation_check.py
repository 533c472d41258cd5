#!/usr/bin/env python3
"""The mutation check: break the core modules on purpose, one small change at a time, and see the tests fail.

    .venv/bin/python scripts/mutation_check.py              # the default set (about half an hour on 2 cores)
    .venv/bin/python scripts/mutation_check.py --sample 0   # every mutant the modules have (over an hour)
    .venv/bin/python scripts/mutation_check.py --list       # the mutants, without running anything
    .venv/bin/python scripts/mutation_check.py --only scoring.py:7 --show
    .venv/bin/python scripts/mutation_check.py --module job.py --report mutation.md

For each mutant the package is copied to a temporary directory, one mutation is applied to one
module, and that module's fast test subset (``SUBSETS``) runs against the copy with ``pytest -x``
and a timeout. A mutant is *killed* when a test fails (or the run times out), *survived* when every
test passes. The unmutated copy must pass every subset first, or nothing is scored.

Mutants are generated from the syntax tree, so the list is the same on every run for the same
source: comparison flips (``<`` / ``<=``, ``==`` / ``!=``, ``in`` / ``not in``), arithmetic swaps
(``+`` / ``-``, ``*`` / ``/``), ``and`` / ``or``, a dropped ``not``, min/max and any/all swaps,
off-by-one integers in indices, slices, ``range`` and comparisons, ``return None`` for a returned
value, and ``pass`` for a statement inside an ``if`` branch. By default a deterministic sample of
the larger modules' mutants runs (``SAMPLE``); ``--sample 0`` runs them all. Display-only code
(``SKIP``, ``SKIP_LINES``) is left out.

The test fixtures (the tiny demo model, its export, a perturbed copy) are built once, by the
unmutated code, into a cache directory (``T5VH_TEST_FIXTURES``, see tests/conftest.py) and shared by
every run. Not in CI: it takes tens of minutes. docs/contributing.md says when to run it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "t5vh_fast"
SINGLE = "not split and not merged"  # the layout-parametrized tests on the default layout only

# module -> the pytest arguments of its fast test subset
SUBSETS = {
    "sampling.py": [
        "tests/test_sampling.py",
        "tests/test_modeling.py::test_filtering_equals_transformers_warpers",
        "tests/test_modeling.py::test_filters_follow_the_tie_rule_on_tied_logits",
        "tests/test_modeling.py::test_draw_is_the_inverse_cdf_of_the_rng_contract",
        "tests/test_modeling.py::test_a_tiny_top_p_keeps_the_top_tokens",
        "tests/test_runtime.py::test_token_parity_on_tied_logits",
        "tests/test_runtime.py::test_token_parity_with_pytorch_on_shared_uniforms",
        "tests/test_runtime.py::test_nan_logits_are_an_error_naming_step_and_row",
        "-k",
        SINGLE,
    ],
    "rollout.py": [
        "tests/test_runtime.py",
        "tests/test_cli.py::test_sample_command_options_reach_the_sampler",
        "-k",
        f"{SINGLE} and not manifest and not tampered and not format_1 and not distribution and not vocabulary",
    ],
    "scoring.py": [
        "tests/test_scoring.py",
        "tests/test_runtime.py::test_rollout_equals_score_on_the_same_tokens",
        "tests/test_reliability.py",
        "-k",
        f"{SINGLE} and (score or kl or reward or job or non_finite or beta or python_api)",
    ],
    "job.py": [
        "tests/test_scoring.py",
        "tests/test_reliability.py",
        "tests/test_batch_tokens.py",
        "-k",
        f"{SINGLE} and not export",
    ],
    "manifest.py": [
        "tests/test_runtime.py",
        "tests/test_reliability.py",
        "tests/test_cli.py::test_commands_on_a_directory_that_is_not_an_export",
        "-k",
        "manifest or tampered or format_1 or damaged or not_an_export or vocabulary_differs",
    ],
}
# mutants run per module by default: a deterministic sample where a module has more (0 = all of them);
# about 140 mutants, half an hour on this project's 2-core machine
SAMPLE = {"sampling.py": 30, "rollout.py": 0, "scoring.py": 0, "job.py": 40, "manifest.py": 20}
# display-only code: progress, timing and summary lines (their mutants would only change what is printed):
# functions (qualified names) and lines holding one of the strings
SKIP = {"job.py": {"JobSummary.line"}}
SKIP_LINES = {"job.py": ("bar.", "bar =", "elapsed_s", "perf_counter")}
SWAP_COMPARE = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult}
SWAP_NAME = {"minimum": "maximum", "maximum": "minimum", "min": "max", "max": "min", "any": "all", "all": "any"}
SWAP_NAME.update(argmax="argmin", argmin="argmax")
OPERATOR_TEXT = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
}


@dataclass(frozen=True)
class Mutant:
    module: str  # file name in the package
    number: int  # per module, in source order
    line: int
    column: int  # of the replaced text, 1-based
    kind: str
    start: int  # byte offsets of the replaced text
    end: int
    replacement: str
    original: str

    @property
    def name(self) -> str:
        return f"{self.module}:{self.number}"

    def describe(self) -> str:
        return f"{self.name} line {self.line}:{self.column} {self.kind}: {self.original!r} -> {self.replacement!r}"

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.replacement.encode() + source[self.end :]


class _Sites(ast.NodeVisitor):
    """Every mutation site of one module, in source order."""

    def __init__(self, module: str, source: bytes):
        self.module = module
        self.source = source
        self.line_starts = [0]
        for line in source.splitlines(keepends=True):
            self.line_starts.append(self.line_starts[-1] + len(line))
        self.found = []  # (start, end, kind, replacement, line)
        self.scope = []
        self.skip = SKIP.get(module, set())
        self.docstrings = set()

    # ------------------------------------------------------------------ positions

    def offset(self, line: int, col: int) -> int:
        return self.line_starts[line - 1] + col  # col_offset is in UTF-8 bytes, like our offsets

    def span(self, node) -> tuple:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def text(self, start: int, end: int) -> str:
        return self.source[start:end].decode()

    def add(self, start: int, end: int, kind: str, replacement: str, line: int) -> None:
        if any(".".join(self.scope[: i + 1]) in self.skip for i in range(len(self.scope))):
            return
        first_line = self.source.splitlines()[line - 1].decode()
        if any(text in first_line for text in SKIP_LINES.get(self.module, ())):
            return
        if replacement != self.text(start, end):
            self.found.append((start, end, kind, replacement, line))

    def operator_between(self, left, right, op_type, new_type, kind: str) -> None:
        """Replace the operator token between two operands (formatting and comments kept)."""
        start, end = self.span(left)[1], self.span(right)[0]
        gap = self.text(start, end)
        old = OPERATOR_TEXT[op_type]
        # the token, not a longer one containing it ("<" inside "<=", "in" inside "not in")
        tokens = gap.replace("(", " ").replace(")", " ").split()
        joined = " ".join(tokens)
        if joined != old:
            return
        at = gap.index(old)
        self.add(start + at, start + at + len(old), kind, OPERATOR_TEXT[new_type], left.end_lineno)

    # ------------------------------------------------------------------ scopes

    def visit_Module(self, node):
        self._docstring(node)
        self.generic_visit(node)

    def _docstring(self, node):
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            self.docstrings.add(id(body[0].value))

    def visit_FunctionDef(self, node):
        self._docstring(node)
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef

    # ------------------------------------------------------------------ mutations

    def visit_JoinedStr(self, node):
        return  # messages: not mutated

    def visit_Compare(self, node):
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            if type(op) in SWAP_COMPARE:
                self.operator_between(left, right, type(op), SWAP_COMPARE[type(op)], "compare")
            left = right
        self.generic_visit(node)

    def visit_BinOp(self, node):
        if type(node.op) in SWAP_BINOP and not _is_string(node) and not _is_path_join(node):
            self.operator_between(node.left, node.right, type(node.op), SWAP_BINOP[type(node.op)], "arithmetic")
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        start, end = self.span(node.values[0])[1], self.span(node.values[1])[0]
        gap = self.text(start, end)
        if gap.replace("(", " ").replace(")", " ").split() == [old]:
            at = gap.index(old)
            self.add(start + at, start + at + len(old), "boolean", new, node.values[0].end_lineno)
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            start, end = self.span(node)
            self.add(start, end, "drop not", self.text(*self.span(node.operand)), node.lineno)
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr in SWAP_NAME and isinstance(node.ctx, ast.Load):
            end = self.span(node)[1]
            self.add(end - len(node.attr), end, "swap", SWAP_NAME[node.attr], node.end_lineno)
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            start, end = self.span(node.func)
            self.add(start, end, "swap", SWAP_NAME[node.func.id], node.lineno)
        if isinstance(node.func, ast.Name) and node.func.id == "range" or _called(node) == "islice":
            for arg in node.args:
                self._off_by_one(arg)
        self.generic_visit(node)

    def visit_Subscript(self, node):
        index = node.slice
        parts = index.elts if isinstance(index, ast.Tuple) else [index]
        for part in parts:
            if isinstance(part, ast.Slice):
                for bound in (part.lower, part.upper):
                    if bound is not None:
                        self._off_by_one(bound)
            else:
                self._off_by_one(part)
        self.generic_visit(node)

    def _off_by_one(self, node):
        """An int constant, or ``x +/- int``: one more."""
        if isinstance(node, ast.Constant) and type(node.value) is int:
            start, end = self.span(node)
            self.add(start, end, "off by one", str(node.value + 1), node.lineno)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            start, end = self.span(node)
            if type(node.operand.value) is int:
                self.add(start, end, "off by one", str(-node.operand.value + 1), node.lineno)
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, (ast.Add, ast.Sub))
            and isinstance(node.right, ast.Constant)
            and type(node.right.value) is int
        ):
            start, end = self.span(node.right)
            self.add(start, end, "off by one", str(node.right.value + 1), node.right.lineno)

    def visit_Return(self, node):
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            start, end = self.span(node.value)
            self.add(start, end, "return None", "None", node.lineno)
        self.generic_visit(node)

    def visit_If(self, node):
        for branch in (node.body, node.orelse):
            if len(branch) == 1 and isinstance(branch[0], ast.If):
                continue  # an elif: its own statements are mutated when it is visited
            for statement in branch:
                if isinstance(statement, (ast.Pass, ast.FunctionDef, ast.ClassDef)):
                    continue
                start, end = self.span(statement)
                self.add(start, end, "delete statement", "pass", statement.lineno)
        self.generic_visit(node)


def _is_string(node) -> bool:
    return any(
        isinstance(side, (ast.Constant, ast.JoinedStr)) and isinstance(getattr(side, "value", ""), str)
        for side in (node.left, node.right)
    )


def _is_path_join(node) -> bool:
    """``root / "name"``, ``root / MANIFEST_NAME``, ``Path(x) / name``: a path, not a division (its swap only
    raises a TypeError, a mutant every test kills)."""
    if not isinstance(node.op, ast.Div):
        return False
    right, left = node.right, node.left
    named = isinstance(right, ast.Name) and right.id.isupper()
    string = isinstance(right, (ast.Constant, ast.JoinedStr)) and isinstance(getattr(right, "value", ""), str)
    return named or string or (isinstance(left, ast.Call) and _called(left) == "Path")


def _called(node) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def mutants(module: str) -> list:
    source = (ROOT / PACKAGE / module).read_bytes()
    sites = _Sites(module, source)
    sites.visit(ast.parse(source))
    seen, out = set(), []
    for start, end, kind, replacement, line in sorted(sites.found):
        if (start, end, replacement) in seen:
            continue
        seen.add((start, end, replacement))
        first = source.rfind(b"\n", 0, start) + 1
        column = len(source[first:start].decode()) + 1
        mutant = Mutant(module, len(out) + 1, line, column, kind, start, end, replacement, source[start:end].decode())
        try:
            ast.parse(mutant.apply(source))
        except SyntaxError:
            continue
        out.append(mutant)
    return out


# ---------------------------------------------------------------------- running


def _copy(source: Path, workdir: Path) -> None:
    """The package, the tests and pytest's settings, from ``source`` into ``workdir``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (PACKAGE, "tests"):
        shutil.copytree(source / name, workdir / name, ignore=ignore)
    for name in ("pytest.ini", "setup.py"):
        shutil.copy(source / name, workdir / name)


def run_subset(workdir: Path, module: str, fixtures: Path, timeout: float) -> tuple:
    """``(outcome, seconds, last line)``: outcome "passed", "failed" or "timeout"."""
    env = {
        **os.environ,
        "PYTHONPATH": str(workdir),
        "T5VH_TEST_FIXTURES": str(fixtures),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"]
    start = time.monotonic()
    # a session of its own, so that a timeout also ends what the tests started (a job a mutant sent looping)
    process = subprocess.Popen(
        [*command, *SUBSETS[module]],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = None, None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # pytest and anything it left running
        except ProcessLookupError:
            pass
        process.communicate()
    seconds = time.monotonic() - start
    if stdout is None:
        return "timeout", seconds, f"over {timeout:.0f} s"
    lines = [line for line in stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else stderr.strip()[-300:]
    if process.returncode == 0:
        return "passed", seconds, last
    if process.returncode == 1:
        return "failed", seconds, last
    return "error", seconds, last  # a collection error, or the mutant broke an import: killed too


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(SUBSETS), help="Only these modules.")
    parser.add_argument("--only", action="append", default=[], help="Only these mutants (MODULE:NUMBER).")
    parser.add_argument(
        "--sample", type=int, default=None, help="A deterministic sample of N mutants per module [SAMPLE]; 0 = all."
    )
    parser.add_argument("--list", action="store_true", help="List the mutants and exit.")
    parser.add_argument("--baseline", action="store_true", help="Only run the subsets on the unmutated code.")
    parser.add_argument("--show", action="store_true", help="Print each mutant's changed line.")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds per test run (a timeout kills) [120].")
    parser.add_argument("--fixtures", type=Path, default=None, help="Fixture cache [a temporary directory].")
    parser.add_argument("--report", type=Path, default=None, help="Write a Markdown report here.")
    parser.add_argument("--json", type=Path, default=None, help="Write every result as JSON here.")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated check still removes its copies

    modules = args.module or list(SUBSETS)
    chosen = []
    for module in modules:
        found = mutants(module)
        size = SAMPLE.get(module, 0) if args.sample is None else args.sample
        if size and len(found) > size:
            found = sorted(random.Random(f"t5vh-{module}").sample(found, size), key=lambda m: m.number)
        chosen += found
    if args.only:
        chosen = [m for m in chosen if m.name in args.only]
    if args.list:
        for mutant in chosen:
            print(mutant.describe())
        print(f"{len(chosen)} mutants")
        return 0

    fixtures = args.fixtures or Path(tempfile.mkdtemp(prefix="t5vh-mutation-fixtures-"))
    results = []
    with tempfile.TemporaryDirectory(prefix="t5vh-mutation-") as tmp:
        baseline = Path(tmp) / "baseline"  # a snapshot: edits to the checkout while this runs change nothing
        _copy(ROOT, baseline)
        for module in modules if args.baseline else sorted({m.module for m in chosen}):
            outcome, seconds, last = run_subset(baseline, module, fixtures, args.timeout * 3)
            print(f"baseline {module}: {outcome} in {seconds:.0f} s ({last})", flush=True)
            if outcome != "passed":
                print("the unmutated code must pass every subset first: fix that, then rerun", file=sys.stderr)
                return 2
        for i, mutant in enumerate([] if args.baseline else chosen, start=1):
            workdir = Path(tmp) / f"m{i}"
            _copy(baseline, workdir)
            path = workdir / PACKAGE / mutant.module
            path.write_bytes(mutant.apply(path.read_bytes()))
            outcome, seconds, last = run_subset(workdir, mutant.module, fixtures, args.timeout)
            shutil.rmtree(workdir, ignore_errors=True)
            killed = outcome != "passed"
            results.append(
                {
                    **mutant.__dict__,
                    "name": mutant.name,
                    "outcome": outcome,
                    "killed": killed,
                    "seconds": seconds,
                    "last": last,
                }
            )
            print(
                f"[{i}/{len(chosen)}] {'killed  ' if killed else 'SURVIVED'} {mutant.describe()} ({seconds:.0f} s)",
                flush=True,
            )
            if args.show and not killed:
                print(f"    {last}")
    if not args.fixtures:
        shutil.rmtree(fixtures, ignore_errors=True)
    summary = _summary(results)
    print(summary)
    if args.report:
        args.report.write_text(summary + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _summary(results: list) -> str:
    lines = ["| module | mutants | killed | survived | score |", "|---|---|---|---|---|"]
    for module in sorted({r["module"] for r in results}) + ["all"]:
        mine = [r for r in results if module in ("all", r["module"])]
        killed = sum(r["killed"] for r in mine)
        score = killed / len(mine) if mine else 0.0
        lines.append(f"| {module} | {len(mine)} | {killed} | {len(mine) - killed} | {score:.0%} |")
    survivors = [r for r in results if not r["killed"]]
    if survivors:
        lines += ["", "Survivors:", ""]
        lines += [
            f"- {r['name']} line {r['line']}:{r['column']} {r['kind']}: `{r['original']}` -> `{r['replacement']}`"
            for r in survivors
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
