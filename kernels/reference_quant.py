"""Torch specification of the quantized-weight ops (formats: kernels/quant_formats.py).

dequantize(weight) -> [N, K] float32 reproduces gguf.quants.dequantize bit for bit (same
float32 operations in the same order), vectorised over all blocks at once. quant_matmul is
x.float() @ dequantize(weight).T. quantize_q8_0 is ggml's quantize_row_q8_0 (what the loader
uses for fp checkpoints). quantize_activations / quant_matmul_q8 give the activation
quantisation the C++ face uses (per 32-block int8, fp32 scale, round half to even), so the
C++ results can be checked against a reference that makes the same rounding choices.
"""
from __future__ import annotations

import torch

from lmarith.kernels.quant_formats import QTYPES, QuantWeight

ACT_BLOCK = 32


def _blocks(weight: QuantWeight) -> torch.Tensor:
    """data viewed as [N, blocks per row, bytes per block]."""
    block_bytes = QTYPES[weight.qtype][1]
    return weight.data.reshape(weight.out_features, -1, block_bytes)


def _half(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from the last dim's byte pairs [..., 2k] -> float32 [..., k]."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: the low nibbles, then the high nibbles (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks[..., :2])
    return blocks[..., 2:].contiguous().view(torch.int8).float() * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks[..., :2])
    return d * (_nibbles(blocks[..., 2:]).to(torch.int8) - 8).float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _half(blocks[..., :2]), _half(blocks[..., 2:4])
    return d * _nibbles(blocks[..., 4:]).float() + m


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """q5's 4 bytes [..., 4] -> [..., 32] uint8: bit j of the little-endian word, times 16."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    bits = (qh.unsqueeze(-1) >> shifts) & 1               # [..., 4 bytes, 8 bits]
    return bits.flatten(-2) << 4


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks[..., :2])
    q = _nibbles(blocks[..., 6:]) | _fifth_bits(blocks[..., 2:6])
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _half(blocks[..., :2]), _half(blocks[..., 2:4])
    q = _nibbles(blocks[..., 8:]) | _fifth_bits(blocks[..., 4:8])
    return d * q.float() + m


def k4_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k's 12 packed bytes [..., 12] -> 6-bit (scales, mins) [..., 8] (get_scale_min_k4)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mins


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n, nb = blocks.shape[:2]
    d, dmin = _half(blocks[..., 0:2]), _half(blocks[..., 2:4])
    sc, mins = k4_scales(blocks[..., 4:16])
    scale = (d * sc.float()).reshape(n, nb, 8, 1)
    offset = (dmin * mins.float()).reshape(n, nb, 8, 1)
    qs = blocks[..., 16:].reshape(n, nb, 4, 32)        # 4 groups of 64 weights
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(n, nb, 8, 32).float()
    return (scale * q - offset).reshape(n, nb, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n, nb = blocks.shape[:2]
    ql = blocks[..., :128].reshape(n, nb, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float()
    d = (_half(blocks[..., 208:210]) * scales).reshape(n, nb, 16, 1)
    low = (ql >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)) & 0x0F
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)) & 0x03
    q = (low.reshape(n, nb, 8, 32) | (high.reshape(n, nb, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, nb, 16, 16).float()).reshape(n, nb, 256)


_DEQUANT = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1,
            "q4_k": _q4_k, "q6_k": _q6_k}


def dequantize(weight: QuantWeight) -> torch.Tensor:
    """The float32 matrix [N, K] a QuantWeight stands for (on the weight's device)."""
    values = _DEQUANT[weight.qtype](_blocks(weight))
    return values.reshape(weight.out_features, weight.in_features)


def _round_away(values: torch.Tensor) -> torch.Tensor:
    """roundf: halves away from zero (gguf's np_roundf, which ggml's q8_0 uses)."""
    magnitude = values.abs()
    floor = magnitude.floor()
    return values.sign() * (floor + (2 * (magnitude - floor)).floor())


def quantize_q8_0(w: torch.Tensor) -> QuantWeight:
    """ggml's q8_0 of a float matrix [N, K] (K % 32 == 0): d = max|w| / 127 per 32-block,
    q = roundf(w / d) (as w * (1/d)), d stored as fp16."""
    n, k = w.shape
    if k % 32:
        raise ValueError(f"q8_0 needs in_features divisible by 32, got {k}")
    blocks = w.float().reshape(n, k // 32, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_away(blocks * inverse).to(torch.int8)
    d_bytes = d.to(torch.float16).view(torch.uint8)
    data = torch.cat([d_bytes, q.view(torch.uint8)], dim=-1).reshape(n, -1)
    return QuantWeight("q8_0", data.contiguous(), n, k)


def quant_matmul(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T in float32, W dequantised."""
    return x.float() @ dequantize(weight).T


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ face's activation quantisation: per 32-block of a row, d = max|x| / 127 (fp32),
    q = round_half_even(x * (1/d)) as int8 -> (q [M, K] int8, d [M, K/32] float32)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // ACT_BLOCK, ACT_BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(blocks * inverse).to(torch.int8)
    return q.reshape(m, k), d.reshape(m, -1)


def quant_matmul_q8(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """quant_matmul with the activations first quantised as the C++ face quantises them."""
    q, d = quantize_activations(x)
    m, k = x.shape
    rounded = (q.reshape(m, -1, ACT_BLOCK).double() * d.double().unsqueeze(-1)).reshape(m, k)
    return (rounded @ dequantize(weight).double().T).float()
