"""The built-in demo model: seeded random T5 weights and a locally trained tokenizer.

Nothing is downloaded. The same size and seed give the same files every time,
so the demo is rebuilt instead of being stored in git.

    tiny   d_model 64, 2+2 layers, vocab 256      (tests: seconds)
    small  t5-small shape: d_model 512, d_ff 2048, 6+6 layers, 8 heads, vocab 32128 (benchmarks)
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from ._files import replace_dir
from .errors import InputError, PathExists

SIZES = {
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=256),
    "small": dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_decoder_layers=6, num_heads=8, vocab_size=32128),
}
# T5 families the exporter supports; the demo defaults to v1.0 (t5-small's own).
FAMILIES = {
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
TOKENIZER_VOCAB = 256  # pieces; the small model has more ids than pieces, as t5-small does (32128 > 32100)

_CORPUS = """\
paraphrase: Which course should I take to get started in data science?
What are the best courses to learn data science from scratch?
How can I learn to use data science in my daily work?
Which is the best undergraduate course for machine learning?
The model samples one token at a time from its own distribution.
A value head predicts the expected reward of the text written so far.
Reinforcement learning from human feedback trains the policy with rewards.
The reference model stays frozen while the policy is optimised.
The reward is the score minus beta times the divergence from the reference.
Proximal policy optimisation clips the ratio of new and old probabilities.
Sampling stops after a fixed number of tokens, never earlier.
The encoder reads the query once and the decoder writes the response.
Every response token has a log probability and a value.
How do I cook rice without a rice cooker?
What is the fastest way to learn a new language?
Why is the sky blue during the day and red at sunset?
Where can I find good books about the history of mathematics?
Translate English to German: The house is wonderful.
Summarize: The committee met on Tuesday and agreed to publish the report next month.
Question: how many legs does a spider have? Answer: eight.
The quick brown fox jumps over the lazy dog near the river bank.
She sells sea shells by the sea shore on sunny afternoons.
Numbers like 1, 2, 3, 42 and 2026 appear in text too.
Please rewrite this sentence so that it keeps its meaning.
Is it better to study in the morning or in the evening?
What should I take with me on a long hike in the mountains?
Can you explain how a transformer network attends to its inputs?
The weather today is cloudy with a chance of light rain in the evening.
"""


def train_tokenizer(vocab_size: int):
    """A T5-style Unigram tokenizer (pad=0, eos=1, unk=2; appends </s>) trained on the corpus above."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines * 4, trainer=trainer)
    # The trainer picks the same pieces every run, but its scores and id order vary in the last bits
    # (hash-map order). Re-score each piece by its corpus frequency and sort, so ids never change.
    specials = ["<pad>", "</s>", "<unk>"]
    text = "▁" + "▁".join(" ".join(lines).split())
    pieces = sorted(p for p in tok.get_vocab(with_added_tokens=False) if p not in specials)
    counts = {p: max(text.count(p), 1) for p in pieces}
    total = sum(counts.values())
    scored = [(p, round(math.log(counts[p] / total), 6)) for p in pieces]
    tok.model = models.Unigram([(p, 0.0) for p in specials] + scored, unk_id=2)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def build_config(size: str = "tiny", *, family: str = "t5", head_layout: str = "logits"):
    from transformers import MT5Config, T5Config

    if size not in SIZES:
        raise InputError(f"unknown demo size {size!r}: choose one of {sorted(SIZES)}")
    if family not in FAMILIES:
        raise InputError(f"unknown T5 family {family!r}: choose one of {sorted(FAMILIES)}")
    cls = MT5Config if family == "mt5" else T5Config
    return cls(
        **SIZES[size],
        **FAMILIES[family],
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        value_head_layout=head_layout,
    )


def build_model(size: str = "tiny", *, seed: int = 0, family: str = "t5", head_layout: str = "logits"):
    """The seeded random value-head model (eval mode)."""
    import torch

    from .modeling import T5HeadWithValueModel

    config = build_config(size, family=family, head_layout=head_layout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5HeadWithValueModel(config)
    return model.eval()


def write_demo(
    out_dir, *, size: str = "tiny", seed: int = 0, family: str = "t5", head_layout: str = "logits", force: bool = False
) -> Path:
    """Write the demo model and its tokenizer to ``out_dir`` (atomically)."""
    from transformers import T5TokenizerFast

    out = Path(out_dir)
    if out.exists() and not force:
        raise PathExists(f"{out} already exists: pass force=True (--force) to replace it")
    model = build_model(size, seed=seed, family=family, head_layout=head_layout)
    tokenizer = T5TokenizerFast(
        tokenizer_object=train_tokenizer(TOKENIZER_VOCAB),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_cache_dir() -> Path:
    """Where demo models and their exports are cached: ``$T5VH_CACHE`` or ``~/.cache/t5vh_fast``."""
    return Path(os.environ.get("T5VH_CACHE", Path.home() / ".cache" / "t5vh_fast"))


def demo_export(size: str, cache_dir: Path, *, precision: str = "fp32", log=lambda message: None) -> Path:
    """The demo model's export (at ``precision``) in ``cache_dir``, built (deterministically) on first use."""
    from .errors import ExportError
    from .export import default_output_dir, export
    from .manifest import read_manifest

    model_dir = cache_dir / f"demo-{size}"
    export_dir = default_output_dir(model_dir, precision)
    try:
        if _current(read_manifest(export_dir), export_dir) and (model_dir / "config.json").is_file():
            return export_dir
    except (FileNotFoundError, ExportError):
        pass
    if not (model_dir / "config.json").is_file():
        log(f"building the {size} demo model in {model_dir} ...")
        write_demo(model_dir, size=size, force=True)
    return export(model_dir, export_dir, force=True, precision=precision, log=log)


def _current(manifest: dict, export_dir: Path) -> bool:
    """Whether a cached export is what this t5vh_fast would write: format, graph revision, single-layout
    tensor plan, and the newest graph of that layout (the packed encoder)."""
    import json

    from .manifest import FORMAT_VERSION, GRAPH_REVISION, PACKED_ENCODER_GRAPH
    from .weights import ModelSpec, plan_record

    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("graph_revision", 1) != GRAPH_REVISION:
        return False
    if PACKED_ENCODER_GRAPH not in manifest.get("layouts", {}).get("single", ()):
        return False
    spec = ModelSpec.from_config(json.loads((export_dir / "config.json").read_text()))
    plan = plan_record(spec, manifest.get("precision", "fp32"), tuple(manifest.get("kept_fp32", ())))
    return manifest.get("weights", {}).get("single") == plan
