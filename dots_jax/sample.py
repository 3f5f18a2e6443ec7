"""`python -m dots_jax.sample`: generate text with a dots1 model and print it as it comes.

  python -m dots_jax.sample --model rednote-hilab/dots.llm1.inst --chat --prompt "Why is the sky blue?"
  python -m dots_jax.sample --model ./my-checkpoint --prompt "Once upon a time" --temperature 0.7 --top-p 0.9
  echo "Translate to French: good morning" | python -m dots_jax.sample --model ./my-checkpoint --chat --prompt -

stdout carries each prompt followed by its completion (special tokens left out; with --chat, a line break
between the two, as the reply is an answer rather than a continuation). On a terminal the prompt is dimmed; on a
pipe both are plain, so stdout is exactly prompt + completion. With one prompt the completion streams token by
token; with several, each prompt and completion is printed at the end under a `=== [i]` label. Loading notes and
the timing line (time to first token, tokens/s) go to stderr. Bad input prints one `error: ...` line and exits
with 2.

Without --model, the embedded demo model (dots_jax/demo_model: a 4-layer, 16-expert dots1 model trained on the
Python standard library's source, see dots_jax/demo.py) completes the --prompt given, or a Python snippet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Sequence

import jax
import jinja2
import numpy as np

from dots_jax import cli
from dots_jax.cli import DEMO_MODEL_DIR
from dots_jax.errors import UserError
from dots_jax.inference.generate import GenerateOutput, generate
from dots_jax.inference.tokenizer import DOTS1_ASSISTANT, DOTS1_SYSTEM, DOTS1_USER, StreamDecoder
from dots_jax.model.padding import pad_for_mesh
from dots_jax.parallel.distributed import is_main_process, maybe_initialize
from dots_jax.parallel.sharding import PADDABLE, check_shardable, make_mesh
from dots_jax.weights import from_pretrained  # HF directories, repo ids and converted checkpoints

DEFAULT_MAX_NEW_TOKENS = 128
DEMO_PROMPT = 'def is_palindrome(text):\n    """Return True if text reads the same backwards."""\n'
END_OF_RESPONSE = "<|endofresponse|>"  # where a dots1 chat turn ends (dots.llm1.inst's chat template)
DIM, RESET = "\x1b[2m", "\x1b[0m"  # ANSI: the prompt, dimmed on a terminal, reads apart from the completion


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m dots_jax.sample", description=__doc__)
    parser.add_argument("--model", metavar="PATH_OR_REPO",
                        help="dots1 checkpoint in HF format: a local directory (config.json, *.safetensors and "
                             "tokenizer.json or tokenizer.model) or a Hugging Face repo id such as "
                             "rednote-hilab/dots.llm1.inst (downloaded into the HF cache; HF_HUB_OFFLINE=1 keeps "
                             "to the cache). Default: the embedded demo model, which writes Python.")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="prompt text; repeat for a batch of prompts. '-' reads the prompt from stdin. "
                             "Default (demo model only): a Python function header.")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message in the checkpoint's chat template "
                             "(tokenizer_config.json or chat_template.jinja; without one, the dots1 format "
                             "<|system|>..<|endofsystem|> <|userprompt|>..<|endofuserprompt|> <|response|>, "
                             "written without the spaces, if the tokenizer has those tokens; refused otherwise), and "
                             "also stop at <|endofresponse|>")
    parser.add_argument("--system", metavar="TEXT",
                        help="system message for --chat (default: the template's, for dots1 "
                             "'You are a helpful assistant.')")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"most tokens to generate per prompt (default {DEFAULT_MAX_NEW_TOKENS}); generation "
                             "also stops at the end-of-sequence token")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature, >= 0; 0 (the default) is greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="sample only among the K most likely tokens; 0 (default) is off")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling: the smallest set of tokens whose probability reaches P, in (0, 1]; "
                             "1 (default) is off")
    parser.add_argument("--min-p", type=float, default=0.0, metavar="P",
                        help="drop tokens less likely than P times the most likely one, in [0, 1]; 0 (default) "
                             "is off")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed of the sampling; default 0")
    parser.add_argument("--dtype", choices=cli.COMPUTE_DTYPES, default="float32",
                        help="dtype of the weights and activations (default float32)")
    cli.add_moe_backend(parser)
    cli.add_attention_backend(parser)
    cli.add_quantize(parser)
    parser.add_argument("--lora", metavar="DIR",
                        help="apply a LoRA adapter in PEFT's layout (adapter/ of `dots_jax.train --lora-rank`, or one "
                             "PEFT saved), merged into the weights as they load")
    cli.add_kv_cache_dtype(parser)
    parser.add_argument("--mesh", metavar="AXIS=SIZE,...",
                        help="shard the model and cache over a device mesh with axes data, fsdp, expert, tensor, "
                             "e.g. expert=8 or fsdp=4,expert=16 (the sizes must multiply to the device count); "
                             "default: one device")
    parser.add_argument("--show-ids", action="store_true",
                        help="after the text, also print the prompt and generated token ids")
    cli.add_distributed(parser, "prints the text")
    return parser


# ----------------------------------------------------------------------------------------- arguments
def check_args(args: argparse.Namespace) -> None:
    """Reject out-of-range values up front, naming the option (the checks are written so that NaN fails)."""
    if args.mesh is not None:
        try:
            args.mesh = make_mesh(args.mesh)
        except ValueError as e:
            raise UserError(f"--mesh {args.mesh}: {e}") from None
    if args.max_new_tokens is not None and not args.max_new_tokens >= 1:
        raise UserError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not args.top_k >= 0:
        raise UserError(f"--top-k must be an integer >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must lie in (0, 1] (1 = off), got {args.top_p}")
    if not 0 <= args.min_p <= 1:
        raise UserError(f"--min-p must lie in [0, 1] (0 = off), got {args.min_p}")
    if args.system is not None and not args.chat:
        raise UserError("--system only applies with --chat")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt values, '-' replaced by stdin (one trailing newline dropped, as `echo` adds one)."""
    prompts = []
    for prompt in args.prompt or []:
        if prompt == "-":
            prompt = sys.stdin.read().removesuffix("\n")
            if prompt == "":
                raise UserError("--prompt -: read an empty prompt from stdin")
        if prompt == "":
            raise UserError("--prompt is empty: give some text")
        prompts.append(prompt)
    return prompts


