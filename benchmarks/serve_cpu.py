"""Serving throughput and latency on CPU: the engine behind a real server against the static generate() and
transformers' batched generate, on the same requests, in one run.

For each model (--models: "demo", the embedded demo model dots_jax/demo_model; "small", the ~87M dots1-shaped
config of generate_cpu.py with random weights, saved as an HF directory with a 32000-word tokenizer):

- engine: `python -m dots_jax.serve --model DIR --port P --max-batch 32` in its own process, driven by N client
  threads (--clients, default 1,2,4,8,16,32), each sending its next streamed /v1/completions request when the last
  one returns (a closed loop: N requests in flight). Times are taken client-side from the server-sent events:
  time to first token (request sent -> first chunk with tokens), inter-token latency (the gaps between those
  chunks, as vLLM's benchmark reports them, a chunk of k tokens counting as k gaps), output tokens/s = completion
  tokens / wall time of the level. Requests are greedy (temperature 0) with ignore_eos (the server takes vLLM's
  extension), so every request returns exactly its max_tokens tokens whatever the weights say; return_token_ids
  gives the server's token ids. Before each level, an untimed pass of the same prompts mix (clients + 2 x prompt
  lengths requests, at most 8 tokens each) compiles the prefill shapes it meets; shapes compiled while timed are
  counted in the results.
- static: dots_jax.generate() on the same requests in batches of N (every row runs to the batch's longest
  max_tokens; only each request's own max_tokens count as output), stop tokens off.
- transformers: Dots1ForCausalLM.generate on the same batches (left padding, do_sample=False, sdpa attention,
  min_new_tokens = max_new_tokens so that no row stops early).

Prompts are distinct for every request (so no prefix-cache hit helps the engine: the static batch has no cache to
hit), of mixed lengths (--prompt-tokens, cycled), with --max-tokens cycled over the requests: by default a mix of
short and long answers (8 to 128 tokens), as a chat service sees them, where a static batch holds every row until
its longest finishes (a single value makes every answer as long, the static batch's best case). Greedy outputs
are compared: the server's token ids against the static and transformers tokens of the same request (the fraction
identical).

Then the decode step alone: the engine (dots_jax.inference.engine.Engine, in this process) with B sequences all
decoding, time per Engine.step() at B = 1, 8, 16, 32, against transformers' forward of one token per row with its
KV cache at the same batch and context, and the memory-bandwidth floor of the step (the weight bytes it must read:
every non-expert weight, the routed experts B rows touch on average, the head; plus the KV cache it reads / the
measured copy bandwidth).

XLA:CPU uses all cores (the server's process and this one never compute at once: the server is stopped before the
in-process runs); torch gets torch.set_num_threads(os.cpu_count()). Prints tables and writes JSON. Run from the repo
root:

    python benchmarks/serve_cpu.py [--models demo,small] [--clients 1,2,4,8,16,32] [--requests N]
                                   [--max-tokens 8,16,32,64,128] [--prompt-tokens 16,48,96,192]
                                   [--out benchmarks/results/serve_cpu.json]
    python benchmarks/serve_cpu.py --markdown benchmarks/results/serve_cpu.json   # the README's tables
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# tests/oracle.py builds the reference model and sets no XLA flags (the test suite's own set-up does, for the whole
# process): a benchmark must measure the optimised build users run.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from generate_cpu import CONFIGS, copy_bandwidth, machine_facts  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)
from oracle import hf_config, hf_model, save  # noqa: E402
from results_io import write_results  # noqa: E402

import dots_jax  # noqa: E402
from dots_jax.cli import DEMO_MODEL_DIR  # noqa: E402
from dots_jax.inference.engine import Engine, RequestParams  # noqa: E402
from dots_jax.inference.generate import generate  # noqa: E402
from dots_jax.inference.tokenizer import Tokenizer  # noqa: E402

MAX_BATCH = 32  # the server's --max-batch: room for the largest offered load
MAX_SEQ_LEN = 512  # the server's --max-seq-len: the longest prompt plus the longest answer fit
STEP_BATCHES = (1, 8, 16, 32)
STEP_PROMPT = 64  # context of the decode-step rows (prompt tokens before the timed steps)
STEP_TIMED = 8  # timed decode steps per batch size
SERVER_START_TIMEOUT = 600.0


# ----------------------------------------------------------------------------------------------- models
@dataclass
class Model:
    name: str
    path: Path  # an HF directory with a tokenizer
    description: str
    hf: transformers.Dots1ForCausalLM
    tokenizer: Tokenizer
    params_M: float = 0.0


def word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary ("w1" .. "wN", id 0 the end-of-text token), so that any id
    the random model emits decodes to one whole word: one token per streamed chunk, and text <-> ids exact."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}) + "\n")


def load_model(name: str, tmp: Path) -> Model:
    if name == "demo":
        hf = transformers.Dots1ForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
        path, description = DEMO_MODEL_DIR, "the embedded demo model (hidden 256, 4 layers, 16 experts, top-2)"
    elif name == "small":
        cfg = hf_config(**CONFIGS["small"], max_position_embeddings=2048, eos_token_id=0)
        hf = hf_model(cfg, bias_std=0.01)
        path = save(hf, tmp / name)
        word_tokenizer(path, cfg.vocab_size)
        description = "random dots1 weights (hidden 512, 6 layers, 32 experts, top-6, 2 shared)"
    else:
        raise SystemExit(f"error: --models: unknown model {name!r} (choose from demo, small)")
    hf.set_attn_implementation("sdpa")  # transformers' default (the oracle's builder picks eager)
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    return Model(name, Path(path), description, hf, Tokenizer.from_dir(path), round(params, 1))


# --------------------------------------------------------------------------------------------- requests
@dataclass
class Request:
    prompt: str
    ids: list[int]  # what the server's tokenizer makes of the prompt (the same Tokenizer class)
    max_tokens: int


def demo_corpus() -> str:
    """Python source (the demo model was trained on the standard library's): a fixed, local text."""
    import argparse as a
    import json as j
    import textwrap as t

    return "\n".join(Path(m.__file__).read_text() for m in (t, j.decoder, j.encoder, a))


def make_requests(model: Model, count: int, prompt_tokens: list[int], max_tokens: list[int], seed: int,
                  corpus_ids: list[int] | None) -> list[Request]:
    """`count` distinct prompts of cycled lengths (no two share a first page), with cycled max_tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = prompt_tokens[i % len(prompt_tokens)]
        if corpus_ids is None:  # the word tokenizer: any words are a prompt of exactly n tokens
            text = " ".join(f"w{t}" for t in rng.integers(1, model.tokenizer.vocab_size, size=n))
        else:  # a slice of real text, starting anywhere (re-encoding may merge a token at the cut: about n tokens)
            start = int(rng.integers(0, len(corpus_ids) - n))
            text = model.tokenizer.decode(corpus_ids[start:start + n])
        out.append(Request(text, model.tokenizer.encode(text), max_tokens[i % len(max_tokens)]))
    return out


# ----------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: Model, log: Path) -> Iterator[tuple[int, str]]:
    """A `python -m dots_jax.serve` process for the model; yields (port, model id). Stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "dots_jax.serve", "--model", str(model.path), "--port", str(port),
           "--max-batch", str(MAX_BATCH), "--max-seq-len", str(MAX_SEQ_LEN)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                status, body = http_get(port, "/health")
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health in {SERVER_START_TIMEOUT:.0f} s")
            time.sleep(0.5)
        models = json.loads(http_get(port, "/v1/models")[1])
        yield port, models["data"][0]["id"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def metrics(port: int) -> dict[str, float]:
    """The server's Prometheus samples without labels (name -> value)."""
    values = {}
    for line in http_get(port, "/metrics")[1].decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            with contextlib.suppress(ValueError):
                values[parts[0]] = float(parts[1])
    return values


@dataclass
class Timing:
    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens) of each token-carrying chunk
    token_ids: list[int] = field(default_factory=list)


def stream_completion(conn: http.client.HTTPConnection, model_id: str, request: Request) -> Timing:
    body = json.dumps({"model": model_id, "prompt": request.prompt, "max_tokens": request.max_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True})
    timing = Timing(time.perf_counter())
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    for raw in response:  # server-sent events: one "data: ..." line per chunk, a blank line between them
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"the stream ended in an error: {chunk['error']}")
        ids = chunk["choices"][0].get("token_ids") if chunk.get("choices") else None
        if ids:
            timing.chunks.append((time.perf_counter(), len(ids)))
            timing.token_ids += ids
    response.read()
    return timing


