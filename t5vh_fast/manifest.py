"""``t5vh_manifest.json``: what an export directory holds and how well it matched PyTorch.

Written by the exporter, read (and verified) by the runtime; no torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._files import sha256_file
from .errors import ExportError, PathNotFound

MANIFEST_NAME = "t5vh_manifest.json"
FORMAT_VERSION = 1
ENCODER = "encoder_model.onnx"
DECODER = "decoder_model.onnx"
DECODER_WITH_PAST = "decoder_with_past_model.onnx"
DECODER_MERGED = "decoder_model_merged.onnx"


def read_manifest(export_dir, *, verify_hashes: bool = True, only=None) -> dict:
    """Read and check the manifest of ``export_dir``; raise ``ExportError`` saying what is wrong.

    ``only``: check just these files (the graphs about to be loaded)."""
    root = Path(export_dir).expanduser()
    if not root.exists():
        raise PathNotFound(f"export directory not found: {root}")
    if not root.is_dir():
        raise PathNotFound(f"{root} is a file, not an export directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"{root} has no {MANIFEST_NAME}: it is not a t5vh export. Create one with `t5vh-export MODEL_DIR`"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ExportError(f"{path} is not valid JSON ({exc}): re-export the model") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest object: re-export the model")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{root} was exported in t5vh format version {version!r}; this t5vh_fast reads version "
            f"{FORMAT_VERSION}. Re-export it with this version's `t5vh-export`"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ExportError(f"{path} has no valid 'files' table of graph hashes: the export is damaged; re-export it")
    unlisted = sorted(set(only or ()) - set(files))
    if verify_hashes and unlisted and (root / unlisted[0]).exists():
        raise ExportError(
            f"{path} does not list {unlisted[0]}, so its hash cannot be checked: the export is damaged; re-export it"
        )
    for name, expected in files.items():
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
