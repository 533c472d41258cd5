"""What one benchmark subprocess does: time one system, check parity, measure the floor or a precision gap.

Each worker takes a JSON spec and returns a JSON-able dict; ``python -m
t5vh_fast.bench KIND SPEC`` runs one and prints its result as the last line.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from .systems import SYSTEMS, ct2_model, sampler, scorer

QUERY_LEN = 64  # the sampling workload's query length
SCORE_ROWS = 320  # the scoring workload: rows of 8-64 query and 4-64 response tokens
SCORE_BATCH = 32
TTFT_RUNS = 3  # time to first token: the median of this many runs of one token (one run moves by 30-50% here)


def _status_mb(field: str) -> float:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MB (NaN where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """This process's resident set now (MB)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set (MB). ``VmHWM``, not ``ru_maxrss``: Linux carries ru_maxrss across
    fork and exec, so a worker started by a parent that had just exported a model reported the parent's peak."""
    peak = _status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vocab(spec: dict) -> int:
    return json.loads((Path(spec["model_dir"]) / "config.json").read_text())["vocab_size"]


def queries(batch: int, vocab: int, seed: int = 0):
    """The sampling workload's queries: ``batch`` rows of ``QUERY_LEN`` random tokens ending in </s>."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, min(vocab, 32000), size=(batch, QUERY_LEN))
    ids[:, -1] = 1
    return ids


def score_batches(vocab: int, rows: int = SCORE_ROWS, batch_size: int = SCORE_BATCH, seed: int = 0) -> list:
    """The scoring workload: seeded (query, response) token lists, sorted by length, in batches."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(rows):
        query = rng.integers(3, min(vocab, 32000), size=int(rng.integers(7, 64))).tolist() + [1]
        response = rng.integers(3, min(vocab, 32000), size=int(rng.integers(4, 65))).tolist()
        pairs.append((query, response))
    pairs.sort(key=lambda p: (len(p[0]), len(p[1])))
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


def run_worker(spec: dict) -> dict:
    """Time one system sampling at one batch size."""
    import numpy as np

    system, batch, n = spec["system"], spec["batch"], spec["new_tokens"]
    run = sampler(system, spec)
    ids = queries(batch, _vocab(spec))
    run(ids, min(n, 3))  # warm-up
    ttft = float(np.median([_timed(run, ids, 1) for _ in range(TTFT_RUNS)]))
    start = time.perf_counter()
    tokens, clock = run(ids, n)
    end = time.perf_counter()
    if tokens.shape != (batch, n):
        raise RuntimeError(f"{system} returned {tokens.shape} tokens, expected exactly {(batch, n)}")
    total = end - start
    timed = clock is not None and len(clock.marks) >= n
    if timed:
        steps = clock.steps(end)[-n:]
    else:  # a black box: the mean step after the first token (the whole mean when noise makes that negative)
        steps = [(total - ttft) / max(n - 1, 1) if total > ttft else total / n]
    return {
        "system": system,
        "batch": batch,
        "new_tokens": n,
        "seconds": total,
        "tokens_per_s": batch * n / total,
        "step_ms_p50": 1000 * float(np.percentile(steps, 50)),
        "step_ms_p95": 1000 * float(np.percentile(steps, 95)),
        "per_step_timed": timed,
        "ttft_ms": 1000 * ttft,
        "peak_rss_mb": peak_rss_mb(),
    }


