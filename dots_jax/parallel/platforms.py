"""Keep libtpu from probing for a TPU on a machine that has none.

The [test] and [tpu] extras install libtpu. JAX then initialises its TPU backend on every start, and on a machine
without a TPU libtpu prints five lines to stderr (host bounds, an `E0000 ... unexpected worker hostname` error, a
source-location trace) before JAX falls back to the CPU: above every CLI's output and its one `error:` line.
steer() runs when this module is imported (dots_jax imports it first), before any backend exists: with no
JAX_PLATFORMS (or jax_platforms) chosen by the user and no sign of a TPU on this machine, it restricts JAX to the
GPU plugins that are installed plus the CPU. A TPU machine, or a user who chose the platforms, is left alone.
The planner (dots_jax.plan) compiles for TPU topologies through jax.experimental.topologies, which loads libtpu
directly and does not need the TPU backend.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

# Set on TPU VMs (and by users pointing libtpu at a slice); any of them means "a TPU may be here". Not
# TPU_SKIP_MDS_QUERY or TPU_ML_PLATFORM: JAX sets those itself (the first exactly when it finds no TPU chip), and a
# child of a JAX process inherits them.
TPU_ENV_VARS = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of this vendor (what jax's own hardware probe reads)


def has_tpu() -> bool:
    """True when this machine may have a TPU: a TPU device node, a Google PCI device, or a TPU environment."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    if any(os.environ.get(name) for name in TPU_ENV_VARS):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def gpu_platforms() -> list[str]:
    """The GPU platforms whose JAX plugin is installed (JAX itself skips cuda where no NVIDIA GPU is visible).
    Naming a platform without its plugin would make JAX fail, so only installed ones are listed."""
    names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    if importlib.util.find_spec("jax_plugins") is not None:
        import pkgutil

        import jax_plugins

        names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    return [platform for platform in ("cuda", "rocm") if any(platform in name for name in names)]


def steer() -> None:
    """Leave the TPU backend out on a machine without a TPU, unless the user chose the platforms."""
    if "JAX_PLATFORMS" in os.environ or has_tpu():
        return
    import jax

    if jax.config.jax_platforms:  # chosen in code before dots_jax was imported
        return
    # The config, not the environment variable: child processes (a test's subprocess, a user's tool) decide
    # for themselves.
    jax.config.update("jax_platforms", ",".join([*gpu_platforms(), "cpu"]))


steer()