# -------------------------------------------------------------------------------------------- loading
def check_chat(checkpoint: cli.Checkpoint, model: str) -> None:
    """--chat needs a chat template, or a tokenizer that knows the dots1 chat markers (the built-in format):
    otherwise the markers would be encoded as plain text and the model would continue garbage."""
    tokenizer = checkpoint.tokenizer
    markers = (*DOTS1_SYSTEM, *DOTS1_USER, *DOTS1_ASSISTANT)
    if tokenizer.chat_template is None and any(tokenizer.token_to_id(m) is None for m in markers):
        raise UserError(f"--chat: the model {model} has no chat template (and its tokenizer lacks the dots1 chat "
                        "tokens): drop --chat to complete the prompt as plain text")


def show_prompt(prompt: str, chat: bool) -> None:
    """Print the prompt before its completion: dimmed on a terminal, plain on a pipe (stdout = prompt + text)."""
    text = prompt + ("\n" if chat else "")
    print(f"{DIM}{text}{RESET}" if sys.stdout.isatty() else text, end="", flush=True)


def encode_prompts(prompts: Sequence[str], checkpoint: cli.Checkpoint, args: argparse.Namespace,
                   max_new_tokens: int) -> list[list[int]]:
    tokenizer, context = checkpoint.tokenizer, checkpoint.cfg.max_position_embeddings
    batch = []
    for prompt in prompts:
        if args.chat:
            messages = [{"role": "user", "content": prompt}]
            if args.system is not None:
                messages.insert(0, {"role": "system", "content": args.system})
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except jinja2.TemplateError as e:  # the checkpoint's template failed (or raise_exception'd)
                raise UserError(f"--chat: the chat template of {args.model}: {e}") from None
            # The template writes any BOS itself, so the tokenizer adds nothing.
            ids = tokenizer.encode(text)
        else:
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise UserError(f"--prompt {prompt!r} encodes to no tokens")
        if max(ids) >= checkpoint.cfg.vocab_size:
            raise UserError(f"--prompt encodes to token id {max(ids)}, outside the model's vocabulary of "
                            f"{checkpoint.cfg.vocab_size}: the checkpoint's tokenizer does not fit its model")
        if len(ids) + max_new_tokens > context:
            raise UserError(f"--prompt has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                            f"the model's context of {context} tokens (max_position_embeddings): shorten the "
                            "prompt or lower --max-new-tokens")
        batch.append(ids)
    return batch


# ----------------------------------------------------------------------------------------- generation
class Progress:
    """generate()'s on_tokens callback: notes when the first token arrives and, with a StreamDecoder, prints
    the text of row 0 as it becomes complete."""

    def __init__(self, stream: StreamDecoder | None = None):
        self.stream = stream
        self.first_token_time: float | None = None
        self.was_active: np.ndarray | None = None

    def __call__(self, step: int, tokens: np.ndarray, active: np.ndarray) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        # `active` is after this step: a row that stopped here still produced this step's (stop) token.
        if self.stream is not None and (self.was_active is None or self.was_active[0]):
            print(self.stream.put(int(tokens[0])), end="", flush=True)
        self.was_active = np.array(active, copy=True)


