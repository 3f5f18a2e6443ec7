"""Every registered attention backend against "reference" (dots_jax.ops.attention) and against an independent
float64 numpy attention: values and q/k/v gradients on the shapes the model produces (MHA, GQA, sliding windows
static and traced, right padding, lengths that cross the backends' blocks, one token, decode against a partly
filled cache, prefill into a fresh and a filled cache); gradients through the whole model; transformers' logits on
test_parity's configs; greedy generate(). Backends are collected from the registry at import, so each new one is
held to the same bar without editing this file.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_parity
import torch
from conftest import TINY, random_ids, torch_one_thread
from flax import nnx

import dots_jax
from dots_jax.cli import DEMO_MODEL_DIR
from dots_jax.model.modeling import abstract_model, random_model
from dots_jax.ops.attention import BACKENDS, NO_WINDOW, attention

TOL = 1e-5  # f32, relative to the largest magnitude of the expected array
PARITY_TOL = 1e-4  # logits against transformers, as test_parity

# Every registered backend runs on CPU (splash in the Pallas interpreter, cudnn as jax.nn.dot_product_attention's
# "xla" implementation), so none is skipped here.
OTHERS = sorted(name for name in BACKENDS if name != "reference")
# Through the whole model, only backends whose CPU path is the code that runs elsewhere: on CPU "cudnn" is XLA's
# implementation, not the cuDNN kernel, and its masking is held to the oracle case by case above (CI time).
MODEL_BACKENDS = [name for name in OTHERS if name != "cudnn"]


def _backend_params(names: list[str]) -> list:
    if names:
        return names
    return [pytest.param(None, marks=pytest.mark.skip(reason="no attention backend besides 'reference' is "
                                                          "registered in dots_jax.ops.attention.BACKENDS"))]


needs_flash = pytest.mark.skipif("flash" not in BACKENDS, reason="the 'flash' attention backend is not registered")


def record_calls(monkeypatch) -> list[str]:
    """Wrap every registered backend so the test sees which ones the model dispatched to (at trace time)."""
    calls: list[str] = []
    for name, fn in list(BACKENDS.items()):
        monkeypatch.setitem(BACKENDS, name, lambda *a, name=name, fn=fn: calls.append(name) or fn(*a))
    return calls


# ------------------------------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True)
class Case:
    q: np.ndarray  # [B, S, N, D] f32
    k: np.ndarray  # [B, T, KV, D]
    v: np.ndarray
    q_pos: np.ndarray  # [B, S] int32
    k_pos: np.ndarray  # [B, T] int32
    key_valid: np.ndarray  # [B, T] bool
    window: int = NO_WINDOW
    traced_window: bool = False  # passed as a traced int32 scalar (a stack whose layers' windows differ)
    q_offset: int | None = None
    traced_offset: bool = False  # traced, as the model's cache.index


HEAD_DIM = 32


def _qkv(b: int, s: int, t: int, n: int, kv: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32)
                 for shape in ((b, s, n, HEAD_DIM), (b, t, kv, HEAD_DIM), (b, t, kv, HEAD_DIM)))


def self_attention(b: int, s: int, n: int, kv: int, *, lengths: list[int] | None = None, window: int = NO_WINDOW,
                   traced_window: bool = False, seed: int = 0) -> Case:
    """Training or an uncached prompt: T = S, default positions (q_offset 0), row b right-padded after lengths[b]."""
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    valid = pos < np.asarray(lengths or [s] * b)[:, None]
    return Case(*_qkv(b, s, s, n, kv, seed), pos, pos, valid, window, traced_window, 0)


def cache_prefill(b: int, s: int, t: int, start: int, lengths: list[int], *, window: int = NO_WINDOW,
                  n: int = 4, kv: int = 2, seed: int = 1) -> Case:
    """S new tokens written at slot `start` of a T-slot cache whose earlier slots are all valid; the first
    lengths[b] new tokens of row b are real (right padding); slots past start + S are unwritten (position 0, as
    KVCache.create leaves them). Default positions follow the slots: q_offset = start, traced like cache.index."""
    slots = np.arange(t, dtype=np.int32)
    k_pos = np.broadcast_to(np.where(slots < start + s, slots, 0), (b, t))
    key_valid = (slots < start) | ((slots >= start) & (slots < start + np.asarray(lengths)[:, None]))
    q_pos = np.broadcast_to(start + np.arange(s, dtype=np.int32), (b, s))
    return Case(*_qkv(b, s, t, n, kv, seed), q_pos, k_pos, key_valid, window, False, start, True)


def decode(t: int, width: int, index: int, lengths: list[int], *, window: int = NO_WINDOW,
           traced_window: bool = False, n: int = 8, kv: int = 2, seed: int = 2) -> Case:
    """One new token per row at slot `index` of a T-slot cache, as generate() decodes: a prefill of `width` slots
    holds row b's prompt in its first lengths[b] (padding after), then decoded tokens up to the query's slot;
    positions count each row's real tokens (explicit per row, so q_offset None); slots after the query are
    unwritten."""
    b = len(lengths)
    slots = np.arange(t, dtype=np.int32)
    length = np.asarray(lengths, np.int32)[:, None]
    decoded = (slots >= width) & (slots <= index)
    k_pos = np.where(slots < width, slots, np.where(decoded, length + slots - width, 0)).astype(np.int32)
    key_valid = (slots < length) | decoded
    q_pos = (length + index - width).astype(np.int32)
    return Case(*_qkv(b, 1, t, n, kv, seed), q_pos, k_pos, key_valid, window, traced_window, None)


# Lengths cross the block sizes of the backends (flash: 512-slot blocks, split near-equally, the last one shifted
# back to end at T; splash: multiples of 128), land off them (1, 7, 130, 600) and include one token. Padded rows
# with a window leave some queries no key at all (row 1 of the padded window cases past position length + window).
CASES: dict[str, Callable[[], Case]] = {
    "mha_padded": lambda: self_attention(2, 130, 4, 4, lengths=[130, 77]),
    "gqa_8q_2kv_two_blocks": lambda: self_attention(1, 600, 8, 2),
    "gqa_window_padded_two_blocks": lambda: self_attention(2, 600, 8, 2, lengths=[600, 250], window=100),
    "window_traced_padded": lambda: self_attention(3, 130, 4, 2, lengths=[130, 20, 1], window=37,
                                                   traced_window=True),
    "single_token": lambda: self_attention(2, 1, 4, 2),
    "prefill_fresh_cache": lambda: cache_prefill(2, 130, 300, 0, [130, 90]),
    "prefill_filled_cache_mqa_7": lambda: cache_prefill(2, 7, 300, 130, [7, 3], window=50, kv=1),
    "decode": lambda: decode(1100, 600, 900, [600, 350, 5]),
    "decode_window_traced": lambda: decode(1100, 600, 900, [600, 350, 5], window=200, traced_window=True),
}


# ------------------------------------------------------------------------------------------------ the oracle
def attendable(c: Case) -> np.ndarray:
    """[B, S, T] bool: the contract's mask, computed here from its definition."""
    delta = c.q_pos[:, :, None].astype(np.int64) - c.k_pos[:, None, :]
    return (delta >= 0) & (delta < c.window) & c.key_valid[:, None, :]


