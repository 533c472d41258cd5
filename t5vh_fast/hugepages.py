"""Huge pages for the weights a CPU session pre-packs (Linux).

onnxruntime copies every matrix into a pre-packed buffer of its own when a session starts, in
memory it asks malloc for: 4 KB pages where transparent huge pages are given only to memory that
asks (``madvise`` mode, as on this project's machines) and the program was not started with glibc's
huge-page tunable. A batch-1 decode step streams all ~150 MB of those buffers, ~38,000 such pages
for the TLB: 6.32 against 5.91 ms a token at batch 1 with 2 MB pages (t5-small shape, median of 16
alternating pairs of processes, faster in 13).

After a session starts, ``collapse_later`` turns the anonymous memory that appeared meanwhile into
2 MB pages (``madvise(MADV_COLLAPSE)``, Linux >= 6.1), each 2 MB range only if every one of its pages
is resident already (``mincore``): the weights are, so RSS does not grow; a range of someone else's
(another thread allocating meanwhile) is left as it was or moved to the same memory in larger pages.
Where the call is refused (a kernel before 6.1, a process that turned huge pages off for itself)
or does not exist (macOS, Windows) nothing changes. The call works whatever the system-wide THP
setting is: it is the program asking for its own memory, as some malloc implementations do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import threading
from typing import Iterable, Optional, Set, Tuple

MADV_COLLAPSE = 25  # linux/mman.h (6.1)
_PAGE = mmap.PAGESIZE


def _huge_page_size(path: str = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") -> int:
    """The kernel's PMD huge page (2 MB on x86-64; 512 MB on 64 KB-page Arm kernels)."""
    try:
        with open(path) as file:
            return int(file.read())
    except (OSError, ValueError):
        return 2 * 2**20


HUGE_PAGE = _huge_page_size()

_libc: Optional[ctypes.CDLL] = None


def _c() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            _libc = libc
        except (OSError, AttributeError):
            return None
    return _libc


def anonymous_mappings() -> Set[Tuple[int, int]]:
    """The process's writable anonymous mappings (heap included), as (start, end) addresses."""
    if _c() is None:
        return set()
    regions = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                anonymous = len(fields) == 5 or (len(fields) == 6 and fields[5] == "[heap]")
                if anonymous and fields[1].startswith("rw"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    regions.add((start, end))
    except OSError:
        return set()
    return regions


def resident(address: int, length: int) -> bool:
    """Whether every page of ``length`` bytes at ``address`` is in memory."""
    pages = ctypes.create_string_buffer(length // _PAGE)
    if _c().mincore(address, length, pages) != 0:
        return False
    return all(byte & 1 for byte in pages.raw)


def collapse(regions: Iterable[Tuple[int, int]]) -> int:
    """Move the fully resident 2 MB-aligned ranges of ``regions`` into huge pages; returns the bytes moved."""
    libc = _c()
    if libc is None:
        return 0
    moved = 0
    for start, end in regions:
        for page in range(-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE):
            if not resident(page, HUGE_PAGE):
                continue
            if libc.madvise(page, HUGE_PAGE, MADV_COLLAPSE) == 0:  # else refused: left in small pages
                moved += HUGE_PAGE
    return moved


def collapse_later(before: Optional[Set[Tuple[int, int]]]) -> Optional[threading.Thread]:
    """``collapse`` the anonymous memory mapped since ``before`` (an ``anonymous_mappings()``; None: nothing)
    in a daemon thread, which it returns. The kernel takes ~3-6 ms per 2 MB here (~0.5 s for t5-small's
    decoder), so the session is handed back at once and its pages grow while it runs (the call leaves
    the GIL; a page being moved is not read meanwhile, only waited for)."""
    if before is None or _c() is None:
        return None
    regions = sorted(anonymous_mappings() - before)
    if not regions:
        return None
    thread = threading.Thread(target=collapse, args=(regions,), name="t5vh-huge-pages", daemon=True)
    thread.start()
    return thread
