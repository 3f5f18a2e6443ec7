"""benchmarks/generate_gpu.py and benchmarks/serve_gpu.py on the CPU: their dry runs go through every phase and
write results of the shape the GPU session will read, and without a GPU a real run stops with exit code 2 and one
`error:` line, writing nothing. (The GPU measurements themselves need the device machine: benchmarks/gpu_session.sh.)

The three runs are subprocesses, as the GPU session starts them, launched together: each is mostly one thread of
compiling, so together they take about as long as the longest.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHEAP_COMPILE

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    tmp = tmp_path_factory.mktemp("gpu_benchmarks")
    # The benchmarks run as users run them: without the suite's cheap-compile XLA_FLAGS (conftest), which every child
    # process would otherwise inherit.
    flags = os.environ.get("XLA_FLAGS", "").replace(CHEAP_COMPILE, "").strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    jobs = {"generate_dry": ("generate_gpu.py", "--dry-run"), "serve_dry": ("serve_gpu.py", "--dry-run"),
            "no_gpu": ("generate_gpu.py",)}  # serve_gpu.py refuses by the same function (gpu_problem)
    procs = {}
    for name, (script, *args) in jobs.items():
        out = tmp / f"{name}.json"
        procs[name] = (subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                                        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                       out)
    done = {}
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return done


def dry_result(runs: dict, name: str) -> dict:
    result, out = runs[name]
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_generate_gpu_dry_run(runs: dict) -> None:
    payload = dry_result(runs, "generate_dry")
    assert {"machine", "settings", "model", "greedy", "results"} <= payload.keys() and payload["complete"] is True
    machine = payload["machine"]
    assert CHEAP_COMPILE not in machine["xla_flags"], "the benchmark ran with the test suite's cheap-compile flags"
    for key in ("device", "torch_device", "driver", "jax", "jaxlib", "torch", "transformers", "loadavg_1_5_15_start",
                "loadavg_1_5_15_end"):
        assert key in machine
    assert payload["settings"]["dry_run"] is True
    model = payload["model"]
    assert 0 < model["active_params"] < model["params"]
    assert model["moe_backend"] == "auto" and model["dtype"] == "bfloat16"
    assert model["ref_attn_implementation"] == "sdpa" and model["ref_experts_implementation"]
    greedy = payload["greedy"]
    assert len(greedy["ours"]) == len(greedy["ref"]) == greedy["tokens"] == 16
    assert 0.0 <= greedy["fraction_equal"] <= 1.0
    assert (greedy["first_divergence"] is None) == greedy["equal"]
    rows = {r["phase"]: r for r in payload["results"]}
    assert set(rows) == {"prefill_64", "prefill_128", "decode_b1", "decode_b4"}
    for phase, r in rows.items():
        for key in ("ours_tok_s", "ref_tok_s", "ratio"):
            assert positive_finite(r[key]), (phase, key, r[key])
        assert r["ratio"] == pytest.approx(r["ours_tok_s"] / r["ref_tok_s"])
    assert rows["decode_b1"]["target"] == 3.0 and rows["prefill_64"]["target"] == 1.5


def test_serve_gpu_dry_run(runs: dict) -> None:
    payload = dry_result(runs, "serve_dry")
    assert {"machine", "settings", "model", "decode_step"} <= payload.keys() and payload["complete"] is True
    assert positive_finite(payload["machine"]["copy_bandwidth_GB_s"])
    rows = payload["decode_step"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        for key in ("engine_ms", "transformers_ms", "engine_tok_s", "transformers_tok_s", "ratio", "floor_tok_s",
                    "engine_fraction_of_floor"):
            assert positive_finite(r[key]), (r["batch"], key, r[key])


def test_refuses_without_gpu(runs: dict) -> None:
    result, out = runs["no_gpu"]
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs a GPU" in errors[0], result.stderr[-3000:]
    assert not out.exists()
