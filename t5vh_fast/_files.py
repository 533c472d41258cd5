"""File helpers every other module uses: hashes, atomic writes, directory replacement, locks.

Nothing here knows about models; it only makes sure a reader never sees a
half-written file, an interrupted writer leaves nothing behind, two writers
never share one output, and no path given for output names a file that must
be kept.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Optional

from .errors import OutputError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def umask_mode(mode: int) -> int:
    """``mode`` less the process umask (mkstemp/mkdtemp create 0600/0700; finished files shouldn't be)."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; name a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing ``out`` is swapped out, then removed."""
    os.chmod(tmp, umask_mode(0o777))
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def remove_leftovers(out: Path) -> None:
    """Remove what an interrupted writer of ``out`` left beside it: ``.NAME.partial.*`` directories
    (a build never renamed into place) and, once ``out`` exists, ``.NAME.old.*`` (a swapped-out
    previous version). Call it only while holding ``exclusive_lock(out)``: then none is in use."""
    kinds = ("partial", "old") if out.exists() else ("partial",)
    for kind in kinds:
        for leftover in out.parent.glob(f".{glob.escape(out.name)}.{kind}.*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------- outputs that keep what the user had


def is_regular_or_missing(path: Path) -> bool:
    """True for a regular file or a path that does not exist yet: what a job may read back and resume.
    Devices (/dev/null, /dev/full), FIFOs and sockets are written, never read back."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):  # not there yet (writing it will say why if it cannot be)
        return True


def is_within(path: Path, root: Path) -> bool:
    """True when ``path`` is ``root`` or inside it, symlinks and ``..`` resolved."""
    path, root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return path == root or root in path.parents


def same_regular_file(a, b) -> bool:
    """True when two paths (or open files) are one regular file: the same inode, or two spellings of
    one path that does not exist yet. Two names for one device or pipe (a terminal, /dev/null) are fine."""
    ids = [_regular_file_id(x) for x in (a, b)]
    if None not in ids:
        return ids[0] == ids[1]
    paths = [x for x in (a, b) if isinstance(x, (str, os.PathLike))]
    return len(paths) == 2 and not any(os.path.exists(p) for p in paths) and _real(a) == _real(b)


def _regular_file_id(target) -> Optional[tuple]:
    try:
        st = os.fstat(target.fileno()) if hasattr(target, "fileno") else os.stat(target)
    except (OSError, ValueError):  # no such path, or a file object without a descriptor
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


# ---------------------------------------------------------------------- one writer per output


def lock_path(path: Path) -> Path:
    """The lock file of an output: ``.NAME.t5vh-lock`` beside it, there while a writer holds it."""
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.t5vh-lock"


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str):
    """Hold the advisory lock of output ``path`` for the block; if another process holds it, raise
    ``OutputError(busy)``. The kernel drops the lock when its process ends, SIGKILL included, so a
    killed job never leaves a stale lock behind; a finished one also removes the lock file."""
    lock = lock_path(path)
    f = _locked_file(path, busy)
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # still holding it: a process that opened it meanwhile sees it gone and retries
        except OSError:
            pass
        f.close()


def _locked_file(path: Path, busy: str):
    lock = lock_path(path)
    for _ in range(10):
        try:
            f = open(lock, "a+")
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        if not _try_lock(f):
            holder = _read_holder(f)
            f.close()
            raise OutputError(f"{busy} ({holder})" if holder else busy)
        if _still_named(f, lock):
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            return f
        f.close()  # its holder finished and removed it between our open and our lock: open the new one
    raise OutputError(busy)


def _still_named(f, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def _read_holder(f) -> str:
    try:
        f.seek(0)
        return f.read(100).strip()
    except OSError:  # Windows: the holder's lock covers the byte that names it
        return ""


def _try_lock(f) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: a byte-range lock, also dropped when the process ends
        import msvcrt

        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