def score_worker(spec: dict) -> dict:
    """Time one system scoring the scoring workload (the same sorted batches for every system)."""
    system = spec["system"]
    score = scorer(system, spec)
    batches = score_batches(_vocab(spec), rows=spec.get("rows", SCORE_ROWS))
    score(batches[0])  # warm-up
    start = time.perf_counter()
    tokens = sum(score(batch) for batch in batches)
    seconds = time.perf_counter() - start
    rows = sum(len(batch) for batch in batches)
    return {
        "system": system,
        "rows": rows,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "rows_per_s": rows / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def rollout_parity(policy, reference, ids, mask, uniforms) -> dict:
    """The t5vh sampler against the PyTorch reference on shared uniforms, and both timed.

    Log-prob and value differences are taken on each row's common prefix (where
    the two samplers chose the same tokens so far).
    """
    import numpy as np

    start = time.perf_counter()
    ours = policy.respond_to_batch(ids, mask, txt_len=uniforms.shape[1], uniforms=uniforms)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference.respond_to_batch(ids, mask, txt_len=uniforms.shape[1], uniforms=uniforms)
    ref_s = time.perf_counter() - start
    ref_tokens = ref.tokens.numpy()
    same = np.cumprod(ours.tokens == ref_tokens, axis=1).astype(bool)
    return {
        "rows": int(ids.shape[0]),
        "tokens": int(uniforms.shape[1]),
        "identical_tokens": float((ours.tokens == ref_tokens).mean()),
        "max_logprob_diff": float(np.abs(ours.logprobs - ref.logprobs.numpy())[same].max()),
        "max_value_diff": float(np.abs(ours.values - ref.values.numpy())[same].max()),
        "t5vh_s": ours_s,
        "torch_s": ref_s,
    }


def parity_worker(spec: dict) -> dict:
    """The t5vh sampler (default layout, CPU) against the PyTorch reference on shared uniforms (8 rows x 32 tokens)."""
    import numpy as np

    import t5vh_fast

    from ..checkpoint import load_reference

    reference = load_reference(Path(spec["model_dir"]))
    policy = t5vh_fast.load(spec["export_dir"], providers="cpu", threads=spec["threads"])
    ids = queries(8, reference.config.vocab_size, seed=1)
    return rollout_parity(policy, reference, ids, np.ones_like(ids), np.random.default_rng(1).random((8, 32)))


def gap_worker(spec: dict) -> dict:
    """The distribution cost of each reduced-precision system against the fp32 PyTorch model, on one probe.

    t5vh int8: the export's own measurement (shared uniforms included). CTranslate2:
    its teacher-forced logits on the same probe tokens (``translate_batch`` with
    the tokens as ``target_prefix`` and ``return_logits_vocab``); it draws its own
    random numbers, so it has no token agreement.
    """
    import numpy as np

    from ..checkpoint import load_reference
    from ..export.precision import fp32_rollout, gap_stats, precision_gap, probe, teacher_forced

    model = load_reference(Path(spec["model_dir"]))
    ids, mask, uniforms = probe(model.config.vocab_size)
    reference = fp32_rollout(model, ids, mask, uniforms)
    tokens = reference.tokens.numpy()
    out = {}
    for system in spec["systems"]:
        if system == "t5vh-int8":
            out[system] = precision_gap(model, Path(spec["int8_dir"]), "int8", ids, mask, uniforms, reference)
            continue
        import ctranslate2

        converted = ct2_model(Path(spec["model_dir"]), Path(spec["cache_dir"]), int8=system == "ct2-int8")
        translator = ctranslate2.Translator(str(converted), device="cpu", intra_threads=spec["threads"])
        vocab = json.loads((converted / "shared_vocabulary.json").read_text())
        source = [[vocab[i] for i, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())]
        target = [[vocab[i] for i in row] for row in tokens.tolist()]
        results = translator.translate_batch(
            source,
            target_prefix=target,
            max_decoding_length=tokens.shape[1],
            beam_size=1,
            return_logits_vocab=True,
            end_token=[],
        )
        logits = np.stack([np.stack([np.asarray(step) for step in r.logits[0]]) for r in results])
        ref_logits, _ = teacher_forced(model, ids, mask, tokens)
        out[system] = {"measured": True, **gap_stats(ref_logits, logits.reshape(tokens.size, -1), tokens)}
    return out


def floor_worker(spec: dict) -> dict:
    """The memory-bandwidth floor of one batch-1 decode step: decoder + LM-head bytes / read bandwidth.

    The bytes are the fp32 matrices of the single layout's decoder graph (what a
    step reads). The bandwidth is measured in this run: the best of onnxruntime
    MatMuls (batch 1, same thread count) streaming a matrix as big as those
    weights, in huge pages as t5vh's own (``hugepages``); NumPy's copy bandwidth is
    reported beside it. Beside the floor, what
    the step's matrix products alone take in onnxruntime: one graph of only
    MatMuls of the decoder's matrices' shapes at batch 1, its median run
    (``matmuls_ms``), so a report can say how much of a step is other work.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx.load(str(Path(spec["export_dir"]) / "t5vh_decoder.onnx"), load_external_data=False).graph
    shapes = [
        tuple(init.dims) for init in graph.initializer if init.data_type == TensorProto.FLOAT and len(init.dims) == 2
    ]
    weights = sum(rows * cols * 4 for rows, cols in shapes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    matmuls_ms = _matmuls_only_ms(shapes, options)
    read_gb_s, matrix = 0.0, None
    for k in (512, 1024, 2048, 4096):  # MLAS streams some shapes faster than others: take the best
        cols = max(weights // 4 // k, 1)
        matrix = np.random.default_rng(0).random((k, cols), dtype=np.float32)
        model = helper.make_model(
            helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                "gemv",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
                [numpy_helper.from_array(matrix, "w")],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        model.ir_version = 9
        session = _huge_paged_session(model, options)
        x = np.ones((1, k), dtype=np.float32)
        for _ in range(3):
            session.run(None, {"x": x})
        best = min(_timed(session.run, None, {"x": x}) for _ in range(10))
        read_gb_s = max(read_gb_s, matrix.nbytes / best / 1e9)
    copy = np.empty_like(matrix)
    copy_best = min(_timed(np.copyto, copy, matrix) for _ in range(5))
    return {
        "weight_bytes": weights,
        "read_gb_s": read_gb_s,
        "copy_gb_s": 2 * matrix.nbytes / copy_best / 1e9,
        "floor_ms": 1000 * weights / (read_gb_s * 1e9),
        "matmuls_ms": matmuls_ms,
    }


def _huge_paged_session(model, options):
    """A CPU session of ``model`` whose pre-packed weights are moved into huge pages before it is timed, as
    t5vh's own sessions' are (``hugepages``): the floor is what the machine streams at its best."""
    import onnxruntime as ort

    from .. import hugepages

    before = hugepages.anonymous_mappings()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    hugepages.collapse(hugepages.anonymous_mappings() - before)
    return session


def _matmuls_only_ms(shapes: list, options) -> float:
    """Median ms of one onnxruntime run of only these batch-1 MatMuls (random weights of these shapes)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, weights, feeds = [], [], [], [], {}
    for i, (rows, cols) in enumerate(shapes):
        weights.append(numpy_helper.from_array(rng.random((rows, cols), dtype=np.float32), f"w{i}"))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, rows]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, cols]))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
        feeds[f"x{i}"] = np.ones((1, rows), dtype=np.float32)
    model = helper.make_model(
        helper.make_graph(nodes, "matmuls", inputs, outputs, weights), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 9
    session = _huge_paged_session(model, options)
    for _ in range(5):
        session.run(None, feeds)
    return 1000 * float(np.median([_timed(session.run, None, feeds) for _ in range(100)]))


def convert_worker(spec: dict) -> dict:
    """Convert the demo model for CTranslate2 (fp32 and int8) before any timed run."""
    for int8 in (False, True):
        ct2_model(Path(spec["model_dir"]), Path(spec["cache_dir"]), int8=int8)
    return {"converted": True}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


WORKERS = {
    "run": run_worker,
    "score": score_worker,
    "parity": parity_worker,
    "gap": gap_worker,
    "floor": floor_worker,
    "convert": convert_worker,
}
__all__ = ["WORKERS", "SYSTEMS", "rollout_parity", "queries", "score_batches", "peak_rss_mb", "rss_mb"]
