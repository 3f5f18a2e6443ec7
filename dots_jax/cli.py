"""What every command line (python -m dots_jax.sample / train / plan / demo, convert.*) shares: one parser whose
mistakes are user errors, one `error: ...` line and exit code 2 for any UserError, one dtype map."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import jax.numpy as jnp

from dots_jax.errors import UserError

EXIT_USER_ERROR = 2
# The dtypes a user can name on a command line: weights and activations (sample, train, plan) and storage (convert).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
COMPUTE_DTYPES = ("float32", "bfloat16")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as a UserError (one line, exit 2) instead of printing the usage."""

    def __init__(self, prog: str, description: str | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def run(main: Callable[[], int]) -> int:
    """main()'s exit code, or 2 with one `error:` line on stderr when it raises a UserError."""
    try:
        return main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