def closed_loop(port: int, model_id: str, requests: list[Request], clients: int) -> tuple[float, list[Timing]]:
    """N client threads, each sending the next request when its last one returns. Returns (wall s, timings)."""
    timings: list[Timing | None] = [None] * len(requests)
    lock = threading.Lock()
    next_index = iter(range(len(requests)))
    errors: list[BaseException] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None or errors:
                    return
                timings[i] = stream_completion(conn, model_id, requests[i])
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall, timings


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": 1e3 * float(np.percentile(values, 50)), "p99_ms": 1e3 * float(np.percentile(values, 99))}


def compiles(log: Path) -> int:
    """How many engine-step shapes the server has compiled so far (it logs each one)."""
    return log.read_text(errors="replace").count("compiling the engine step")


def engine_level(port: int, model_id: str, requests: list[Request], warm: list[Request], clients: int,
                 log: Path) -> dict:
    # The server compiles its decode shapes before it opens its port, and a prefill shape (rows x chunk width x
    # pages) when it first meets it: an untimed pass of the same mix meets most of them. Those met while timed are
    # counted in the results.
    closed_loop(port, model_id, warm, clients)
    before = compiles(log)
    wall, timings = closed_loop(port, model_id, requests, clients)
    compiled = compiles(log) - before
    tokens = sum(len(t.token_ids) for t in timings)
    ttft = [t.chunks[0][0] - t.sent for t in timings if t.chunks]
    itl = []
    for t in timings:
        for (previous, _), (arrival, k) in itertools.pairwise(t.chunks):
            # A chunk carrying k tokens counts as k gaps of 1/k of its wait, as the server's histogram counts them.
            itl += [(arrival - previous) / k] * k
    return {"tok_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens, "compiles_while_timed": compiled,
            "ttft": percentiles_ms(ttft), "itl": percentiles_ms(itl), "outputs": [t.token_ids for t in timings]}


