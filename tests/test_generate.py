"""Generation: cached decoding against full forward passes, greedy generate() against transformers' generate()
(the pinned oracle), input validation, and prompt-length bucketing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_config, hf_model, save, torch_one_thread
from flax import nnx

import dots_jax
from dots_jax.inference import generate as gen
from dots_jax.model.cache import KVCache

# name: (config overrides, MoE backend). The first runs the default backend ("auto": "loop" on CPU); the others
# use "dense" only because it compiles about twice as fast on CPU (the backends agree: test_grouped_matmul).
CONFIGS = {
    # Multi-head attention (as the released model), one dense layer then two MoE layers.
    "mha": (dict(), "auto"),
    # Grouped-query attention: 4 query heads share 2 key/value heads.
    "gqa": (dict(num_key_value_heads=2), "dense"),
    # Layers 1 and 2 use a sliding window of 8 (prompts up to 13 tokens + 32 new ones run far past it), with MQA.
    "sliding": (dict(sliding_window=8, max_window_layers=1, num_key_value_heads=1), "dense"),
}
PROMPT_LENGTHS = (7, 13, 4)  # three prompts of different lengths: shorter and longer than the sliding window
NEW_TOKENS = 32


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    """(name, transformers reference, our f32 model loaded from the reference's saved checkpoint)."""
    name = request.param
    overrides, backend = CONFIGS[name]
    ref = hf_model(hf_config(**overrides), seed=10 + len(name), bias_std=0.05)
    path = save(ref, tmp_path_factory.mktemp(name))
    return name, ref, dots_jax.from_pretrained(path, dtype=jnp.float32, moe_backend=backend, progress=False)


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).tolist() for n in PROMPT_LENGTHS]


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------------ decode consistency
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, positions, mask, cache):
    return nnx.merge(graphdef, state)(ids, positions=positions, attention_mask=mask, cache=cache)


def test_cached_decode_matches_full_forward(pair):
    """Right-padded prefill, then one token per step through the cache (teacher forcing), gives each row's
    logits of one uncached pass over that row alone — transformers' (our own uncached pass matches it to 1e-4:
    test_parity). The model is driven directly, under one jit per shape (eager calls take seconds each)."""
    name, ref, ours = pair
    graphdef, state = nnx.split(ours)
    cfg = ours.cfg
    steps = 12
    rng = np.random.default_rng(3)
    prompts = _prompts(cfg.vocab_size, seed=4)
    forced = rng.integers(0, cfg.vocab_size, size=(len(prompts), steps)).astype(np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max()) + 3  # padding beyond the longest prompt too
    ids = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    valid = np.arange(width)[None, :] < lengths[:, None]

    cache = KVCache.create(cfg, len(prompts), width + steps, jnp.float32)
    prefill, cache = _forward(graphdef, state, jnp.asarray(ids), None, jnp.asarray(valid), cache)
    decoded = []
    for j in range(steps):
        logits, cache = _forward(graphdef, state, jnp.asarray(forced[:, j:j + 1]),
                                 jnp.asarray(lengths[:, None] + j), None, cache)
        decoded.append(np.asarray(logits[:, 0]))
    assert int(cache.index) == width + steps
    prefill, decoded = np.asarray(prefill), np.stack(decoded, axis=1)  # [B, width, V], [B, steps, V]

    rows = [np.concatenate([p, forced[i]]).astype(np.int32) for i, p in enumerate(prompts)]
    for i, row in enumerate(rows):
        n = len(prompts[i])
        cached = np.concatenate([prefill[i, :n], decoded[i]])  # logits at positions 0 .. n + steps - 1
        with torch_one_thread():
            oracle = ref(torch.from_numpy(row[None]).long()).logits[0].double().numpy()
        assert _rel_err(cached, oracle) <= 1e-4, (name, i)


