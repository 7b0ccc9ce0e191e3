"""Torch faces (the specification) of a decoder layer's small ops: residual add + RMSNorm,
rotate-half rotary embedding, SiLU-and-multiply. The C++ faces (csrc/layer_ops.cpp) do each
in one call; bf16 results round where these round."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight * norm(s), s) with s = x + residual (in x's dtype), or (weight * norm(x), None):
    the norm in float32, rounded to x's dtype before the weight (Hugging Face's LlamaRMSNorm)."""
    summed = None if residual is None else x + residual
    source = x if summed is None else summed
    wide = source.float()
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(source.dtype), summed


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [N, heads, D] in place by position: pairs (i, i + D/2); cos/sin [N, 1, D]."""
    first, second = x.chunk(2, dim=-1)
    x.copy_(x * cos + torch.cat([-second, first], dim=-1) * sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [N, 2I] holding gate then up -> [N, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
