"""The C++ faces (lmarith._C, csrc/layer_ops.cpp) of rms_norm, rotary, silu_mul and
store_kv, on inputs already checked by bindings/checks.py. They take float32/bfloat16
tensors laid out as the kernels read them (rows strided, heads and head_dim contiguous);
anything else (float16, a transposed view) runs the torch face instead, same results."""
from __future__ import annotations

from typing import Optional

import torch

from lmarith.bindings import cpp
from lmarith.kernels import reference_attention, reference_layers

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """reference_layers.rms_norm in one call: (normed, x + residual or None)."""
    code = _DTYPES.get(x.dtype)
    if (code is None or weight.dtype != x.dtype or not weight.is_contiguous()
            or (residual is not None and residual.dtype != x.dtype)):
        return reference_layers.rms_norm(x, weight, eps, residual)
    x = x.contiguous()
    out = torch.empty_like(x)
    summed, residual_address, summed_address = None, 0, 0
    if residual is not None:
        residual = residual.contiguous()
        summed = torch.empty_like(x)
        residual_address, summed_address = residual.data_ptr(), summed.data_ptr()
    hidden = x.shape[-1]
    cpp._C.rms_norm(x.data_ptr(), residual_address, weight.data_ptr(), x.numel() // hidden, hidden,
                    eps, code, out.data_ptr(), summed_address)
    return out, summed


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """reference_layers.rotary in one call, in place on x [N, heads, D] (rows may be strided,
    as q and k are inside the fused qkv output)."""
    rows, heads, dim = x.shape
    code = _DTYPES.get(x.dtype)
    if (code is None or cos.dtype != x.dtype or sin.dtype != x.dtype or x.stride(2) != 1
            or x.stride(1) != dim or not (cos.is_contiguous() and sin.is_contiguous())):
        return reference_layers.rotary(x, cos, sin)
    cpp._C.rotary(x.data_ptr(), rows, x.stride(0) if rows else heads * dim, heads, dim,
                  cos.data_ptr(), sin.data_ptr(), code)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """reference_layers.silu_mul in one call: [N, 2I] -> [N, I]."""
    code = _DTYPES.get(gate_up.dtype)
    if code is None:
        return reference_layers.silu_mul(gate_up)
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], width), dtype=gate_up.dtype)
    cpp._C.silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * width), width, code, out.data_ptr())
    return out


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """reference_attention.store_kv in one call (K/V may be any views with head_dim contiguous,
    such as slices of the qkv output;
    slots outside the cache raise ValueError before anything is written)."""
    tokens, heads, dim = key.shape
    codes = [_DTYPES.get(t.dtype) for t in (key, key_cache, value_cache)]
    if (None in codes or value.dtype != key.dtype or key.stride(2) != 1 or value.stride(2) != 1
            or key_cache.stride(3) != 1 or value_cache.stride(3) != 1):
        return reference_attention.store_kv(key, value, key_cache, value_cache, slot_pages, slot_offsets)
    slot_pages = slot_pages.to(torch.int64).contiguous()
    slot_offsets = slot_offsets.to(torch.int64).contiguous()
    cpp._C.store_kv(key.data_ptr(), value.data_ptr(), key.stride()[:2], value.stride()[:2], codes[0],
                    tokens, heads, dim, key_cache.data_ptr(), codes[1], key_cache.stride()[:3],
                    value_cache.data_ptr(), codes[2], value_cache.stride()[:3],
                    tuple(key_cache.shape[:2]), slot_pages.data_ptr(), slot_offsets.data_ptr())
