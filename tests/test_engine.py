"""The serving engine without HTTP: paged model logits against the dense model, continuous batching against
transformers' generate, preemption, prefix caching, seeded sampling, stop strings, cancellation, the page pool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_config, hf_model, save, torch_one_thread
from flax import nnx

from dots_jax.inference.engine import Engine, PagePool, RequestError, RequestParams, page_key
from dots_jax.inference.tokenizer import Tokenizer
from dots_jax.model.cache import PagedKVCache, PageTable
from dots_jax.ops.paged_attention import PAGED_BACKENDS
from dots_jax.weights.load import from_pretrained

DEMO = "dots_jax/demo_model"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint with GQA (4 query heads on 2 key/value heads) and its model in f32."""
    hf = hf_model(hf_config(num_key_value_heads=2), seed=3)
    path = save(hf, tmp_path_factory.mktemp("engine") / "tiny")
    return hf, from_pretrained(str(path), dtype=jnp.float32)


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch_one_thread():  # an explicit mask: generate would otherwise take token 0 (pad_token_id) for padding
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# One engine shape for the whole file: the engine step's compiled programs (a handful of row and token counts) are
# shared by every test, and compiling them is most of this file's time.
ENGINE = dict(max_batch=4, page_size=8, prefill_chunk=32)
PROMPT_LENGTHS = [3, 17, 40, 9, 70, 1, 33, 25]
MAX_TOKENS = [5, 12, 7, 20, 3, 9, 15, 11]


@pytest.fixture(scope="module")
def greedy_case(tiny):
    hf, _ = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 160, n).tolist() for n in PROMPT_LENGTHS]
    return prompts, [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]


@pytest.mark.parametrize("backend", sorted(PAGED_BACKENDS))
def test_paged_steps_give_the_dense_models_logits(tiny, backend):
    """Three sequences prefilled in ragged chunks over shuffled pages, then decoded, with rows that prefill,
    decode and sit idle in the same step: every new token's logits equal the dense forward's."""
    _, model = tiny
    cfg = model.cfg
    rng = np.random.default_rng(1)
    lengths, page, max_pages = [37, 6, 21], 4, 12
    ids = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    dense = [np.asarray(model(jnp.asarray(x)[None]))[0] for x in ids]
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x, cache, pages):
        model = nnx.merge(graphdef, state)
        hidden, cache, _ = model.hidden_states(x, cache=cache, pages=pages)
        return model.logits(hidden), cache

    cache = PagedKVCache.create(cfg, 3 * max_pages + 4, page, jnp.float32)
    table = rng.permutation(3 * max_pages + 4)[:3 * max_pages].reshape(3, max_pages).astype(np.int32)
    done, got = [0, 0, 0], [[], [], []]
    for chunk in [[16, 1, 0], [16, 1, 7], [5, 4, 14]]:  # prefill, decode and idle rows mixed
        q = [min(c, n - d) for c, n, d in zip(chunk, lengths, done, strict=True)]
        x = np.zeros((3, 16), np.int32)
        for b in range(3):
            x[b, :q[b]] = ids[b][done[b]:done[b] + q[b]]
        kv = np.array([d + n for d, n in zip(done, q, strict=True)], np.int32)
        pages = PageTable(jnp.asarray(table), jnp.asarray(kv), jnp.asarray(q, jnp.int32), backend)
        logits, cache = step(state, jnp.asarray(x), cache, pages)
        logits = np.asarray(logits)
        for b in range(3):
            got[b].append(logits[b, :q[b]])
            done[b] += q[b]
    assert done == lengths
    for b in range(3):
        np.testing.assert_allclose(np.concatenate(got[b]), dense[b], atol=1e-5, rtol=0)


