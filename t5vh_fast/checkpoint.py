"""Finding and loading T5 value-head checkpoints (safetensors; pickles only when asked).

Needs torch and transformers (the ``export`` extra).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import T5Config

from .errors import InputError, ModelError, PathNotFound
from .modeling import T5HeadWithValueModel
from .weights import HEAD_KEYS, canonical_head_layout

SUPPORTED_MODEL_TYPES = ("t5", "mt5")


def load_reference(
    model_dir: Union[str, os.PathLike],
    *,
    strict: bool = False,
    allow_pickle: bool = False,
    head_layout: Optional[str] = None,
) -> T5HeadWithValueModel:
    """Load a T5 value-head model from a local directory (or a hub name where there is a network).

    Only safetensors weights are read unless ``allow_pickle=True`` (``.bin``
    files are pickles: never unpickle a file you did not make). The head layout
    is taken from the checkpoint's keys, else from the config, else
    ``"logits"``. Missing head weights are initialised freshly with a warning
    naming them; ``strict=True`` makes that an error. Returns the model in eval mode.
    """
    path = resolve_model_dir(model_dir)
    config = read_t5_config(path)
    weights = _weight_files(path, allow_pickle=allow_pickle)
    keys = _checkpoint_keys(weights)
    layout = head_layout or _layout_from_keys(keys) or getattr(config, "value_head_layout", None) or "logits"
    config.value_head_layout = canonical_head_layout(layout)
    use_safetensors = weights[0].suffix == ".safetensors" or weights[0].name.endswith(".safetensors.index.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = T5HeadWithValueModel.from_pretrained(
                path, config=config, use_safetensors=use_safetensors, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    if missing:
        body = [k for k in missing if not k.startswith("v_head.")]
        msg = f"{path}: weights missing from the checkpoint and freshly initialised: {missing}"
        if strict or body:
            raise ModelError(msg + (" (strict mode)" if strict else " (the T5 body must be complete)"))
        warnings.warn(msg + "; train the value head before trusting its values", stacklevel=2)
    model.eval()
    return model


def resolve_model_dir(model_dir) -> Path:
    """A local directory, or a hub name fetched where a network exists."""
    path = Path(model_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PathNotFound(f"{path} is a file, not a model directory")
    name = str(model_dir)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as exc:  # offline, unknown repo, ...
            raise PathNotFound(
                f"{name} is not a local directory and could not be fetched from the hub ({type(exc).__name__}): "
                "pass the path of a saved model directory"
            ) from None
    raise PathNotFound(f"model directory not found: {path}")


def read_t5_config(path: Path) -> T5Config:
    """The directory's config, refused unless it is a T5-family model."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PathNotFound(f"{path} has no config.json: is it a saved model directory?")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file} is not valid JSON: {exc}") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{path} holds a {model_type!r} model; t5vh_fast supports T5-family seq2seq models only "
            f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}: T5 v1.0, T5 v1.1, Flan-T5, mT5)"
        )
    if model_type == "mt5":
        from transformers import MT5Config

        return MT5Config.from_pretrained(path)
    return T5Config.from_pretrained(path)


def _weight_files(path: Path, *, allow_pickle: bool) -> list:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (path / name).is_file():
            return [path / name]
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            if allow_pickle:
                return [path / name]
            raise InputError(
                f"{path} has only {name}, a pickle file, and pickles are not loaded by default "
                "(they can run code). Convert it to safetensors, or pass allow_pickle=True "
                "(--allow-pickle) if you trust where it came from."
            )
    raise PathNotFound(f"{path} has no weights file (model.safetensors)")


def _checkpoint_keys(weights: list) -> set:
    first = weights[0]
    if first.name.endswith(".index.json"):
        return set(json.loads(first.read_text())["weight_map"])
    if first.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(first), framework="pt") as f:
                return set(f.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header or size
            raise ModelError(
                f"{first} is not a readable safetensors file ({exc}): it is truncated or damaged; save the model again"
            ) from None
    return set(torch.load(first, map_location="cpu", weights_only=True))  # opted in, weights only


def _layout_from_keys(keys: set) -> Optional[str]:
    for layout, head_keys in HEAD_KEYS.items():
        if head_keys[0] in keys:
            return layout
    return None
