"""Multi-process (multi-host) start-up: `jax.distributed.initialize()` when this process is one of several.

On a TPU pod slice, a multi-node GPU job or a group of CPU processes, every process runs the same program, and
JAX must connect them before anything touches a device: afterwards `jax.devices()` lists every process's devices
and a mesh can span them. `maybe_initialize()` is the first JAX call of `python -m dots_jax.sample` and
`python -m dots_jax.train`. It initializes when asked (their `--distributed`) or when the environment says this
process is one of several; a single-process run is left exactly as it was.

jax.distributed.initialize() finds the coordinator, the process count and this process's id itself on Cloud TPU,
Slurm and Open MPI. Anywhere else, set JAX_COORDINATOR_ADDRESS (host:port of process 0, which jax reads itself),
JAX_NUM_PROCESSES and JAX_PROCESS_ID (which this module passes on) in every process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1"))
    except ValueError:
        return 1


def multiprocess_signal(environ: Mapping[str, str] = os.environ) -> str | None:
    """The environment variable that says this process is one of several, or None (a single-process run).

    Only signals that hold for every process of a multi-process job and for none of a single-process run: a
    coordinator address; a TPU slice with several workers, or several slices; a Slurm step (srun) or an Open MPI
    job of several tasks. Not SLURM_NTASKS: an sbatch script that starts one process has it too; not
    CLOUD_TPU_TASK_ID: a worker's number says nothing of how many there are (and libtpu sets it to a warning
    text on machines without a TPU). On a Cloud TPU VM pod whose workers only the metadata server knows, pass
    --distributed.
    """
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):  # comma-separated, one entry per worker
        value = environ.get(name, "")
        # libtpu, starting on a machine that is no TPU VM, fills TPU variables with "WARNING: could not
        # determine ..., please set ..." (commas included), and child processes inherit them.
        if len(value.split(",")) > 1 and not value.startswith("WARNING"):
            return name
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):  # multislice: always several processes
        return "MEGASCALE_COORDINATOR_ADDRESS"
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        if _count(environ, name) > 1:
            return name
    return None


def maybe_initialize(force: bool = False, environ: Mapping[str, str] = os.environ) -> bool:
    """Call jax.distributed.initialize() if `force` or multiprocess_signal() finds a multi-process run; returns
    whether it did. Call it before any other JAX call (jax.devices(), creating an array, ...): JAX connects the
    processes only before its backends start."""
    if not force and multiprocess_signal(environ) is None:
        return False
    # None lets jax fill them in: from its cluster detection (TPU, Slurm, Open MPI) or, for the address,
    # from JAX_COORDINATOR_ADDRESS.
    num_processes, process_id = environ.get("JAX_NUM_PROCESSES"), environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=None if num_processes is None else int(num_processes),
                               process_id=None if process_id is None else int(process_id))
    return True


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the one that prints results and writes output files.
    Orbax checkpoints are the exception: every process takes part in writing them."""
    return jax.process_index() == 0
