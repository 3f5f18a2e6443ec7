"""Sampling: temperature / top-k / top-p / min-p against a float64 numpy oracle of each definition, the sampled
distribution against softmax (chi-square), seeds, and temperature 0 as greedy decoding."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_config, hf_model, save, torch_one_thread
from scipy.stats import chisquare

import dots_jax
from dots_jax.inference import generate as gen

V = 48
filter_logits = jax.jit(gen.filter_logits)
sample_tokens = jax.jit(gen.sample_tokens)


def _params(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> tuple[jax.Array, ...]:
    return gen.SamplingParams(temperature, top_k, top_p, min_p).as_arrays()


def _softmax(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    z = np.where(keep, x - x[keep].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()


def allowed(logits: np.ndarray, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> tuple[np.ndarray, float]:
    """The float64 oracle, straight from the definitions, applied in transformers' order (temperature, top-k,
    top-p, min-p; each later filter sees the renormalised survivors of the earlier ones).

    top-k: tokens whose logit >= the k-th largest (ties kept). top-p: the smallest set of most likely tokens
    whose mass reaches p — token t is in it iff the tokens strictly more likely than t hold less than p (so
    tokens tied at the boundary all stay). min-p: tokens with probability >= min_p * the largest.
    Returns (keep mask, margin): how close the nearest decision came to flipping (logit units for top-k,
    probability units for top-p and min-p), so that a caller can leave out cases float32 cannot decide.
    """
    # The float32 values our code will see, then float64 arithmetic.
    top_p, min_p = float(np.float32(top_p)), float(np.float32(min_p))
    x = np.asarray(logits, np.float64) / (float(np.float32(temperature)) if temperature > 0 else 1.0)
    keep = np.ones(x.shape, bool)
    margin = np.inf
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, x.size) - 1]
        keep = x >= kth
        margin = min(margin, np.abs(x[x != kth] - kth).min(initial=np.inf))
    if top_p < 1.0:
        prob = _softmax(x, keep)
        above = (prob[None, :] * (x[None, :] > x[:, None])).sum(axis=1)  # mass strictly more likely than t
        margin = min(margin, np.abs(above[keep] - top_p).min())
        keep &= above < top_p
    if min_p > 0.0:
        prob = _softmax(x, keep)
        ratio = prob / prob.max()
        margin = min(margin, np.abs(ratio[keep] - min_p).min())
        keep &= ratio >= min_p
    return keep, margin


def _logit_rows(seed: int) -> np.ndarray:
    """[24, V] float32: continuous rows at several scales, and rows on a 0.5 grid (many exact ties)."""
    rng = np.random.default_rng(seed)
    scales = np.repeat([0.5, 2.0, 5.0], 4)[:, None]
    smooth = rng.normal(size=(12, V)) * scales
    tied = np.round(rng.normal(size=(12, V)) * 2.0) / 2.0
    return np.concatenate([smooth, tied]).astype(np.float32)


def test_oracle_on_hand_worked_examples():
    """The oracle itself, on cases small enough to work out by hand."""
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert allowed(x, top_k=2)[0].tolist() == [True, True, False, False]
    assert allowed(x, top_p=0.5)[0].tolist() == [True, True, False, False]  # 0.4 < 0.5 <= 0.7
    assert allowed(x, top_p=0.35)[0].tolist() == [True, False, False, False]  # 0.4 alone reaches 0.35
    assert allowed(x, top_p=0.75)[0].tolist() == [True, True, True, False]
    assert allowed(x, min_p=0.45)[0].tolist() == [True, True, True, False]  # 0.2 >= 0.45 * 0.4 > 0.1
    assert allowed(x, min_p=0.6)[0].tolist() == [True, True, False, False]
    # top-k then top-p renormalises: of {0.4, 0.3} (4/7, 3/7), p = 0.5 keeps only the first.
    assert allowed(x, top_k=2, top_p=0.5)[0].tolist() == [True, False, False, False]
    # Temperature 2 flattens [0.4, 0.3, 0.2, 0.1] to ~[0.32, 0.28, 0.23, 0.16]: min-p 0.6 now keeps three.
    assert allowed(x, temperature=2.0, min_p=0.6)[0].tolist() == [True, True, True, False]
    # Ties: top-2 of [3, 3, 3, 1] keeps the three 3s; top-p 0.1 does too.
    t = np.array([3.0, 3.0, 3.0, 1.0])
    assert allowed(t, top_k=2)[0].tolist() == [True, True, True, False]
    assert allowed(t, top_p=0.1)[0].tolist() == [True, True, True, False]


def test_filter_logits_keeps_exactly_the_oracle_set():
    rows = _logit_rows(seed=0)
    grid = itertools.product((0.0, 0.6, 1.0, 1.8), (0, 1, 2, 5, V + 7), (1.0, 0.2, 0.6, 0.9, 0.99),
                             (0.0, 0.02, 0.2, 0.9))
    checked = skipped = 0
    for temperature, top_k, top_p, min_p in grid:
        out = np.asarray(filter_logits(jnp.asarray(rows), *_params(temperature, top_k, top_p, min_p)))
        kept = np.isfinite(out)
        scaled = rows / np.float32(temperature if temperature > 0 else 1.0)
        np.testing.assert_allclose(out[kept], scaled[kept], rtol=1e-6)  # survivors carry logits / temperature
        assert (out[~kept] == -np.inf).all()
        for i, row in enumerate(rows):
            keep, margin = allowed(row, temperature, top_k, top_p, min_p)
            if margin < 2e-5:  # too close to the boundary for float32 to decide
                skipped += 1
                continue
            checked += 1
            np.testing.assert_array_equal(kept[i], keep, err_msg=f"{(temperature, top_k, top_p, min_p)} row {i}")
    assert checked >= 0.95 * (checked + skipped), (checked, skipped)


def _draw(logits: np.ndarray, n: int, seed: int, **params) -> np.ndarray:
    """n tokens from n identical rows (independent draws: one key gives each row its own Gumbel noise)."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.shape[-1]))
    return np.asarray(sample_tokens(batch, jax.random.key(seed), *_params(**params)))


