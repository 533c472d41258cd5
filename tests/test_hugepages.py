"""Huge pages for CPU sessions' weights (t5vh_fast/hugepages.py): only resident memory moves, nothing else."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from t5vh_fast import hugepages
from t5vh_fast import providers as providers_module

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages through madvise: Linux only")


def _smaps(address: int) -> dict:
    """The /proc/self/smaps fields (kB) of the mapping that holds ``address``."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.split()[-1] == "kB":
                fields[head.rstrip(":")] = int(line.split()[1])
    return fields


def test_collapse_moves_only_fully_resident_ranges_and_keeps_their_bytes():
    """Two 2 MB ranges with every page written move into huge pages; a third with half its pages written
    is left alone, so RSS does not grow; the bytes read back the same."""
    if hugepages.HUGE_PAGE != 2 * 2**20 or mmap.PAGESIZE != 4096:
        pytest.skip("written for 4 KB pages and 2 MB huge pages (x86-64, most Arm kernels)")
    region = mmap.mmap(-1, 10 * hugepages.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(region, dtype=np.uint8)
    start = -(-data.ctypes.data // hugepages.HUGE_PAGE) * hugepages.HUGE_PAGE
    offset = start - data.ctypes.data
    full = slice(offset, offset + 2 * hugepages.HUGE_PAGE)
    data[full] = np.arange(2 * hugepages.HUGE_PAGE, dtype=np.uint64).astype(np.uint8)
    half = data[offset + 2 * hugepages.HUGE_PAGE : offset + 3 * hugepages.HUGE_PAGE]
    half[:: 2 * 4096] = 7  # every other 4 KB page
    expected = data[full].copy()
    assert _smaps(start).get("AnonHugePages", 0) == 0
    rss = _smaps(start)["Rss"]

    moved = hugepages.collapse([(data.ctypes.data, data.ctypes.data + data.nbytes)])

    if moved == 0:
        pytest.skip("this kernel moves no memory into huge pages (MADV_COLLAPSE refused: Linux < 6.1 or THP off)")
    assert moved == 2 * hugepages.HUGE_PAGE
    after = _smaps(start)
    assert after["AnonHugePages"] == 2 * hugepages.HUGE_PAGE // 1024 and after["Rss"] == rss
    np.testing.assert_array_equal(data[full], expected)
    assert hugepages.resident(start, hugepages.HUGE_PAGE)
    assert not hugepages.resident(start + 2 * hugepages.HUGE_PAGE, hugepages.HUGE_PAGE)


def test_a_cpu_session_hands_what_it_mapped_to_the_collapse(tmp_path, monkeypatch):
    """make_session collapses the anonymous memory that appeared while a CPU session started (here a 40 MB
    matrix's pre-packed copy, larger than any malloc keeps in its heap), in a thread of its own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).random((2560, 4096), dtype=np.float32)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "big",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2560])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
            [numpy_helper.from_array(weight, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "big.onnx"))
    seen, threads = [], []
    monkeypatch.setattr(hugepages, "collapse", lambda regions: seen.append(list(regions)) or 0)
    later = hugepages.collapse_later
    monkeypatch.setattr(hugepages, "collapse_later", lambda before: threads.append(later(before)) or threads[-1])
    before = hugepages.anonymous_mappings()
    session = providers_module.make_session(tmp_path / "big.onnx", ["CPUExecutionProvider"], 1)
    assert len(threads) == 1 and threads[0] is not None
    threads[0].join(10)
    assert len(seen) == 1 and not set(seen[0]) & before  # only mappings that the session's start made
    assert max(end - start for start, end in seen[0]) >= weight.nbytes
    x = np.ones((1, 2560), dtype=np.float32)
    expected = x @ weight  # two float computations: DESIGN's tolerance, 1e-4 of the largest value
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert hugepages.collapse_later(None) is None  # CUDA sessions pass None: nothing to do