def numpy_attention(c: Case, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    """Softmax attention and its q/k/v gradients for cotangent dout, in float64 numpy. Rows with no key give 0."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (c.q, c.k, c.v, dout))
    b, t, kv, d = k.shape
    groups = q.shape[2] // kv
    k_rep, v_rep = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # query head n reads n // groups
    mask = attendable(c)[:, None]  # [B, 1, S, T]
    scores = np.where(mask, np.einsum("bsnd,btnd->bnst", q, k_rep) * d**-0.5, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
    p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    out = np.einsum("bnst,btnd->bsnd", p, v_rep)
    dp = np.einsum("bsnd,btnd->bnst", dout, v_rep)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) * d**-0.5
    dq = np.einsum("bnst,btnd->bsnd", ds, k_rep)
    dk = np.einsum("bnst,bsnd->btnd", ds, q).reshape(b, t, kv, groups, d).sum(axis=3)
    dv = np.einsum("bnst,bsnd->btnd", p, dout).reshape(b, t, kv, groups, d).sum(axis=3)
    return out, dq, dk, dv


def run_backend(backend: str, c: Case, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    """(out, dq, dk, dv) of attention() with this backend under jit, via jax.vjp with cotangent dout."""
    static, traced = {}, {}
    (traced if c.traced_window else static)["window"] = c.window
    (traced if c.traced_offset else static)["q_offset"] = c.q_offset
    traced = {name: jnp.int32(value) for name, value in traced.items()}

    def f(q, k, v, q_pos, k_pos, key_valid, dout, traced):
        def attend(q, k, v):
            return attention(q, k, v, q_pos, k_pos, key_valid, backend=backend, **static, **traced)

        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(dout))

    outs = jax.jit(f)(c.q, c.k, c.v, c.q_pos, c.k_pos, c.key_valid, dout, traced)
    return tuple(np.asarray(x) for x in outs)


def cotangent(c: Case, seed: int = 7) -> np.ndarray:
    """A random cotangent, zero on query rows with no key (their values are unspecified by the contract)."""
    has_key = attendable(c).any(axis=-1)
    return (np.random.default_rng(seed).standard_normal(c.q.shape) * has_key[:, :, None, None]).astype(np.float32)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference over the largest expected magnitude (absolute where all are exactly 0: one key
    gives zero dq and dk)."""
    return float(np.abs(got.astype(np.float64) - want).max() / (np.abs(want).max() or 1.0))


def errors(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...], c: Case) -> dict[str, float]:
    """Relative error of out, dq, dk, dv; out and dq only on the query rows that have a key."""
    has_key = attendable(c).any(axis=-1)
    names = ("out", "dq", "dk", "dv")
    return {name: rel_err(g[has_key], w[has_key]) if name in ("out", "dq") else rel_err(g, w)
            for name, g, w in zip(names, got, want, strict=True)}


