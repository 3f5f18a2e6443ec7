"""An OpenAI-compatible HTTP API over the serving Engine (FastAPI; `python -m dots_jax.serve` runs it).

Routes: POST /v1/completions, POST /v1/chat/completions (each streamed as server-sent events with "stream": true),
GET /v1/models, GET /health, GET /metrics (Prometheus text).

The handlers never call JAX: the engine runs on its own thread, and each request's callback (called on that
thread) hands the engine's RequestOutput events to the event loop with `loop.call_soon_threadsafe`. A JAX call
in a handler would stall every other client for its duration.

Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, with the status the official client maps
to its exceptions: 400 naming the bad field, 401 (a missing or wrong API key), 404 (an unknown model), 413 (a
body over the size limit), 429 (the engine's waiting queue is full), 500 for a bug (the server stays up).

Beyond OpenAI's fields, a request may carry (as vLLM's do) `top_k`, `min_p`, `ignore_eos`, `stop_token_ids` and
`return_token_ids` (each choice, or streamed chunk, then also carries its `token_ids`, and the response its
`prompt_token_ids`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from dots_jax.inference.engine import Engine, QueueFull, RequestError, RequestOutput, RequestParams
from dots_jax.inference.tokenizer import DOTS1_ASSISTANT, DOTS1_SYSTEM, DOTS1_USER, Tokenizer

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: a request that names no temperature samples
DISCONNECT_POLL_S = 0.25  # how often a request waiting for tokens checks whether its client is still there
END_OF_RESPONSE = "<|endofresponse|>"  # where a dots1 chat turn ends: chat requests also stop there
# Request fields we accept only at their neutral value: anything else would be silently ignored otherwise.
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
               "logprobs": (None, False, 0), "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
               "presence_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
               "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INT32_MAX = 2**31 - 1


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# ------------------------------------------------------------------------------------------------ metrics
class _EngineCollector:
    """The engine's gauges and counters, read from one EngineStats snapshot at each scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        gauges = [("requests_running", "requests decoding or prefilling", s.running),
                  ("requests_waiting", "requests queued for admission (preempted ones included)", s.waiting),
                  ("kv_pages_used", "KV cache pages held by requests", s.pages_used),
                  ("kv_pages_free", "KV cache pages free (unreferenced prefix-cache pages included)", s.pages_free),
                  ("kv_pages_total", "KV cache pages in the pool", s.pages_total)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"dots_jax_{name}", doc, value=value)
        counters = [("prefix_cache_hit_pages", "prompt pages found in the prefix cache", s.prefix_hit_pages),
                    ("prefix_cache_query_pages", "full prompt pages looked up in the prefix cache",
                     s.prefix_query_pages),
                    ("generated_tokens", "tokens generated", s.generated_tokens),
                    ("preemptions", "sequences preempted (pages freed, recomputed later) for lack of pages",
                     s.preemptions)]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"dots_jax_{name}", doc, value=value)  # exposed as dots_jax_{name}_total


class Metrics:
    """The server's Prometheus registry: the engine's state plus what only the server sees (latencies as a
    client experiences them, finish reasons, errors)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("dots_jax_time_to_first_token_seconds",
                              "from a request's arrival to its first generated token", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.itl = Histogram("dots_jax_inter_token_latency_seconds",
                             "between consecutive token-carrying events of a request, per token",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.finished = Counter("dots_jax_requests", "requests finished, by finish reason (abort: cancelled)",
                                ["finish_reason"], registry=self.registry)
        self.errors = Counter("dots_jax_request_errors", "requests answered with an error, by HTTP status",
                              ["status"], registry=self.registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------- request parsing
def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(name, f"must be a number, got {value!r}")
    return float(value)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {value!r}")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


def _check_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise bad(name, f"{body[name]!r} is not supported by this server (only {neutral[-1]!r})")


def request_params(body: dict, *, max_tokens: int, extra_stop_ids: Sequence[int]) -> RequestParams:
    """RequestParams from a request's sampling fields, each checked with a 400 that names it."""
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE)
    if temperature < 0:
        raise bad("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad("top_p", f"must lie in (0, 1] (1 = off), got {top_p}")
    top_k = _integer(body, "top_k", 0)
    if not 0 <= top_k <= INT32_MAX:  # the engine holds it in an int32 array
        raise bad("top_k", f"must be >= 0 (0 = off), got {top_k}")
    min_p = _number(body, "min_p", 0.0)
    if not 0 <= min_p <= 1:
        raise bad("min_p", f"must lie in [0, 1] (0 = off), got {min_p}")
    if max_tokens < 1:
        raise bad("max_tokens", f"must be >= 1, got {max_tokens}")
    seed = _integer(body, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise bad("seed", f"must fit in 64 bits, got {seed}")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", f"must be a non-empty string or a list of them, got {body.get('stop')!r}")
    stop_ids = body.get("stop_token_ids")
    stop_ids = [] if stop_ids is None else stop_ids
    if not (isinstance(stop_ids, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= INT32_MAX for i in stop_ids)):
        raise bad("stop_token_ids", f"must be a list of token ids, got {stop_ids!r}")
    ignore_eos = _flag(body, "ignore_eos")
    if not ignore_eos:
        stop_ids = [*stop_ids, *extra_stop_ids]
    try:
        return RequestParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             seed=seed, stop_token_ids=tuple(sorted(set(stop_ids))), stop=tuple(stop),
                             ignore_eos=ignore_eos)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> list[int]:
    """/v1/completions' prompt: a string, a list of one string, a list of token ids or a list of one such list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return prompt
    raise bad("prompt", "must be a string or a list of token ids (one prompt per request: a list of several "
                        "prompts is not supported)")


def _message_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad("messages", f"messages[{index}].content must be a string or a list of text parts")


# ----------------------------------------------------------------------------------------- one request
class _Bridge:
    """Carries one request's RequestOutput events from the engine thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[RequestOutput, float]] = asyncio.Queue()

    def callback(self, output: RequestOutput) -> None:  # on the engine thread: quick, no JAX
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (output, time.perf_counter()))
        except RuntimeError:  # the loop has closed (server shutdown): nobody is listening
            pass


