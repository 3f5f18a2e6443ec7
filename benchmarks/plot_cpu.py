"""The CPU throughput plot (docs/throughput_cpu.png): dots_jax over transformers for every phase measured by
benchmarks/generate_cpu.py and benchmarks/train_cpu.py, read from their JSON results.

    python benchmarks/plot_cpu.py [--generate benchmarks/results/generate_cpu.json]
                                  [--train benchmarks/results/train_cpu.json] [--out docs/throughput_cpu.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bars(generate: dict, train: dict) -> list[tuple[str, float]]:
    """(label, ours / reference tokens per second) per measured phase, in the results' order."""
    out = []
    for r in generate["results"]:
        name = f"{r['config']} {r['params_M']:.0f}M"
        for key, value in r.items():
            if key.endswith("_tok_s") and isinstance(value, dict):
                phase = key.removesuffix("_tok_s").replace("_", " ")
                out.append((f"{name}\n{phase}", value["ours"] / value["ref"]))
    for r in train["results"]:
        out.append((f"{r['config']} {r['params_M']}M\ntrain {r['batch']}x{r['seq']}", r["ratio"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate", default="benchmarks/results/generate_cpu.json")
    parser.add_argument("--train", default="benchmarks/results/train_cpu.json")
    parser.add_argument("--out", default="docs/throughput_cpu.png")
    args = parser.parse_args()
    data = bars(json.loads(Path(args.generate).read_text()), json.loads(Path(args.train).read_text()))
    labels = [label for label, _ in data]
    ratios = [ratio for _, ratio in data]
    fig, ax = plt.subplots(figsize=(max(8.5, 0.85 * len(data)), 3.8))
    colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    ax.bar(range(len(data)), ratios, color=colors)
    for i, r in enumerate(ratios):
        ax.text(i, r, f"{r:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(data)), labels, fontsize=7.5)
    ax.set_ylabel("dots_jax tok/s / transformers tok/s")
    ax.set_title("CPU throughput against the reference, f32 (2-core x86_64; benchmarks/generate_cpu.py, "
                 "train_cpu.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