# ------------------------------------------------------------------------------ greedy generation vs transformers
def _hf_greedy(ref, prompts: list[list[int]], eos: int | None) -> list[list[int]]:
    """transformers' greedy generate with LEFT padding; each row cut after its first eos (HF pads after it)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ref.generation_config.eos_token_id = None
    with torch_one_thread():
        out = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=0,
                           pad_token_id=0, eos_token_id=eos)
    rows = []
    for r in out[:, width:].tolist():
        if eos is not None and eos in r:
            r = r[:r.index(eos) + 1]
        rows.append(r)
    return rows


def _pick_eos(rows: list[list[int]]) -> int:
    """A token that first appears mid-way through one row and nowhere in another row."""
    for row in rows:
        for t in row[2:NEW_TOKENS - 4]:
            if row.index(t) >= 2 and any(t not in other for other in rows):
                return t
    pytest.fail(f"no token to use as eos in {rows}")


def test_greedy_generate_matches_transformers(pair):
    name, ref, ours = pair
    assert ours.cfg.eos_token_id == (), "the default stop tokens must be empty for the no-eos case"
    prompts = _prompts(ours.cfg.vocab_size, seed=5)
    expected = _hf_greedy(ref, prompts, eos=None)
    assert all(len(r) == NEW_TOKENS for r in expected)
    got = gen.generate(ours, prompts, max_new_tokens=NEW_TOKENS)
    assert got.prompt_tokens == prompts
    assert got.tokens == expected, name

    # Rerun both with an eos that stops one row early and not (at all) another.
    eos = _pick_eos(expected)
    expected = _hf_greedy(ref, prompts, eos=eos)
    assert any(len(r) < NEW_TOKENS for r in expected) and any(len(r) == NEW_TOKENS for r in expected)
    got = gen.generate(ours, prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[eos])
    assert got.tokens == expected, (name, eos)
    for row in got.tokens:
        assert eos not in row[:-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The "mha" architecture with other weights: the same graph, so it reuses the compilations of the greedy
    test (jit caches on the graph and the shapes, not on the weights)."""
    ref = hf_model(hf_config(**CONFIGS["mha"][0]), seed=1, bias_std=0.05)
    return dots_jax.from_pretrained(save(ref, tmp_path_factory.mktemp("tiny")), dtype=jnp.float32, progress=False)


def test_streaming_callback_sees_every_token(tiny):
    """on_tokens reports each step's tokens and which rows are still active; finished rows' lists stop growing."""
    ours = tiny
    prompts = _prompts(ours.cfg.vocab_size, seed=5)
    first = gen.generate(ours, prompts, max_new_tokens=NEW_TOKENS)
    eos = _pick_eos(first.tokens)
    seen: list[list[int]] = [[] for _ in prompts]
    was_active = np.ones(len(prompts), bool)

    def on_tokens(step, tokens, active):
        for i in np.flatnonzero(was_active):
            seen[i].append(int(tokens[i]))
        was_active[:] = active

    got = gen.generate(ours, prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[eos], on_tokens=on_tokens)
    assert seen == got.tokens
    assert not was_active[[eos in row for row in got.tokens]].any()


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("prompts, kwargs, names", [
    ([[]], {}, r"prompts\[0\].*empty"),
    ([[1, 2], []], {}, r"prompts\[1\].*empty"),
    ([], {}, r"prompt"),
    ([[1 + i % 150 for i in range(500)]], dict(max_new_tokens=13), r"max_new_tokens.*max_position_embeddings"),
    ([[1, 2]], dict(max_new_tokens=0), r"max_new_tokens"),
    ([[1, 2]], dict(max_new_tokens=-3), r"max_new_tokens"),
    ([[1, 2]], dict(top_p=0.0), r"top_p"),
    ([[1, 2]], dict(top_p=1.5), r"top_p"),
    ([[1, 2]], dict(temperature=-1.0), r"temperature"),
    ([[1, 2]], dict(top_k=-1), r"top_k"),
    ([[1, 2]], dict(min_p=1.5), r"min_p"),
    ([[1, 2]], dict(min_p=-0.1), r"min_p"),
    ("hello world", {}, r"tokenizer"),
    (["hello", "world"], {}, r"tokenizer"),
    ([[1, 160]], {}, r"prompts\[0\].*160"),  # the tiny vocabulary is 0..159
    ([[3], [1, -1]], {}, r"prompts\[1\]"),
])
def test_bad_input_raises_value_error_naming_it(tiny, prompts, kwargs, names):
    assert tiny.cfg.vocab_size == 160 and tiny.cfg.max_position_embeddings == 512
    with pytest.raises(ValueError, match=names):
        gen.generate(tiny, prompts, **kwargs)


# ------------------------------------------------------------------------------------------------- bucketing
def test_bucket_length_is_a_power_of_two_covering_n():
    for n in range(1, 301):
        b = gen.bucket_length(n)
        assert b >= 16 and b >= n and b & (b - 1) == 0, (n, b)
        assert b == 16 or b < 2 * n, (n, b)  # the next power of two, not a larger one


def test_prompt_lengths_in_one_bucket_share_a_compilation(tiny):
    if not hasattr(gen._prefill, "_cache_size"):
        pytest.skip("jax.jit no longer exposes _cache_size")
    prefill, decode = gen._prefill._cache_size, gen._decode_step._cache_size
    before = prefill(), decode()
    for longest in (5, 9):  # both pad to 16
        gen.generate(tiny, [[1, 2], list(range(1, longest + 1)), [3]], max_new_tokens=NEW_TOKENS)
    assert prefill() - before[0] <= 1
    assert decode() - before[1] <= 1
    # The counter does count: prompts in the next bucket (32) compile the prefill once more.
    mid = prefill()
    gen.generate(tiny, [[1, 2], list(range(1, 21)), [3]], max_new_tokens=1)
    assert prefill() == mid + 1
