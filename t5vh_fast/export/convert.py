"""``export(model_dir)``: Optimum ONNX export with the value output, checked, with a manifest.

The export is built in a temporary directory beside the output and renamed
into place only after the parity check passed: an interrupted or failed
export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from .._files import exclusive_lock, is_within, remove_leftovers, replace_dir, sha256_file, write_json_atomic
from ..checkpoint import load_reference
from ..errors import InputError, NonFiniteError, OutputError, ParityError, PathExists, PathNotFound
from ..manifest import (
    DECODER,
    DECODER_MERGED,
    DECODER_WITH_PAST,
    ENCODER,
    FORMAT_VERSION,
    GRAPH_REVISION,
    MANIFEST_NAME,
)
from ..tensorrt import graph_input_dims
from ..weights import PRECISIONS, ModelSpec, checkpoint_params, plan_record, weights_digest
from .check import TOLERANCE, check_export, format_report
from .graph import OPSET
from .optimize import fold_lm_head_scale
from .optimum_map import fingerprinted, map_and_fill
from .single import write_single_layout

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "added_tokens.json",
)


ExportParityError = ParityError  # the name this error had before t5vh_fast.errors existed


def default_output_dir(model_dir, precision: str = "fp32") -> Path:
    """``<model_dir>-onnx``, or ``<model_dir>-onnx-<precision>`` for a reduced precision."""
    suffix = "-onnx" if precision == "fp32" else f"-onnx-{precision}"
    return Path(str(Path(model_dir).expanduser()).rstrip("/") + suffix)


def export(
    model_dir,
    output_dir=None,
    *,
    force: bool = False,
    precision: str = "fp32",
    max_kl: Optional[float] = None,
    optimum: bool = True,
    merged: bool = True,
    opset: Optional[int] = None,
    allow_pickle: bool = False,
    strict: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Export ``model_dir`` to ONNX in ``output_dir`` (default ``<model_dir>-onnx``); returns the path.

    Always writes the ``single`` layout the runtime runs by default
    (``t5vh_encoder.onnx``, ``t5vh_decoder.onnx``, their weights and the host
    tables); with ``optimum`` (the default) also Optimum's layout, which
    Optimum's ``ORTModelForSeq2SeqLM`` loads (``encoder_model.onnx``,
    ``decoder_model.onnx``, ``decoder_with_past_model.onnx``, and with
    ``merged`` ``decoder_model_merged.onnx``). ``opset`` applies to Optimum's
    graphs. Refuses an existing ``output_dir`` unless ``force``, and even then
    replaces only a previous t5vh export or an empty directory; never an output
    that is or contains ``model_dir``. Raises ``ParityError`` (and writes
    nothing) when a graph misses the parity tolerance.

    ``precision``: ``"fp32"`` (the reference), ``"int8"`` (CPU: every matrix
    per-column int8, activations quantized on the fly), ``"fp16"`` or
    ``"bf16"`` (CUDA/TensorRT; fp16 keeps in fp32 the sublayers whose
    activations come near its range). A reduced-precision export holds the
    single layout only (default output ``<model_dir>-onnx-<precision>``) and,
    instead of the fp32 parity check, a precision-gap report measured against
    the fp32 model; ``max_kl`` refuses one whose mean per-token KL to fp32 is
    larger, and NaN or inf on the probe always fails.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_kl is not None and (isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not max_kl >= 0):
        raise InputError(f"max_kl must be a number >= 0, got {max_kl!r}")
    out = Path(output_dir).expanduser() if output_dir is not None else default_output_dir(model_dir, precision)
    check_output_dir(out, model_dir, force=force)
    model = load_reference(model_dir, strict=strict, allow_pickle=allow_pickle)
    check_finite_weights(model)
    with _output_lock(out, model_dir, force=force):
        if precision != "fp32":
            return _export_reduced(out, model, model_dir, precision=precision, max_kl=max_kl, log=log)
        return _export_to(out, model, model_dir, optimum=optimum, merged=merged, opset=opset, log=log)


def check_output_dir(out: Path, model_dir, *, force: bool) -> None:
    """Refuse an output directory whose replacement would destroy something the user had."""
    source = Path(model_dir).expanduser()
    if source.exists() and is_within(source, out):
        raise OutputError(
            f"{out} is or contains the model directory {source}: replacing it would delete the model; "
            "choose another output directory"
        )
    if out.parent.exists() and not out.parent.is_dir():
        raise PathNotFound(f"cannot write {out}: {out.parent} is a file, not a directory")
    if not out.exists():
        return
    if not out.is_dir() or not ((out / MANIFEST_NAME).is_file() or not any(out.iterdir())):
        raise PathExists(
            f"{out} exists and is not a t5vh export (no {MANIFEST_NAME}): refusing to replace it, even with "
            "--force; choose another output directory"
        )
    if not force:
        raise PathExists(f"{out} already exists: pass --force (force=True) to replace it")


@contextlib.contextmanager
def _output_lock(out: Path, model_dir, *, force: bool):
    """One export per output at a time; what a killed export to ``out`` left beside it is removed."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write the export at {out}: {exc.strerror}") from None
    with exclusive_lock(out, f"another t5vh-export is writing {out}: wait for it to finish"):
        check_output_dir(out, model_dir, force=force)  # again: another export may have finished meanwhile
        remove_leftovers(out)
        yield


