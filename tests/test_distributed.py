"""Multi-process runs: when jax.distributed.initialize() is called (environment, --distributed), and two real CPU
processes on localhost, 2 simulated devices each, joined into one 4-device mesh: the tiny model's logits and a
`python -m dots_jax.train --mesh` run against the single-process, single-device model; only process 0 writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from conftest import run_cli

from dots_jax.parallel import distributed

SINGLE_PROCESS_ENVIRONMENTS = [
    {},
    {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"},  # an sbatch script running one process
    {"SLURM_STEP_NUM_TASKS": "1"},
    {"TPU_WORKER_HOSTNAMES": "localhost"},  # a single-host TPU VM
    {"CLOUD_TPU_TASK_ID": "0", "TPU_WORKER_ID": "0"},
    # What libtpu leaves in the environment of a machine without a TPU (inherited by child processes).
    {"TPU_WORKER_HOSTNAMES": "WARNING: could not determine TPU worker hostnames or IP addresses, please set env var "
                             "`TPU_WORKER_HOSTNAMES` manually, otherwise libtpu.so may not properly initialize."},
]
MULTI_PROCESS_ENVIRONMENTS = [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, "TPU_WORKER_HOSTNAMES"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "TPU_PROCESS_ADDRESSES"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "MEGASCALE_COORDINATOR_ADDRESS"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}, "SLURM_STEP_NUM_TASKS"),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, "OMPI_COMM_WORLD_SIZE"),
]


@pytest.mark.parametrize("environ", SINGLE_PROCESS_ENVIRONMENTS)
def test_single_process_runs_are_left_alone(environ, monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.multiprocess_signal(environ) is None
    assert distributed.maybe_initialize(environ=environ) is False and calls == []


@pytest.mark.parametrize("environ, signal", MULTI_PROCESS_ENVIRONMENTS)
def test_multi_process_environments_initialize(environ, signal, monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.multiprocess_signal(environ) == signal
    assert distributed.maybe_initialize(environ=environ) is True
    assert calls == [{"num_processes": None, "process_id": None}]  # jax's cluster detection fills them in


def test_flag_forces_it_and_process_numbers_are_passed_on(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.maybe_initialize(True, environ={}) is True
    environ = {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.maybe_initialize(environ=environ) is True
    assert calls == [{"num_processes": None, "process_id": None}, {"num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize("module", ["sample", "train", "serve"])
def test_clis_initialize_before_touching_jax(module, monkeypatch):
    """--distributed reaches maybe_initialize, and nothing before it starts a JAX backend (the CLIs' imports
    included): afterwards jax.distributed.initialize() would fail."""
    code = textwrap.dedent(f"""
        import jax
        from jax._src import xla_bridge
        import dots_jax.parallel.distributed, dots_jax.{module} as cli
        seen = []
        def maybe_initialize(force=False):
            seen.append((force, dict(xla_bridge._backends)))
            raise SystemExit(0)
        cli.maybe_initialize = maybe_initialize
        try:
            cli.main({{"sample": ["--distributed", "--prompt", "x"], "serve": ["--distributed"],
                      "train": ["--distributed", "--config", "tiny", "--data", "x", "--steps", "1", "--out", "y"]
                      }}["{module}"])
        except SystemExit:
            pass
        assert seen == [(True, {{}})], seen
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr[-3000:]


# ------------------------------------------------------------------------------ two processes on localhost
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(argv: list[str], timeout: float = 480) -> list[subprocess.CompletedProcess]:
    """argv run as processes 0 and 1 of one JAX job (2 CPU devices each), found through the environment alone
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), as a launcher would start them."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "JAX_COORDINATOR_ADDRESS":
            f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen(argv, env={**base, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return results


WORKER = """
import json
import dataclasses
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from dots_jax.parallel import distributed
from dots_jax.parallel import sharding
from dots_jax.config import preset
from dots_jax.model.modeling import random_model

assert distributed.maybe_initialize()  # from the environment
cfg = dataclasses.replace(preset("tiny"), num_hidden_layers=2, layer_types=(), initializer_range=0.1)
model = random_model(cfg, seed=3, moe_backend="gather")
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16), dtype=np.int32)
graphdef, state = nnx.split(model)
forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
want = np.asarray(forward(state, ids))  # the oracle: this process's own device, alone
mesh = sharding.make_mesh("data=2,expert=2")  # spans both processes
with jax.set_mesh(mesh):
    got = forward(sharding.shard_state(state, mesh), ids)