# (row of _logit_rows(seed=1), settings): rows 0-11 are continuous (scale 0.5, 2, 5 by fours), 12-23 tied.
DRAW_CASES = [
    (0, dict(temperature=0.7, top_k=5)),
    (6, dict(temperature=1.0, top_p=0.5)),  # 4 tokens
    (4, dict(temperature=1.3, min_p=0.3)),  # 3 tokens
    (14, dict(temperature=1.0, top_k=3)),  # ties widen the set to 5
    (13, dict(temperature=0.9, top_k=10, top_p=0.8, min_p=0.1)),  # 9 tokens
    (8, dict(temperature=2.0, top_p=0.95)),  # 19 tokens, some rare
]


def test_draws_never_leave_the_allowed_set():
    rows = _logit_rows(seed=1)
    n = 4000
    exhaustive = 0
    for case_index, (row_index, params) in enumerate(DRAW_CASES):
        row = rows[row_index]
        keep, margin = allowed(row, **params)
        assert margin > 1e-3 and keep.sum() >= 3, (params, margin, keep.sum())
        tokens = _draw(row, n, seed=case_index, **params)
        assert keep[tokens].all(), (params, sorted(set(tokens[~keep[tokens]].tolist())))
        # A small set whose least likely member has >= 20 expected draws: every member must turn up.
        prob = _softmax(np.asarray(row, np.float64) / params["temperature"], keep)
        if keep.sum() <= 12 and prob[keep].min() * n >= 20:
            exhaustive += 1
            assert set(tokens.tolist()) == set(np.flatnonzero(keep).tolist()), params
    assert exhaustive >= 3


def _chi2(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0
    return chisquare(counts[support], probs[support] * tokens.size).pvalue


def test_samples_follow_softmax():
    """Chi-square goodness of fit (fixed seeds, so deterministic) at temperature 1, temperature 0.5, and after
    top-k 3 (the renormalised top-3 softmax); and the same counts must reject a slightly wrong distribution,
    so that the test has the power to notice a wrong temperature."""
    rng = np.random.default_rng(7)
    logits = rng.permutation(np.linspace(-1.5, 1.5, 10)).astype(np.float32)
    x = logits.astype(np.float64)
    n = 20000
    everything = np.ones(10, bool)

    tokens = _draw(logits, n, seed=11, temperature=1.0)
    assert _chi2(tokens, _softmax(x, everything)) > 1e-3
    assert _chi2(tokens, _softmax(x / 1.15, everything)) < 1e-6

    tokens = _draw(logits, n, seed=12, temperature=0.5)
    assert _chi2(tokens, _softmax(x / 0.5, everything)) > 1e-3
    assert _chi2(tokens, _softmax(x / 0.6, everything)) < 1e-6

    tokens = _draw(logits, n, seed=13, temperature=1.0, top_k=3)
    top3 = x >= np.sort(x)[-3]
    assert top3.sum() == 3
    assert _chi2(tokens, _softmax(x, top3)) > 1e-3


def test_temperature_zero_is_argmax_whatever_the_filters_and_key():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(64, V)) * 3).astype(np.float32)
    for seed, (top_k, top_p, min_p) in enumerate([(0, 1.0, 0.0), (3, 0.5, 0.2), (1, 0.1, 0.9), (V, 0.99, 0.01)]):
        got = np.asarray(sample_tokens(jnp.asarray(logits), jax.random.key(seed), *_params(0.0, top_k, top_p, min_p)))
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


