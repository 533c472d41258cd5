"""The NumPy sampling math against plain definitions (the two-level CDF must equal the full one)."""

from __future__ import annotations

import numpy as np
import pytest

from t5vh_fast import sampling


def _full_cdf_draw(logits, u):
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    cdf = np.cumsum(weights, axis=-1, dtype=np.float64)
    return (cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1)


@pytest.mark.parametrize("vocab", [7, 256, 1000, 32128])
def test_two_level_draw_equals_the_full_cumulative_sum(vocab):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((64, vocab)) * 4).astype(np.float32)
    logits[::3, rng.integers(0, vocab, size=vocab // 2)] = -np.inf  # filtered tokens have zero mass
    u = rng.random(64)
    u[:4] = [0.0, 1 - 2**-53, 0.5, 1e-12]
    np.testing.assert_array_equal(sampling.draw(logits, u), _full_cdf_draw(logits, u))
    chosen = sampling.draw(logits, u)
    assert np.isfinite(logits[np.arange(64), chosen]).all()  # never a token with zero mass


def test_draw_at_block_edges():
    """u landing exactly on a block boundary of the CDF picks the first token of the next block."""
    logits = np.zeros((1, 3 * sampling.BLOCK), dtype=np.float32)  # uniform
    for k in (1, 2):
        u = np.array([k / 3])
        assert sampling.draw(logits, u)[0] == _full_cdf_draw(logits, u)[0]


def test_logsumexp_and_token_logprobs():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((5, 300)) * 10).astype(np.float32)
    expected = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(sampling.logsumexp(logits), expected, rtol=1e-6)
    token = np.array([0, 5, 299, 17, 42])
    np.testing.assert_allclose(
        sampling.token_logprobs(logits, token), logits[np.arange(5), token] - expected, atol=1e-4
    )


def test_non_finite_rows_are_named():
    lse = sampling.exp_weights(np.array([[0.0, 1.0], [np.nan, 0.0], [np.inf, 0.0]], dtype=np.float32))[2]
    with pytest.raises(FloatingPointError, match="step 3, row 1"):
        sampling.check_finite(lse, 3)
