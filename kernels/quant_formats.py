"""Quantized weight formats (GGML's block layouts, byte for byte as GGUF files store them) and
the QuantWeight a quantized linear layer holds. A weight [N, K] is N rows of K // block
weights each; row r's blocks are data[r] (uint8, row_bytes = K // block * block_bytes), so a
row permutation of the matrix is a row permutation of `data`.

  q8_0  block 32:  fp16 d, 32 x int8 q                      w = d * q
  q4_0  block 32:  fp16 d, 16 bytes of nibbles              w = d * (q - 8)
  q4_1  block 32:  fp16 d, fp16 m, 16 bytes of nibbles      w = d * q + m
  q5_0  block 32:  fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles       w = d * (q - 16)
  q5_1  block 32:  fp16 d, fp16 m, 4 bytes of fifth bits, 16 of nibbles     w = d * q + m
  q4_k  block 256: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
  q6_k  block 256: 128 bytes low nibbles, 64 bytes high 2 bits, 16 x int8 scales, fp16 d
(nibble order within a 32-block: byte j holds weight j in its low half, weight j + 16 in its
high half; q5's fifth bit of weight j is bit j of the little-endian 32-bit word; the K-quants follow ggml's dequantize_row_q4_K / q6_K exactly.)"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QTYPES: dict[str, tuple[int, int]] = {      # name -> (weights per block, bytes per block)
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q4_k": (256, 144),
    "q6_k": (256, 210),
}


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A quantized [out_features, in_features] matrix: data is uint8 [out_features, row_bytes]."""

    qtype: str
    data: torch.Tensor
    out_features: int
    in_features: int

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ValueError(f"unknown quantization {self.qtype!r}; known: {', '.join(QTYPES)}")
        block, block_bytes = QTYPES[self.qtype]
        if self.in_features % block:
            raise ValueError(f"{self.qtype} needs in_features divisible by {block}, got {self.in_features}")
        expected = (self.out_features, self.in_features // block * block_bytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise ValueError(f"{self.qtype} data must be uint8 {expected}, got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel()
