"""`python -m dots_jax.serve` as a real process on 127.0.0.1, driven by the official `openai` client and plain HTTP.

Two servers share the module (starting one is most of the cost: loading, and compiling the engine's step shapes):
  - "main": a tiny random dots1 checkpoint (f32) with the demo model's tokenizer and a chat template, a KV pool
    large enough for every sequence of a full batch;
  - "tight": the same weights without a chat template, a pool of 10 pages where 8 sequences would want up to 32
    (preemption), an API key, a 64 KiB body limit.
Every greedy completion is checked token for token against transformers' generate(do_sample=False) on that prompt
alone, the oracle; prompt ids against transformers' tokenizer and chat template.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, run_cli, save, torch_one_thread
from prometheus_client.parser import text_string_to_metric_families

from dots_jax.cli import DEMO_MODEL_DIR

NAME = "tiny-dots1"
API_KEY = "test-key-18"
EOS = 0  # the demo tokenizer's <|endoftext|>: the checkpoint's eos, so both sides stop there
MAX_SEQ_LEN = 64
PAGE_SIZE = 16
MAX_BODY = 65536
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
START_TIMEOUT_S = 600  # load + warm-up on a loaded 2-core CI machine
REQUEST_TIMEOUT_S = 180


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint in two directories: with a chat template ("main") and without ("tight")."""
    main = tmp_path_factory.mktemp("serve") / "main"
    vocab = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DEMO_MODEL_DIR / "tokenizer.json"))
    config = hf_config(vocab_size=len(vocab), eos_token_id=EOS, pad_token_id=EOS)
    save(hf_model(config, seed=18, bias_std=0.05), main)
    shutil.copy(DEMO_MODEL_DIR / "tokenizer.json", main / "tokenizer.json")
    tokenizer_config = json.loads((DEMO_MODEL_DIR / "tokenizer_config.json").read_text())
    (main / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE}))
    tight = main.parent / "tight"
    tight.mkdir()
    for path in main.iterdir():
        if path.name != "tokenizer_config.json":
            (tight / path.name).symlink_to(path)
    shutil.copy(DEMO_MODEL_DIR / "tokenizer_config.json", tight / "tokenizer_config.json")
    return {"main": main, "tight": tight}


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m dots_jax.serve` child process; its output goes to a file (a pipe nobody drains would fill)."""

    def __init__(self, name: str, args: list[str], log_path: Path, api_key: str | None = None):
        self.name, self.api_key, self.port, self.log_path = name, api_key, free_port(), log_path
        env = {k: v for k, v in os.environ.items() if k != "DOTS_JAX_API_KEY"}
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "dots_jax.serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "unused", max_retries=0,
                                    timeout=REQUEST_TIMEOUT_S)
        self.started = time.perf_counter()

    def log(self, tail: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return f"--- {self.name} server log (last {tail} of {len(lines)} lines) ---\n" + "\n".join(lines[-tail:])

    def wait_ready(self) -> float:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the {self.name} server exited with {self.proc.returncode}\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"the {self.name} server did not answer /health within {START_TIMEOUT_S} s\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            text = response.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def wait_idle(self, timeout: float = 120) -> dict[str, float]:
        """The metrics once no request runs or waits (cancelled requests are dropped at the engine's next step)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["dots_jax_requests_running"] == m["dots_jax_requests_waiting"] == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: uvicorn's graceful shutdown, then engine.stop
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory, request) -> dict[str, Server]:
    logs = tmp_path_factory.mktemp("serve-logs")
    # A prefill chunk of 64 slots (every prompt here fits in one) caps the prefill shapes the engine compiles at
    # 6 (rows x width: 1-4 x 16, 1-2 x 32, 1 x 64) instead of 11.
    common = ["--served-model-name", NAME, "--max-batch", "8", "--max-seq-len", str(MAX_SEQ_LEN),
              "--page-size", str(PAGE_SIZE), "--prefill-chunk", "64"]
    started = {
        "main": Server("main", ["--model", str(checkpoints["main"]), *common], logs / "main.log"),
        "tight": Server("tight", ["--model", str(checkpoints["tight"]), *common, "--kv-pages", "10",
                                  "--max-body-bytes", str(MAX_BODY), "--api-key", API_KEY], logs / "tight.log",
                        api_key=API_KEY),
    }
    try:
        request.getfixturevalue("cases")  # transformers' outputs, computed while the servers start
        for server in started.values():  # started together: their compiles overlap on CI's two cores
            print(f"{server.name} server ready in {server.wait_ready():.1f} s")
        yield started
    finally:
        codes = {name: server.stop() for name, server in started.items()}
    bad = {name: code for name, code in codes.items() if code != 0}
    assert not bad, f"servers exited with {bad} on SIGINT\n" + "\n".join(started[n].log() for n in bad)
    for server in started.values():  # the engine stopped after uvicorn did
        assert "INFO:     stopped" in server.log_path.read_text(), server.log()


@pytest.fixture(autouse=True)
def server_logs_on_failure(request):
    """Print the servers' log tails after each test: pytest shows them only for a failed test."""
    yield
    if "servers" in request.fixturenames:
        for server in request.getfixturevalue("servers").values():
            print(server.log(40))


# ------------------------------------------------------------------------------------ cases and the oracle
@dataclass
class Case:
    kind: str  # "ids" (a token-id prompt), "text" or "chat"
    prompt: list[int] | str | list[dict]
    max_tokens: int
    stream: bool


@dataclass
class Result:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def make_cases(tokenizer: transformers.PreTrainedTokenizerFast) -> list[Case]:
    """36 completions (half token ids, half text) and 8 chats: prompts of 3 to 40 tokens, max_tokens 4 to 20,
    every other one streamed."""
    rng = np.random.default_rng(18)
    cases = []
    for i in range(44):
        kind = "ids" if i < 18 else "text" if i < 36 else "chat"
        length = int(rng.integers(3, {"ids": 41, "text": 31, "chat": 16}[kind]))
        ids = [int(t) for t in rng.integers(1, tokenizer.vocab_size, length)]
        prompt = ids if kind == "ids" else tokenizer.decode(ids)
        if kind == "chat":
            prompt = [{"role": "user", "content": prompt}]
        cases.append(Case(kind, prompt, int(rng.integers(4, 21)), stream=i % 2 == 1))
    return cases


@pytest.fixture(scope="module")
def oracle(checkpoints):
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(checkpoints["main"] / "tokenizer.json"),
                                                     eos_token="<|endoftext|>")
    model = transformers.Dots1ForCausalLM.from_pretrained(checkpoints["main"], dtype=torch.float32).eval()
    model.generation_config.eos_token_id = EOS
    return tokenizer, model


def prompt_ids(tokenizer, case: Case) -> list[int]:
    if case.kind == "ids":
        return list(case.prompt)
    if case.kind == "text":
        return tokenizer(case.prompt).input_ids
    return tokenizer.apply_chat_template(case.prompt, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def hf_greedy(model, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' generate(do_sample=False) for one prompt alone, cut after its eos."""
    with torch_one_thread():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_tokens, eos_token_id=EOS, pad_token_id=EOS)
    new = out[0, len(ids):].tolist()
    return new[:new.index(EOS) + 1] if EOS in new else new


@pytest.fixture(scope="module")
def cases(oracle) -> list[tuple[Case, list[int], list[int]]]:
    """(case, prompt ids, expected generated ids) for every case."""
    tokenizer, model = oracle
    table = []
    for case in make_cases(tokenizer):
        ids = prompt_ids(tokenizer, case)
        assert len(ids) + case.max_tokens <= MAX_SEQ_LEN
        table.append((case, ids, hf_greedy(model, ids, case.max_tokens)))
    return table


# --------------------------------------------------------------------------------------------- requests
def ask(server: Server, case: Case, **sampling) -> Result:
    """One request through the openai client, streamed or not; vLLM's `return_token_ids` gives the ids."""
    client = server.client
    kwargs = {"model": NAME, "max_tokens": case.max_tokens, "temperature": 0.0, **sampling}
    extra_body = {"return_token_ids": True, **kwargs.pop("extra_body", {})}
    if case.kind == "chat":
        create = lambda **kw: client.chat.completions.create(messages=case.prompt, **kw)  # noqa: E731
    else:
        create = lambda **kw: client.completions.create(prompt=case.prompt, **kw)  # noqa: E731
    if not case.stream:
        response = create(**kwargs, extra_body=extra_body)
        choice = response.choices[0]
        return Result(response.model_extra["prompt_token_ids"], choice.model_extra["token_ids"],
                      choice.message.content if case.kind == "chat" else choice.text, choice.finish_reason,
                      response.usage.prompt_tokens, response.usage.completion_tokens)
    chunks = list(create(**kwargs, stream=True, stream_options={"include_usage": True}, extra_body=extra_body))
    with_choice = [c for c in chunks if c.choices]
    assert with_choice and all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    if case.kind == "chat":
        assert with_choice[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in with_choice)
    else:
        text = "".join(c.choices[0].text for c in with_choice)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, "the usage chunk comes last"
    return Result(with_choice[0].model_extra["prompt_token_ids"],
                  [t for c in with_choice for t in c.choices[0].model_extra["token_ids"]], text,
                  with_choice[-1].choices[0].finish_reason, chunks[-1].usage.prompt_tokens,
                  chunks[-1].usage.completion_tokens)


def check(result: Result, ids: list[int], expected: list[int], tokenizer, label: str) -> None:
    assert result.prompt_ids == ids, f"{label}: prompt ids"
    assert result.token_ids == expected, f"{label}: generated ids differ from transformers' greedy generate"
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True), f"{label}: text"
    assert result.finish_reason == ("stop" if expected[-1] == EOS else "length"), label
    assert (result.prompt_tokens, result.completion_tokens) == (len(ids), len(expected)), f"{label}: usage"


def run_threads(jobs, workers: int = 32) -> list:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result(timeout=REQUEST_TIMEOUT_S * 2) for f in futures]


def raw_request(server: Server, path: str, body: bytes | str | dict, headers: dict | None = None,
                key: str | None = "default") -> tuple[int, dict]:
    """A POST over plain HTTP: (status, JSON body)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    headers = {"Content-Type": "application/json", **(headers or {})}
    key = server.api_key if key == "default" else key
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def disconnect(server: Server, body: dict, stream: bool, delay: float) -> None:
    """Send a request and hang up: after the first streamed event, or `delay` seconds into a plain one."""
    data = json.dumps({**body, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                  % ((server.api_key or "").encode(), len(data), data))
        if stream:
            received = b""
            while b"data:" not in received:
                piece = s.recv(4096)
                assert piece, "the server closed the stream before its first event"
                received += piece
        else:
            time.sleep(delay)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("which", ["main", "tight"])
def test_concurrent_requests_match_transformers(servers, cases, oracle, which):
    """Acceptance 1: 36+ concurrent requests (44 on main with the chats, 36 on tight), half streamed, each
    the tokens transformers' greedy generate gives for that prompt alone; on the tight pool, with preemptions."""
    server, tokenizer = servers[which], oracle[0]
    todo = [(i, c) for i, c in enumerate(cases) if which == "main" or c[0].kind != "chat"]
    before = server.metrics()
    results = run_threads([lambda c=c: ask(server, c[0]) for _, c in todo], workers=len(todo))
    for (i, (case, ids, expected)), result in zip(todo, results, strict=True):
        check(result, ids, expected, tokenizer, f"case {i} ({case.kind}, stream={case.stream})")
    after = server.wait_idle()
    preempted = after["dots_jax_preemptions_total"] - before["dots_jax_preemptions_total"]
    print(f"{which}: {len(todo)} requests, {preempted:.0f} preemptions, KV pages "
          f"{after['dots_jax_kv_pages_total']:.0f}")
    if which == "tight":
        assert preempted > 0, "a pool of 10 pages for 8 sequences of up to 4 pages must preempt"
    assert after["dots_jax_kv_pages_used"] == 0


def test_seeded_sampling_is_independent_of_the_batch(servers, cases):
    """Acceptance 2: a seeded sampled request returns the same tokens alone and amid 8 other requests."""
    server = servers["main"]
    case, _, greedy = cases[3]
    sampled = dict(temperature=0.9, top_p=0.95, seed=1234, extra_body={"top_k": 50})
    alone = ask(server, case, **sampled)
    others = [lambda c=c, s=s: ask(server, c, temperature=1.0, seed=s)  # sampled with seeds of their own
              for s, (c, _, _) in enumerate(cases[10:18])]
    crowd = run_threads([lambda: ask(server, case, **sampled), *others])
    assert crowd[0].token_ids == alone.token_ids and crowd[0].text == alone.text
    assert alone.token_ids != greedy, "temperature 0.9 over a random model's 4096 tokens should not be greedy"
    assert ask(server, case, **{**sampled, "seed": 4321}).token_ids != alone.token_ids


def test_prefix_cache_reuses_pages(servers, oracle):
    """Acceptance 5: a request sharing 40 prompt tokens (2 full pages) with an earlier one gets 2 prefix-cache
    hits and transformers' output. The time to first token is printed, not asserted."""
    server, (tokenizer, model) = servers["main"], oracle
    rng = np.random.default_rng(5)
    prefix = [int(t) for t in rng.integers(1, tokenizer.vocab_size, 40)]
    first = Case("ids", prefix + [11, 12, 13, 14], 8, stream=True)
    second = Case("ids", prefix + [21, 22, 23, 24, 25, 26], 8, stream=True)
    expected = hf_greedy(model, second.prompt, second.max_tokens)

    def timed(case: Case) -> tuple[float, float]:
        hits = server.metrics()["dots_jax_prefix_cache_hit_pages_total"]
        start = time.perf_counter()
        stream = server.client.completions.create(model=NAME, prompt=case.prompt, max_tokens=case.max_tokens,
                                                  temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)
        ttft = time.perf_counter() - start
        list(chunks)
        return ttft, server.wait_idle()["dots_jax_prefix_cache_hit_pages_total"] - hits

    ttft_first, hits_first = timed(first)
    ttft_second, hits_second = timed(second)
    print(f"time to first token: {ttft_first * 1000:.0f} ms without a prefix hit, {ttft_second * 1000:.0f} ms "
          f"with {hits_second:.0f} of 2 full pages from the cache")
    assert hits_first == 0
    assert hits_second == 2  # (46 - 1) // 16 full prompt pages, both within the shared 40 tokens
    check(ask(server, second), second.prompt, expected, tokenizer, "after the prefix hit")


# Invalid requests: (what to send, status, the `param` the error must name or a word its message must hold).
FIELD_ERRORS = [
    (dict(temperature=-1), 400, "temperature"),
    (dict(temperature="hot"), 400, "temperature"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(top_p=0), 400, "top_p"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(top_k=-2), 400, "top_k"),
    (dict(min_p=1.5), 400, "min_p"),
    (dict(seed=1.5), 400, "seed"),
    (dict(stop=[1, 2]), 400, "stop"),
    (dict(n=2), 400, "n"),
    (dict(model="gpt-4"), 404, "model"),
    (dict(prompt=list(range(1, MAX_SEQ_LEN + 1))), 400, "prompt"),
    (dict(prompt=[1, 2, 3], max_tokens=MAX_SEQ_LEN), 400, "max_tokens"),
    (dict(prompt=[1, 10**6]), 400, "prompt"),
]


def invalid_request(server: Server, j: int) -> None:
    """The j-th kind of invalid request, checked for its status and the problem it names."""
    kinds = len(FIELD_ERRORS) + 4
    k = j % kinds
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 4}
    if k < len(FIELD_ERRORS):
        fields, status, param = FIELD_ERRORS[k]
        got, error = raw_request(server, "/v1/completions", {**body, **fields})
        assert (got, error["error"]["param"]) == (status, param), error
        assert set(error["error"]) == {"message", "type", "param", "code"}
        return
    k -= len(FIELD_ERRORS)
    if k == 0:
        got, error = raw_request(server, "/v1/completions", '{"model": "tiny-dots1", "prompt": [5, 6')
        assert got == 400 and "JSON" in error["error"]["message"], error
    elif k == 1:
        got, error = raw_request(server, "/v1/completions", {**body, "prompt": "x" * MAX_BODY})
        assert got == 413 and str(MAX_BODY) in error["error"]["message"], error
    else:
        got, error = raw_request(server, "/v1/completions", body, key=None if k == 2 else "wrong-key")
        assert got == 401 and "API key" in error["error"]["message"], error


def test_load_with_disconnects_and_invalid_requests(servers, cases, oracle):
    """Acceptance 4: 128 requests from 32 concurrent clients on the tight pool (API key set): 80 valid ones
    (checked against transformers), 16 that hang up early, 32 invalid ones. Afterwards no request runs, no KV page
    is held, and the server is up."""
    server, tokenizer = servers["tight"], oracle[0]
    completions = [c for c in cases if c[0].kind != "chat"]
    kinds = ["valid"] * 80 + ["disconnect"] * 16 + ["invalid"] * 32
    random.Random(4).shuffle(kinds)
    before = server.metrics()

    def job(i: int, kind: str) -> None:
        if kind == "valid":
            case, ids, expected = completions[i % len(completions)]
            check(ask(server, Case(case.kind, case.prompt, case.max_tokens, stream=i % 2 == 0)), ids, expected,
                  tokenizer, f"load request {i}")
        elif kind == "disconnect":
            body = {"model": NAME, "prompt": [7 + i, 8, 9], "max_tokens": 40, "temperature": 0}
            disconnect(server, body, stream=i % 2 == 0, delay=0.05 * (i % 4))
        else:
            invalid_request(server, i)

    run_threads([lambda i=i, k=k: job(i, k) for i, k in enumerate(kinds)], workers=32)
    after = server.wait_idle()
    assert server.alive()
    assert after["dots_jax_requests_running"] == after["dots_jax_requests_waiting"] == 0
    assert after["dots_jax_kv_pages_used"] == 0, "a disconnected request kept its pages"
    aborted = (after.get('dots_jax_requests_total{finish_reason="abort"}', 0)
               - before.get('dots_jax_requests_total{finish_reason="abort"}', 0))
    print(f"aborted by disconnects: {aborted:.0f} of 16; errors by status: "
          f"{ {k: v for k, v in after.items() if k.startswith('dots_jax_request_errors_total')} }")
    assert aborted >= 1
    case, ids, expected = completions[0]
    check(ask(server, case), ids, expected, tokenizer, "after the load")


def test_streaming_wire_format(servers):
    """The SSE stream itself: `data: <chunk>` events, the first chat chunk carrying the role, the last choice
    chunk the finish reason, then the usage chunk and `data: [DONE]`."""
    server = servers["main"]
    body = {"model": NAME, "messages": [{"role": "user", "content": "def"}], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    connection.close()
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == NAME for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    reasons = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert reasons[-1] == "length" and not any(reasons[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 5


def test_api_surface(servers):
    """/v1/models, /health, /metrics; a model without a chat template; the key on every /v1 route."""
    main, tight = servers["main"], servers["tight"]
    assert [m.id for m in main.client.models.list()] == [NAME]
    assert [m.id for m in tight.client.models.list()] == [NAME]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tight.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="chat template") as error:
        tight.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["param"] == "messages"
    with urllib.request.urlopen(f"{tight.url}/health", timeout=30) as response:  # no key needed
        assert json.loads(response.read()) == {"status": "ok"}
    metrics = main.metrics()
    for name in ["requests_running", "requests_waiting", "kv_pages_used", "kv_pages_free", "kv_pages_total",
                 "prefix_cache_hit_pages_total", "prefix_cache_query_pages_total", "generated_tokens_total",
                 "preemptions_total", "time_to_first_token_seconds_count", "inter_token_latency_seconds_count"]:
        assert f"dots_jax_{name}" in metrics, name
    assert metrics["dots_jax_kv_pages_total"] == 8 * MAX_SEQ_LEN // PAGE_SIZE
    assert metrics["dots_jax_time_to_first_token_seconds_count"] > 0


def test_chat_template_tokens(servers, cases, oracle):
    """A non-streamed chat with a system message: its prompt ids are transformers' rendering of the template."""
    tokenizer = oracle[0]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
    response = servers["main"].client.chat.completions.create(model=NAME, messages=messages, max_tokens=3,
                                                               temperature=0, extra_body={"return_token_ids": True})
    assert response.model_extra["prompt_token_ids"] == prompt_ids(tokenizer, Case("chat", messages, 3, False))
    assert response.object == "chat.completion" and response.choices[0].message.role == "assistant"


def test_servers_survived(servers):
    """Nothing above took a server down (the fixture's teardown then stops both and checks their exit)."""
    assert all(server.alive() for server in servers.values())


# ------------------------------------------------------------------------------ in-process: no model, no JAX call
@pytest.mark.parametrize("argv, names", [
    (["--port", "0"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--kv-pages", "-1"], "--kv-pages"),
    (["--max-body-bytes", "0"], "--max-body-bytes"),
    (["--api-key", ""], "--api-key"),
    (["--mesh", "expert=3,fsdp"], "--mesh"),
    (["--model", "/nonexistent/checkpoint"], "--model"),
    (["--dtype", "float64"], "--dtype"),
])
def test_cli_errors_are_one_line(argv, names):
    from dots_jax.serve import main

    code, out, err = run_cli(main, argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and names in err, err


def test_cli_refuses_a_taken_port_before_loading():
    from dots_jax.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli(main, ["--model", "/nonexistent/checkpoint", "--port", str(taken.getsockname()[1])])
    assert code == 2 and "already in use" in err, err


class StubEngine:
    """Stands in for the Engine where only the server's mapping of the engine's answers is under test: 429 for
    QueueFull, 500 for a bug (the server stays up), 503 for a request the engine aborted."""

    max_seq_len = 64

    def __init__(self):
        self.raises: Exception | None = None
        self.finish_reason = "length"

    def add_request(self, prompt_ids, params, callback, request_id=None):
        from dots_jax.inference.engine import RequestOutput

        if self.raises is not None:
            raise self.raises
        callback(RequestOutput(request_id, "", [], True, self.finish_reason, len(prompt_ids), 0))
        return request_id

    def cancel(self, request_id):
        pass

    def stats(self):
        from dots_jax.inference.engine import EngineStats

        return EngineStats(0, 0, 0, 1, 1, 0, 0, 0, 0, 0)


def test_engine_refusals_and_bugs_map_to_statuses():
    import uvicorn

    from dots_jax.inference.engine import QueueFull
    from dots_jax.inference.server import create_app
    from dots_jax.inference.tokenizer import Tokenizer

    engine = StubEngine()
    app = create_app(engine, Tokenizer.from_dir(DEMO_MODEL_DIR), model_name=NAME)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        stub = Server.__new__(Server)
        stub.port, stub.api_key = server.config.port, None
        body = {"model": NAME, "prompt": "x"}
        engine.raises = QueueFull("2 requests are waiting already")
        status, error = raw_request(stub, "/v1/completions", body)
        assert status == 429 and "waiting" in error["error"]["message"], error
        engine.raises = RuntimeError("a bug")
        status, error = raw_request(stub, "/v1/completions", body)
        assert status == 500 and "a bug" in error["error"]["message"], error
        engine.raises, engine.finish_reason = None, "abort"
        status, error = raw_request(stub, "/v1/completions", body)
        assert status == 503 and error["error"]["type"] == "server_error", error
        engine.finish_reason = "length"
        assert raw_request(stub, "/v1/completions", body)[0] == 200
    finally:
        server.should_exit = True
        thread.join(30)
