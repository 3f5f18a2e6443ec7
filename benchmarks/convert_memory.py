"""Peak memory and wall time of `python -m convert.hf_to_jax` on a synthetic multi-shard checkpoint.

    python benchmarks/convert_memory.py                 # ~4.6 GB in 10 shards; table + results/convert_memory.json
    python benchmarks/convert_memory.py --moe-layers 3  # smaller, for a quick look

The checkpoint is dots1 scaled down (hidden 2048, 16 heads x 128, 64 experts of width 704, 2 shared experts,
layer 0 dense), written here in bf16 with the correction bias in f32, in shards of at most --shard-mb. Weights
are slices of one random pool, so they compress like real weights (barely) without minutes of RNG.

Measured: the conversion subprocess's peak RSS (os.wait4's ru_maxrss, which counts the file pages it has mapped
too), against the acceptance bound largest shard + 1 GB; its wall time against `cp -r` of the same directory
(the bytes merely read and written once). Both read the source from the page cache (it was just written): the
comparison is of the work each does, not of the disk. Everything is written under a temporary directory that
is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)

from dots_jax.config import Dots1Config  # noqa: E402
from dots_jax.weights.safetensors_io import save_file  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
GB = 10**9


def synthetic_config(moe_layers: int) -> dict:
    cfg = dict(model_type="dots1", architectures=["Dots1ForCausalLM"], vocab_size=32768, hidden_size=2048,
               intermediate_size=5472, moe_intermediate_size=704, num_hidden_layers=1 + moe_layers,
               num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6,
               n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
               rms_norm_eps=1e-5, rope_theta=1e7, max_position_embeddings=4096, sliding_window=None,
               tie_word_embeddings=False, torch_dtype="bfloat16")
    Dots1Config.from_hf(cfg)  # the reader accepts it
    return cfg


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(HF name, shape, dtype) of every tensor, in the order a checkpoint stores them (layer by layer)."""
    h, e, i, v = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * 128
    out = [("model.embed_tokens.weight", (v, h), BF16)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,), BF16), (p + "post_attention_layernorm.weight", (h,), BF16)]
        out += [(p + f"self_attn.{n}_proj.weight", (q, h), BF16) for n in "qkv"]
        out += [(p + "self_attn.o_proj.weight", (h, q), BF16)]
        out += [(p + f"self_attn.{n}_norm.weight", (128,), BF16) for n in "qk"]
        if layer < cfg["first_k_dense_replace"]:
            w = cfg["intermediate_size"]
            out += [(p + "mlp.gate_proj.weight", (w, h), BF16), (p + "mlp.up_proj.weight", (w, h), BF16),
                    (p + "mlp.down_proj.weight", (h, w), BF16)]
            continue
        s = i * cfg["n_shared_experts"]
        out += [(p + "mlp.gate.weight", (e, h), BF16), (p + "mlp.gate.e_score_correction_bias", (e,),
                                                          np.dtype(np.float32))]
        out += [(p + f"mlp.shared_experts.{n}_proj.weight", (s, h), BF16) for n in ("gate", "up")]
        out += [(p + "mlp.shared_experts.down_proj.weight", (h, s), BF16)]
        for x in range(e):
            out += [(p + f"mlp.experts.{x}.{n}_proj.weight", (i, h), BF16) for n in ("gate", "up")]
            out += [(p + f"mlp.experts.{x}.down_proj.weight", (h, i), BF16)]
    out += [("model.norm.weight", (h,), BF16), ("lm_head.weight", (v, h), BF16)]
    return out


def write_checkpoint(directory: Path, cfg: dict, shard_bytes: int) -> list[int]:
    """Write the synthetic checkpoint; returns the shard sizes in bytes."""
    pool = np.random.default_rng(0).standard_normal(96 * 2**20, dtype=np.float32).astype(BF16)  # 192 MB
    tensors = tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * t[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, offset = {}, 0
    for name, shard in zip(names, shards, strict=True):
        arrays = {}
        for key, shape, dtype in shard:
            n = int(np.prod(shape))
            start = offset % (pool.size - n)
            offset += 7919 * 13  # a different slice of the pool for every tensor
            arrays[key] = pool[start:start + n].reshape(shape).astype(dtype)
            weight_map[key] = name
        save_file(arrays, directory / name, metadata={"format": "pt"})
    total = sum(int(np.prod(s)) * d.itemsize for _, s, d in tensors)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return [(directory / n).stat().st_size for n in names]


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of a child process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode  # ru_maxrss is in KiB on Linux


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moe-layers", type=int, default=7, help="MoE layers (each ~0.6 GB); default 7 = 4.6 GB")
    parser.add_argument("--shard-mb", type=int, default=500, help="largest shard, MB (default 500)")
    parser.add_argument("--tmp", default=None, help="scratch directory (default: the system temp dir)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_memory.json"))
    args = parser.parse_args()

    cfg = synthetic_config(args.moe_layers)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="convert_memory_") as tmp:
        tmp = Path(tmp)
        src = tmp / "hf"
        src.mkdir()
        t0 = time.perf_counter()
        shards = write_checkpoint(src, cfg, args.shard_mb * 10**6)
        print(f"wrote {len(shards)} shards, {sum(shards) / GB:.2f} GB in {time.perf_counter() - t0:.0f} s",
              flush=True)
        cp_wall, cp_rss, _ = run_measured(["cp", "-r", str(src), str(tmp / "copy")])
        shutil.rmtree(tmp / "copy")
        conv_wall, conv_rss, code = run_measured([sys.executable, "-m", "convert.hf_to_jax", "--src", str(src),
                                                  "--dst", str(tmp / "jax"), "--no-progress"])
        if code != 0:
            raise SystemExit(f"conversion failed with exit code {code}")
        out_bytes = du(tmp / "jax")

    total, largest = sum(shards), max(shards)
    bound = largest + GB
    result = {
        "meta": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "config": {k: cfg[k] for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                                               "num_hidden_layers", "vocab_size")}},
        "results": {"shards": len(shards), "total_bytes": total, "largest_shard_bytes": largest,
                    "converted_bytes": out_bytes, "peak_rss_bytes": conv_rss, "bound_bytes": bound,
                    "within_bound": conv_rss <= bound, "convert_s": conv_wall, "cp_s": cp_wall,
                    "convert_over_cp": conv_wall / cp_wall, "convert_gb_per_s": total / GB / conv_wall},
    }
    write_results(args.out, result)
    r = result["results"]
    print("\n| checkpoint | peak RSS | bound (largest shard + 1 GB) | convert | cp -r | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| {r['shards']} shards, {total / GB:.2f} GB (largest {largest / GB:.2f} GB) | {conv_rss / GB:.2f} GB | "
          f"{bound / GB:.2f} GB ({'ok' if r['within_bound'] else 'EXCEEDED'}) | {conv_wall:.1f} s "
          f"({r['convert_gb_per_s']:.2f} GB/s) | {cp_wall:.1f} s | {r['convert_over_cp']:.1f}x |")
    print(f"converted checkpoint: {out_bytes / GB:.2f} GB (Orbax, zstd); results in {args.out}")


if __name__ == "__main__":
    main()