async def _events(http_request: Request, engine: Engine, bridge: _Bridge, request_id: str, arrival: float,
                  metrics: Metrics) -> AsyncIterator[RequestOutput]:
    """The request's events until it finishes. If the client disconnects first, or the consumer stops early
    (a streaming response cancelled by Starlette), the request is cancelled in the engine, freeing its pages."""
    finished = False
    getter: asyncio.Task | None = None
    last = None
    next_poll = time.perf_counter() + DISCONNECT_POLL_S
    try:
        while True:
            # Checked on a clock, not only when idle: tokens may keep coming for a client that has gone.
            if time.perf_counter() >= next_poll:
                if await http_request.is_disconnected():
                    return
                next_poll = time.perf_counter() + DISCONNECT_POLL_S
            if getter is None:
                getter = asyncio.ensure_future(bridge.queue.get())
            # asyncio.wait rather than wait_for: a timeout never drops an event that arrived at that moment.
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if not done:
                continue
            output, at = getter.result()
            getter = None
            if output.token_ids:
                if last is None:
                    metrics.ttft.observe(at - arrival)
                else:
                    for _ in output.token_ids:
                        metrics.itl.observe((at - last) / len(output.token_ids))
                last = at
            if output.finished:
                finished = True
                metrics.finished.labels(output.finish_reason or "unknown").inc()
            yield output
            if finished:
                return
    finally:
        if getter is not None:
            getter.cancel()
        if not finished:
            engine.cancel(request_id)
            metrics.finished.labels("abort").inc()


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their request in the engine however the response ends (a no-op for a
    finished request), also when the client went away mid-stream."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], cancel: Callable[[], None]):
        super().__init__(content)
        self.cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()
            self.cancel()  # for a stream that never started; a no-op once the request has finished


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------------- app
def create_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, stop_token_ids: Sequence[int] = ()) -> FastAPI:
    """The FastAPI app serving `engine` (which the caller starts and stops) under the name `model_name`.

    api_key: when set, every /v1 route requires `Authorization: Bearer <api_key>`. max_body_bytes: larger request
    bodies get a 413. stop_token_ids: end-of-sequence ids beyond the model's (generation_config.json's), which
    every request stops at unless it sets ignore_eos.
    """
    app = FastAPI(title="dots_jax", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    created = int(time.time())
    end_of_turn = tokenizer.token_to_id(END_OF_RESPONSE)
    chat_stop_ids = [*stop_token_ids, *([end_of_turn] if end_of_turn is not None else [])]
    has_chat_format = tokenizer.chat_template is not None or all(
        tokenizer.token_to_id(m) is not None for m in (*DOTS1_SYSTEM, *DOTS1_USER, *DOTS1_ASSISTANT))
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.errors.labels(str(e.status)).inc()
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return await _api_error(request, APIError(e.status_code, str(e.detail), code=None))

    @app.exception_handler(Exception)  # a bug: Starlette still logs the traceback after this answer
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        return await _api_error(request, APIError(500, f"internal server error: {type(e).__name__}: {e}",
                                                  type="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, f"invalid Content-Length header {length!r}")
            if int(length) > max_body_bytes:
                raise APIError(413, f"request body of {length} bytes exceeds the limit of {max_body_bytes}",
                               code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():  # the bytes actually sent count, whatever the header said
                size += len(chunk)
                if size > max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the request") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON; nesting too deep for the parser
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        _check_unsupported(body)
        return body

    def submit(prompt_ids: list[int], params: RequestParams, request_id: str) -> _Bridge:
        bridge = _Bridge(asyncio.get_running_loop())
        try:
            engine.add_request(prompt_ids, params, bridge.callback, request_id=request_id)
        except RequestError as e:  # its message names the field already
            raise APIError(400, str(e), param=e.param) from None
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        return bridge

    def stream_options(body: dict) -> bool:
        options = body.get("stream_options")
        if options is None:
            return False
        if not isinstance(options, dict):
            raise bad("stream_options", f"must be an object, got {options!r}")
        return _flag(options, "include_usage")

    def usage(output: RequestOutput) -> dict:
        return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
                "total_tokens": output.prompt_tokens + output.completion_tokens}

    async def respond(request: Request, body: dict, prompt_ids: list[int], params: RequestParams, chat: bool,
                      arrival: float) -> Response:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        stream, include_usage = _flag(body, "stream"), stream_options(body)
        with_ids = _flag(body, "return_token_ids")
        bridge = submit(prompt_ids, params, request_id)
        events = _events(request, engine, bridge, request_id, arrival, metrics)
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if stream:
            return _EventStream(sse(events, head, chat, include_usage, with_ids, prompt_ids),
                                cancel=lambda: engine.cancel(request_id))
        text, token_ids, last = [], [], None
        async for output in events:
            text.append(output.text)
            token_ids += output.token_ids
            last = output
        if last is None or not last.finished:  # the client went away: nobody reads this
            return Response(status_code=499)
        if last.finish_reason == "abort":
            raise APIError(503, "the request was aborted by the server (shutting down?)", type="server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        if with_ids:
            choice["token_ids"] = token_ids
        response = {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                    "usage": usage(last)}
        if with_ids:
            response["prompt_token_ids"] = prompt_ids
        return JSONResponse(response)

    async def sse(events: AsyncIterator[RequestOutput], head: dict, chat: bool, include_usage: bool,
                  with_ids: bool, prompt_ids: list[int]) -> AsyncIterator[str]:
        first = True
        async for output in events:
            if output.finished and output.finish_reason == "abort":
                yield _sse({"error": {"message": "the request was aborted by the server", "type": "server_error",
                                      "param": None, "code": None}})
                break
            if not (output.text or output.finished or (with_ids and output.token_ids) or (chat and first)):
                continue
            choice: dict[str, Any] = {"index": 0, "finish_reason": output.finish_reason if output.finished else None,
                                      "logprobs": None}
            if chat and first:
                choice["delta"] = {"role": "assistant", "content": output.text}
            elif chat:
                choice["delta"] = {"content": output.text} if output.text else {}
            else:
                choice["text"] = output.text
            if with_ids:
                choice["token_ids"] = output.token_ids
            chunk = {**head, "choices": [choice]}
            if with_ids and first:
                chunk["prompt_token_ids"] = prompt_ids
            if include_usage:
                chunk["usage"] = None
            first = False
            yield _sse(chunk)
            if output.finished and include_usage:
                yield _sse({**head, "choices": [], "usage": usage(output)})
        yield _sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.perf_counter()
        authorize(request)
        body = await read_body(request)
        if "prompt" not in body:
            raise bad("prompt", "is required")
        prompt_ids = await asyncio.to_thread(_prompt_ids, body["prompt"], tokenizer)
        max_tokens = _integer(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
        params = request_params(body, max_tokens=max_tokens, extra_stop_ids=stop_token_ids)
        return await respond(request, body, prompt_ids, params, chat=False, arrival=arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.perf_counter()
        authorize(request)
        body = await read_body(request)
        if not has_chat_format:
            raise bad("messages", f"the model {model_name} has no chat template (tokenizer_config.json's "
                                  "chat_template or chat_template.jinja): use /v1/completions")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "must be a non-empty list of {role, content} objects")
        conversation = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad("messages", f"messages[{i}] must be an object with a string 'role'")
            conversation.append({"role": message["role"], "content": _message_text(message.get("content"), i)})
        try:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, conversation, add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError) as e:
            raise bad("messages", f"the chat template rejected the conversation: {e}") from None
        # The template writes any special tokens itself, so the tokenizer adds none.
        prompt_ids = await asyncio.to_thread(tokenizer.encode, text)
        max_tokens = body.get("max_completion_tokens")
        name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
        max_tokens = _integer(body, name, max(engine.max_seq_len - len(prompt_ids), 0))
        if max_tokens < 1:
            raise bad(name, f"must be >= 1, got {max_tokens}" if name in body else
                      f"the conversation has {len(prompt_ids)} tokens: no room left in the context of "
                      f"{engine.max_seq_len}")
        params = request_params(body, max_tokens=max_tokens, extra_stop_ids=chat_stop_ids)
        return await respond(request, body, prompt_ids, params, chat=True, arrival=arrival)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "dots_jax",
             "max_model_len": engine.max_seq_len}]})

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app
