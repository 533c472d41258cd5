"""Group sampling: num_samples responses per query, the encoder once per query, the numbers of the repeated batch."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import mixed_queries, teacher_forced, tol

N = 4


def _repeated(ids, mask, n):
    return np.repeat(ids, n, axis=0), np.repeat(mask, n, axis=0)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.9)])
def test_group_equals_the_repeated_batch(policy, reference, top_k, top_p):
    ids, mask = mixed_queries(64, 256, seed=70, max_len=20)
    u = np.random.default_rng(70).random((64 * N, 12))
    group = policy.respond_to_batch(ids, mask, txt_len=12, num_samples=N, top_k=top_k, top_p=top_p, uniforms=u)
    flat = policy.respond_to_batch(*_repeated(ids, mask, N), txt_len=12, top_k=top_k, top_p=top_p, uniforms=u)
    assert group.tokens.shape == (64 * N, 12) and group.attention_mask.shape == mask.shape
    np.testing.assert_array_equal(group.query_index, np.repeat(np.arange(64), N))
    assert (group.tokens == flat.tokens).mean() >= 0.999
    same = np.cumprod(group.tokens == flat.tokens, axis=1).astype(bool)
    logits = teacher_forced(reference, np.repeat(ids, N, axis=0), np.repeat(mask, N, axis=0), flat.tokens).logits
    assert np.abs(group.logprobs - flat.logprobs)[same].max() <= tol(logits)
    assert np.abs(group.values - flat.values)[same].max() <= tol(flat.values)
    # the samples of one query are different rollouts, not copies
    assert len({tuple(row) for row in group.tokens[:N]}) == N


def test_seeded_groups_draw_what_the_repeated_batch_draws(policy):
    ids, mask = mixed_queries(5, 256, seed=71)
    group = policy.respond_to_batch(ids, mask, txt_len=6, num_samples=3, seed=9)
    flat = policy.respond_to_batch(*_repeated(ids, mask, 3), txt_len=6, seed=9)
    assert (group.tokens == flat.tokens).mean() >= 0.999


def test_the_reference_has_the_same_option(policy, reference):
    ids, mask = mixed_queries(32, 256, seed=72)
    u = np.random.default_rng(72).random((32 * N, 8))
    ours = policy.respond_to_batch(ids, mask, txt_len=8, num_samples=N, uniforms=u)
    ref = reference.respond_to_batch(ids, mask, txt_len=8, num_samples=N, uniforms=u)
    assert (ours.tokens == ref.tokens.numpy()).mean() >= 0.999
    np.testing.assert_array_equal(ref.query_index.numpy(), ours.query_index)


def test_score_of_groups_equals_score_of_the_repeated_batch(policy, reference):
    ids, mask = mixed_queries(16, 256, seed=73)
    rollout = policy.respond_to_batch(ids, mask, txt_len=7, num_samples=N, seed=73)
    grouped = policy.score(ids, rollout.tokens, mask)
    flat = policy.score(*_repeated(ids, mask, N)[:1], rollout.tokens, np.repeat(mask, N, axis=0))
    ref = reference.score(ids, rollout.tokens, mask)
    np.testing.assert_allclose(grouped.logprobs, flat.logprobs, atol=1e-4)
    np.testing.assert_allclose(grouped.logprobs, rollout.logprobs, atol=1e-4)
    assert np.abs(grouped.values - ref.values.numpy()).max() <= tol(ref.values)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_bad_num_samples_is_one_line(policy, bad):
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1"):
        policy.respond_to_batch([[5, 6, 1]], txt_len=3, num_samples=bad)


def test_uniforms_rows_must_be_queries_times_samples(policy):
    ids, mask = mixed_queries(3, 256, seed=74)
    with pytest.raises(ValueError, match=r"uniforms has 3 rows, but 3 queries x 4 samples = 12 responses"):
        policy.respond_to_batch(ids, mask, txt_len=5, num_samples=4, uniforms=np.full((3, 5), 0.5))
    with pytest.raises(ValueError, match="same number of responses for every query"):
        policy.score(ids, [[5, 6]] * 7, mask)
