"""The int8 KV cache (kv_cache_dtype="int8"): per token and head, scale = max|x| / 127 and int8 values.

Its writes and reads against a float64 numpy quantisation; attention over an int8 cache (dense, and paged with the
"reference" and "blocked" backends) against attention over the dequantised cache; the "ragged" TPU kernel's refusal;
generate() against transformers' greedy tokens; the demo model's held-out cross-entropy through an int8 cache
against f32; the serving engine against generate() with the same cache dtype. With int8 weights too, where the
model takes them (from_pretrained(..., quantize="int8")).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_config, hf_model, save, torch_one_thread
from flax import nnx

from dots_jax.config import Dots1Config
from dots_jax.demo import stdlib_glob
from dots_jax.inference.engine import Engine, RequestParams
from dots_jax.inference.generate import SamplingParams, _decode_step, _prefill, bucket_length, generate
from dots_jax.inference.tokenizer import Tokenizer
from dots_jax.model.attention import Attention, rope_tables
from dots_jax.model.cache import KVCache, LayerStackCache, PagedKVCache
from dots_jax.ops.common import NO_WINDOW
from dots_jax.ops.paged_attention import paged_attention, write_kv_int8
from dots_jax.training.data import find_files, load_tokens
from dots_jax.weights.load import from_pretrained

DEMO = "dots_jax/demo_model"


def numpy_quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: float64 scale max|x| / 127 over the last axis, values rounded to the nearest step."""
    x = x.astype(np.float64)
    scale = np.abs(x).max(axis=-1) / 127.0
    q = np.round(x / np.where(scale > 0, scale, 1.0)[..., None])
    return q, scale


def check_quantised(values: np.ndarray, scales: np.ndarray, x: np.ndarray) -> None:
    """int8 values and f32 scales hold x: the scale is the oracle's (to f32 rounding), the values are the oracle's
    steps (a tie may round either way: one step apart at most), and the dequantised x is within scale / 2."""
    q64, scale64 = numpy_quantise(x)
    assert values.dtype == np.int8 and scales.dtype == np.float32
    np.testing.assert_allclose(scales, scale64, rtol=1e-6, atol=0)
    assert np.abs(values.astype(np.int64) - q64).max() <= 1
    assert np.mean(values == q64) > 0.99
    error = np.abs(values.astype(np.float64) * scales[..., None].astype(np.float64) - x.astype(np.float64))
    assert np.all(error <= scale64[..., None] / 2 * (1 + 1e-5) + 1e-12)


# ------------------------------------------------------------------------------------------- writes and reads
def test_dense_cache_writes_int8_and_reads_back_the_dequantised_values() -> None:
    rng = np.random.default_rng(0)
    b, t, kv, d, start, s = 2, 12, 3, 16, 5, 4
    cache = LayerStackCache(jnp.zeros((b, t, kv, d), jnp.int8), jnp.zeros((b, t, kv, d), jnp.int8),
                            jnp.zeros((b, t, kv), jnp.float32), jnp.zeros((b, t, kv), jnp.float32))
    k = rng.standard_normal((b, s, kv, d)).astype(np.float32) * rng.uniform(0.01, 10, (b, s, kv, 1))
    v = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    k[0, 1, 2] = 0.0  # an all-zero vector: scale 0, values 0

    @jax.jit
    def write_read(cache: LayerStackCache, k: jax.Array, v: jax.Array, index: jax.Array):
        cache = cache.write(k, v, index)
        return cache, cache.read(jnp.float32)

    cache, (k_read, v_read) = write_read(cache, k, v, jnp.int32(start))
    new = slice(start, start + s)
    for values, scales, x in [(cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)]:
        values, scales = np.asarray(values), np.asarray(scales)
        check_quantised(values[:, new], scales[:, new], x)
        assert not values[:, :start].any() and not values[:, start + s:].any()  # nothing else written
        assert not scales[:, :start].any() and not scales[:, start + s:].any()
    for read, values, scales in [(k_read, cache.k, cache.k_scale), (v_read, cache.v, cache.v_scale)]:
        expected = np.asarray(values, np.float64) * np.asarray(scales, np.float64)[..., None]
        np.testing.assert_allclose(np.asarray(read), expected, rtol=1e-6, atol=0)


