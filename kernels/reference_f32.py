"""The torch specification of f32_linear: y = x @ W.T + b with W in float32, held in the
packed layout the C++ kernel (csrc/f32_matmul.cpp) reads, packed once at load.

Layout: W [N, K] zero-padded to [ceil(N/16)*16, K], as blocks of 16 output rows, each block
[K][16]: for every input column the 16 rows' weights side by side (one 64-byte vector).

Semantics (every face): float32 products summed in float32, the bias added. Faces differ
only in the order of the sums: within 1e-5 * (|x| @ |W|.T) + 1e-6.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

BLOCK_ROWS = 16   # output rows per packed block (csrc kF32Block)


@dataclasses.dataclass(frozen=True)
class F32Weight:
    """A float32 weight [out_features, in_features] in the packed layout: data float32
    [ceil(N/16), K, 16]."""

    data: torch.Tensor
    out_features: int
    in_features: int


def pack_weight(weight: torch.Tensor) -> F32Weight:
    """W [N, K] (any float dtype, cast to float32) -> its packed F32Weight, on W's device."""
    n, k = weight.shape
    blocks = -(-n // BLOCK_ROWS)
    padded = torch.zeros(blocks * BLOCK_ROWS, k, dtype=torch.float32, device=weight.device)
    padded[:n] = weight.detach()
    data = padded.view(blocks, BLOCK_ROWS, k).transpose(1, 2).contiguous()
    return F32Weight(data, n, k)


def unpack_weight(weight: F32Weight) -> torch.Tensor:
    """The float32 matrix [N, K] an F32Weight holds."""
    blocks, k = weight.data.shape[:2]
    rows = weight.data.transpose(1, 2).reshape(blocks * BLOCK_ROWS, k)
    return rows[:weight.out_features]


def f32_linear(x: torch.Tensor, weight: F32Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias in float32."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), unpack_weight(weight), b)