# ------------------------------------------------------------------------------------------ the op, per case
@functools.cache
def expected(case: str) -> tuple[Case, np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(the case, its cotangent, the float64 oracle's outputs, the reference backend's), once per case."""
    c = CASES[case]()
    dout = cotangent(c)
    return c, dout, numpy_attention(c, dout), run_backend("reference", c, dout)


# Where splash's and cudnn's static masks cannot be exact (a traced window, a cache filled past slot 0, decode's
# per-row positions) they hand the call to flash, which these cases already hold to the oracle; that hand-off is
# tested in test_splash.py. Not repeating those cases through them saves CI time.
HANDED_TO_FLASH = {"window_traced_padded", "prefill_filled_cache_mqa_7", "decode", "decode_window_traced"}
PAIRS = [(backend, case) for backend in ["reference", *OTHERS] for case in CASES
         if not (backend in ("splash", "cudnn") and case in HANDED_TO_FLASH)]


@pytest.mark.parametrize("backend, case", PAIRS)
def test_backend_matches_reference_and_float64(backend, case):
    c, dout, float64, reference = expected(case)
    got = run_backend(backend, c, dout)
    assert all(np.isfinite(x).all() for x in got), "non-finite values or gradients (rows without keys included)"
    worst = errors(got, float64, c)
    assert max(worst.values()) <= TOL, f"{backend} against float64: {worst}"
    worst = errors(got, reference, c)
    assert max(worst.values()) <= TOL, f"{backend} against 'reference': {worst}"


def test_the_comparison_catches_a_wrong_window_or_scale():
    """Negative control: attention one slot short of the window, or with the scale 1% off, misses the oracle by
    far more than TOL in values and in every gradient, so the checks above can fail."""
    c = CASES["window_traced_padded"]()
    dout = cotangent(c)
    expected = numpy_attention(c, dout)
    short_window = errors(run_backend("reference", dataclasses.replace(c, window=c.window - 1), dout), expected, c)
    assert min(short_window.values()) > 100 * TOL, short_window
    out, dq, dk, dv = run_backend("reference", dataclasses.replace(c, q=c.q * 1.01), dout)
    wrong_scale = errors((out, dq * 1.01, dk, dv), expected, c)  # dq chain-ruled back to the true q
    assert min(wrong_scale.values()) > 100 * TOL, wrong_scale


# ---------------------------------------------------------------------------------------------- the model
def _model_config() -> dots_jax.Dots1Config:
    """TINY with GQA (4 query heads on 2 key/value heads) and a MoE stack whose layers' windows differ (one
    sliding, one full: its window is traced) beside a dense stack with full attention (a static window)."""
    raw = {**TINY, "model_type": "dots1", "num_key_value_heads": 2, "sliding_window": 16,
           "layer_types": ["full_attention", "sliding_attention", "full_attention"]}
    return dots_jax.Dots1Config.from_hf(raw)


@functools.cache
def _model_weights() -> nnx.State:
    return nnx.state(random_model(_model_config(), 3, moe_backend="dense"))


@functools.cache
def model_grads(backend: str) -> dict:
    """Gradients of a next-token loss over right-padded rows (sequence 40 > window 16), f32, of one random model
    whose weights are run by each backend (a model built for the backend, the same state merged in: random_model
    per backend gives the same weights but costs an init compile each)."""
    cfg = _model_config()
    ids = jnp.asarray(random_ids(cfg.vocab_size, 2, 41, seed=5))
    mask = jnp.arange(40)[None, :] < jnp.asarray([[40], [23]])
    structure = abstract_model(cfg, moe_backend="dense", attention_backend=backend)
    graphdef, params, rest = nnx.split(nnx.merge(nnx.graphdef(structure), _model_weights()), nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(ids[:, :-1], attention_mask=mask)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
        return (nll * mask).sum() / mask.sum()

    return nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize("backend", _backend_params(MODEL_BACKENDS))
def test_model_gradients_match_reference(backend, monkeypatch):
    """Through the whole model (a static and a traced window, GQA, padding): every parameter's gradient with
    this backend equals the reference backend's, 1e-5 relative to that parameter's largest."""
    calls = record_calls(monkeypatch)
    got = model_grads(backend)
    assert calls and set(calls) == {backend}
    ref_grads = model_grads("reference")
    worst = jax.tree.map(lambda g, r: rel_err(np.asarray(g), np.asarray(r, np.float64)), got, ref_grads)
    worst = jax.tree_util.tree_flatten_with_path(worst)[0]
    assert max(err for _, err in worst) <= TOL, sorted(worst, key=lambda kv: -kv[1])[:5]


@pytest.fixture(params=list(test_parity.CONFIGS), scope="module")
def parity_checkpoint(request, tmp_path_factory):
    """test_parity's configs: (saved checkpoint, ids, transformers' f32 logits in float64)."""
    ref, path = test_parity._build(request.param, tmp_path_factory.mktemp(request.param))
    ids = random_ids(ref.config.vocab_size, test_parity.BATCH, test_parity.SEQ, seed=1)
    with torch_one_thread():
        expected = ref(torch.from_numpy(ids).long()).logits.double().numpy()
    return path, ids, expected


def logits(path, ids: np.ndarray, backend: str) -> np.ndarray:
    graphdef, state = nnx.split(dots_jax.from_pretrained(path, dtype=jnp.float32, attention_backend=backend,
                                                         progress=False))
    return np.asarray(jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))(state, jnp.asarray(ids)))


@pytest.mark.parametrize("backend", _backend_params(MODEL_BACKENDS))
def test_parity_configs_match_transformers(parity_checkpoint, backend, monkeypatch):
    path, ids, expected = parity_checkpoint
    calls = record_calls(monkeypatch)
    got = logits(path, ids, backend)
    assert calls and set(calls) == {backend}
    assert test_parity._rel_err(got, expected) <= PARITY_TOL


@pytest.mark.parametrize("parity_checkpoint", ["sliding"], indirect=True)
def test_parity_check_catches_a_window_one_short(parity_checkpoint, monkeypatch):
    """Negative control at the model level: the sliding config with every window one slot short (a backend
    that gets the window's edge wrong) misses transformers' logits by far more than PARITY_TOL."""
    path, ids, expected = parity_checkpoint
    reference = BACKENDS["reference"]

    def one_short(q, k, v, q_pos, k_pos, key_valid, window, q_offset):
        return reference(q, k, v, q_pos, k_pos, key_valid, window - 1, q_offset)

    monkeypatch.setitem(BACKENDS, "reference", one_short)
    err = test_parity._rel_err(logits(path, ids, "reference"), expected)
    assert err > 100 * PARITY_TOL


@needs_flash
def test_generate_greedy_flash_equals_reference(monkeypatch):
    """The demo model, greedy: a prompt past flash's 512-slot block (prefill and decode read two key blocks) and
    a short one beside it (right padding); the same tokens as with "reference"."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, 4096, size=n).tolist() for n in (530, 17)]
    calls = record_calls(monkeypatch)
    tokens = {}
    for name in ("reference", "flash"):
        model = dots_jax.from_pretrained(DEMO_MODEL_DIR, dtype=jnp.float32, attention_backend=name,
                                         progress=False)
        tokens[name] = dots_jax.generate(model, prompts, max_new_tokens=12).tokens
    assert set(calls) == {"reference", "flash"}
    assert tokens["flash"] == tokens["reference"]
