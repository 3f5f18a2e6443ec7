"""Read and write .safetensors files with numpy alone (ml_dtypes for bf16): no torch, tensors memory-mapped.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from dots_jax.errors import UserError
from dots_jax.files import atomic_path

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(UserError):
    """A missing, truncated or corrupt safetensors file; the message names the file (and tensor)."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping name -> np.ndarray, each a view of the memory-mapped file (read lazily)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise SafetensorsError(f"{self.path}: corrupt or truncated header (claims {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._info: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a corrupt header entry {info!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: offsets {begin}..{end} do not match "
                                       f"shape {shape} of {info['dtype']}")
            if end > data_size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} of the data, "
                                       f"but the file holds only {data_size}")
            self._info[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._info:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, end = self._info[name]
        if begin == end:
            return np.zeros(shape, dtype)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        return self._mmap[begin:end].view(dtype).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """The tensor copied into fresh memory with a plain read(), not through the memory map.

        Why: pages of a memory map that have been touched count toward the process's RSS until it is unmapped,
        so streaming shard after shard through __getitem__ grows RSS by whole shards; read() leaves the file's
        pages in the page cache only (what the converter needs for bounded memory).
        """
        if name not in self._info:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, end = self._info[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin)
            got = handle.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r} ({got} of {end - begin} "
                                   "bytes)")
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._info[name][0]


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors atomically: to a temporary file beside `path`, then rename."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