def _export_to(out: Path, model, model_dir, *, optimum: bool, merged: bool, opset: Optional[int], log) -> Path:
    """Build the fp32 export in a temporary directory beside ``out``, check it, and move it into place."""
    tmp = _partial_dir(out)
    try:
        layouts, weight_maps, used_opset = {}, {}, OPSET
        if optimum:
            layouts, weight_maps, used_opset = _export_graphs(model, tmp, merged=merged, opset=opset, log=log)
        log("writing the single layout (t5vh_encoder.onnx, t5vh_decoder.onnx and their packed forms) ...")
        layouts = {"single": write_single_layout(model, tmp), **layouts}
        _save_side_files(model, Path(model_dir).expanduser(), tmp)
        log("checking every graph against PyTorch ...")
        report = check_export(model, tmp, layouts=tuple(layouts))
        log(format_report(report))
        failed = [g for g, entry in report.items() if not entry["ok"]]
        if failed:
            raise ExportParityError(
                f"export does not match PyTorch within {TOLERANCE} for {failed}:\n{format_report(report)}"
            )
        manifest = _manifest(model, model_dir, tmp, layouts, used_opset, precision="fp32")
        manifest["weights"].update(weight_maps)
        manifest["parity"] = {"tolerance": TOLERANCE, "graphs": report}
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = ", ".join(f"{name} {(out / name).stat().st_size / 1e6:.1f} MB" for name in manifest["files"])
    log(f"wrote {out}: {sizes}")
    return out


def _export_reduced(out: Path, model, model_dir, *, precision: str, max_kl: Optional[float], log) -> Path:
    """The single layout at a reduced precision, with its precision-gap report; nothing written if it fails."""
    from .precision import format_gap, fp16_keep, fp32_rollout, precision_gap, probe, sublayer_peaks

    tmp = _partial_dir(out)
    try:
        ids, mask, uniforms = probe(model.config.vocab_size)
        reference = fp32_rollout(model, ids, mask, uniforms)
        keep, peaks = (), {}
        if precision == "fp16":
            peaks = sublayer_peaks(model, ids, mask, reference.tokens.numpy())
            keep = fp16_keep(peaks)
        log(f"writing the {precision} single layout ...")
        files = write_single_layout(model, tmp, precision=precision, keep_fp32=keep)
        _save_side_files(model, Path(model_dir).expanduser(), tmp)
        log(f"measuring the {precision} export against the fp32 PyTorch model ...")
        try:
            report = precision_gap(model, tmp, precision, ids, mask, uniforms, reference)
        except NonFiniteError as exc:
            if not peaks:
                raise
            name, peak = max(((n, v) for n, v in peaks.items() if n not in keep), key=lambda item: item[1])
            raise NonFiniteError(f"{exc} (largest fp16 sublayer: {name}, max |activation| {peak:.3g})") from None
        log(format_gap(report, keep if precision in ("fp16", "bf16") else None))
        if max_kl is not None and report.get("measured") and report["kl_mean"] > max_kl:
            raise ParityError(
                f"the {precision} export's mean per-token KL to fp32 is {report['kl_mean']:.3g}, more than "
                f"--max-kl {max_kl:g}: not written; use a higher --max-kl or another precision"
            )
        spec = ModelSpec.from_config(model.config.to_dict())
        manifest = _manifest(model, model_dir, tmp, {"single": files}, OPSET, precision=precision)
        manifest.update(
            kept_fp32=list(keep),
            weights={"single": plan_record(spec, precision, keep)},
            precision_report=report,
            parity=None,
        )
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return out


def check_finite_weights(model) -> None:
    """Refuse a model with a NaN or inf weight: its export would report nonsense."""
    import torch

    for name, param in model.state_dict().items():
        if param.is_floating_point() and not torch.isfinite(param).all():
            count = int((~torch.isfinite(param)).sum())
            raise NonFiniteError(
                f"weight {name} holds {count} NaN or inf value(s): the checkpoint is broken; "
                "fix or retrain it before exporting"
            )