def timing_line(start: float, progress: Progress, end: float, output: GenerateOutput) -> str:
    total = sum(len(t) for t in output.tokens)
    first = progress.first_token_time or end
    line = (f"time to first token {first - start:.2f} s; {total} new tokens in {end - start:.2f} s: "
            f"{total / max(end - start, 1e-9):.1f} tokens/s overall")
    after_first = total - len(output.tokens)  # each row's first token came from the prefill
    if after_first > 0 and end > first:
        line += f", {after_first / (end - first):.1f} tokens/s after the first"
    return line + " (a first run of a shape includes JIT compilation)"


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)


def run_model(args: argparse.Namespace, demo: bool = False) -> int:
    # The model first: a wrong --model is the problem to report, whatever else is missing.
    checkpoint = cli.open_checkpoint(args.model)
    if args.mesh is not None:
        try:
            check_shardable(checkpoint.cfg, args.mesh)
        except ValueError as e:
            raise UserError(f"--mesh: {e}") from None
    if args.chat:
        check_chat(checkpoint, args.model)
    prompts = read_prompts(args)
    if not prompts:
        raise UserError("--model needs at least one --prompt (use --prompt - to read it from stdin)")
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    batch = encode_prompts(prompts, checkpoint, args, max_new_tokens)
    if demo:  # after the checks: a bad input's stderr is its one error line
        print(f"note: no --model given: the embedded demo model ({DEMO_MODEL_DIR}), a small dots1 model trained "
              "on the Python standard library; pass --model for a real checkpoint", file=sys.stderr)
    stops = set(checkpoint.stop_token_ids)
    if args.chat and checkpoint.tokenizer.token_to_id(END_OF_RESPONSE) is not None:
        stops.add(checkpoint.tokenizer.token_to_id(END_OF_RESPONSE))

    start = time.perf_counter()
    model = from_pretrained(checkpoint.directory, mesh=args.mesh, dtype=cli.DTYPES[args.dtype],
                            moe_backend=args.moe_backend, attention_backend=args.attention_backend,
                            progress=sys.stderr.isatty(), quantize=args.quantize, lora=args.lora)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s on {jax.devices()[0].platform}",
          file=sys.stderr)
    if args.mesh is not None:
        # Widths the mesh's tensor axis does not divide (or not into lane-sized slices) are zero-padded: exact.
        padded = pad_for_mesh(model, args.mesh)
        if padded is not model:
            grown = [f"{field} {getattr(model.cfg, field)} -> {getattr(padded.cfg, field)}" for field in PADDABLE
                     if getattr(padded.cfg, field) != getattr(model.cfg, field)]
            print(f"note: zero-padded {', '.join(grown)} for the mesh's tensor axis (the logits do not change)",
                  file=sys.stderr)
        model = padded

    tokenizer = checkpoint.tokenizer
    progress = Progress(StreamDecoder(tokenizer, skip_special_tokens=True) if len(batch) == 1 else None)
    if progress.stream is not None:
        show_prompt(prompts[0], args.chat)
    start = time.perf_counter()
    output = generate(model, batch, max_new_tokens=max_new_tokens, stop_token_ids=sorted(stops),
                      on_tokens=progress, mesh=args.mesh, kv_cache_dtype=args.kv_cache_dtype,
                      **sampling_kwargs(args))
    end = time.perf_counter()

    if progress.stream is not None:
        print(progress.stream.flush())
    else:
        for i, (prompt, tokens) in enumerate(zip(prompts, output.tokens, strict=True), 1):
            label = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            print(f"=== [{i}] {label!r}")
            show_prompt(prompt, args.chat)
            print(tokenizer.decode(tokens, skip_special_tokens=True))
    if args.show_ids:
        for i, (prompt_ids, tokens) in enumerate(zip(batch, output.tokens, strict=True), 1):
            print(f"[{i}] prompt ids: {prompt_ids}")
            print(f"[{i}] generated ids: {tokens}")
    print(timing_line(start, progress, end, output), file=sys.stderr)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    maybe_initialize(args.distributed)  # before any other JAX call (check_args builds the mesh)
    check_args(args)
    demo = args.model is None
    if demo:
        args.model = str(DEMO_MODEL_DIR)
        args.prompt = args.prompt or [DEMO_PROMPT]
    # Every process of a multi-process run generates the same text: process 0 prints it. stderr (notes,
    # errors) stays per process, so that a failure on any host shows.
    with contextlib.nullcontext() if is_main_process() else contextlib.redirect_stdout(io.StringIO()):
        return run_model(args, demo)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dots_jax.sample ...`; returns the exit code (2 for bad input, with one `error:` line)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
