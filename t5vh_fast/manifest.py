"""``t5vh_manifest.json``: what an export directory holds and how well it matched PyTorch.

Written by the exporter, read (and verified) by the runtime; no torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._files import sha256_file
from .errors import ExportError, PathNotFound

MANIFEST_NAME = "t5vh_manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: Optimum's graphs only, no weight map
# How t5vh builds its own graphs: raised when their nodes change but not their inputs and outputs (not a format
# change: an older export still loads and gives the same numbers). Recorded in the manifest, so the demo cache
# (``demo.demo_export``, the benchmarks) exports again instead of timing graphs this version no longer writes.
# 2: the packed graphs gather q, k and v into attention's grid instead of scattering them into zeros.
GRAPH_REVISION = 2
ENCODER = "encoder_model.onnx"
DECODER = "decoder_model.onnx"
DECODER_WITH_PAST = "decoder_with_past_model.onnx"
DECODER_MERGED = "decoder_model_merged.onnx"
ENCODER_GRAPH = "t5vh_encoder.onnx"
DECODER_GRAPH = "t5vh_decoder.onnx"
SAMPLER_GRAPH = "t5vh_sampler.onnx"  # the draw on the GPU (single layout; exports made before it lack it)
SCORER_GRAPH = "t5vh_scorer.onnx"  # the scorer's log-softmax on the GPU (the same; newer still)
LOOKUP_GRAPH = "t5vh_lookup.onnx"  # the embedding lookup on the GPU (the same; newer still)
PACKED_GRAPH = "t5vh_decoder_packed.onnx"  # the decoder for scoring on the CPU, padding removed (newer still)
PACKED_ENCODER_GRAPH = "t5vh_encoder_packed.onnx"  # the encoder on the CPU, the queries' padding removed (newer still)


def read_manifest(export_dir) -> dict:
    """Read the manifest of ``export_dir`` and check its format; ``ExportError`` says what is wrong.

    The files it lists are checked by ``check_files``, once the caller knows which it will load.
    """
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
    if version not in READABLE_VERSIONS:
        raise ExportError(
            f"{root} was exported in t5vh format version {version!r}; this t5vh_fast reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Re-export it with this version's `t5vh-export`"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ExportError(f"{path} has no valid 'files' table of graph hashes: the export is damaged; re-export it")
    return manifest


def layouts(manifest: dict) -> dict:
    """``{decoder layout: [files it reads]}`` of an export (format 1 exports hold Optimum's layouts only)."""
    if "layouts" in manifest:
        return manifest["layouts"]
    listed = manifest.get("files", {})
    found = {"split": [ENCODER, DECODER, DECODER_WITH_PAST]}
    if DECODER_MERGED in listed:
        found["merged"] = [ENCODER, DECODER_MERGED]
    return found


def default_layout(manifest: dict) -> str:
    """The layout ``load`` runs when none is asked for: ``single`` where the export has it."""
    return "single" if "single" in layouts(manifest) else "split"


def check_files(root: Path, manifest: dict, names, *, verify_hashes: bool = True) -> None:
    """Every file in ``names`` is listed in the manifest, present, and (``verify_hashes``) unchanged.

    A file the manifest does not list is refused: the runtime loads nothing the
    exporter did not vouch for.
    """
    listed = manifest.get("files", {})
    for name in names:
        if name not in listed:
            raise ExportError(
                f"{root / name} is not listed in {MANIFEST_NAME}: the runtime loads only files the export "
                "vouches for; re-export the model"
            )
        file = root / name
        if not file.is_file():
            raise ExportError(f"{root} lacks {name}, which its manifest lists: the export is incomplete; re-export it")
        if verify_hashes and sha256_file(file) != listed[name]:
            raise ExportError(
                f"{file} does not match the sha256 in {MANIFEST_NAME}: the file was changed or damaged "
                "after export; re-export the model"
            )