def _export_graphs(model, tmp: Path, *, merged: bool, opset: Optional[int], log):
    """Write Optimum's encoder and decoder graphs (and the merged decoder), traced from a fingerprinted twin
    and filled with the model's weights; returns ``({layout: files}, {layout: {graph: weight map}}, opset)``."""
    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_encoder_decoder_models_for_export

    from .onnx_config import TASK, T5ValueHeadOnnxConfig

    twin = fingerprinted(model)  # traced instead of the model: see optimum_map
    onnx_config = T5ValueHeadOnnxConfig(twin.config, task=TASK, use_past=True)
    opset = opset or onnx_config.DEFAULT_ONNX_OPSET
    # Optimum's patcher sets config.use_cache on every submodule and leaves it set: put it back after.
    saved = {
        id(m.config): (m.config, m.config.use_cache)
        for m in twin.modules()
        if hasattr(getattr(m, "config", None), "use_cache")
    }
    files = {}
    try:
        for name, model_and_config in get_encoder_decoder_models_for_export(twin, onnx_config).items():
            start = time.perf_counter()
            log(f"exporting {name}.onnx ...")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_models({name: model_and_config}, tmp, opset=opset, output_names=[f"{name}.onnx"])
            log(f"  {name}.onnx done in {time.perf_counter() - start:.1f} s")
            files[f"{name}.onnx"] = True
    finally:
        for config, use_cache in saved.values():
            config.use_cache = use_cache
    if set(files) != {ENCODER, DECODER, DECODER_WITH_PAST}:
        raise RuntimeError(f"Optimum exported {sorted(files)}, expected {ENCODER}, {DECODER}, {DECODER_WITH_PAST}")
    for name in (DECODER, DECODER_WITH_PAST):
        if fold_lm_head_scale(tmp / name):
            log(f"  folded the d_model**-0.5 rescale into the LM head of {name}")
    if merged:
        from optimum.onnx import merge_decoders

        start = time.perf_counter()
        log(f"merging the decoders into {DECODER_MERGED} ...")
        # strict=False: the with-past decoder does not output the (constant) cross-attention K/V
        merge_decoders(tmp / DECODER, tmp / DECODER_WITH_PAST, save_path=tmp / DECODER_MERGED, strict=False)
        log(f"  {DECODER_MERGED} done in {time.perf_counter() - start:.1f} s")
        files[DECODER_MERGED] = True
    spec = ModelSpec.from_config(model.config.to_dict())
    maps = {}
    for name in files:
        log(f"  {name}: the model's weights into the traced graph, as external data ...")
        maps[name] = map_and_fill(tmp / name, twin, model, spec)
    graphs = {"split": [ENCODER, DECODER, DECODER_WITH_PAST]}
    if merged:
        graphs["merged"] = [ENCODER, DECODER_MERGED]
    layouts = {layout: [f for g in names for f in (g, f"{g}.data")] for layout, names in graphs.items()}
    weight_maps = {layout: {g: maps[g] for g in names} for layout, names in graphs.items()}
    return layouts, weight_maps, opset


def _save_side_files(model, model_dir: Path, tmp: Path) -> None:
    """config.json, generation_config.json and the tokenizer files, as Optimum's export does."""
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
    if not (tmp / "tokenizer.json").exists() and (model_dir / "spiece.model").is_file():
        try:  # a slow (sentencepiece) tokenizer only: write the fast tokenizer.json the runtime reads
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(model_dir, use_fast=True).save_pretrained(tmp)
        except Exception as exc:  # the export is still usable with token ids
            warnings.warn(
                f"could not write tokenizer.json ({exc}); the export will accept token ids only", stacklevel=2
            )


def library_versions() -> dict:
    versions = {}
    for name in (
        "torch",
        "transformers",
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "t5vh_fast",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _partial_dir(out: Path) -> Path:
    """A fresh ``.NAME.partial.*`` directory beside ``out`` to build the export in."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write the export at {out}: {exc.strerror}") from None


def _manifest(model, model_dir, tmp: Path, layouts: dict, opset: int, *, precision: str) -> dict:
    """The manifest fields every export has (files hashed as they are in ``tmp``)."""
    files = sorted({name for names in layouts.values() for name in names})
    spec = ModelSpec.from_config(model.config.to_dict())
    return {
        "format_version": FORMAT_VERSION,
        "graph_revision": GRAPH_REVISION,
        "precision": precision,
        "head_layout": model.head_layout,
        "model_type": model.config.model_type,
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "opset": opset,
        "layouts": layouts,
        "files": {name: sha256_file(tmp / name) for name in files},
        "weights": {"single": plan_record(spec, precision)},
        # what OnnxPolicy.weights_version reports for these weights, fresh or after update_weights
        "weights_version": weights_digest(checkpoint_params(model.state_dict(), spec)),
        "graphs": {name: {"inputs": graph_input_dims(tmp / name)} for name in files if name.endswith(".onnx")},
        "versions": library_versions(),
        "source": str(Path(model_dir).expanduser().resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
