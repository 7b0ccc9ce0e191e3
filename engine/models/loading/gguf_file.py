"""Minimal GGUF reader: metadata and tensors, dequantised to float32 with the `gguf` package.

gguf.GGUFReader builds a numpy view per token string, which takes ~15 s for a 49k-token
vocabulary; this reader parses the header with `struct` in well under a second.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass
class TensorInfo:
    """Where one tensor's bytes are and how to read them."""

    name: str
    shape: tuple[int, ...]   # numpy order (outermost first), i.e. GGUF dims reversed
    qtype: GGMLQuantizationType
    offset: int


class ByteCursor:
    """Sequential little-endian reader over a bytes-like buffer."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        """Read one struct-formatted value."""
        value = struct.unpack_from(fmt, self.buffer, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        """Read a length-prefixed UTF-8 string."""
        size = self.scalar("<Q")
        text = bytes(self.buffer[self.pos:self.pos + size]).decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int) -> Any:
        """Read a metadata value of GGUF type `kind`."""
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            return self.scalar(SCALARS[kind])
        item_kind, count = self.scalar("<I"), self.scalar("<Q")
        if item_kind in SCALARS and item_kind != 7:
            dtype = np.dtype(SCALARS[item_kind])
            items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
            self.pos += dtype.itemsize * count
            return items.tolist()
        return [self.value(item_kind) for _ in range(count)]


class GGUFFile:
    """A GGUF file's metadata (dict) and tensors (name -> TensorInfo), memory-mapped."""

    def __init__(self, path: str) -> None:
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        cursor = ByteCursor(memoryview(self.data))
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        cursor.pos = 4
        version = cursor.scalar("<I")
        num_tensors, num_fields = cursor.scalar("<Q"), cursor.scalar("<Q")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_fields):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.scalar("<I"))
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(num_tensors):
            name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            qtype = GGMLQuantizationType(cursor.scalar("<I"))
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, cursor.scalar("<Q"))
        alignment = self.metadata.get("general.alignment", 32)
        self.data_start = -(-cursor.pos // alignment) * alignment

    def _stored(self, info: TensorInfo) -> np.ndarray:
        """A view of the tensor's bytes in the memory map, [rows, row_bytes]."""
        block, block_bytes = GGML_QUANT_SIZES[info.qtype]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        row_bytes = info.shape[-1] // block * block_bytes
        start = self.data_start + info.offset
        return self.data[start:start + rows * row_bytes].reshape(rows, row_bytes)

    def read(self, name: str) -> torch.Tensor:
        """One tensor as float32, dequantised if needed, in numpy/PyTorch axis order."""
        info = self.tensors[name]
        stored = self._stored(info)
        raw = stored.reshape(*info.shape[:-1], stored.shape[-1])
        if info.qtype in PLAIN:
            return torch.from_numpy(raw.view(PLAIN[info.qtype]).astype(np.float32))
        return torch.from_numpy(np.ascontiguousarray(dequantize(raw, info.qtype), dtype=np.float32))

    def raw(self, name: str) -> torch.Tensor:
        """One tensor's stored bytes as uint8 [rows, row_bytes] (a copy), quantized or not."""
        return torch.from_numpy(np.array(self._stored(self.tensors[name])))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(GGUF name, float32 tensor) for every tensor, read lazily."""
        for name in self.tensors:
            yield name, self.read(name)
