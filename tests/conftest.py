"""Shared fixtures: tiny demo models and their exports, built once per test session."""

from __future__ import annotations

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
    """DESIGN.md §5: 1e-4 x max(1, max |reference|)."""
    return 1e-4 * max(1.0, float(np.abs(np.asarray(reference)).max()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def tiny_export(tiny_dir, tmp_path_factory):
    from t5vh_fast.export import export

    return export(tiny_dir, tmp_path_factory.mktemp("exports") / "tiny-onnx")


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

    model = load_reference(tiny_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("models") / "perturbed"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def perturbed_export(perturbed_dir, tmp_path_factory):
    from t5vh_fast.export import export

    return export(perturbed_dir, tmp_path_factory.mktemp("exports") / "perturbed-onnx", merged=False)


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


def assert_pad_invariant(model, *, seed: int) -> None:
    """A row's tokens (shared uniforms) are the same alone as in a right-padded batch.

    ``model`` is the PyTorch reference or an ONNX policy: both take NumPy input.
    """
    ids, mask = mixed_queries(8, 256, seed=seed, min_len=3, max_len=16)
    u = np.random.default_rng(seed).random((8, 10))
    batch = model.respond_to_batch(ids, mask, txt_len=10, uniforms=u)
    for row in range(8):
        n = int(mask[row].sum())
        alone = model.respond_to_batch(ids[row : row + 1, :n], txt_len=10, uniforms=u[row : row + 1])
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batch.tokens[row]))
        np.testing.assert_allclose(np.asarray(alone.logprobs[0]), np.asarray(batch.logprobs[row]), atol=1e-4)