# ------------------------------------------------------------------------------------- in-process runs
class _Enough(Exception):
    """Raised from generate()'s on_tokens to end a warm-up once its decode step has compiled."""


def static_level(model, requests: list[Request], clients: int) -> dict:
    batches = [requests[i:i + clients] for i in range(0, len(requests), clients)]

    def run(batch: list[Request], on_tokens=None):
        return generate(model, [r.ids for r in batch], max_new_tokens=max(r.max_tokens for r in batch),
                        stop_token_ids=[], on_tokens=on_tokens)

    def stop_after_decode(step, tokens, active):
        if step >= 1:
            raise _Enough

    for batch in batches:  # compile every batch shape first (prefill and one decode step), untimed
        with contextlib.suppress(_Enough):
            run(batch, stop_after_decode)

    outputs, ttft, itl, tokens = [], [], [], 0
    start = time.perf_counter()
    for batch in batches:
        stamps = [time.perf_counter()]  # the batch's start, then the end of each step (prefill first)
        out = run(batch, lambda step, tokens, active, stamps=stamps: stamps.append(time.perf_counter()))
        ttft += [stamps[1] - stamps[0]] * len(batch)
        itl += list(np.diff(stamps[1:]))
        for r, row in zip(batch, out.tokens, strict=True):
            outputs.append(row[:r.max_tokens])
            tokens += r.max_tokens
    wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens,
            "ttft": percentiles_ms(ttft), "itl": percentiles_ms(itl), "outputs": outputs}


def transformers_level(hf: transformers.Dots1ForCausalLM, requests: list[Request], clients: int) -> dict:
    batches = [requests[i:i + clients] for i in range(0, len(requests), clients)]

    def run(batch: list[Request], new_tokens: int) -> torch.Tensor:
        width = max(len(r.ids) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):  # left padding, as batched decoder-only generation needs
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
        return out[:, width:]

    run(batches[0], 2)  # first-call overheads, untimed
    outputs, tokens = [], 0
    start = time.perf_counter()
    for batch in batches:
        out = run(batch, max(r.max_tokens for r in batch))
        for r, row in zip(batch, out.tolist(), strict=True):
            outputs.append(row[:r.max_tokens])
            tokens += r.max_tokens
    wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens, "outputs": outputs}


