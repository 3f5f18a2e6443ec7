"""The serving engine: continuous batching over a paged KV cache, with prefix caching and preemption.

One thread owns the model, the page pool and the scheduler and runs step() again and again. A step:
  1. applies cancellations, then admits waiting requests while batch slots and pages allow (a request's pages for
     its whole prompt are taken at admission; full pages whose token prefix was computed before are reused);
  2. decodes every running sequence in one jitted call (rows padded to a power of two: no compile per request),
     taking a new page where a sequence crosses into one, and preempting the youngest sequence when none is left;
  3. prefills a chunk of the admitted prompts (at most `prefill_chunk` token slots) in a second jitted call, so
     that a long prompt never stalls the running sequences for more than one chunk; its rows x width is always
     about `prefill_chunk` slots (width a power of two), so that prefills have one compiled shape per width;
  4. reads the sampled tokens back (one host copy per call), appends them, detokenizes, checks the stops, sends
     each request its event and frees the pages of finished sequences at once.

Sampling is per row inside the step (temperature, top_k, top_p, min_p as arrays), and request r's n-th token is
drawn with the key fold_in(key(seed_r), n): a seeded request gives the same tokens whatever shares its batch, and
after a preemption (which recomputes its prompt and its tokens so far).

Callbacks run on the engine thread: they must be quick and must not call JAX (the HTTP server hands each event to
its event loop with call_soon_threadsafe).

Several processes (jax.distributed, a mesh over all their devices): process 0 schedules and broadcasts each call's
inputs; every other process runs follow(), which makes the same calls in lockstep until process 0 stops.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dots_jax.inference.generate import sample_tokens
from dots_jax.inference.tokenizer import StreamDecoder, Tokenizer
from dots_jax.model.cache import PagedKVCache, PageTable
from dots_jax.model.modeling import Dots1ForCausalLM
from dots_jax.ops.paged_attention import default_paged_backend
from dots_jax.ops.ragged_paged import INT8_KV_UNSUPPORTED, head_axes
from dots_jax.parallel.cpu_tuning import tune_allocator
from dots_jax.parallel.sharding import check_shardable, constrain, make_mesh, shard_state

log = logging.getLogger("dots_jax.engine")

__all__ = ["Completion", "Engine", "EngineStats", "QueueFull", "RequestError", "RequestOutput", "RequestParams",
           "engine_step"]


class RequestError(ValueError):
    """A request the engine cannot take, naming the field at fault (an HTTP 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue is full (an HTTP 429): retry later."""


@dataclasses.dataclass(frozen=True)
class RequestParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None: the engine draws one
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's eos ids, unless ignore_eos
    stop: tuple[str, ...] = ()  # the returned text ends before the first match
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def number(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        checks = [
            ("max_tokens", integer(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", number(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", integer(self.top_k) and 0 <= self.top_k < 2**31, "an integer >= 0 (0 = off)"),
            ("top_p", number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("min_p", number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1] (0 = off)"),
            ("seed", self.seed is None or integer(self.seed), "an integer"),
            ("stop_token_ids", all(integer(t) and t >= 0 for t in self.stop_token_ids), "token ids >= 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise RequestError(name, f"{name} must be {want}, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclasses.dataclass
class RequestOutput:
    """One event of a request, delivered to its callback on the engine thread."""

    request_id: str
    text: str  # new text since the previous event (whole characters; a stop string never leaks)
    token_ids: list[int]  # new token ids since the previous event
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    prompt_tokens: int
    completion_tokens: int  # so far


@dataclasses.dataclass
class Completion:
    """What Engine.generate returns per prompt."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


@dataclasses.dataclass
class EngineStats:
    running: int  # admitted sequences (prefilling or decoding)
    waiting: int
    pages_used: int  # held by a sequence (cached pages nobody holds count as free: they are evicted on demand)
    pages_free: int
    pages_total: int
    prefix_hit_pages: int  # pages reused from the prefix cache
    prefix_query_pages: int  # full prompt pages looked up in it
    generated_tokens: int
    preemptions: int
    finished: int


# ------------------------------------------------------------------------------------------------ the jitted step
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Per-row sampling settings of one step (padding rows: greedy, ignored)."""

    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] i32
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32
    seed: jax.Array  # [B] u32
    count: jax.Array  # [B] i32: how many tokens the request has generated (the key's index)


def _sample_rows(logits: jax.Array, s: RowSampling) -> jax.Array:
    keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(s.seed, s.count)
    return sample_tokens(logits, keys, s.temperature, s.top_k, s.top_p, s.min_p)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def engine_step(graphdef: nnx.GraphDef, state: nnx.State, cache: PagedKVCache, tokens: jax.Array,
                pages: PageTable, sampling: RowSampling) -> tuple[jax.Array, PagedKVCache]:
    """One call of the engine: tokens [B, S] written into the pages and attended, then the next token of every row
    sampled from its last new token's logits. Returns (next tokens [B] int32, the updated cache)."""
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model.hidden_states(tokens, cache=cache, pages=pages)
    last = jnp.maximum(pages.q_lens - 1, 0)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    next_tokens = _sample_rows(model.logits(last_hidden).astype(jnp.float32), sampling)
    return constrain(next_tokens, (None,)), cache


# --------------------------------------------------------------------------------------------------- the pages
class PagePool:
    """The host's view of the cache's pages: a free list, reference counts and the prefix cache.

    A full page whose tokens (and all tokens before them) were computed is registered under a key chained from
    its predecessor's; a later sequence with the same prefix takes it by reference. Pages nobody holds but the
    prefix cache stay cached until a page is needed and none is free: then the least recently released goes.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free: collections.deque[int] = collections.deque(range(num_pages))
        self.refs = np.zeros(num_pages, np.int32)
        self.cached: dict[bytes, int] = {}  # prefix key -> page
        self.key_of: dict[int, bytes] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU order

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        return self.num_pages - self.available

    def allocate(self) -> int | None:
        if self.free:
            page = self.free.popleft()
        elif self.evictable:
            page, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def lookup(self, key: bytes) -> int | None:
        page = self.cached.get(key)
        if page is not None:
            if self.refs[page] == 0:
                del self.evictable[page]
            self.refs[page] += 1
        return page

    def register(self, page: int, key: bytes) -> None:
        if key not in self.cached and page not in self.key_of:
            self.cached[key] = page
            self.key_of[page] = key

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self.key_of:
                self.evictable[page] = None
            else:
                self.free.append(page)


def page_key(previous: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(previous + np.asarray(tokens, np.int64).tobytes()).digest()


# ------------------------------------------------------------------------------------------------ the requests
@dataclasses.dataclass(eq=False)
class _Sequence:
    id: str
    prompt: list[int]
    params: RequestParams
    callback: Callable[[RequestOutput], None]
    seed: int
    stops: frozenset[int]
    decoder: StreamDecoder | None
    order: int = 0  # admission order: the youngest is preempted first
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + generated
    computed: int = 0  # slots written in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of its registered full pages
    text: str = ""  # detokenized so far
    sent: int = 0  # characters of text already sent
    finish_reason: str | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """Continuous batching for a Dots1ForCausalLM (see the module docstring). Thread-safe entry points:
    add_request, cancel, stats; step() belongs to one thread (start() runs it in a daemon thread)."""

    def __init__(self, model: Dots1ForCausalLM, tokenizer: Tokenizer | None = None, *, max_batch: int = 8,
                 max_seq_len: int | None = None, page_size: int = 16, kv_pages: int | None = None,
                 prefill_chunk: int = 256, max_waiting: int = 256, mesh: Mesh | None = None,
                 attention_backend: str = "auto", kv_cache_dtype: str | None = None):
        cfg = model.cfg
        mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.max_seq_len = min(cfg.max_position_embeddings, 4096) if max_seq_len is None else max_seq_len
        for name, value, low in [("max_batch", max_batch, 1), ("max_seq_len", self.max_seq_len, 2),
                                 ("page_size", page_size, 1), ("prefill_chunk", prefill_chunk, 1),
                                 ("max_waiting", max_waiting, 1)]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's context of "
                             f"{cfg.max_position_embeddings} (max_position_embeddings)")
        self.max_batch, self.page_size, self.max_waiting = max_batch, page_size, max_waiting
        self.prefill_chunk = max(prefill_chunk, 16)
        self.pages_per_seq = -(-self.max_seq_len // page_size)
        num_pages = max_batch * self.pages_per_seq if kv_pages is None else kv_pages
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"kv_pages must be an integer >= 1, got {kv_pages!r}")
        self.backend = (default_paged_backend(int8=kv_cache_dtype is not None) if attention_backend == "auto"
                        else attention_backend)

        tune_allocator()
        self.graphdef, self.state = nnx.split(model)
        # kv_cache_dtype "int8": int8 pages with a scale per token and head (dots_jax.ops.kv_int8).
        if kv_cache_dtype is not None and self.backend == "ragged":
            raise ValueError(INT8_KV_UNSUPPORTED)
        cache = PagedKVCache.create(cfg, num_pages, page_size, model.dtype, kv_cache_dtype)
        if mesh is not None:
            check_shardable(cfg, mesh)
            self.state = shard_state(self.state, mesh)
            # The pool split as the "ragged" kernel splits the heads (whole pages and rows on every device); the
            # scale pools [L, P, page, 2 * KV] likewise.
            heads = head_axes(dict(mesh.shape), cfg.num_key_value_heads) or None
            cache = jax.device_put(cache, jax.tree.map(
                lambda x: NamedSharding(mesh, P(None, None, None, heads, *[None] * (x.ndim - 4))), cache))
        self.cache = cache
        self.pool = PagePool(num_pages)

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: collections.deque[_Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.active: list[_Sequence] = []  # admitted: prefilling (computed < len(tokens) - 1) or decoding
        self._ids = itertools.count()
        self._order = itertools.count()
        self._seeds = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
        self._shapes: set[tuple[int, ...]] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = collections.Counter()

    # ------------------------------------------------------------------------------------------------- requests
    def add_request(self, prompt_ids: Sequence[int], params: RequestParams,
                    callback: Callable[[RequestOutput], None], request_id: str | None = None) -> str:
        """Queue a request (thread-safe); its events go to callback. Raises RequestError or QueueFull."""
        prompt = [int(t) for t in prompt_ids]
        vocab = self.cfg.vocab_size
        if not prompt:
            raise RequestError("prompt", "the prompt is empty: give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise RequestError("prompt", f"the prompt has token id {bad} outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_seq_len:
            raise RequestError("prompt", f"the prompt has {len(prompt)} tokens; this server's context is "
                                         f"{self.max_seq_len} tokens (--max-seq-len), prompt and completion together")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise RequestError("max_tokens", f"the prompt has {len(prompt)} tokens and max_tokens is "
                                             f"{params.max_tokens}: together over this server's context of "
                                             f"{self.max_seq_len} tokens; lower max_tokens")
        if -(-(len(prompt) + params.max_tokens) // self.page_size) > self.pool.num_pages:
            raise RequestError("max_tokens", f"the request needs more KV pages than the pool holds "
                                             f"({self.pool.num_pages}); lower max_tokens or start with more --kv-pages")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need a tokenizer; this engine has none")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.cfg.eos_token_id))
        seq = _Sequence(id=request_id or f"req-{next(self._ids)}", prompt=prompt, params=params, callback=callback,
                        seed=int(self._seeds.integers(0, 2**31)) if params.seed is None else params.seed % 2**32,
                        stops=frozenset(stops), tokens=list(prompt),
                        decoder=None if self.tokenizer is None else StreamDecoder(self.tokenizer, True))
        with self._lock:
            if len(self.waiting) + len(self._incoming) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are waiting already; retry later")
            self._incoming.append(seq)
        self._wake.set()
        return seq.id

    def cancel(self, request_id: str) -> None:
        """Stop a request (thread-safe): its pages are freed at the next step and it gets an "abort" event."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        c = self._counts
        return EngineStats(running=len(self.active), waiting=len(self.waiting) + len(self._incoming),
                           pages_used=self.pool.used, pages_free=self.pool.available,
                           pages_total=self.pool.num_pages, prefix_hit_pages=c["prefix_hit_pages"],
                           prefix_query_pages=c["prefix_query_pages"], generated_tokens=c["generated_tokens"],
                           preemptions=c["preemptions"], finished=c["finished"])

    # ----------------------------------------------------------------------------------------------- scheduling
    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            cancelled, self._cancelled = self._cancelled, set()
        for seq in [s for s in [*self.active, *self.waiting] if s.id in cancelled]:
            self._finish(seq, "abort")
        self._admit()
        decoding = [s for s in self.active if s.computed == len(s.tokens) - 1]
        decoding = self._reserve_decode_pages(decoding)
        prefilling = self._prefill_chunks()
        if not decoding and not prefilling:
            return False
        calls = []
        if decoding:
            calls.append((decoding, self._run([(s, 1) for s in decoding], 1)))
        if prefilling:
            width = self._prefill_width(max(n for _, n in prefilling))
            calls.append(([s for s, _ in prefilling], self._run(prefilling, width, self._prefill_rows(width))))
        for seqs, (chunks, tokens) in calls:
            host = np.asarray(tokens)
            for row, (seq, n) in enumerate(zip(seqs, chunks, strict=True)):
                seq.computed += n
                self._register_full_pages(seq)
                if seq.computed == len(seq.tokens):  # its last token's logits were computed: a new token
                    self._append(seq, int(host[row]))
        return True

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting[0]
            # The last token is always computed (its logits give the next one), so at most len - 1 are reused.
            full = (len(seq.tokens) - 1) // self.page_size
            hits, keys, previous = [], [], b""
            for i in range(full):
                key = page_key(previous, seq.tokens[i * self.page_size:(i + 1) * self.page_size])
                page = self.pool.lookup(key)
                if page is None:
                    break
                hits.append(page)
                keys.append(key)
                previous = key
            needed = -(-len(seq.tokens) // self.page_size) - len(hits)
            if needed > self.pool.available:
                for page in hits:
                    self.pool.release(page)
                return  # it waits, first in line, for pages
            self.waiting.popleft()
            self._counts["prefix_query_pages"] += full
            self._counts["prefix_hit_pages"] += len(hits)
            seq.pages = hits + [self.pool.allocate() for _ in range(needed)]
            seq.keys, seq.computed, seq.order = keys, len(hits) * self.page_size, next(self._order)
            self.active.append(seq)

    def _reserve_decode_pages(self, decoding: list[_Sequence]) -> list[_Sequence]:
        """Each decoding sequence writes slot len(tokens) - 1: give it a page when that slot opens one, preempting
        the youngest admitted sequence when none is left."""
        for seq in sorted(decoding, key=lambda s: s.order):
            while seq in self.active and len(seq.pages) * self.page_size < len(seq.tokens):
                page = self.pool.allocate()
                if page is not None:
                    seq.pages.append(page)
                else:
                    self._preempt(max(self.active, key=lambda s: s.order))
        return [s for s in decoding if s in self.active]

    def _preempt(self, seq: _Sequence) -> None:
        """Free a sequence's pages and queue it first: it will be recomputed from its tokens so far."""
        self._counts["preemptions"] += 1
        self._release(seq)
        self.active.remove(seq)
        self.waiting.appendleft(seq)

    def _release(self, seq: _Sequence) -> None:
        for page in seq.pages:
            self.pool.release(page)
        seq.pages, seq.keys, seq.computed = [], [], 0

    def _prefill_chunks(self) -> list[tuple[_Sequence, int]]:
        """Admitted sequences still prefilling, with how many tokens each computes this step: rows x padded
        width stay within prefill_chunk slots."""
        chosen: list[tuple[_Sequence, int]] = []
        for seq in self.active:
            if seq.computed >= len(seq.tokens) - 1:
                continue  # decoding
            n = min(len(seq.tokens) - seq.computed, self.prefill_chunk)
            width = self._prefill_width(max([n, *(c for _, c in chosen)]))
            if chosen and _pow2(len(chosen) + 1) * width > self.prefill_chunk:
                break
            chosen.append((seq, n))
        return chosen

    @staticmethod
    def _prefill_width(tokens: int) -> int:
        return max(_pow2(tokens), 16)

    def _prefill_rows(self, width: int) -> int:
        return max(1, self.prefill_chunk // width)

    def _run(self, chunks: list[tuple[_Sequence, int]], width: int, rows: int | None = None
             ) -> tuple[list[int], jax.Array]:
        """Dispatch one engine_step over `chunks` (a sequence and its number of new tokens each) in `rows` rows
        (default: a power of two); returns the chunk sizes and the (not yet fetched) sampled tokens."""
        rows = rows or _pow2(len(chunks))
        max_pages = max(-(-(s.computed + n) // self.page_size) for s, n in chunks)
        # "reference" gathers every page of a row's table, so its tables are as wide as this call needs, in powers
        # of two (a compile per width, a gather of at most twice the pages); the others read only the pages a row
        # holds: one full width, one compile.
        full = _pow2(self.pages_per_seq)
        cols = min(max(_pow2(max_pages), 4), full) if self.backend == "reference" else full
        tokens = np.zeros((rows, width), np.int32)
        table = np.zeros((rows, cols), np.int32)
        kv_lens = np.zeros(rows, np.int32)
        q_lens = np.zeros(rows, np.int32)
        s = {f: np.zeros(rows, t) for f, t in [("temperature", np.float32), ("top_k", np.int32),
                                                ("top_p", np.float32), ("min_p", np.float32),
                                                ("seed", np.uint32), ("count", np.int32)]}
        s["top_p"][:] = 1.0
        for row, (seq, n) in enumerate(chunks):
            tokens[row, :n] = seq.tokens[seq.computed:seq.computed + n]
            table[row, :len(seq.pages)] = seq.pages[:cols]
            kv_lens[row], q_lens[row] = seq.computed + n, n
            p = seq.params
            s["temperature"][row], s["top_k"][row], s["top_p"][row], s["min_p"][row] = (
                p.temperature, p.top_k, p.top_p, p.min_p)
            s["seed"][row], s["count"][row] = seq.seed, seq.generated
        arrays = {"tokens": tokens, "page_indices": table, "kv_lens": kv_lens, "q_lens": q_lens, **s}
        if jax.process_count() > 1:
            _broadcast_plan(arrays)
        return [n for _, n in chunks], self._call(arrays)

    def _call(self, arrays: dict[str, np.ndarray]) -> jax.Array:
        """engine_step on a call's host inputs (the same in every process); returns the sampled tokens."""
        shape = arrays["tokens"].shape + arrays["page_indices"].shape[1:]
        if shape not in self._shapes:
            self._shapes.add(shape)
            log.info("compiling the engine step for %d rows x %d tokens, %d pages per row", *shape)
        if self.mesh is None:
            a = {k: jnp.asarray(v) for k, v in arrays.items()}
        else:  # replicated: with several processes every input must be one global array
            a = jax.device_put(arrays, NamedSharding(self.mesh, P()))
        pages = PageTable(a.pop("page_indices"), a.pop("kv_lens"), a.pop("q_lens"), self.backend)
        tokens = a.pop("tokens")
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            next_tokens, self.cache = engine_step(self.graphdef, self.state, self.cache, tokens, pages,
                                                  RowSampling(**a))
        return next_tokens

    def follow(self) -> None:
        """In processes other than 0: make the engine calls process 0 broadcasts, until it stops."""
        while (arrays := _receive_plan()) is not None:
            np.asarray(self._call(arrays))  # waits, as process 0 does when it reads the tokens


    def _register_full_pages(self, seq: _Sequence) -> None:
        page = self.page_size
        while (len(seq.keys) + 1) * page <= seq.computed:
            i = len(seq.keys)
            key = page_key(seq.keys[-1] if seq.keys else b"", seq.tokens[i * page:(i + 1) * page])
            self.pool.register(seq.pages[i], key)
            seq.keys.append(key)

    # ------------------------------------------------------------------------------------------------- outputs
    def _append(self, seq: _Sequence, token: int) -> None:
        seq.tokens.append(token)
        self._counts["generated_tokens"] += 1
        p = seq.params
        reason = None
        if token in seq.stops:
            reason = "stop"
        elif seq.generated >= p.max_tokens or len(seq.tokens) >= self.max_seq_len:
            reason = "length"
        if seq.decoder is not None:
            seq.text += seq.decoder.put(token)
            if reason is not None:
                seq.text += seq.decoder.flush()
        text_end = len(seq.text)
        if p.stop:
            hit = min(((i, s) for s in p.stop if (i := seq.text.find(s, max(seq.sent - len(s), 0))) >= 0),
                      default=None)
            if hit is not None:
                seq.text = seq.text[:hit[0]]
                text_end, reason = hit[0], "stop"
            elif reason is None:  # hold back what could still become a stop string
                text_end -= max((k for s in p.stop for k in range(1, len(s)) if seq.text.endswith(s[:k])),
                                default=0)
        delta, seq.sent = seq.text[seq.sent:text_end], max(seq.sent, text_end)
        self._emit(seq, delta, [token], reason)
        if reason is not None:
            self._retire(seq, reason)

    def _emit(self, seq: _Sequence, text: str, token_ids: list[int], reason: str | None) -> None:
        out = RequestOutput(request_id=seq.id, text=text, token_ids=token_ids, finished=reason is not None,
                            finish_reason=reason, prompt_tokens=len(seq.prompt), completion_tokens=seq.generated)
        try:
            seq.callback(out)
        except Exception:  # a callback's failure is its request's, never the engine's
            log.exception("request %s: the event callback failed", seq.id)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        """End a request from outside the token loop (a cancellation)."""
        self._emit(seq, "", [], reason)
        self._retire(seq, reason)

    def _retire(self, seq: _Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._counts["finished"] += 1
        self._release(seq)
        if seq in self.active:
            self.active.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # --------------------------------------------------------------------------------------------- running it
    def start(self) -> None:
        """Run step() in a daemon thread until stop()."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dots_jax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread start() began; with several processes, also release the followers."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if jax.process_count() > 1 and jax.process_index() == 0:
            _broadcast_plan(None)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
            except Exception:  # a failed step ends the requests in it, not the server
                log.exception("engine step failed; aborting the requests in flight")
                for seq in [*self.active]:
                    self._finish(seq, "abort")
                busy = False
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def generate(self, prompts: Sequence[Sequence[int]], params: RequestParams | Sequence[RequestParams]
                 ) -> list[Completion]:
        """Run prompts to completion in the calling thread (not while start()ed)."""
        if self._thread is not None:
            raise RuntimeError("generate() steps the engine itself: not while start() runs it")
        params = [params] * len(prompts) if isinstance(params, RequestParams) else list(params)
        outs = [Completion([], "", "", len(p)) for p in prompts]

        def collect(i: int) -> Callable[[RequestOutput], None]:
            def on_event(event: RequestOutput) -> None:
                outs[i].token_ids += event.token_ids
                outs[i].text += event.text
                outs[i].finish_reason = event.finish_reason or ""
            return on_event

        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            self.add_request(prompt, p, collect(i))
        while self.step() or self.active or self.waiting or self._incoming:
            pass
        return outs

    def warmup(self) -> None:
        """Compile every step shape before the first request: the decode for every batch size and the prefill for
        every width (with the "reference" backend, the table widths of longer sequences still compile later)."""
        start = time.perf_counter()
        sizes = sorted({_pow2(b) for b in range(1, self.max_batch + 1)})
        widths = sorted({self._prefill_width(n) for n in range(1, self.prefill_chunk + 1)})
        dummy = _Sequence("warmup", [0], RequestParams(), lambda e: None, 0, frozenset(), None, tokens=[0])
        for rows in sizes:
            self._run([(dummy, 0)] * rows, 1)[1].block_until_ready()
        for width in widths:
            self._run([(dummy, 0)], width, self._prefill_rows(width))[1].block_until_ready()
        log.info("warmed up: decode for batch sizes %s, prefill %s tokens wide, in %.1f s", sizes, widths,
                 time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ several processes
_PLAN_FIELDS = [("tokens", np.int32, 2), ("page_indices", np.int32, 2), ("kv_lens", np.int32, 1),
                ("q_lens", np.int32, 1), ("temperature", np.float32, 1), ("top_k", np.int32, 1),
                ("top_p", np.float32, 1), ("min_p", np.float32, 1), ("seed", np.uint32, 1), ("count", np.int32, 1)]


def _broadcast_plan(arrays: dict[str, np.ndarray] | None) -> None:
    """Process 0: send one call's inputs (None: stop) to the other processes' follow()."""
    if arrays is None:
        multihost_utils.broadcast_one_to_all(np.zeros(3, np.int32))
        return
    rows, width = arrays["tokens"].shape
    multihost_utils.broadcast_one_to_all(np.array([rows, width, arrays["page_indices"].shape[1]], np.int32))
    multihost_utils.broadcast_one_to_all({k: arrays[k] for k, _, _ in _PLAN_FIELDS})


def _receive_plan() -> dict[str, np.ndarray] | None:
    rows, width, cols = (int(x) for x in multihost_utils.broadcast_one_to_all(np.zeros(3, np.int32)))
    if rows == 0:
        return None
    shapes = {"tokens": (rows, width), "page_indices": (rows, cols)}
    empty = {k: np.zeros(shapes.get(k, (rows,)), dtype) for k, dtype, _ in _PLAN_FIELDS}
    return {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(empty).items()}
