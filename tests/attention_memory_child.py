"""One measurement for tests/test_attention_memory.py, run as its own process so that its peak RSS is its own:
build a small random model, run one forward pass over a prompt, or one training step's loss and gradients, and print
{"peak_rss_mb", "seconds"} as JSON on the last line. The peak covers the whole process (imports, compiles, run).

    python tests/attention_memory_child.py --config '<HF config JSON>' --mode forward|train --seq N --backend NAME
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="HF-style config JSON")
    parser.add_argument("--mode", choices=("forward", "train"), required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args()
    start = time.perf_counter()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dots_jax.config import Dots1Config
    from dots_jax.model.modeling import RouterBias, abstract_model
    from dots_jax.training.data import Batch
    from dots_jax.training.step import loss_fn

    cfg = Dots1Config.from_hf(json.loads(args.config))
    # Random weights drawn in numpy: random_model would compile an init program, seconds of no interest here.
    graphdef, abstract = nnx.split(abstract_model(cfg, attention_backend=args.backend))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype), abstract)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, args.seq + 1)), jnp.int32)
    if args.mode == "forward":
        result = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))(state, ids[:, :-1])
    else:  # the training step's loss and its gradients (the optimizer's update adds nothing that grows with S)
        graphdef, params, router_bias = nnx.split(nnx.merge(graphdef, state), nnx.Param, RouterBias)
        batch = Batch(ids[:, :-1], ids[:, 1:], jnp.ones((1, args.seq), jnp.float32))
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(2, 4))
        result = grad_fn(params, router_bias, graphdef, batch, 1e-4)
    jax.block_until_ready(result)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
