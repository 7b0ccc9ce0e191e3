"""The C++ face (lmarith._C.bf16_matmul) of bf16_linear, and the input checks every face of
that op shares.

The kernel's instruction path is chosen at run time from the CPU's features (AVX512-BF16,
else AVX2, else scalar); the environment variable LMARITH_BF16_ISA = avx512bf16 | avx2 |
scalar forces one (tests run every path on one CPU; a path the CPU lacks raises). It is read
when a call is prepared, so a test can set it with monkeypatch."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from lmarith.bindings import cpp
from lmarith.kernels.reference_bf16 import BF16Weight

ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512bf16": 3}   # csrc Bf16Isa
ISA_ENV = "LMARITH_BF16_ISA"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}                 # csrc LogitsDtype


def isa_code(isa: Optional[str] = None) -> int:
    """The path code for `isa` (default: $LMARITH_BF16_ISA, else auto)."""
    name = (isa or os.environ.get(ISA_ENV) or "auto").lower()
    if name not in ISA_CODES:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(ISA_CODES)}, got {name!r}")
    return ISA_CODES[name]


def isa_supported(isa: str) -> bool:
    """Whether the extension built and this CPU runs the named path."""
    return cpp.available() and cpp._C.bf16_isa_supported(ISA_CODES[isa])


def validate(x: torch.Tensor, weight: BF16Weight, bias: Optional[torch.Tensor] = None,
             **face_options) -> torch.device:
    """x [M, K] float32/bfloat16, a packed BF16Weight [N, K] and bias [N] (or None) on one
    device; returns that device."""
    if not isinstance(weight, BF16Weight):
        raise ValueError(f"weight must be a lmarith.kernels.reference_bf16.BF16Weight, got "
                         f"{type(weight).__name__}; pack it with ops.pack_bf16(w)")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != weight.in_features:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [M, {weight.in_features}], got {shape}")
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"x must be a float32 or bfloat16 tensor, got {x.dtype}")
    devices = {x.device, weight.data.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"bias must be a tensor [{weight.out_features}] or None")
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"x, weight and bias must be on one device, got {sorted(map(str, devices))}")
    return x.device


def bf16_linear(x: torch.Tensor, weight: BF16Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Runs lmarith._C.bf16_matmul: x [M, K] float32/bfloat16 -> [M, N] in x's dtype."""
    return prepared(weight, bias)(x)


def prepared(weight: BF16Weight, bias: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """bf16_linear for one fixed, already checked weight and bias (a model layer's): pointers,
    sizes and the instruction path are worked out once, so a call pays ~2 us of Python."""
    data = weight.data.contiguous()
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    bias_ptr = 0 if bias32 is None else bias32.data_ptr()
    kernel, n, k, isa = cpp._C.bf16_matmul, weight.out_features, weight.in_features, isa_code()

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _DTYPE_CODES:
            x = x.to(torch.float32)
        x = x.contiguous()
        code = _DTYPE_CODES[x.dtype]
        out = torch.empty((x.shape[0], n), dtype=x.dtype)
        kernel(x.data_ptr(), code, x.shape[0], k, data.data_ptr(), n, bias_ptr, out.data_ptr(), code, isa)
        return out
    call.keep_alive = (data, bias32)   # the pointers stay valid as long as the call exists
    return call
