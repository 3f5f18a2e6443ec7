"""The README's planner tables: `python -m dots_jax.plan` for the released 142B model on several TPU slices.

    python benchmarks/plan_table.py            # prints markdown tables, writes benchmarks/results/plan_table.json
    python benchmarks/plan_table.py --resume   # keeps the rows already in the JSON, compiles the others

Each row is one ahead-of-time TPU compile on this (CPU) machine: 30 s to a few minutes each on a small one (a
serve row two or three: the step again with the page pool it reports). The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path: scripts run from it)

from dots_jax.plan import SERVE_TABLE_HEADER, TABLE_HEADER, plan, serve_table_row, table_row  # noqa: E402


class Row(NamedTuple):
    topology: str
    mesh: str
    mode: str
    batch: int
    seq: int
    remat: bool = False
    quantize: str | None = None
    kv_cache_dtype: str | None = None
    lora_rank: int | None = None


ROWS = [Row(*row) for row in [
    ("v5p:4x4x4", "expert=16,fsdp=4", "decode", 64, 4096, False),
    ("v5p:4x4x4", "expert=16,fsdp=4", "prefill", 8, 4096, False),
    ("v5e:8x8", "expert=16,fsdp=4", "decode", 64, 4096, False),
    ("v5e:8x8", "expert=16,fsdp=4", "decode", 64, 1024, False),
    ("v5e:8x8", "expert=16,fsdp=4", "prefill", 8, 4096, False),
    ("v5e:16x16", "expert=64,fsdp=4", "decode", 256, 4096, False),
    ("v5e:16x16", "expert=64,fsdp=4", "prefill", 16, 4096, False),
    ("v6e:8x8", "expert=16,fsdp=4", "decode", 64, 4096, False),
    ("v6e:8x8", "expert=16,fsdp=4", "prefill", 8, 4096, False),
    ("v5p:4x4x8", "expert=16,fsdp=8", "train", 128, 128, False),
    # LoRA (rank 16 on every target, the routed experts included) on a frozen base beside full training: the same
    # step on 64 chips, with and without remat; LoRA at SFT length (64 x 4096); 16 chips, where full training's f32
    # state alone exceeds the HBM; an int8 base (QLoRA) on 8 chips
    ("v5p:4x4x4", "expert=16,fsdp=4", "train", 128, 128, False),
    ("v5p:4x4x4", "expert=16,fsdp=4", "train", 128, 128, False, None, None, 16),
    ("v5p:4x4x4", "expert=16,fsdp=4", "train", 128, 128, True),
    ("v5p:4x4x4", "expert=16,fsdp=4", "train", 128, 128, True, None, None, 16),
    ("v5p:4x4x4", "expert=16,fsdp=4", "train", 64, 4096, True, None, None, 16),
    ("v5p:2x2x4", "expert=8,fsdp=2", "train", 128, 128, True),
    ("v5p:2x2x4", "expert=8,fsdp=2", "train", 128, 128, True, None, None, 16),
    ("v5p:2x2x2", "expert=8", "train", 128, 128, True, "int8", None, 16),
    # Long context, splash attention (the planner compiles with it)
    ("v5p:4x4x4", "expert=16,fsdp=4", "prefill", 1, 32768, False),
    ("v5p:4x4x4", "expert=8,fsdp=8", "train", 8, 8192, False),
    ("v5p:4x4x4", "expert=8,fsdp=8", "train", 8, 8192, True),
    # Serving: the engine's decode step and the KV pages that fit beside it (a second table)
    ("v5p:4x4x4", "expert=16,fsdp=4", "serve", 64, 4096, False),
    # int8 weights and an int8 KV cache: the 142B model on half the chips (int8 weights alone do not fit there)
    ("v5e:4x8", "expert=8,fsdp=4", "decode", 64, 4096, False, "int8"),
    ("v5e:4x8", "expert=8,fsdp=4", "decode", 64, 4096, False, "int8", "int8"),
    ("v6e:4x4", "expert=8,fsdp=2", "decode", 64, 4096, False, "int8", "int8"),
]]
OUT = Path(__file__).resolve().parent / "results" / "plan_table.json"


def _key(r: dict) -> Row:
    return Row(r["topology"], r["mesh"], r["mode"], r["batch"], r["seq"], r.get("remat", False), r.get("quantize"),
               r.get("kv_cache_dtype"), r.get("lora_rank"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the JSON")
    args = parser.parse_args(argv)
    done = {}
    if args.resume and OUT.is_file():
        done = {_key(r): r for r in json.loads(OUT.read_text())["rows"]}
    reports = []
    for row in ROWS:
        if row in done:
            reports.append(done[row])
            continue
        t0 = time.perf_counter()
        r = plan(row.topology, row.mesh, row.batch, row.seq, row.mode, remat=row.remat, quantize=row.quantize,
                 kv_cache_dtype=row.kv_cache_dtype, lora_rank=row.lora_rank)
        extras = " ".join(x for x in ("remat" if row.remat else "", row.quantize and "int8 weights",
                                      row.kv_cache_dtype and "int8 KV", row.lora_rank and f"LoRA r={row.lora_rank}")
                          if x)
        what = f"{row.topology} {row.mesh} {row.mode} {extras} {row.batch}x{row.seq}"
        print(f"{what}: {'fits' if r['fits'] else 'does not fit'} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        reports.append(r)
        write_results(OUT, {"model": "dots.llm1.inst (142B)", "rows": reports})
    # Every row once more: with --resume the rows kept after the last compiled one were not written yet.
    write_results(OUT, {"model": "dots.llm1.inst (142B)", "rows": reports})
    print(TABLE_HEADER)
    for r in reports:
        if r["mode"] != "serve":
            print(table_row(r))
    print()
    print(SERVE_TABLE_HEADER)
    for r in reports:
        if r["mode"] == "serve":
            print(serve_table_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
