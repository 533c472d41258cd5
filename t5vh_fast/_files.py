"""File helpers every other module uses: hashes, atomic writes, directory replacement.

Nothing here knows about models; it only makes sure a reader never sees a
half-written file and an interrupted writer leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
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
