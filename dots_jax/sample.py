"""`python -m dots_jax.sample`: for now, one forward pass (text generation comes with the generation issue).

With no --model it builds the tiny random model of configs/tiny.json; with --model it loads an HF dots1
checkpoint (local directory or repo id). It prints the logits' shape and the greedy next token at each position.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dots_jax.config import preset
from dots_jax.hf_weights import from_pretrained
from dots_jax.model import Dots1ForCausalLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dots_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF dots1 checkpoint: a local directory or a repo id. Default: the tiny "
                                        "random model of configs/tiny.json (no text generation yet).")
    parser.add_argument("--ids", default="1,2,3,4,5,6,7,8",
                        help="comma-separated input token ids (tokenizers arrive with the generation issue)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="activation and weight dtype")
    parser.add_argument("--moe-backend", default="auto", help="grouped-matmul backend: auto, loop, ragged_dot, dense")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tiny model")
    args = parser.parse_args(argv)

    dtype = DTYPES[args.dtype]
    try:
        ids = np.asarray([[int(t) for t in args.ids.split(",")]], np.int32)
    except ValueError:
        parser.error(f"--ids must be comma-separated integers, got {args.ids!r}")

    start = time.perf_counter()
    if args.model:
        model = from_pretrained(args.model, dtype=dtype, moe_backend=args.moe_backend)
        source = args.model
    else:
        cfg = preset("tiny")
        model = Dots1ForCausalLM(cfg, dtype=dtype, moe_backend=args.moe_backend, rngs=nnx.Rngs(args.seed))
        source = "configs/tiny.json (random weights)"
    if ids.max() >= model.cfg.vocab_size or ids.min() < 0:
        parser.error(f"--ids must lie in [0, {model.cfg.vocab_size}) for this model")
    loaded = time.perf_counter()

    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    logits.block_until_ready()
    done = time.perf_counter()

    print(f"model: {source} on {jax.devices()[0].platform}")
    print(f"input ids:          {ids[0].tolist()}")
    print(f"logits:             shape {tuple(logits.shape)}, dtype {logits.dtype}")
    print(f"greedy next tokens: {np.asarray(jnp.argmax(logits[0], axis=-1)).tolist()}")
    print("note: one forward pass only; text generation arrives with the generation issue.")
    print(f"load {loaded - start:.2f}s, compile+forward {done - loaded:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
