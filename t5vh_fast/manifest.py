"""``t5vh_manifest.json``: what an export directory holds and how well it matched PyTorch.

Written by the exporter, read (and verified) by the runtime; no torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MANIFEST_NAME = "t5vh_manifest.json"
FORMAT_VERSION = 1
ENCODER = "encoder_model.onnx"
DECODER = "decoder_model.onnx"
DECODER_WITH_PAST = "decoder_with_past_model.onnx"
DECODER_MERGED = "decoder_model_merged.onnx"


class ExportError(ValueError):
    """An export directory that the runtime cannot trust (missing, other version, tampered)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_manifest(export_dir, *, verify_hashes: bool = True, only=None) -> dict:
    """Read and check the manifest of ``export_dir``; raise ``ExportError`` saying what is wrong.

    ``only``: check just these files (the graphs about to be loaded)."""
    root = Path(export_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"export directory not found: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is a file, not an export directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"{root} has no {MANIFEST_NAME}: it is not a t5vh export. Create one with `t5vh-export MODEL_DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}): re-export the model") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{root} was exported in t5vh format version {version!r}; this t5vh_fast reads version "
            f"{FORMAT_VERSION}. Re-export it with this version's `t5vh-export`"
        )
    for name, expected in manifest.get("files", {}).items():
        if only is not None and name not in only:
            continue
        file = root / name
        if not file.is_file():
            raise ExportError(f"{root} lacks {name}, which its manifest lists: the export is incomplete; re-export it")
        if verify_hashes and sha256_file(file) != expected:
            raise ExportError(
                f"{file} does not match the sha256 in {MANIFEST_NAME}: the file was changed or damaged "
                "after export; re-export the model"
            )
    return manifest
