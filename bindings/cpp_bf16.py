"""The C++ face (lmarith._C.bf16_matmul) of bf16_linear, on inputs already checked by
bindings/checks.py.

The kernel's instruction path is chosen at run time from the CPU's features (AMX-BF16 tiles,
else AVX512-BF16, else AVX2, else scalar); LMARITH_BF16_ISA = amx | avx512bf16 | avx2 |
scalar forces one (tests run every path on one CPU; a path the CPU lacks raises
ConfigError). It is read when a call is prepared, so a test can set it with monkeypatch."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from lmarith.bindings import cpp
from lmarith.kernels.reference_bf16 import BF16Weight

ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512bf16": 3, "amx": 4}   # csrc Bf16Isa
ISA_ENV = "LMARITH_BF16_ISA"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}                 # csrc LogitsDtype


def isa_code(isa: Optional[str] = None) -> int:
    """The path code for `isa` (default: $LMARITH_BF16_ISA, else auto)."""
    return cpp.isa_code(ISA_ENV, ISA_CODES, isa, lambda code: cpp._C.bf16_isa_supported(code))


def isa_supported(isa: str) -> bool:
    """Whether the extension built and this CPU runs the named path."""
    return cpp.available() and cpp._C.bf16_isa_supported(ISA_CODES[isa])


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
