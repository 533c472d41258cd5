"""Shared fixtures: tiny demo models and their exports, built once per test session.

With ``T5VH_TEST_FIXTURES=DIR`` they are built once into DIR and reused by later sessions (the
mutation check, ``scripts/mutation_check.py``, runs hundreds of short sessions on the same models).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from t5vh_fast.demo import write_demo


def gpu_skip_reason():
    """Why the ``gpu`` tests cannot run here, or None when they can."""
    from t5vh_fast import gpu
    from t5vh_fast.providers import CUDA, ort

    if CUDA not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider: pip install 't5vh_fast[gpu]'"
    problem = gpu.gpu_problem(gpu.probe(), 0, gpu.ort_cuda_major())
    return f"needs a GPU onnxruntime-gpu runs on: {problem}" if problem else None


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip, with the reason, where there is no usable GPU."""
    marked = [item for item in items if "gpu" in item.keywords]
    reason = gpu_skip_reason() if marked else None
    for item in marked if reason else []:
        item.add_marker(pytest.mark.skip(reason=reason))


def tol(reference) -> float:
    """docs/contract.md, "Parity, defined": 1e-4 x max(1, max |reference|)."""
    return 1e-4 * max(1.0, float(np.abs(np.asarray(reference)).max()))


def teacher_forced(model, ids, mask, tokens):
    """The PyTorch model's output (``.logits``, ``.value``) on queries ``ids``/``mask`` with ``tokens`` as
    the responses, without gradients: the reference numbers a rollout or a score is compared with."""
    import torch

    def tensor(a):
        return a if torch.is_tensor(a) else torch.from_numpy(np.asarray(a))

    with torch.no_grad():
        return model(
            input_ids=tensor(ids), attention_mask=tensor(mask), decoder_input_ids=model._shift_right(tensor(tokens))
        )


def _built(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` into a fresh session directory, or once into ``$T5VH_TEST_FIXTURES/name``."""
    shared = os.environ.get("T5VH_TEST_FIXTURES")
    if not shared:
        path = tmp_path_factory.mktemp("fixtures") / name
        build(path)
        return path
    path = Path(shared) / name
    if not path.exists():
        building = Path(shared) / f".{name}.building"
        shutil.rmtree(building, ignore_errors=True)
        building.parent.mkdir(parents=True, exist_ok=True)
        build(building)
        building.rename(path)  # complete or absent: a killed session leaves only .NAME.building
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return _built(tmp_path_factory, "tiny", lambda path: write_demo(path, size="tiny"))


@pytest.fixture(scope="session")
def tiny_export(tiny_dir, tmp_path_factory):
    from t5vh_fast.export import export

    return _built(tmp_path_factory, "tiny-onnx", lambda path: export(tiny_dir, path))


@pytest.fixture(scope="session")
def reference(tiny_dir):
    from t5vh_fast.checkpoint import load_reference

    return load_reference(tiny_dir)


@pytest.fixture(scope="session")
def perturbed_dir(tiny_dir, tmp_path_factory):
    """The tiny model with seeded noise (0.05) on every decoder weight: a reference model that really
    differs from the policy (KL, reference log-probs and rewards are not those of the policy)."""
    import torch

    from t5vh_fast.checkpoint import load_reference

    def build(path):
        model = load_reference(tiny_dir)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        model.save_pretrained(path)

    return _built(tmp_path_factory, "perturbed", build)


@pytest.fixture(scope="session")
def perturbed_export(perturbed_dir, tmp_path_factory):
    from t5vh_fast.export import export

    return _built(tmp_path_factory, "perturbed-onnx", lambda path: export(perturbed_dir, path, merged=False))


@pytest.fixture(scope="session", params=["single", "split", "merged"])
def policy(request, tiny_export):
    import t5vh_fast

    return t5vh_fast.load(tiny_export, providers="cpu", decoder=request.param)


def mixed_queries(n_rows: int, vocab: int, *, seed: int = 0, min_len: int = 2, max_len: int = 12):
    """Right-padded queries of random lengths ending in </s>, with their mask."""
    from t5vh_fast import pad_batch

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        n = int(rng.integers(min_len, max_len + 1))
        rows.append(list(rng.integers(3, vocab, size=n - 1)) + [1])
    return pad_batch(rows)


def assert_same_samples(tokens, other_tokens, logprobs=None, other_logprobs=None, *, atol: float = 1e-4) -> None:
    """Two *different* float computations of the same sampler, under the same uniforms: the contract's
    rollout parity. At least 256 rows; tokens identical on >= 99.9% (a rare split at a cumulative-probability
    boundary is the only excuse); log-probs within ``atol`` on each row's common prefix."""
    tokens, other_tokens = np.asarray(tokens), np.asarray(other_tokens)
    assert tokens.shape == other_tokens.shape and tokens.shape[0] >= 256, tokens.shape
    same = tokens == other_tokens
    assert same.mean() >= 0.999, f"tokens identical on {same.mean():.4%} only"
    if logprobs is not None:
        prefix = np.cumprod(same, axis=1).astype(bool)
        diff = np.abs(np.asarray(logprobs) - np.asarray(other_logprobs))[prefix]
        assert diff.max() <= atol, diff.max()


def assert_pad_invariant(model, *, seed: int) -> None:
    """A row's result does not depend on how much padding its batch added (shared uniforms).

    256 right-padded rows of mixed lengths, against the same batch with 7 more padding columns and
    against a few rows alone (the shortest and the longest): the contract's rollout parity, not
    bit-identity (the shapes differ, so the float sums may too). ``model`` is the PyTorch reference
    or an ONNX policy: both take NumPy input.
    """
    ids, mask = mixed_queries(256, 256, seed=seed, min_len=3, max_len=16)
    u = np.random.default_rng(seed).random((256, 8))
    batch = model.respond_to_batch(ids, mask, txt_len=8, uniforms=u)
    more = model.respond_to_batch(np.pad(ids, ((0, 0), (0, 7))), np.pad(mask, ((0, 0), (0, 7))), txt_len=8, uniforms=u)
    tokens, logprobs = np.array(more.tokens), np.array(more.logprobs)
    lengths = mask.sum(axis=1)
    for row in np.argsort(lengths, kind="stable")[[0, 1, -2, -1]]:
        n = int(lengths[row])
        alone = model.respond_to_batch(ids[row : row + 1, :n], txt_len=8, uniforms=u[row : row + 1])
        tokens[row], logprobs[row] = np.asarray(alone.tokens[0]), np.asarray(alone.logprobs[0])
    assert (lengths < lengths.max()).mean() > 0.8  # most rows are padded in the batch
    assert_same_samples(tokens, batch.tokens, logprobs, batch.logprobs)
