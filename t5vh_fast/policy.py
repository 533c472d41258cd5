"""``load(export_dir)``: the ONNX policy, with sampling and scoring. No torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from .decoder import OnnxDecoder, graph_files, open_decoder
from .errors import ExportError, InputError, PathNotFound
from .inputs import (
    DEFAULT_MAX_QUERY_TOKENS,
    as_token_batch,
    check_positive_int,
    check_query_length,
    check_response_batch,
    check_text,
    pad_batch,
)
from .manifest import read_manifest
from .results import Rollout, Scores
from .rollout import respond
from .scoring import score as _score


class OnnxPolicy:
    """A T5 value-head policy exported by ``t5vh-export``, run by ONNX Runtime. Made by ``load``."""

    def __init__(self, root: Path, manifest: dict, decoder: OnnxDecoder):
        self.root = root
        self.manifest = manifest
        self.decoder = decoder
        config = _read_config(root)
        self.vocab_size = int(config["vocab_size"])
        self.decoder_start_token_id = int(config.get("decoder_start_token_id", 0) or 0)
        self.eos_token_id = config.get("eos_token_id", 1)
        self.pad_token_id = int(config.get("pad_token_id", 0) or 0)
        self._tokenizer = None

    @property
    def providers(self) -> List[str]:
        """The onnxruntime providers actually in use (CUDA only if it really started)."""
        return self.decoder.providers

    @property
    def tokenizer(self):
        """The export's ``tokenizers.Tokenizer`` (``tokenizer.json``)."""
        if self._tokenizer is None:
            path = self.root / "tokenizer.json"
            if not path.is_file():
                raise PathNotFound(f"{self.root} has no tokenizer.json: pass token ids instead of text")
            from tokenizers import Tokenizer

            try:
                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception for a damaged file
                raise ExportError(
                    f"{path} is not a readable tokenizer ({exc}): copy it again from the model directory, "
                    "or re-export the model"
                ) from None
        return self._tokenizer

    def respond_to_batch(
        self,
        query_ids,
        attention_mask=None,
        *,
        txt_len: int = 20,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
        uniforms=None,
        callback: Optional[Callable[[int, np.ndarray], None]] = None,
        max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    ) -> Rollout:
        """Sample exactly ``txt_len`` tokens per query with the plain sampler.

        ``query_ids``: B x S right-padded token ids (use ``pad_batch`` for ragged
        lists) and ``attention_mask`` B x S (1 = token, 0 = padding; all ones when
        omitted). Each step filters the last position's logits with ``top_k``
        (0 = off) then ``top_p`` (1.0 = off), draws one token by inverse CDF and
        appends it; no early stop at EOS, no EOS masking, no padding.

        Randomness: ``seed`` (an integer >= 0) makes
        ``numpy.random.Generator(PCG64(seed))``, which draws one float64 uniform
        per row per step, rows in order; ``uniforms`` (B x txt_len, in [0, 1))
        replaces the generator. With the same uniforms the PyTorch reference
        (``T5HeadWithValueModel.respond_to_batch``) picks the same tokens.
        ``callback(t, tokens)`` is called after every step (for progress or timing).
        Queries longer than ``max_query_tokens`` are refused (memory grows with
        the square of the query length).

        Returns a ``Rollout``: ``tokens``, ``logprobs`` (unfiltered), ``values``
        and, with filtering, ``sampling_logprobs``; all B x txt_len NumPy arrays.
        Raises ``InputError`` (a ``ValueError``) for bad input and
        ``NonFiniteError`` when the logits hold NaN or inf.
        """
        ids, mask = as_token_batch(query_ids, attention_mask, vocab_size=self.vocab_size)
        check_query_length(ids, max_query_tokens)
        return respond(
            self.decoder,
            ids,
            mask,
            decoder_start_token_id=self.decoder_start_token_id,
            txt_len=txt_len,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            uniforms=uniforms,
            callback=callback,
        )

    def score(
        self,
        query_ids,
        response_ids,
        attention_mask=None,
        response_mask=None,
        *,
        max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
    ) -> Scores:
        """Teacher-forced log-probs, values and entropy of given responses.

        ``query_ids``/``attention_mask``/``max_query_tokens`` as in
        ``respond_to_batch``; ``response_ids`` B x T right-padded,
        ``response_mask`` B x T (all ones when omitted). Returns ``Scores``
        (B x T NumPy arrays, 0 where masked). On tokens a rollout sampled, the
        numbers equal the rollout's. Raises ``NonFiniteError`` naming the row
        when a logit or value is NaN or inf.
        """
        ids, mask = as_token_batch(query_ids, attention_mask, vocab_size=self.vocab_size)
        check_query_length(ids, max_query_tokens)
        resp, resp_mask = check_response_batch(
            response_ids, response_mask, queries=ids.shape[0], vocab_size=self.vocab_size
        )
        return _score(self.decoder, ids, mask, resp, resp_mask, decoder_start_token_id=self.decoder_start_token_id)

    # ------------------------------------------------------------------ text

    def encode_text(self, texts: Sequence[str], *, max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS):
        """Tokenize (appending ``</s>``) and right-pad: ``(ids, attention_mask)``.

        A text longer than ``max_query_tokens`` tokens is refused (and one of
        more than 32 characters per allowed token before it is tokenized)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        check_positive_int("max_query_tokens", max_query_tokens)
        for i, text in enumerate(texts):
            check_text(text, f"text {i}", max_tokens=max_query_tokens)
        rows = [e.ids for e in self.tokenizer.encode_batch(texts)]
        for i, row in enumerate(rows):
            if len(row) > max_query_tokens:
                raise InputError(
                    f"text {i} is {len(row)} tokens long, more than max_query_tokens={max_query_tokens}: "
                    "shorten it, or raise max_query_tokens"
                )
        return pad_batch(rows, pad_id=self.pad_token_id)

    def decode_text(self, token_ids) -> List[str]:
        """Detokenize rows, skipping special tokens and ids the tokenizer does not have."""
        size = self.tokenizer.get_vocab_size()
        return [self.tokenizer.decode([int(t) for t in row if 0 <= t < size]) for row in np.asarray(token_ids)]

    def respond_to_text(self, texts: Sequence[str], **options) -> List[str]:
        """Text in, text out: ``respond_to_batch`` on the tokenized texts, decoded."""
        ids, mask = self.encode_text(texts, max_query_tokens=options.get("max_query_tokens", DEFAULT_MAX_QUERY_TOKENS))
        return self.decode_text(self.respond_to_batch(ids, mask, **options).tokens)


def _read_config(root: Path) -> dict:
    path = root / "config.json"
    try:
        config = json.loads(path.read_bytes())
        return {**config, "vocab_size": int(config["vocab_size"])}
    except FileNotFoundError:
        raise ExportError(f"{root} has no config.json: the export is incomplete; re-export the model") from None
    except (ValueError, TypeError, KeyError) as exc:  # not JSON, not UTF-8, not an object, no vocab_size
        raise ExportError(f"{path} is not a model config ({exc!r}): re-export the model") from None


def load(
    export_dir: Union[str, Path],
    *,
    providers: Union[str, Sequence[str]] = "auto",
    threads: Optional[int] = None,
    decoder: str = "split",
    verify: bool = True,
) -> OnnxPolicy:
    """Load an export made by ``t5vh-export``.

    ``providers``: ``"auto"`` (CUDA when it really works, else CPU), ``"cpu"``,
    ``"cuda"``, ``"tensorrt"`` or an onnxruntime provider list. ``threads``:
    intra-op threads per session (default: all cores). ``decoder``:
    ``"split"`` (two decoder graphs) or ``"merged"`` (one graph, less memory).
    The manifest is checked first: format version and the sha256 of every
    graph (``verify=False`` skips the hashes, not the version). Raises
    ``PathNotFound`` or ``ExportError`` naming what is wrong.
    """
    root = Path(export_dir).expanduser()
    manifest = read_manifest(root, verify_hashes=verify, only=graph_files(decoder))
    return OnnxPolicy(root, manifest, open_decoder(root, decoder, providers=providers, threads=threads))
