"""Triton face of `quant_matmul` (CUDA; the interpreter runs it on CPU tensors in tests).

Semantics: kernels/reference_quant.quant_matmul, y [M, N] = x [M, K] @ W.T in float32 with W
in GGML blocks (kernels/quant_formats.py). One program computes a [BLOCK_M, BLOCK_N] tile of
y: per step of BLOCK_K weights it loads the packed bytes of its BLOCK_N rows (the fp16
scales as byte pairs, the int8 or nibble quants), dequantises them in registers and
accumulates tl.dot(x tile, W tile^T) in float32 (input_precision "ieee": no tf32 rounding,
so it matches the reference to float32 accumulation order). The weights are read once per
M-tile, never written back dequantised.

q8_0, q4_0, q4_1, q5_0 and q5_1 have the kernel; q4_k and q6_k fall back to the reference
(dequantize on the device, then torch's matmul).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmarith.kernels import reference_quant
from lmarith.kernels.quant_formats import QTYPES, QuantWeight

_KINDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q5_0": 3, "q5_1": 4}


@triton.jit
def _half_at(ptr, mask):
    """The little-endian fp16 at byte address ptr, as float32."""
    low = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    high = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _weight_tile(data, row_bytes, offs_n, offs_k, N, K, KIND: tl.constexpr,
                 BLOCK_BYTES: tl.constexpr):
    """W[offs_n, offs_k] dequantised, [BLOCK_N, BLOCK_K] float32 (0 outside the matrix)."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    block = data + offs_n[:, None].to(tl.int64) * row_bytes + (offs_k[None, :] // 32) * BLOCK_BYTES
    j = offs_k[None, :] % 32
    d = _half_at(block, mask)
    if KIND == 0:    # q8_0: fp16 d, 32 int8
        q = tl.load(block + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * d
    else:            # q4 / q5: byte j % 16 holds weight j (low nibble) and j + 16 (high)
        has_min = KIND == 2 or KIND == 4
        qh = 4 if has_min else 2                  # q5: bit j of the 4 bytes at qh is weight j's 5th
        qs = qh + 4 if KIND >= 3 else qh
        byte = tl.load(block + qs + (j % 16), mask=mask, other=0)
        q = tl.where(j < 16, byte & 0x0F, byte >> 4)
        if KIND >= 3:
            bits = tl.load(block + qh + j // 8, mask=mask, other=0)
            q = q | (((bits >> (j % 8)) & 1) << 4)
        q = q.to(tl.float32)
        if has_min:
            w = d * q + _half_at(block + 2, mask)
        else:
            w = d * (q - (16.0 if KIND == 3 else 8.0))
    return tl.where(mask, w, 0.0)


@triton.jit
def _quant_matmul_kernel(x_ptr, data, out_ptr, M, N, K, stride_xm, row_bytes,
                         KIND: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=x_mask, other=0.0).to(tl.float32)
        w = _weight_tile(data, row_bytes, offs_n, offs_k, N, K, KIND, BLOCK_BYTES)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=out_mask)


def quant_matmul(x: torch.Tensor, weight: QuantWeight, block_m: int = 16, block_n: int = 32,
                 block_k: int = 32) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] (float32/bfloat16) @ W.T on x's device."""
    if weight.qtype not in _KINDS:
        return reference_quant.quant_matmul(x, weight)
    if block_k % 32:
        raise ValueError(f"block_k must be a multiple of 32, got {block_k}")
    m, k = x.shape
    n = weight.out_features
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return out
    x = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    x = x.contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_matmul_kernel[grid](x, weight.data.contiguous(), out, m, n, k, x.stride(0),
                               weight.row_bytes, KIND=_KINDS[weight.qtype],
                               BLOCK_BYTES=QTYPES[weight.qtype][1], BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k)
    return out