got = multihost_utils.process_allgather(got, tiled=True)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                  "local_devices": jax.local_device_count(),
                  "rel_err": float(np.abs(got - want).max() / np.abs(want).max())}))
"""


def test_two_processes_logits_over_one_mesh_match_one_device():
    results = run_two_processes([sys.executable, "-c", WORKER])
    reports = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    for i, report in enumerate(reports):
        assert (report["process"], report["processes"], report["devices"], report["local_devices"]) == (i, 2, 4, 2)
        assert report["rel_err"] <= 1e-5, report


def test_two_process_training_matches_one_device_and_only_process_0_writes(tmp_path: Path):
    from dots_jax.train import main

    data = tmp_path / "corpus.txt"
    data.write_text("def add(a, b):\n    return a + b\n" * 200)
    args = ["--config", "tiny", "--data", str(data), "--steps", "2", "--batch", "4", "--seq-len", "32",
            "--eval-fraction", "0", "--save-every", "2"]  # no eval: one program less to compile
    code, _, err = run_cli(main, [*args, "--out", str(tmp_path / "one")])  # the oracle: one process, one device
    assert code == 0, err

    results = run_two_processes([sys.executable, "-m", "dots_jax.train", *args, "--mesh", "data=2,expert=2",
                                 "--out", str(tmp_path / "two")])
    assert "step 2: train loss" in results[0].stdout
    # Gloo's own logging ("[Gloo] Rank 1 is connected to 3 peer ranks. ..."), whose lines its threads sometimes
    # break apart, is not the CLI's output.
    assert [line for line in results[1].stdout.splitlines()
            if not line.startswith("[Gloo]") and "peer ranks" not in line and line.strip()] == []
    assert all("train: 100%" in r.stderr for r in results)  # both trained; progress stays on each stderr
    out = tmp_path / "two"
    assert (out / "loss_curve.png").is_file() and (out / "hf" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "2").is_dir()

    def records(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    want, got = records("one"), records("two")
    assert [sorted(r) for r in got] == [sorted(r) for r in want]  # each record once: only process 0 wrote
    for w, g in zip(want, got, strict=True):
        for key in ("loss", "ce", "balance_loss", "grad_norm"):
            assert abs(g[key] - w[key]) <= 1e-5 * abs(w[key]), (key, g, w)


ENGINE_WORKER = """
import dataclasses
import json
import jax
import numpy as np
from dots_jax.config import preset
from dots_jax.inference.engine import Engine, RequestParams
from dots_jax.inference.generate import generate
from dots_jax.model.modeling import random_model
from dots_jax.parallel import distributed

assert distributed.maybe_initialize()  # from the environment
cfg = dataclasses.replace(preset("tiny"), num_hidden_layers=2, layer_types=(), initializer_range=0.1)
model = random_model(cfg, seed=3, moe_backend="gather")
rng = np.random.default_rng(0)
prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 19, 11)]
engine = Engine(model, max_batch=2, page_size=8, mesh="expert=4")  # one mesh over both processes
if jax.process_index() == 0:
    got = [c.token_ids for c in engine.generate(prompts, RequestParams(max_tokens=5, ignore_eos=True))]
    engine.stop()  # releases the other process
    # The oracle: the static generate on this process's own device, alone.
    want = [generate(model, [p], max_new_tokens=5, stop_token_ids=[]).tokens[0] for p in prompts]
    print(json.dumps({"got": got, "want": want}))
else:
    engine.follow()
    print(json.dumps({"followed": True}))
"""


def test_two_process_engine_serves_from_process_0_in_lockstep():
    """Multi-host serving's engine half: process 0 schedules and broadcasts each call, process 1 follows, and
    the tokens are the single-device model's."""
    results = run_two_processes([sys.executable, "-c", ENGINE_WORKER])
    leader = json.loads(results[0].stdout.strip().splitlines()[-1])
    assert leader["got"] == leader["want"]
    assert json.loads(results[1].stdout.strip().splitlines()[-1]) == {"followed": True}