# ------------------------------------------------------------------------------------------ decode step
def step_bytes(cfg: transformers.Dots1Config, batch: int, context: int, itemsize: int = 4) -> float:
    """Bytes one decode step of `batch` rows must read: every non-expert weight, the routed experts the rows touch
    (expected distinct count when each row picks top-k of E uniformly), the head, and each row's KV cache."""
    h = cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    expert = 3 * h * cfg.moe_intermediate_size
    dense_layers = cfg.first_k_dense_replace
    moe_layers = cfg.num_hidden_layers - dense_layers
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    weights = (cfg.num_hidden_layers * attn + dense_layers * 3 * h * cfg.intermediate_size
               + moe_layers * (h * e + (touched + cfg.n_shared_experts) * expert) + cfg.vocab_size * h
               + batch * h)
    kv = batch * context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * d
    return (weights + kv) * itemsize


def engine_step_s(engine: Engine, batch: int, vocab: int) -> float:
    """Seconds per Engine.step() while `batch` sequences all decode (prefill and compilation excluded)."""
    produced = dict.fromkeys(range(batch), 0)

    def on_output(out, i: int) -> None:
        produced[i] += len(out.token_ids)

    rng = np.random.default_rng(batch)
    # Long enough that the first rows admitted are still decoding when the last one's prefill ends; short enough
    # that every row stays within 128 tokens (one page-table width for every timed step: no compile among them).
    params = RequestParams(max_tokens=128 - STEP_PROMPT - 8, ignore_eos=True)
    ids = [engine.add_request(rng.integers(1, vocab, size=STEP_PROMPT).tolist(), params,
                              lambda out, i=i: on_output(out, i)) for i in range(batch)]
    while min(produced.values()) < 1:  # prefills
        engine.step()
    for _ in range(2):  # the decode shape compiles in the first
        engine.step()
    start = time.perf_counter()
    for _ in range(STEP_TIMED):
        engine.step()
    elapsed = (time.perf_counter() - start) / STEP_TIMED
    if min(produced.values()) < 3 + STEP_TIMED:
        raise RuntimeError(f"engine decode step at batch {batch}: not every row decoded in every timed step")
    for request_id in ids:
        engine.cancel(request_id)
    while engine.step():
        pass
    return elapsed