def test_paged_int8_write_quantises_each_token_and_head_at_its_page() -> None:
    rng = np.random.default_rng(1)
    page, pool_pages, kv, d = 4, 10, 2, 16
    q_lens, kv_lens = np.array([3, 1, 0], np.int32), np.array([6, 9, 0], np.int32)
    table = rng.permutation(pool_pages)[:9].reshape(3, 3).astype(np.int32)
    pool = jnp.zeros((pool_pages, page, 2 * kv, d), jnp.int8)
    scales = jnp.zeros((pool_pages, page, 2 * kv), jnp.float32)
    k, v = (rng.standard_normal((3, 3, kv, d)).astype(np.float32) for _ in range(2))
    pool, scales = (np.asarray(x) for x in jax.jit(write_kv_int8)(pool, scales, k, v, table, kv_lens, q_lens))
    written = np.zeros(pool.shape[:2], bool)
    for b in range(3):
        for j in range(q_lens[b]):
            t = kv_lens[b] - q_lens[b] + j
            p, o = table[b, t // page], t % page
            written[p, o] = True
            check_quantised(pool[p, o, 0::2], scales[p, o, 0::2], k[b, j])
            check_quantised(pool[p, o, 1::2], scales[p, o, 1::2], v[b, j])
    assert not pool[~written].any() and not scales[~written].any()


# ------------------------------------------------------------------------ attention over the dequantised cache
def random_int8_cache(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    values = rng.integers(-127, 128, shape).astype(np.int8)
    scales = rng.uniform(0.001, 0.05, shape[:-1]).astype(np.float32)
    return values, scales


def numpy_dequantise(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return (values.astype(np.float64) * scales.astype(np.float64)[..., None]).astype(np.float32)


def test_dense_attention_over_an_int8_cache_equals_attention_over_the_dequantised_cache() -> None:
    """A step of new tokens (padding: no key reads them) over a cache of 9 earlier tokens, through the model's
    Attention layer: with the int8 cache as with an f32 cache holding its numpy-dequantised values."""
    cfg = Dots1Config.from_hf(hf_config(num_key_value_heads=2).to_dict())
    rng = np.random.default_rng(2)
    b, t, s, old = 2, 16, 3, 9
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    layer = Attention(cfg, param_dtype=jnp.float32, backend="reference", rngs=nnx.Rngs(0))
    (kq, ks), (vq, vs) = (random_int8_cache(rng, (b, t, kv, d)) for _ in range(2))
    int8 = LayerStackCache(*(jnp.asarray(a) for a in (kq, vq, ks, vs)))
    dequantised = LayerStackCache(jnp.asarray(numpy_dequantise(kq, ks)), jnp.asarray(numpy_dequantise(vq, vs)))
    x = jnp.asarray(rng.standard_normal((b, s, cfg.hidden_size)).astype(np.float32))
    q_pos = jnp.broadcast_to(old + jnp.arange(s, dtype=jnp.int32), (b, s))
    k_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    key_valid = k_pos < old
    cos, sin = rope_tables(q_pos, cfg.head_dim, cfg.rope_theta, jnp.float32)

    @jax.jit
    def run(cache: LayerStackCache) -> jax.Array:
        return layer(x, cos, sin, q_pos, k_pos, key_valid, NO_WINDOW, None, cache, jnp.int32(old))[0]

    np.testing.assert_allclose(np.asarray(run(int8)), np.asarray(run(dequantised)), rtol=0, atol=1e-5)


def paged_oracle(q: np.ndarray, pool: np.ndarray, table: np.ndarray, kv_lens: np.ndarray, q_lens: np.ndarray
                 ) -> np.ndarray:
    """Causal softmax attention of each row's queries over its pages, in float64."""
    q, pool = q.astype(np.float64), pool.astype(np.float64)
    page, groups = pool.shape[1], q.shape[2] // (pool.shape[2] // 2)
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        slots = pool[table[b, :-(-kv_lens[b] // page)]].reshape(-1, *pool.shape[2:])
        for j in range(q_lens[b]):
            keys = np.arange(kv_lens[b] - q_lens[b] + j + 1)
            for h in range(q.shape[2]):
                scores = slots[keys, 2 * (h // groups)] @ q[b, j, h] / np.sqrt(q.shape[3])
                weights = np.exp(scores - scores.max())
                out[b, j, h] = weights @ slots[keys, 2 * (h // groups) + 1] / weights.sum()
    return out


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_paged_attention_over_an_int8_pool_equals_attention_over_the_dequantised_pool(backend: str) -> None:
    """A mixed step (prefill, prefill chunk, decode, idle row) over a layer of a stack's int8 pool."""
    rng = np.random.default_rng(3)
    page, pool_pages, per_row, n, kv, d, s = 8, 24, 4, 4, 2, 16, 6
    q_lens, kv_lens = np.array([6, 5, 1, 0], np.int32), np.array([6, 19, 30, 0], np.int32)
    values, scales = random_int8_cache(rng, (2, pool_pages, page, 2 * kv, d))
    table = rng.permutation(pool_pages)[:4 * per_row].reshape(4, per_row).astype(np.int32)
    q = rng.standard_normal((4, s, n, d)).astype(np.float32)
    step = jax.jit(functools.partial(paged_attention, backend=backend, layer=1))
    out = np.asarray(step(q, values, table, kv_lens, q_lens, scale_pages=scales))
    expected = paged_oracle(q, numpy_dequantise(values[1], scales[1]), table, kv_lens, q_lens)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported by the 'ragged'"):
        paged_attention(q, values, table, kv_lens, q_lens, backend="ragged", layer=1, scale_pages=scales)


def test_auto_paged_backend_on_tpu_picks_the_kernel_for_a_float_cache_and_blocked_for_int8(monkeypatch) -> None:
    from dots_jax.ops import paged_attention as module

    monkeypatch.setattr(module.jax, "default_backend", lambda: "tpu")
    assert module.default_paged_backend() == "ragged"
    assert module.default_paged_backend(int8=True) == "blocked"


# ------------------------------------------------------------------------------------- models and generation
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GQA checkpoint (4 query heads on 2 key/value heads) and its path."""
    hf = hf_model(hf_config(num_key_value_heads=2), seed=3)
    return hf, save(hf, tmp_path_factory.mktemp("kv_int8") / "tiny")


def takes_int8_weights() -> bool:
    return "quantize" in inspect.signature(from_pretrained).parameters


def int8_weights(path, **kwargs):
    """The checkpoint with int8 weights, or a skip while the model cannot quantise them."""
    if not takes_int8_weights():
        pytest.skip("int8 weights: from_pretrained(..., quantize='int8') is not there yet")
    return from_pretrained(str(path), dtype=jnp.float32, quantize="int8", **kwargs)


def test_generate_with_an_int8_cache_makes_transformers_greedy_choices(tiny) -> None:
    """transformers' greedy continuations of 16 prompts, fed through generate()'s own prefill and decode steps with
    an int8 cache (teacher forcing: transformers' token goes in, our greedy choice comes out): our choice equals
    transformers' at >= 95% of the positions. A flip is a near-tie of the random model moved by the quantisation,
    after which free-running sequences part; so generate() must give each row transformers' tokens up to its first
    flip, and there the int8 model's own choice."""
    hf, path = tiny
    model = from_pretrained(str(path), dtype=jnp.float32)
    rows, prompt, new = 16, 8, 24
    prompts = np.random.default_rng(5).integers(0, model.cfg.vocab_size, (rows, prompt))
    with torch_one_thread():
        ref = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(rows, prompt, dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    ours = generate(model, prompts.tolist(), max_new_tokens=new, stop_token_ids=[], kv_cache_dtype="int8").tokens

    # generate()'s compiled steps at generate()'s shapes: a prompt bucket of 16, a cache of 16 + 32 slots.
    graphdef, state = nnx.split(model)
    greedy, key = SamplingParams().as_arrays(), jax.random.key(0)
    cache = KVCache.create(model.cfg, rows, bucket_length(prompt) + bucket_length(new), jnp.float32, "int8")
    ids = np.pad(ref[:, :prompt], ((0, 0), (0, bucket_length(prompt) - prompt)))
    valid = np.broadcast_to(np.arange(ids.shape[1]) < prompt, ids.shape)
    choice, cache = _prefill(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(valid), cache, key, greedy)
    choices = [np.asarray(choice)]
    for j in range(prompt, prompt + new - 1):
        choice, cache = _decode_step(graphdef, state, jnp.asarray(ref[:, j], jnp.int32), jnp.full(rows, j, jnp.int32),
                                     cache, key, greedy)
        choices.append(np.asarray(choice))
    choices = np.stack(choices, axis=1)
    agree = choices == ref[:, prompt:]
    print(f"int8 KV cache: transformers' greedy choice at {agree.sum()} of {agree.size} positions "
          f"({agree.mean():.1%})")
    assert agree.mean() >= 0.95
    for row, tokens in enumerate(ours):
        flip = int(np.argmin(agree[row])) if not agree[row].all() else new - 1
        assert tokens[:flip] == ref[row, prompt:prompt + flip].tolist()
        assert tokens[flip] == choices[row, flip]


def held_out_windows(tokenizer: Tokenizer, windows: int, seq_len: int) -> np.ndarray:
    """[windows, seq_len + 1] tokens of text the demo model never trained on: the stdlib's last files, which lie in
    the 5% of the corpus training held out (dots_jax.demo.evaluate)."""
    tail = np.concatenate([load_tokens(f, tokenizer) for f in find_files(stdlib_glob())[-3:]])
    assert tail.size >= windows * seq_len + 1
    return tail[:windows * seq_len + 1][np.arange(windows)[:, None] * seq_len + np.arange(seq_len + 1)]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _chunk_nll(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, cache: KVCache, targets: jax.Array
               ) -> tuple[jax.Array, KVCache]:
    logits, cache = nnx.merge(graphdef, state)(ids, cache=cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).sum(), cache


def cached_cross_entropy(model, windows: np.ndarray, chunk: int, kv_cache_dtype: str | None) -> float:
    """Mean next-token cross-entropy (nats) of the windows, fed through the KV cache `chunk` tokens at a time
    (teacher forcing): every chunk's attention reads the cache, the earlier chunks' keys and values as stored."""
    graphdef, state = nnx.split(model)
    b, n = windows.shape[0], windows.shape[1] - 1
    cache = KVCache.create(model.cfg, b, n, model.dtype, kv_cache_dtype)
    total = 0.0
    for start in range(0, n, chunk):
        nll, cache = _chunk_nll(graphdef, state, jnp.asarray(windows[:, start:start + chunk]), cache,
                                jnp.asarray(windows[:, start + 1:start + chunk + 1]))
        total += float(nll)
    return total / (b * n)


def test_demo_models_held_out_cross_entropy_through_an_int8_cache_is_within_2_percent_of_f32() -> None:
    windows = held_out_windows(Tokenizer.from_dir(DEMO), windows=8, seq_len=256)
    f32 = from_pretrained(DEMO, dtype=jnp.float32, progress=False)
    base = cached_cross_entropy(f32, windows, 64, None)
    int8_kv = cached_cross_entropy(f32, windows, 64, "int8")
    print(f"demo held-out cross-entropy ({windows.size - len(windows)} tokens): f32 {base:.4f}, int8 KV "
          f"{int8_kv:.4f} ({int8_kv / base - 1:+.2%})")
    assert abs(int8_kv / base - 1) <= 0.02
    both = cached_cross_entropy(int8_weights(DEMO, progress=False), windows, 64, "int8")
    print(f"int8 weights and int8 KV: {both:.4f} ({both / base - 1:+.2%})")
    assert abs(both / base - 1) <= 0.02


# Few engine step shapes (compiling them is this test's time): prompts within one prefill width, requests that
# run together to the end.
ENGINE = dict(max_batch=4, page_size=8, prefill_chunk=32)
PROMPT_LENGTHS, MAX_TOKENS = [3, 16, 9, 12], 10


def test_engine_with_an_int8_cache_gives_generates_tokens(tiny) -> None:
    """Greedy: the engine (paged int8 cache over pages of 8, prefill chunks of two rows) gives each prompt the
    tokens generate() gives it with an int8 cache (dense), for the same model with int8 weights (the serving
    configuration of issue 19; f32 weights where the model cannot quantise them: the cache paths are the same)."""
    _, path = tiny
    model = int8_weights(path) if takes_int8_weights() else from_pretrained(str(path), dtype=jnp.float32)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    expected = generate(model, prompts, max_new_tokens=MAX_TOKENS, stop_token_ids=[], kv_cache_dtype="int8").tokens
    engine = Engine(model, **ENGINE, kv_cache_dtype="int8")
    outs = engine.generate(prompts, RequestParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert engine.cache.moe.dtype == jnp.int8 and engine.cache.moe_scale.dtype == jnp.float32
    with pytest.raises(ValueError, match="not supported by the 'ragged'"):  # refused before anything compiles
        Engine(model, **ENGINE, kv_cache_dtype="int8", attention_backend="ragged")


def test_command_lines_take_the_cache_dtype() -> None:
    from dots_jax import sample, serve
    from dots_jax.errors import UserError

    for parser in (sample.build_parser(), serve.build_parser()):
        assert parser.parse_args(["--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
        assert parser.parse_args([]).kv_cache_dtype is None
        with pytest.raises(UserError, match="kv-cache-dtype"):
            parser.parse_args(["--kv-cache-dtype", "int4"])


def test_cache_dtype_is_checked() -> None:
    cfg = Dots1Config.from_hf(hf_config().to_dict())
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVCache.create(cfg, 1, 8, jnp.float32, "int4")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        PagedKVCache.create(cfg, 4, 8, jnp.float32, "fp8")
    cache = jax.eval_shape(lambda: PagedKVCache.create(cfg, 4, 8, jnp.bfloat16, "int8"))
    assert cache.dense.dtype == jnp.int8 and cache.dense_scale.shape == (cfg.num_dense_layers, 4, 8,
                                                                         2 * cfg.num_key_value_heads)
