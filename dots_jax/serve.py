"""`python -m dots_jax.serve`: serve a dots1 model over an OpenAI-compatible HTTP API.

  python -m dots_jax.serve                                   # the embedded demo model on http://127.0.0.1:8000
  python -m dots_jax.serve --model rednote-hilab/dots.llm1.inst --dtype bfloat16 --mesh expert=8 --port 8080
  DOTS_JAX_API_KEY=secret python -m dots_jax.serve --host 0.0.0.0   # reachable from other machines: set a key

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with "stream": true), GET /v1/models,
GET /health, GET /metrics (Prometheus). The engine (dots_jax.inference.engine) batches the requests continuously
over a paged KV cache; the API is dots_jax.inference.server. The server listens on 127.0.0.1 unless --host says
otherwise, and requires `Authorization: Bearer KEY` on /v1 routes when --api-key (or DOTS_JAX_API_KEY) is set.

The model is loaded and the engine's decode step compiled for every batch size before the server opens its port,
so /health answers once the server is ready (a prefill shape seen for the first time still compiles once, and the
log says so). As OpenAI's API does, a request that gives no temperature samples at temperature 1; 0 is greedy.
Bad input prints one `error: ...` line and exits with 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence

import jax
import uvicorn

from dots_jax import cli
from dots_jax.cli import DEMO_MODEL_DIR
from dots_jax.errors import UserError
from dots_jax.inference.engine import Engine
from dots_jax.inference.server import DEFAULT_MAX_BODY_BYTES, create_app
from dots_jax.model.padding import pad_for_mesh
from dots_jax.parallel.distributed import is_main_process, maybe_initialize
from dots_jax.parallel.sharding import check_shardable, make_mesh
from dots_jax.weights import from_pretrained

API_KEY_ENV = "DOTS_JAX_API_KEY"
DEMO_NAME = "dots1-demo"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m dots_jax.serve", description=__doc__)
    parser.add_argument("--model", metavar="PATH_OR_REPO",
                        help="dots1 checkpoint in HF format with its tokenizer: a local directory (config.json, "
                             "*.safetensors, tokenizer.json or tokenizer.model) or a Hugging Face repo id. "
                             "Default: the embedded demo model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the name clients pass as `model` (default: --model as given, or "
                             f"{DEMO_NAME} for the demo model)")
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}, "
                             "else no key)")
    parser.add_argument("--dtype", choices=cli.COMPUTE_DTYPES, default="float32",
                        help="dtype of the weights, activations and KV cache (default float32)")
    cli.add_quantize(parser)
    parser.add_argument("--lora", metavar="DIR",
                        help="apply a LoRA adapter in PEFT's layout (adapter/ of `dots_jax.train --lora-rank`, or one "
                             "PEFT saved), merged into the weights as they load")
    cli.add_kv_cache_dtype(parser)
    parser.add_argument("--mesh", metavar="AXIS=SIZE,...",
                        help="shard the model over a device mesh with axes data, fsdp, expert, tensor, e.g. "
                             "expert=8 (the sizes must multiply to the device count); default: one device")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="most sequences decoded together in one step (default 8)")
    parser.add_argument("--max-seq-len", type=int, metavar="N",
                        help="most tokens of one sequence, prompt and completion together (default: the model's "
                             "context, at most 4096)")
    parser.add_argument("--page-size", type=int, default=16, metavar="N",
                        help="tokens per KV cache page (default 16)")
    parser.add_argument("--kv-pages", type=int, metavar="N",
                        help="pages in the KV cache pool (default: enough for --max-batch sequences of "
                             "--max-seq-len tokens); with fewer, sequences are preempted and recomputed when "
                             "pages run out")
    parser.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                        help="most prompt tokens prefilled in one engine step, so that running sequences keep "
                             "decoding between the chunks of a long prompt (default 256)")
    cli.add_distributed(parser, "listens for HTTP; the others run the engine's steps with it")
    parser.add_argument("--max-waiting", type=int, default=256, metavar="N",
                        help="most requests queued for admission; beyond it requests get HTTP 429 (default 256)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                        help=f"largest request body accepted, larger ones get HTTP 413 "
                             f"(default {DEFAULT_MAX_BODY_BYTES})")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject out-of-range values up front, naming the option."""
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must lie in [1, 65535], got {args.port}")
    for name in ("max_batch", "max_seq_len", "page_size", "kv_pages", "prefill_chunk", "max_waiting",
                 "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.mesh is not None:
        try:
            args.mesh = make_mesh(args.mesh)
        except ValueError as e:
            raise UserError(f"--mesh {args.mesh}: {e}") from None
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    elif not args.api_key:
        raise UserError("--api-key is empty: give a key, or leave the option out to serve without one")


def check_port(host: str, port: int) -> None:
    """Fail in a second, not after loading the model, when the address is taken (uvicorn binds it again later)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            probe.bind(address)
        except OSError as e:
            taken = e.errno == errno.EADDRINUSE
            raise UserError(f"--port {port}: {host}:{port} is already in use" if taken
                            else f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # Several processes (a TPU pod slice, a multi-node job): every process loads the model and runs the engine
    # over one mesh; process 0 alone listens, schedules and broadcasts each step to the others (Engine.follow).
    maybe_initialize(args.distributed)  # before any other JAX call
    check_args(args)
    if is_main_process():
        check_port(args.host, args.port)
    demo = args.model is None
    model_arg = str(DEMO_MODEL_DIR) if demo else args.model
    name = args.served_model_name or (DEMO_NAME if demo else args.model)
    log = logging.getLogger("dots_jax")  # the engine's compile notes (dots_jax.engine) too, in uvicorn's format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # absl (through orbax) may have put a handler on the root logger

    checkpoint = cli.open_checkpoint(model_arg)
    directory, cfg, tokenizer = checkpoint.directory, checkpoint.cfg, checkpoint.tokenizer
    stop_token_ids = sorted(checkpoint.stop_token_ids)
    if args.mesh is not None:
        try:
            check_shardable(cfg, args.mesh)
        except ValueError as e:
            raise UserError(f"--mesh: {e}") from None
    if demo:
        log.info("no --model given: serving the embedded demo model (%s), a small dots1 model trained on the "
                 "Python standard library, as %r", DEMO_MODEL_DIR, name)
    model = from_pretrained(directory, mesh=args.mesh, dtype=cli.DTYPES[args.dtype],
                            progress=sys.stderr.isatty(), quantize=args.quantize, lora=args.lora)
    if args.mesh is not None:
        model = pad_for_mesh(model, args.mesh)  # zero-pads widths the tensor axis does not divide: exact
    try:
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                        page_size=args.page_size, kv_pages=args.kv_pages, prefill_chunk=args.prefill_chunk,
                        max_waiting=args.max_waiting, mesh=args.mesh, kv_cache_dtype=args.kv_cache_dtype)
    except ValueError as e:  # the engine names the setting (max_seq_len over the model's context, ...)
        raise UserError(f"{e}") from None
    log.info("engine: batch %d, %d tokens per sequence, %d KV pages of %d tokens", engine.max_batch,
             engine.max_seq_len, engine.stats().pages_total, engine.page_size)
    if not is_main_process():
        log.info("process %d: following process 0's engine steps", jax.process_index())
        engine.follow()
        return 0
    engine.warmup()

    app = create_app(engine, tokenizer, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, stop_token_ids=stop_token_ids)
    if args.host not in LOOPBACK and args.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach it can use it (--api-key)", args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("serving %r at http://%s:%d/v1%s", name, host, args.port,
             " (API key required)" if args.api_key else "")
    engine.start()
    try:
        # uvicorn handles SIGINT and SIGTERM: it stops accepting, lets open requests finish (at most 10 s), returns.
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    finally:
        engine.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dots_jax.serve ...`; returns the exit code (2 for bad input, with one `error:` line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