def test_continuous_batching_equals_transformers_greedy(tiny, greedy_case):
    """Eight prompts of different lengths and max_tokens, four batch slots, chunked prefill: each equals
    transformers' generate for that prompt alone."""
    _, model = tiny
    prompts, expected = greedy_case
    engine = Engine(model, **ENGINE)
    outs = engine.generate(prompts, [RequestParams(max_tokens=m, ignore_eos=True) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == expected
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    stats = engine.stats()
    assert stats.pages_used == 0 and stats.running == 0 and stats.generated_tokens == sum(MAX_TOKENS)


def test_preemption_recomputes_the_same_tokens(tiny, greedy_case):
    """A page pool too small for all sequences at once: the youngest are preempted and recomputed, and every
    output is still transformers' (greedy) and the same seeded samples as without pressure."""
    _, model = tiny
    prompts, expected = greedy_case
    engine = Engine(model, **ENGINE, kv_pages=14)
    outs = engine.generate(prompts, [RequestParams(max_tokens=m, ignore_eos=True) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == expected
    assert engine.stats().preemptions > 0
    assert engine.stats().pages_used == 0

    sampled = [RequestParams(max_tokens=m, ignore_eos=True, temperature=1.0, seed=i) for i, m in enumerate(MAX_TOKENS)]
    roomy = Engine(model, **ENGINE).generate(prompts, sampled)
    tight = Engine(model, **ENGINE, kv_pages=14)
    assert [o.token_ids for o in tight.generate(prompts, sampled)] == [o.token_ids for o in roomy]
    assert tight.stats().preemptions > 0


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_batch(tiny):
    _, model = tiny
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 160, 12).tolist()
    params = RequestParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=1234, ignore_eos=True)
    engine = Engine(model, **ENGINE)
    alone = engine.generate([prompt], params)[0].token_ids
    others = [rng.integers(0, 160, n).tolist() for n in [5, 30, 8, 19, 2, 44, 11, 7]]
    crowd = [RequestParams(max_tokens=9, temperature=1.0, seed=i, ignore_eos=True) for i in range(8)]
    mixed = engine.generate(others[:4] + [prompt] + others[4:], crowd[:4] + [params] + crowd[4:])
    assert mixed[4].token_ids == alone
    other_seed = engine.generate([prompt], RequestParams(max_tokens=12, temperature=0.9, seed=99, ignore_eos=True))
    assert other_seed[0].token_ids != alone  # the seed matters (12 tokens from a 160-token vocabulary)


def test_prefix_caching_reuses_full_pages_and_keeps_the_output(tiny):
    hf, model = tiny
    rng = np.random.default_rng(3)
    system = rng.integers(0, 160, 40).tolist()
    first, second = system + [5, 6, 7], system + [9, 8]
    engine = Engine(model, **ENGINE)
    engine.generate([first], RequestParams(max_tokens=4, ignore_eos=True))
    hits = engine.stats().prefix_hit_pages
    out = engine.generate([second], RequestParams(max_tokens=6, ignore_eos=True))[0]
    assert engine.stats().prefix_hit_pages - hits == 5  # the 40 shared tokens fill 5 pages of 8
    assert out.token_ids == hf_greedy(hf, second, 6)


def test_page_pool_counts_references_and_evicts_the_least_recently_released():
    pool = PagePool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert pool.allocate() is None and pool.available == 0
    pool.register(a, b"A")
    pool.register(b, b"B")
    assert pool.lookup(b"A") == a  # a second holder
    pool.release(a)
    assert pool.available == 0  # still held once
    pool.release(b)
    pool.release(a)
    assert pool.available == 2 and pool.used == 1
    assert pool.lookup(b"B") == b and pool.available == 1  # a cached page taken back from the evictable list
    assert pool.allocate() == a  # the only evictable page goes, and its prefix entry with it
    assert pool.lookup(b"A") is None
    pool.release(c)
    assert pool.allocate() == c  # a free page before any cached one
    assert page_key(b"", [1, 2]) != page_key(b"", [2, 1]) and page_key(b"x", [1]) != page_key(b"y", [1])


def test_cancel_frees_the_pages_and_sends_abort(tiny):
    _, model = tiny
    engine = Engine(model, **ENGINE)
    events = []
    rid = engine.add_request(list(range(1, 30)), RequestParams(max_tokens=50, ignore_eos=True), events.append)
    for _ in range(3):
        engine.step()
    assert engine.stats().pages_used > 0
    engine.cancel(rid)
    engine.step()
    assert events[-1].finished and events[-1].finish_reason == "abort"
    assert engine.stats().pages_used == 0 and engine.stats().running == 0


def test_requests_the_engine_cannot_take_name_the_field(tiny):
    _, model = tiny
    engine = Engine(model, max_seq_len=64, page_size=8)
    with pytest.raises(RequestError) as e:
        engine.add_request(list(range(60)), RequestParams(max_tokens=10), print)
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError) as e:
        engine.add_request(list(range(64)), RequestParams(max_tokens=1), print)
    assert e.value.param == "prompt"
    with pytest.raises(RequestError) as e:
        engine.add_request([1, 500], RequestParams(), print)
    assert e.value.param == "prompt" and "500" in str(e.value)
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("max_tokens", 0),
                         ("seed", 1.5), ("stop", [""])]:
        with pytest.raises(RequestError) as e:
            RequestParams(**{field: value})
        assert e.value.param == field


def test_stop_strings_end_the_text_before_the_match_and_never_leak():
    """The demo model and its tokenizer: the streamed pieces never contain a prefix of the stop string that
    the final text does not, and the text ends where the stop string began."""
    tok = Tokenizer.from_dir(DEMO)
    model = from_pretrained(DEMO, dtype=jnp.float32)
    engine = Engine(model, tok, max_batch=2, page_size=16)
    prompt = tok.encode("def fibonacci(n):\n")
    free = engine.generate([prompt], RequestParams(max_tokens=40, ignore_eos=True))[0].text
    stop = next(free[i:i + 3] for i in range(5, len(free) - 3) if free[i:i + 3].strip())
    pieces = []
    engine.add_request(prompt, RequestParams(max_tokens=40, ignore_eos=True, stop=(stop,)),
                       lambda e: pieces.append(e))
    while engine.step():
        pass
    text = "".join(p.text for p in pieces)
    assert text == free[:free.index(stop)]
    assert pieces[-1].finish_reason == "stop"


def test_engine_step_keeps_the_cache_on_its_device(tiny):
    """The donated cache comes back with its shape and dtype (a step never silently reallocates it)."""
    _, model = tiny
    engine = Engine(model, **ENGINE, kv_pages=10)
    before = jax.tree.map(lambda x: (x.shape, x.dtype), engine.cache)
    engine.generate([[1, 2, 3]], RequestParams(max_tokens=3))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), engine.cache) == before
