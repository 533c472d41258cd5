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
from .manifest import (
    DECODER_GRAPH,
    ENCODER_GRAPH,
    LOOKUP_GRAPH,
    PACKED_ENCODER_GRAPH,
    PACKED_GRAPH,
    SAMPLER_GRAPH,
    SCORER_GRAPH,
    check_files,
    default_layout,
    layouts,
    read_manifest,
)
from .providers import CudaOptions, provider_errors, resolve_providers
from .results import Rollout, Scores
from .rollout import respond
from .scoring import score as _score
from .tensorrt import TensorrtOptions
from .weights import ModelSpec, checkpoint_params, place_arrays, plan_record, transformed, weights_digest


class OnnxPolicy:
    """A T5 value-head policy exported by ``t5vh-export``, run by ONNX Runtime. Made by ``load``."""

    def __init__(self, root: Path, manifest: dict, decoder: OnnxDecoder):
        self.root = root
        self.manifest = manifest
        config = _read_config(root)
        self.vocab_size = int(config["vocab_size"])
        self.decoder_start_token_id = int(config.get("decoder_start_token_id", 0) or 0)
        self.eos_token_id = config.get("eos_token_id", 1)
        self.pad_token_id = int(config.get("pad_token_id", 0) or 0)
        self.config = config
        # the precision of every number this policy computes ("fp32", "int8", ...)
        self.precision = manifest.get("precision", "fp32")
        # (decoder, weights version), replaced as one by update_weights: a call reads both at once
        self._running = (decoder, _export_version(manifest, layout_files(root, manifest, decoder.layout)))
        self._tokenizer = None

    @property
    def decoder(self) -> OnnxDecoder:
        """The sessions now running (a call keeps the ones it started on)."""
        return self._running[0]

    @decoder.setter
    def decoder(self, decoder: OnnxDecoder) -> None:
        self._running = (decoder, self._running[1])

    @property
    def weights_version(self) -> str:
        """Which weights this policy runs: a hash of them (the export's until ``update_weights``), or the
        name passed to ``update_weights(..., version=)``. Every ``Rollout`` and ``Scores`` carries it."""
        return self._running[1]

    @property
    def precision_report(self) -> Optional[dict]:
        """What this reduced precision costs against fp32, measured at export (KL per token, token agreement,
        largest log-prob and value differences, importance ratios; docs/contract.md). None for fp32."""
        return self.manifest.get("precision_report")

    @property
    def providers(self) -> List[str]:
        """The onnxruntime providers actually in use (CUDA only if it really started)."""
        return self.decoder.providers

    @property
    def tokenizer(self):
        """The export's ``tokenizers.Tokenizer`` (``tokenizer.json``)."""
        if self._tokenizer is None:
            self._tokenizer = read_tokenizer(self.root)
        return self._tokenizer

    def respond_to_batch(
        self,
        query_ids,
        attention_mask=None,
        *,
        txt_len: int = 20,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
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

        ``num_samples`` responses are drawn per query (R = B x num_samples rows,
        query-major: all samples of query 0, then of query 1, ...;
        ``Rollout.query_index`` maps rows back to queries). The encoder runs once
        per query and its keys/values are shared by the query's samples; the
        numbers equal those of the query batch repeated ``num_samples`` times.

        Randomness: ``seed`` (an integer >= 0) makes
        ``numpy.random.Generator(PCG64(seed))``, which draws one float64 uniform
        per response row per step, rows in order (the same draws as for the
        repeated batch); ``uniforms`` (R x txt_len, in [0, 1)) replaces the
        generator. With the same uniforms the PyTorch reference
        (``T5HeadWithValueModel.respond_to_batch``) picks the same tokens.
        ``callback(t, tokens)`` is called after every step (for progress or timing).
        Queries longer than ``max_query_tokens`` are refused (memory grows with
        the square of the query length).

        Returns a ``Rollout``: ``tokens``, ``logprobs`` (unfiltered), ``values``
        and, with filtering, ``sampling_logprobs``, all R x txt_len NumPy arrays,
        plus ``query_index``, ``precision`` and ``weights_version``. Raises
        ``InputError`` (a ``ValueError``) for bad input and ``NonFiniteError``
        when the logits hold NaN or inf.
        """
        ids, mask = as_token_batch(query_ids, attention_mask, vocab_size=self.vocab_size)
        check_query_length(ids, max_query_tokens)
        decoder, version = self._running  # one read: an update_weights meanwhile does not touch this call
        with provider_errors(decoder.providers, "while sampling"):
            return respond(
                decoder,
                ids,
                mask,
                decoder_start_token_id=self.decoder_start_token_id,
                txt_len=txt_len,
                top_k=top_k,
                top_p=top_p,
                num_samples=num_samples,
                seed=seed,
                uniforms=uniforms,
                callback=callback,
                precision=self.precision,
                weights_version=version,
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

        ``query_ids``/``attention_mask`` as in ``respond_to_batch``;
        ``response_ids`` R x T right-padded, ``response_mask`` R x T (all ones
        when omitted). R is B, or a multiple of it for several responses per
        query grouped query-major (as ``respond_to_batch(..., num_samples=N)``
        returns them): the encoder then runs once per query. ``max_query_tokens``
        as in ``respond_to_batch``. Returns ``Scores`` (R x T NumPy arrays, 0
        where masked). On tokens a rollout sampled, the numbers equal the
        rollout's. Raises ``NonFiniteError`` naming the row when a logit or
        value is NaN or inf.
        """
        ids, mask = as_token_batch(query_ids, attention_mask, vocab_size=self.vocab_size)
        check_query_length(ids, max_query_tokens)
        resp, resp_mask, num_samples = check_response_batch(
            response_ids, response_mask, queries=ids.shape[0], vocab_size=self.vocab_size
        )
        decoder, version = self._running
        with provider_errors(decoder.providers, "while scoring"):
            return _score(
                decoder,
                ids,
                mask,
                resp,
                resp_mask,
                decoder_start_token_id=self.decoder_start_token_id,
                num_samples=num_samples,
                precision=self.precision,
                weights_version=version,
            )

    # ------------------------------------------------------------------ weights

    def update_weights(self, weights, *, version: Optional[str] = None) -> str:
        """Run on new weights from now on, without re-exporting; returns the new ``weights_version``.

        ``weights``: a ``T5HeadWithValueModel`` or a state dict (torch tensors
        or NumPy arrays) with the checkpoint's parameter names, as
        ``model.state_dict()`` gives it (tied weights under every alias) or as
        a saved ``model.safetensors`` holds it. Every name, shape and value is
        checked first: a missing, extra or misshapen parameter, another
        vocabulary or a NaN raises a ``T5vhError`` naming it and changes
        nothing. The new weights are transformed exactly as the exporter did
        (transposes, the tied LM head's scale, the folded value head, int8
        quantization) into copies (changing the model afterwards, as an
        optimizer step does, does not reach the policy) and loaded into new
        sessions; afterwards every number equals that of a fresh export of the
        same weights. Every decoder layout of a format-2 export can be
        refreshed. The new sessions and version replace the old ones in one
        assignment: a call already running finishes on the old weights and
        reports the old version. ``version``: a non-empty name for the new
        weights (default: ``weights_digest``, a hash of them, which is also the
        version a fresh export of the same weights loads with).
        """
        if version is not None and not (isinstance(version, str) and version.strip()):
            raise InputError(f"version must be a non-empty string, got {version!r}")
        decoder = self.decoder
        layout = decoder.layout
        recorded = self.manifest.get("weights", {}).get(layout)
        if recorded is None:
            raise ExportError(
                f"{self.root} holds no weight map for decoder={layout!r} (it was exported by an older t5vh_fast): "
                "re-export it with this version's `t5vh-export`"
            )
        spec = ModelSpec.from_config(self.config)
        keep = tuple(self.manifest.get("kept_fp32", ()))
        if layout == "single" and plan_record(spec, self.precision, keep) != recorded:
            raise ExportError(
                f"{self.root} was exported with another weight layout than this t5vh_fast computes: re-export it"
            )
        params = checkpoint_params(weights, spec)
        if layout == "single":
            arrays = {
                name: place_arrays(params, spec, self.precision, place, keep)
                for name, place in (("host", "host"), (ENCODER_GRAPH, "encoder"), (DECODER_GRAPH, "decoder"))
            }
        else:  # Optimum's graphs: the map the exporter found for each initializer
            arrays = {
                graph: {name: transformed(m["transform"], params[m["source"]], spec) for name, m in mapping.items()}
                for graph, mapping in recorded.items()
            }
        new_version = version if version is not None else weights_digest(params)
        self._running = (decoder.with_weights(arrays), new_version)
        return new_version

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


def read_tokenizer(root: Path):
    """The ``tokenizers.Tokenizer`` of an export (its ``tokenizer.json``)."""
    path = Path(root) / "tokenizer.json"
    if not path.is_file():
        raise PathNotFound(f"{root} has no tokenizer.json: pass token ids instead of text")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a damaged file
        raise ExportError(
            f"{path} is not a readable tokenizer ({exc}): copy it again from the model directory, "
            "or re-export the model"
        ) from None


def read_config(root: Path) -> dict:
    """An export's ``config.json``, checked to hold a ``vocab_size``."""
    return _read_config(Path(root))


def _read_config(root: Path) -> dict:
    path = root / "config.json"
    try:
        config = json.loads(path.read_bytes())
        return {**config, "vocab_size": int(config["vocab_size"])}
    except FileNotFoundError:
        raise ExportError(f"{root} has no config.json: the export is incomplete; re-export the model") from None
    except (ValueError, TypeError, KeyError) as exc:  # not JSON, not UTF-8, not an object, no vocab_size
        raise ExportError(f"{path} is not a model config ({exc!r}): re-export the model") from None


# which providers run which precision: bf16 has no CPU kernels; int8's MatMulIntegerToFloat has no CUDA ones
_PRECISION_PROVIDERS = {
    "bf16": ("CUDAExecutionProvider", "TensorrtExecutionProvider"),
    "int8": ("CPUExecutionProvider",),
}


def _check_precision_runs(precision: str, providers, cuda) -> None:
    """Refuse, before any session starts, a precision the chosen provider cannot run."""
    if precision not in _PRECISION_PROVIDERS:
        return
    cuda = cuda or CudaOptions()
    first = resolve_providers(providers, device_id=cuda.device_id, probe=cuda.probe)[0]
    if first not in _PRECISION_PROVIDERS[precision]:
        fix = "export fp32 or int8 for the CPU" if precision == "bf16" else "export fp32, fp16 or bf16 for the GPU"
        raise InputError(
            f"this export's precision is {precision}, which {first} cannot run (it needs "
            f"{' or '.join(_PRECISION_PROVIDERS[precision])}): pass other providers, or {fix}"
        )


def layout_files(root: Path, manifest: dict, layout: str) -> List[str]:
    """The files a decoder layout of the export at ``root`` reads: its graphs, their external weights
    (``<graph>.data``, where there are any) and host tables, and whatever the manifest lists for it."""
    graphs = graph_files(layout)
    on_disk = (f"{g}.data" for g in graphs if (root / f"{g}.data").exists())
    return sorted({*graphs, *on_disk, *layouts(manifest).get(layout, ())})


def export_weights_version(export_dir, decoder: Optional[str] = None) -> str:
    """The ``weights_version`` a policy loaded from ``export_dir`` (with ``decoder``) reports, without loading it."""
    root = Path(export_dir).expanduser()
    manifest = read_manifest(root)
    return _export_version(manifest, layout_files(root, manifest, decoder or default_layout(manifest)))


def _export_version(manifest: dict, files) -> str:
    """The version of an export's weights: the digest of its weights the exporter recorded (what
    ``update_weights`` gives for the same weights), else a hash of the hashes of the files the layout reads."""
    import hashlib

    recorded = manifest.get("weights_version")
    if isinstance(recorded, str) and recorded:
        return recorded
    listed = manifest.get("files", {})
    joined = "".join(f"{name}:{listed.get(name, '')};" for name in sorted(files))
    return hashlib.blake2b(joined.encode(), digest_size=8).hexdigest()


def load(
    export_dir: Union[str, Path],
    *,
    providers: Union[str, Sequence[str]] = "auto",
    threads: Optional[int] = None,
    decoder: Optional[str] = None,
    verify: bool = True,
    cuda: Optional[CudaOptions] = None,
    tensorrt: Optional[TensorrtOptions] = None,
    for_scoring: bool = False,
) -> OnnxPolicy:
    """Load an export made by ``t5vh-export``.

    ``providers``: ``"auto"`` (CUDA when it really works, else CPU), ``"cpu"``,
    ``"cuda"``, ``"tensorrt"`` or an onnxruntime provider list. ``threads``:
    intra-op threads per session (default: all cores). ``decoder``: which
    graphs run: ``"single"`` (t5vh's own: one decoder graph for every step,
    weights held once; the default where the export has it), ``"split"`` or
    ``"merged"`` (Optimum's graphs). The manifest is checked first: format
    version, and that every file the layout reads is listed and unchanged
    (``verify=False`` skips the hashes, not the listing). ``cuda``:
    ``CudaOptions`` (device, TF32, memory arena) for CUDA and TensorRT;
    ``tensorrt``: ``TensorrtOptions`` (shape profiles, engine cache,
    fp16/bf16). A GPU provider that fails raises ``ProviderError`` naming it.
    ``for_scoring``: a process that scores and does not sample (a scoring job):
    on the CPU the sampling decoder then starts only if ``respond_to_batch`` is
    called, so only the packed scoring decoder holds the decoder's weights (on
    the CPU ``score()`` runs that graph, started at its first call), and each CPU
    session runs on one thread: ``score()`` runs ``threads`` parts of a batch's
    queries at once instead, each on a thread of its own.
    Raises ``PathNotFound`` or ``ExportError`` naming what is wrong.
    """
    root = Path(export_dir).expanduser()
    manifest = read_manifest(root)
    layout = decoder if decoder is not None else default_layout(manifest)
    available = layouts(manifest)
    needed = layout_files(root, manifest, layout)
    if layout not in available:
        known = ", ".join(repr(name) for name in available)
        raise ExportError(f"{root} has no {layout!r} decoder layout (it has {known}): pass one of those, or re-export")
    check_files(root, manifest, needed, verify_hashes=verify)
    precision = manifest.get("precision", "fp32")
    if precision == "int8" and providers == "auto":
        providers = "cpu"  # int8 exports are made for the CPU provider
    _check_precision_runs(precision, providers, cuda)
    graphs = {
        "sampler": SAMPLER_GRAPH,
        "scorer": SCORER_GRAPH,
        "lookup": LOOKUP_GRAPH,
        "packed": PACKED_GRAPH,
        "packed_encoder": PACKED_ENCODER_GRAPH,
    }
    options = {option: name in needed for option, name in graphs.items()} if layout == "single" else {}
    if layout == "single":
        options["lazy_decoder"] = options["rows_at_once"] = bool(for_scoring) and options["packed"]
    opened = open_decoder(root, layout, providers=providers, threads=threads, cuda=cuda, tensorrt=tensorrt, **options)
    return OnnxPolicy(root, manifest, opened)
