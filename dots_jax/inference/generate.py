"""Generation: bucketed prefill, a jitted decode step that donates the KV cache, and sampling.

Prompts of different lengths are right-padded to one bucket length (a power of two, so a new prompt length rarely
recompiles); each row's tokens keep their true positions, and padding slots are masked. Decoding writes every
row's next token at the same cache slot, at that row's own position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dots_jax.model.cache import KVCache
from dots_jax.model.modeling import Dots1ForCausalLM
from dots_jax.parallel.cpu_tuning import tune_allocator
from dots_jax.parallel.sharding import cache_shardings, check_shardable, constrain, shard_state

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded length for n tokens: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0, top_p 1 and min_p 0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must lie in [0, 1] (0 = off), got {self.min_p!r}")

    def as_arrays(self) -> tuple[jax.Array, ...]:
        """Traced scalars, so that changing a setting never recompiles."""
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
                jnp.float32(self.min_p))


def _rows(x: jax.Array) -> jax.Array:
    """A setting as a column: a scalar applies to every row, a [B] array row by row."""
    return jnp.reshape(x, (-1, 1))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array) -> jax.Array:
    """Temperature, then top-k, top-p and min-p (the order transformers applies them); removed tokens get -inf.
    Each setting is a scalar for every row or a [B] array, one per row (the serving engine's mixed batches).

    top-k keeps tokens whose logit is >= the k-th largest (ties kept); top-p keeps the smallest prefix of the
    descending-probability order whose mass reaches top_p (the first token always); min-p keeps tokens with
    probability >= min_p * the largest probability. A row whose filters are off is left exactly as it was.
    """
    temperature, min_p = _rows(temperature), _rows(min_p)
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    # Sorting the vocabulary is the costly part on CPU (milliseconds per row): only when a filter needs it.
    logits = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)), _top_k_top_p, lambda x, k, p: x, logits,
                          _rows(top_k), _rows(top_p))
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where((min_p > 0) & (probs < min_p * probs.max(axis=-1, keepdims=True)), -jnp.inf, logits)


def _top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """top_k, top_p: [1 or B, 1] columns."""
    b, vocab = logits.shape
    sorted_desc = -jnp.sort(-logits, axis=-1)  # one sort serves both filters
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(jnp.clip(top_k - 1, 0, vocab - 1), (b, 1)), axis=-1)
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_desc = jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc)  # top-k kept a prefix: still sorted

    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p) | (jnp.arange(vocab) == 0)
    # The smallest kept logit is the threshold; ties at the threshold are kept, as with top-k.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array) -> jax.Array:
    """[B, V] logits -> [B] int32 tokens; greedy where temperature == 0 (no filter is computed when every row is).
    `key`: one key for the batch, or [B] keys, one per row (row b's draw then depends on its key alone). The
    settings are scalars or [B] arrays, as filter_logits takes them."""
    def sample(logits: jax.Array) -> jax.Array:
        filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
        if key.ndim == 0:
            drawn = jax.random.categorical(key, filtered, axis=-1)
        else:
            drawn = jax.vmap(jax.random.categorical)(key, filtered)
        return jnp.where(_rows(temperature)[:, 0] > 0, drawn, jnp.argmax(logits, axis=-1))

    def greedy(logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1)

    return jax.lax.cond(jnp.any(temperature > 0), sample, greedy, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, valid: jax.Array, cache: KVCache,
             key: jax.Array, sampling: tuple[jax.Array, ...]) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model.hidden_states(ids, attention_mask=valid, cache=cache)
    last = jnp.maximum(valid.sum(axis=-1) - 1, 0)  # each row's last real token
    # The LM head for those rows only: over every prompt position it would be [B, S, vocab] of logits, work and
    # memory that grow with the prompt for nothing (transformers' generate keeps one position too).
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    last_logits = model.logits(last_hidden)
    # Replicated: every process reads the new tokens (a multi-process run cannot fetch a split array).
    return constrain(sample_tokens(last_logits, key, *sampling), (None,)), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
                 cache: KVCache, key: jax.Array, sampling: tuple[jax.Array, ...]
                 ) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens[:, None], positions=positions[:, None], cache=cache)
    return constrain(sample_tokens(logits[:, 0], key, *sampling), (None,)), cache


@dataclasses.dataclass
class GenerateOutput:
    tokens: list[list[int]]  # the new tokens of each prompt (ending with the stop token if one was met)
    text: list[str] | None = None
    prompt_tokens: list[list[int]] = dataclasses.field(default_factory=list)


def generate(
    model: Dots1ForCausalLM,
    prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    tokenizer=None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    on_tokens: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    mesh: Mesh | None = None,
    kv_cache_dtype: str | None = None,
) -> GenerateOutput:
    """Generate for a batch of prompts (text needs a tokenizer; token ids do not).

    Stops each sequence at a stop token (default: the config's eos_token_id) or after max_new_tokens.
    `on_tokens(step, tokens [B], active [B])` is called after every step (for streaming).
    With a `mesh` (dots_jax.parallel.sharding.make_mesh) the weights and the KV cache are split by the sharding table
    and every step runs under it (expert parallelism included); a mesh that cannot split the model is rejected
    before anything compiles. `kv_cache_dtype="int8"` keeps the KV cache in int8 with a scale per token and head
    (dots_jax.ops.kv_int8; None: the activation dtype).
    """
    sampling = SamplingParams(temperature, top_k, top_p, min_p)
    tune_allocator()
    cfg = model.cfg
    batch_ids = _as_token_lists(prompts, tokenizer)
    if not batch_ids:
        raise ValueError("prompts is empty: give at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    for i, ids in enumerate(batch_ids):
        if not ids:
            raise ValueError(f"prompts[{i}] is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            bad = next(t for t in ids if not 0 <= t < cfg.vocab_size)
            raise ValueError(f"prompts[{i}] has token id {bad} outside the vocabulary [0, {cfg.vocab_size})")
        if len(ids) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                             f"exceeds the model's context of {cfg.max_position_embeddings} "
                             "(max_position_embeddings): shorten the prompt or lower max_new_tokens")
    stops = set(cfg.eos_token_id if stop_token_ids is None else stop_token_ids)

    lengths = np.array([len(ids) for ids in batch_ids], np.int32)
    prompt_len = bucket_length(int(lengths.max()))
    ids = np.zeros((len(batch_ids), prompt_len), np.int32)
    for i, row in enumerate(batch_ids):
        ids[i, :len(row)] = row
    valid = np.arange(prompt_len)[None, :] < lengths[:, None]
    cache = KVCache.create(cfg, len(batch_ids), prompt_len + bucket_length(max_new_tokens), model.dtype,
                           kv_cache_dtype)

    graphdef, state = nnx.split(model)
    if mesh is not None:
        check_shardable(cfg, mesh)
        state, cache = shard_state(state, mesh), jax.device_put(cache, cache_shardings(cache, mesh))
    args = sampling.as_arrays()
    base_key = jax.random.key(seed)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():  # the model reads the mesh
        tokens, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(valid), cache,
                                    jax.random.fold_in(base_key, 0), args)
        out: list[list[int]] = [[] for _ in batch_ids]
        active = np.ones(len(batch_ids), bool)
        for step in range(max_new_tokens):
            host_tokens = np.asarray(tokens)
            for i in np.flatnonzero(active):
                out[i].append(int(host_tokens[i]))
                if int(host_tokens[i]) in stops:
                    active[i] = False
            if on_tokens is not None:
                on_tokens(step, host_tokens, active)
            if not active.any() or step == max_new_tokens - 1:
                break
            positions = jnp.asarray(lengths + step)
            tokens, cache = _decode_step(graphdef, state, tokens, positions, cache,
                                            jax.random.fold_in(base_key, step + 1), args)
    text = [tokenizer.decode(t) for t in out] if tokenizer is not None else None
    return GenerateOutput(tokens=out, text=text, prompt_tokens=batch_ids)


def _as_token_lists(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int | np.integer)):
        prompts = [prompts]
    result = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompts[{i}] is text, but no tokenizer was given: pass tokenizer= or token ids")
            result.append(list(tokenizer.encode(p)))
        else:
            result.append([int(t) for t in p])
    return result