def transformers_step_s(hf: transformers.Dots1ForCausalLM, batch: int, vocab: int, device: str = "cpu") -> float:
    """Seconds per forward of one new token per row with the KV cache, at the same batch and context; on a GPU
    (device "cuda", serve_gpu.py) drained before the clock starts and before it stops."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rng = np.random.default_rng(batch)
    ids = torch.tensor(rng.integers(1, vocab, size=(batch, STEP_PROMPT)), device=device)
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(2):
            out = hf(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(STEP_TIMED):
            out = hf(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        return (time.perf_counter() - start) / STEP_TIMED


def decode_steps(model, m: Model, bandwidth: float) -> list[dict]:
    rows = []
    vocab = m.hf.config.vocab_size
    engine = Engine(model, m.tokenizer, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN)
    for batch in STEP_BATCHES:
        ours = engine_step_s(engine, batch, vocab)
        ref = transformers_step_s(m.hf, batch, vocab)
        floor = batch * bandwidth / step_bytes(m.hf.config, batch, STEP_PROMPT + STEP_TIMED // 2)
        rows.append({"batch": batch, "engine_ms": 1e3 * ours, "transformers_ms": 1e3 * ref,
                     "engine_tok_s": batch / ours, "transformers_tok_s": batch / ref, "ratio": ref / ours,
                     "floor_tok_s": floor, "engine_fraction_of_floor": batch / ours / floor})
        print(f"[{m.name}] decode step b{batch}: engine {1e3 * ours:.1f} ms, transformers {1e3 * ref:.1f} ms "
              f"({ref / ours:.2f}x)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- main
def same(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of requests with identical greedy tokens."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def bench_model(m: Model, args, bandwidth: float, log: Path) -> dict:
    corpus = m.tokenizer.encode(demo_corpus()) if m.name == "demo" else None
    levels = []
    for clients in args.clients:
        count = args.requests or max(8, 2 * clients)
        seed = 1000 * clients
        levels.append({"clients": clients,
                       "requests": make_requests(m, count, args.prompt_tokens, args.max_tokens, seed, corpus),
                       "warm": make_requests(m, clients + 2 * len(args.prompt_tokens), args.prompt_tokens,
                                             [min(8, t) for t in args.max_tokens], seed + 1, corpus)})
    row = {"model": m.name, "description": m.description, "params_M": m.params_M, "levels": []}

    with server(m, log) as (port, model_id):
        before = metrics(port)
        for level in levels:
            level["engine"] = engine_level(port, model_id, level["requests"], level["warm"], level["clients"], log)
            e = level["engine"]
            print(f"[{m.name}] engine, {level['clients']:2} clients: {e['tok_s']:7.1f} tok/s, TTFT p50 "
                  f"{e['ttft']['p50_ms']:.0f} ms, ITL p50 {e['itl']['p50_ms']:.0f} ms, "
                  f"{e['compiles_while_timed']} compiles while timed", flush=True)
        after = metrics(port)
    row["server_metrics_delta"] = {k: after[k] - before.get(k, 0.0) for k in after
                                   if "prefix" in k or "preempt" in k or "generated" in k}

    model = dots_jax.from_pretrained(m.path, dtype=jnp.float32, progress=False)
    for level in levels:
        level["static"] = static_level(model, level["requests"], level["clients"])
        level["transformers"] = transformers_level(m.hf, level["requests"], level["clients"])
        print(f"[{m.name}] {level['clients']:2} clients: static {level['static']['tok_s']:7.1f} tok/s, "
              f"transformers {level['transformers']['tok_s']:7.1f} tok/s", flush=True)
    row["decode_step"] = decode_steps(model, m, bandwidth)

    for level in levels:
        engine_outputs = level["engine"].pop("outputs")
        result = {"clients": level["clients"], "requests": len(level["requests"]),
                  "prompt_tokens": sum(len(r.ids) for r in level["requests"]),
                  "engine": level["engine"], "static": level["static"], "transformers": level["transformers"],
                  "same_tokens_static": same(engine_outputs, level["static"].pop("outputs")),
                  "same_tokens_transformers": same(engine_outputs, level["transformers"].pop("outputs"))}
        row["levels"].append(result)
    by_clients = {r["clients"]: r for r in row["levels"]}
    if 1 in by_clients and 16 in by_clients:
        row["engine_16_over_1"] = by_clients[16]["engine"]["tok_s"] / by_clients[1]["engine"]["tok_s"]
    if 16 in by_clients:
        row["engine_over_static_16"] = by_clients[16]["engine"]["tok_s"] / by_clients[16]["static"]["tok_s"]
    return row


def print_tables(machine: dict, rows: list[dict]) -> None:
    load = machine["loadavg_1_5_15_start"][0], machine["loadavg_1_5_15_end"][0]
    print(f"\nmachine: {machine['processor']}, {machine['cpus']} cpus, copy bandwidth "
          f"{machine['copy_bandwidth_GB_s']:.1f} GB/s, load average {load[0]:.2f} -> {load[1]:.2f}")
    for row in rows:
        print(f"\n{row['model']} ({row['params_M']}M): {row['description']}")
        header = (f"{'clients':>7} {'engine tok/s':>12} {'static':>8} {'transf.':>8} {'eng/static':>10} "
                  f"{'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'same tokens s/t':>15}")
        print(header)
        print("-" * len(header))
        for r in row["levels"]:
            e = r["engine"]
            print(f"{r['clients']:>7} {e['tok_s']:>12.1f} {r['static']['tok_s']:>8.1f} "
                  f"{r['transformers']['tok_s']:>8.1f} {e['tok_s'] / r['static']['tok_s']:>10.2f} "
                  f"{e['ttft']['p50_ms']:>8.0f}/{e['ttft']['p99_ms']:<7.0f} {e['itl']['p50_ms']:>7.0f}/"
                  f"{e['itl']['p99_ms']:<7.0f} {r['same_tokens_static']:>7.2f}/{r['same_tokens_transformers']:<7.2f}")
        for key, label in (("engine_16_over_1", "engine 16 clients / 1 client"),
                           ("engine_over_static_16", "engine / static batch at 16 clients")):
            if key in row:
                print(f"{label}: {row[key]:.2f}x")
        print(f"{'batch':>5} {'engine ms':>10} {'transf. ms':>10} {'ratio':>6} {'engine tok/s':>12} "
              f"{'floor tok/s':>11}")
        for s in row["decode_step"]:
            print(f"{s['batch']:>5} {s['engine_ms']:>10.1f} {s['transformers_ms']:>10.1f} {s['ratio']:>6.2f} "
                  f"{s['engine_tok_s']:>12.1f} {s['floor_tok_s']:>11.1f}")


def markdown_tables(payload: dict) -> str:
    """The README's tables, from a results JSON (so that the figures there are the JSON's)."""
    lines = ["| model | clients | engine tok/s | static generate() tok/s | transformers tok/s | engine / static | "
             "TTFT p50 / p99 ms | ITL p50 / p99 ms | compiles while timed |", "|---|---|---|---|---|---|---|---|---|"]
    for row in payload["results"]:
        for i, r in enumerate(row["levels"]):
            e = r["engine"]
            name = f"{row['model']} ({row['params_M']:.0f}M)" if i == 0 else ""
            lines.append(f"| {name} | {r['clients']} | {e['tok_s']:.1f} | {r['static']['tok_s']:.1f} | "
                         f"{r['transformers']['tok_s']:.1f} | {e['tok_s'] / r['static']['tok_s']:.2f} | "
                         f"{e['ttft']['p50_ms']:.0f} / {e['ttft']['p99_ms']:.0f} | "
                         f"{e['itl']['p50_ms']:.0f} / {e['itl']['p99_ms']:.0f} | {e['compiles_while_timed']} |")
    lines += ["", "| model | batch | engine step ms | transformers step ms | ratio | engine tok/s | floor tok/s |",
              "|---|---|---|---|---|---|---|"]
    for row in payload["results"]:
        for i, d in enumerate(row["decode_step"]):
            name = f"{row['model']} ({row['params_M']:.0f}M)" if i == 0 else ""
            lines.append(f"| {name} | {d['batch']} | {d['engine_ms']:.1f} | {d['transformers_ms']:.1f} | "
                         f"{d['ratio']:.2f} | {d['engine_tok_s']:.1f} | {d['floor_tok_s']:.0f} |")
    return "\n".join(lines)


def code_version() -> dict:
    """The commit measured, and the package files that differed from it (others may be editing the checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": [line[3:] for line in git("status", "--porcelain", "dots_jax").splitlines()]}


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,small", help="comma-separated: demo, small")
    parser.add_argument("--clients", type=int_list, default=[1, 2, 4, 8, 16, 32],
                        help=f"offered loads: concurrent clients, each at most {MAX_BATCH}")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per load level (default: twice the clients, at least 8)")
    parser.add_argument("--max-tokens", type=int_list, default=[8, 16, 32, 64, 128],
                        help="max_tokens of the requests (a comma-separated list is cycled over them)")
    parser.add_argument("--prompt-tokens", type=int_list, default=[16, 48, 96, 192],
                        help="prompt lengths in tokens, cycled")
    parser.add_argument("--out", default="benchmarks/results/serve_cpu.json")
    parser.add_argument("--markdown", metavar="JSON", help="only print the README tables of a results file")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_tables(json.loads(Path(args.markdown).read_text())))
        return 0
    if max(args.clients) > MAX_BATCH:
        parser.error(f"--clients: at most {MAX_BATCH}")
    if max(args.prompt_tokens) + max(args.max_tokens) + 8 > MAX_SEQ_LEN:  # 8: re-encoded text may grow a little
        parser.error(f"--prompt-tokens + --max-tokens: at most {MAX_SEQ_LEN - 8} together")
    torch.set_num_threads(os.cpu_count() or 1)
    bandwidth = copy_bandwidth()
    machine = {**machine_facts(bandwidth), **code_version()}
    settings = {"clients": args.clients, "requests": args.requests or "max(8, 2 * clients)",
                "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
                "server": f"--max-batch {MAX_BATCH} --max-seq-len {MAX_SEQ_LEN} (other options default)",
                "request": "stream, temperature 0, ignore_eos, distinct prompts",
                "decode_step": {"batches": list(STEP_BATCHES), "prompt_tokens": STEP_PROMPT,
                                "timed_steps": STEP_TIMED}}
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            m = load_model(name, Path(tmp))
            rows.append(bench_model(m, args, bandwidth, Path(tmp) / f"server_{name}.log"))
    machine["loadavg_1_5_15_end"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - start
    payload = {"machine": machine, "settings": settings, "results": rows}
    print_tables(machine, rows)
    print(f"\nREADME tables:\n{markdown_tables(payload)}")
    print(f"wrote {write_results(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
