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


def test_draw_when_u_lands_exactly_on_a_cumulative_sum():
    """The first index whose cumulative mass *exceeds* u * total: where u * total equals the mass of the
    first j tokens exactly (uniform weights), the token is j, inside a block or at its edge."""
    vocab = 3 * sampling.BLOCK
    logits = np.zeros((1, vocab), dtype=np.float32)
    for j in (1, 100, 255, 256, 257, 511, 700):
        u = np.array([j / vocab])
        assert u[0] * vocab == j  # the tie is exact in float64
        assert sampling.draw(logits, u)[0] == j == _full_cdf_draw(logits, u)[0]


def test_filtering_and_drawing_do_not_overflow_on_large_logits():
    """Only differences of logits matter: +80 (exp(80) is past float32's range) changes nothing."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((64, 300)) * 3).astype(np.float32)
    u = rng.random(64)
    for top_k, top_p in ((0, 0.9), (20, 0.7)):
        kept = np.isfinite(sampling.filter_logits(logits, top_k=top_k, top_p=top_p))
        np.testing.assert_array_equal(np.isfinite(sampling.filter_logits(logits + 80, top_k=top_k, top_p=top_p)), kept)
    np.testing.assert_array_equal(sampling.draw(logits + 80, u), sampling.draw(logits, u))
    np.testing.assert_allclose(sampling.logsumexp(logits + 80), sampling.logsumexp(logits) + 80, rtol=1e-6)


def _rounding_block(vocab: int) -> np.ndarray:
    """A row whose first block is token 0 (weight 1) and 255 tokens of weight ~2**-55: the float64 block
    total (a pairwise sum) counts them, the in-order running sum loses each one. The rest has no mass."""
    row = np.full(vocab, -np.inf, dtype=np.float32)
    row[: sampling.BLOCK] = np.float32(-55 * np.log(2))
    row[0] = 0.0
    return row


@pytest.mark.parametrize(
    "case",
    ["past the end of the row", "onto a token without mass at a block edge", "where the two totals disagree"],
)
def test_draw_at_the_float64_edge_falls_back_to_the_full_cdf(case):
    """u * total landing between the block total and the running sum inside the block (a float64 edge)
    sends the two-level draw past the row or onto a zero-mass token: the full CDF must decide."""
    vocab = sampling.BLOCK if case == "past the end of the row" else 2 * sampling.BLOCK
    logits = _rounding_block(vocab)[None]
    if vocab > sampling.BLOCK:
        logits[0, sampling.BLOCK + 44] = 0.0  # the next token with mass is 44 tokens into the next block
    weights, block_sums, _ = sampling.exp_weights(logits)
    running = np.cumsum(weights[0, : sampling.BLOCK], dtype=np.float64)[-1]
    total = block_sums.sum()
    u = {
        "past the end of the row": 1 - 2**-52,
        "onto a token without mass at a block edge": 0.5,
        "where the two totals disagree": 1 / total,  # u * block total = 1.0, u * full total < 1.0
    }[case]
    threshold = u * total
    # the construction reaches the edge: the threshold sits between the running sum and the block total,
    # so every token of block 0 has cumulative mass <= threshold and the two-level search walks past it
    assert running <= threshold < block_sums[0, 0], "numpy's float64 sums no longer disagree: rebuild the row"
    token = sampling.draw(logits, np.array([u]))
    np.testing.assert_array_equal(token, _full_cdf_draw(logits, np.array([u])))
    assert np.isfinite(logits[0, token[0]])  # a token with mass


def test_logsumexp_and_token_logprobs():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((5, 300)) * 10).astype(np.float32)
    expected = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(sampling.logsumexp(logits), expected, rtol=1e-6)
    token = np.array([0, 5, 299, 17, 42])
    np.testing.assert_allclose(
        sampling.token_logprobs(logits, token), logits[np.arange(5), token] - expected, atol=1e-4
    )


def test_exp_weights_writes_into_the_array_it_is_given():
    logits = (np.random.default_rng(2).standard_normal((3, 700)) * 5).astype(np.float32)
    out = np.full_like(logits, np.nan)
    weights, block_sums, lse = sampling.exp_weights(logits, out=out)
    assert weights is out
    expected = sampling.exp_weights(logits)
    for got, want in zip((weights, block_sums, lse), expected):
        np.testing.assert_array_equal(got, want)


def test_non_finite_rows_are_named():
    lse = sampling.exp_weights(np.array([[0.0, 1.0], [np.nan, 0.0], [np.inf, 0.0]], dtype=np.float32))[2]
    with pytest.raises(FloatingPointError, match="step 3, row 1"):
        sampling.check_finite(lse, 3)


def _sampler_session(vocab: int):
    import onnxruntime as ort

    from t5vh_fast.export.sampler import sampler_graph

    return ort.InferenceSession(sampler_graph(vocab).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("vocab", [7, 256, 300, 32128])
def test_sampler_graph_draws_as_numpy_does(vocab):
    """The graph CUDA runs for the draw (t5vh_sampler.onnx), here on the CPU provider: the same tokens,
    log-probs and log-sum-exps as the NumPy sampler, zero-mass tokens, u = 0 and u ~ 1 included."""
    rng = np.random.default_rng(vocab + 1)
    logits = (rng.standard_normal((64, vocab)) * 4).astype(np.float32)
    logits[::3, rng.integers(0, vocab, size=vocab // 2)] = -np.inf
    logits[5] = -np.inf
    logits[5, vocab - 1] = 0.0  # all the mass on the last token
    u = rng.random(64)
    u[:4] = [0.0, 1 - 2**-53, 0.5, 1e-12]
    token, logprob, lse, lost = _sampler_session(vocab).run(None, {"logits": logits, "u": u})
    assert not lost.any() and token.dtype == np.int64
    np.testing.assert_array_equal(token, sampling.draw(logits, u))
    assert token[5] == vocab - 1
    np.testing.assert_allclose(lse, sampling.logsumexp(logits), rtol=1e-6)
    np.testing.assert_allclose(logprob, sampling.token_logprobs(logits, token), atol=1e-5)


def test_sampler_graph_flags_the_float64_edge_or_gets_it_right():
    """Where numpy's block total and running sum disagree, the graph either draws what the full CDF says
    or flags the row ``lost`` (the runtime then draws it on the host); a NaN row has a NaN log-sum-exp."""
    vocab = 2 * sampling.BLOCK
    logits = _rounding_block(vocab)[None].repeat(2, axis=0)
    logits[:, sampling.BLOCK + 44] = 0.0
    weights, block_sums, _ = sampling.exp_weights(logits[:1])
    u = np.array([0.5, 1 / block_sums.sum()])
    token, _, _, lost = _sampler_session(vocab).run(None, {"logits": logits, "u": u})
    right = token == _full_cdf_draw(logits, u)
    assert (right | lost).all()
    broken = logits.copy()
    broken[1, 3] = np.nan
    _, _, lse, _ = _sampler_session(vocab).run(None, {"logits": broken, "u": u})
    assert np.isfinite(lse[0]) and np.isnan(lse[1])


def _with_device_draw(export_dir, monkeypatch):
    """A CPU policy as load() makes it, its sampler graph drawing for every batch (draw_step: what CUDA
    runs; the CPU's default for a few rows)."""
    import t5vh_fast
    from t5vh_fast import decoder as decoder_module

    monkeypatch.setattr(decoder_module, "GRAPH_DRAW_ROWS", 10**6)
    policy = t5vh_fast.load(export_dir, providers="cpu")
    assert policy.decoder.samples_on_device
    return policy


def test_the_cpu_draws_small_batches_in_the_sampler_graph(tiny_export, monkeypatch):
    """On the CPU the sampler graph draws a step of up to GRAPH_DRAW_ROWS rows (unfiltered); larger
    batches and filtered draws are NumPy's. Both give the tokens of the NumPy draw."""
    import t5vh_fast
    from t5vh_fast import decoder as decoder_module

    from .conftest import mixed_queries

    policy, host = t5vh_fast.load(tiny_export, providers="cpu"), t5vh_fast.load(tiny_export, providers="cpu")
    host.decoder._sampler = None
    draws = []
    draw_step = type(policy.decoder).draw_step
    monkeypatch.setattr(
        type(policy.decoder),
        "draw_step",
        lambda self, state, tokens, u: draws.append(len(u)) or draw_step(self, state, tokens, u),
    )
    limit, split = decoder_module.GRAPH_DRAW_ROWS, 0
    for rows, options in ((1, {}), (limit, {}), (limit + 1, {}), (limit, {"top_k": 5})):
        ids, mask = mixed_queries(rows, 256, seed=rows)
        draws.clear()
        a = policy.respond_to_batch(ids, mask, txt_len=7, seed=rows, **options)
        b = host.respond_to_batch(ids, mask, txt_len=7, seed=rows, **options)
        assert draws == ([rows] * 7 if rows <= limit and not options else [])
        # onnxruntime's exp and NumPy's are two computations: a near-tie may split a row, after which it
        # is another rollout; up to the split the log-probs agree
        same = np.cumprod(a.tokens == b.tokens, axis=1).astype(bool)
        split += int((~same).any(axis=1).sum())
        assert np.abs(a.logprobs - b.logprobs)[same].max() <= 1e-5
    assert split <= 1  # of 14 rows


def test_the_device_draw_path_gives_the_host_rollout(tiny_export, perturbed_dir, monkeypatch):
    """respond_to_batch through draw_step (what CUDA runs, and the CPU for a few rows): the same tokens,
    log-probs and values as the NumPy path, with a seed, given uniforms, several samples per query and
    after a weight refresh; filtering stays on the host."""
    import t5vh_fast
    from t5vh_fast.checkpoint import load_reference

    from .conftest import mixed_queries

    host = t5vh_fast.load(tiny_export, providers="cpu")
    host.decoder._sampler = None  # the NumPy draw, as on an export without t5vh_sampler.onnx
    device = _with_device_draw(tiny_export, monkeypatch)
    ids, mask = mixed_queries(32, 256, seed=12)
    cases = ({"seed": 3}, {"uniforms": np.random.default_rng(4).random((32, 9))}, {"seed": 5, "top_p": 0.8})
    for refreshed in (False, True):
        if refreshed:  # update_weights builds new decoder sessions; the sampler goes with them
            moved = load_reference(perturbed_dir)
            host.update_weights(moved)
            device.update_weights(moved)
            assert device.decoder.samples_on_device and not host.decoder.samples_on_device
        for kwargs in (*cases, {"seed": 7, "num_samples": 3}):
            a = device.respond_to_batch(ids, mask, txt_len=9, **kwargs)
            b = host.respond_to_batch(ids, mask, txt_len=9, **kwargs)
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
            np.testing.assert_allclose(a.values, b.values, atol=1e-6)


def test_a_lost_device_draw_is_drawn_again_on_the_host(tiny_export, monkeypatch):
    """Rows the sampler graph flags ``lost`` are drawn by NumPy from the logits left on the device."""
    policy = _with_device_draw(tiny_export, monkeypatch)
    decoder, session = policy.decoder, policy.decoder._sampler

    class Flagging:
        """The real sampler graph, but every other row comes back flagged lost, with token 0."""

        def io_binding(self):
            return session.io_binding()

        def run_with_iobinding(self, binding):
            session.run_with_iobinding(binding)
            token, logprob, lse, lost = [np.array(o) for o in binding.copy_outputs_to_cpu()]
            lost[::2], token[::2], logprob[::2] = True, 0, 0.0
            binding.copy_outputs_to_cpu = lambda: [token, logprob, lse, lost]

    from .conftest import mixed_queries

    ids, mask = mixed_queries(16, 256, seed=13)
    expected = _with_device_draw(tiny_export, monkeypatch).respond_to_batch(ids, mask, txt_len=5, seed=6)
    monkeypatch.setattr(decoder, "_sampler", Flagging())
    got = policy.respond_to_batch(ids, mask, txt_len=5, seed=6)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-6)