# ------------------------------------------------------------------------------------------ through generate()
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers reference, our model from its checkpoint, three prompts of different lengths)."""
    ref = hf_model(hf_config(), seed=2, bias_std=0.05)
    ours = dots_jax.from_pretrained(save(ref, tmp_path_factory.mktemp("tiny")), dtype=jnp.float32, progress=False)
    prompts = [[5, 6, 7], list(range(20, 33)), [9, 9, 9, 9, 9, 9, 9]]
    return ref, ours, prompts


NEW = 32


def test_same_seed_same_tokens(tiny):
    _, ours, prompts = tiny
    kwargs = dict(max_new_tokens=NEW, temperature=0.8, top_p=0.9)
    first = gen.generate(ours, prompts, seed=7, **kwargs).tokens
    assert all(len(row) == NEW for row in first)
    assert gen.generate(ours, prompts, seed=7, **kwargs).tokens == first
    others = [gen.generate(ours, prompts, seed=s, **kwargs).tokens for s in (8, 9, 10)]
    assert any(o != first for o in others)


def test_every_step_and_row_draws_fresh_noise(tiny):
    """At a huge temperature every token is (nearly) equally likely, so the 32 tokens of a row should be ~29
    distinct values out of 160 and identical prompts should diverge at once. Reusing one key across steps or
    rows would repeat the same Gumbel noise, and with it (nearly) the same token."""
    _, ours, _ = tiny
    out = gen.generate(ours, [[5, 6, 7]] * 3, max_new_tokens=NEW, temperature=1e4, seed=4).tokens
    for row in out:
        assert len(set(row)) >= 20, row  # under uniform draws P(< 20 distinct of 32 from 160) ~ 4e-8
    assert len({row[0] for row in out}) >= 2  # all three equal: P = 1 / 160**2
    assert len({tuple(row) for row in out}) == 3


def test_generate_at_temperature_zero_is_greedy(tiny):
    """Temperature 0 ignores the other settings and the seed: transformers' greedy decoding, token for token."""
    ref, ours, prompts = tiny
    got = gen.generate(ours, prompts, max_new_tokens=NEW, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2,
                       seed=5).tokens
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ref.generation_config.eos_token_id = None
    with torch_one_thread():
        expected = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    assert got == expected[:, width:].tolist()


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=3),
    dict(temperature=0.7, top_p=0.3, min_p=0.5),
    dict(temperature=1.5, min_p=0.6),
])
def test_generated_tokens_lie_in_the_set_allowed_by_reference_logits(tiny, params):
    """Every sampled token lies in the oracle's allowed set computed from transformers' logits for that row and
    position (teacher-forced on what we generated): generate() samples from the right logits, filtered right."""
    ref, ours, prompts = tiny
    out = gen.generate(ours, prompts, max_new_tokens=NEW, seed=3, stop_token_ids=[], **params).tokens
    checked = sizes = 0
    for prompt, new in zip(prompts, out, strict=True):
        with torch_one_thread():
            logits = ref(torch.tensor([prompt + new[:-1]])).logits[0].double().numpy()
        for j, token in enumerate(new):
            keep, margin = allowed(logits[len(prompt) - 1 + j], **params)
            if margin < 1e-3:  # our logits differ from the reference's in the 5th digit
                continue
            checked += 1
            sizes += keep.sum()
            assert keep[token], (params, j, token, np.flatnonzero(keep))
    assert checked >= 0.8 * len(prompts) * NEW
    assert sizes < 0.1 * ours.cfg.vocab_size * checked  # the sets are small, so a wrong token would be noticed


def test_per_row_settings_filter_each_row_by_its_own():
    """The serving engine's batches mix requests: settings given per row ([B] arrays) keep exactly the oracle's
    set for each row's own settings."""
    rows = _logit_rows(seed=1)
    rng = np.random.default_rng(5)
    settings = [(float(rng.choice([0.0, 0.7, 1.3])), int(rng.choice([0, 1, 3, 8])), float(rng.choice([1.0, 0.3, 0.9])),
                 float(rng.choice([0.0, 0.05, 0.5]))) for _ in rows]
    columns = [jnp.asarray(c, dtype) for c, dtype in zip(zip(*settings, strict=True),
                                                         (jnp.float32, jnp.int32, jnp.float32, jnp.float32),
                                                         strict=True)]
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(rows), *columns)))
    checked = 0
    for i, (row, params) in enumerate(zip(rows, settings, strict=True)):
        keep, margin = allowed(row, *params)
        if margin >= 2e-5:
            checked += 1
            np.testing.assert_array_equal(kept[i], keep, err_msg=f"{params} row {i}")
    assert checked >= 0.9 * len(rows)


def test_per_row_keys_make_each_row_independent_of_the_batch():
    """With one key per row, a row's token depends on its key, logits and settings only: drawn alone or among
    other rows with other settings, it is the same token."""
    rows = jnp.asarray(_logit_rows(seed=2))
    b = rows.shape[0]
    keys = jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32))
    temperature = jnp.where(jnp.arange(b) % 3 == 0, 0.0, 1.0).astype(jnp.float32)
    top_k = jnp.where(jnp.arange(b) % 2 == 0, 0, 5).astype(jnp.int32)
    top_p, min_p = jnp.full(b, 0.9, jnp.float32), jnp.zeros(b, jnp.float32)
    together = np.asarray(sample_tokens(rows, keys, temperature, top_k, top_p, min_p))
    for i in range(b):
        alone = sample_tokens(rows[i:i + 1], keys[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                              min_p[i:i + 1])
        assert int(alone[0]) == together[i], i
    assert (together[::3] == np.asarray(jnp.argmax(rows[::3], axis=-1))).all()  # temperature 0: greedy
