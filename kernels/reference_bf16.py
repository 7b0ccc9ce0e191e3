"""The torch specification of bf16_linear: y = x @ W.T + b with W in bfloat16, held in the
packed layout the C++ kernel (csrc/bf16_matmul.cpp) reads, packed once at load.

Layout: W [N, K] zero-padded to [ceil(N/16)*16, ceil(K/2)*2], as blocks of 16 output rows,
each block [K/2][16][2]: for every pair of input columns the 16 rows' two weights side by side
(one 32-bit lane per row, the operand vdpbf16ps takes). Stored as int16 bit patterns so a
model's .to(dtype) never converts them.

Semantics (every face): x is rounded to bfloat16 (nearest even), the products summed in
float32, the float32 bias added, and the result cast to x's dtype (float32 or bfloat16).
Faces differ only in the order of the float32 sums: within 1e-5 * (|x| @ |W|.T) for a
float32 result, plus one bfloat16 rounding step (2^-8 relative) for a bfloat16 one.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

BLOCK_ROWS = 16   # output rows per packed block (csrc kBf16Block)


@dataclasses.dataclass(frozen=True)
class BF16Weight:
    """A bf16 weight [out_features, in_features] in the packed layout: data int16
    [ceil(N/16), ceil(K/2), 16, 2]."""

    data: torch.Tensor
    out_features: int
    in_features: int


def pack_weight(weight: torch.Tensor) -> BF16Weight:
    """W [N, K] (any float dtype, rounded to bfloat16) -> its packed BF16Weight, on W's device."""
    n, k = weight.shape
    blocks, pairs = -(-n // BLOCK_ROWS), -(-k // 2)
    padded = torch.zeros(blocks * BLOCK_ROWS, pairs * 2, dtype=torch.bfloat16, device=weight.device)
    padded[:n, :k] = weight.detach()
    data = padded.view(blocks, BLOCK_ROWS, pairs, 2).permute(0, 2, 1, 3).contiguous()
    return BF16Weight(data.view(torch.int16), n, k)


def unpack_weight(weight: BF16Weight) -> torch.Tensor:
    """The bfloat16 matrix [N, K] a BF16Weight holds."""
    blocks, pairs = weight.data.shape[:2]
    rows = weight.data.view(torch.bfloat16).permute(0, 2, 1, 3).reshape(blocks * BLOCK_ROWS, pairs * 2)
    return rows[:weight.out_features, :weight.in_features]


def bf16_linear(x: torch.Tensor, weight: BF16Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = round_bf16(x) [M, K] @ W.T + bias, summed in float32, in x's dtype."""
    w = unpack_weight(weight).float()
    b = None if bias is None else bias.float()
    return F.linear(x.to(torch.bfloat16).float(), w, b).to(x.dtype)
