"""Writing files so that nobody ever sees half of one: write beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same directory, so the rename stays on one file system) for the
    caller to create as a file or a directory; on success it takes the place of `path`, on an exception it is
    removed and `path` is left as it was. The parent directory must exist."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)  # left by an earlier, killed writer
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        # os.replace cannot replace a non-empty directory: move the old one aside, then remove it. A kill in
        # between leaves the old one as <name>.old, never half of either.
        old = path.with_name(path.name + ".old")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (str as UTF-8) to `path` through atomic_path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def overlapping(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when local paths a and b, resolved (symlinks followed, ~ expanded), are the same path or one lies
    inside the other: writing or replacing one would change the other. Neither needs to exist."""
    ra, rb = (Path(os.path.realpath(os.path.expanduser(os.fspath(p)))) for p in (a, b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
