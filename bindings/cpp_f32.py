"""The C++ face (lmarith._C.f32_matmul) of f32_linear, on inputs already checked by
bindings/checks.py.

The kernel's instruction path is chosen at run time from the CPU's features (AVX512F, else
AVX2, else scalar); the environment variable LMARITH_F32_ISA = avx512 | avx2 | scalar forces
one (tests run every path on one CPU; a path the CPU lacks raises ConfigError). It is read
when a call is prepared, so a test can set it with monkeypatch."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from lmarith.bindings import cpp
from lmarith.kernels.reference_f32 import F32Weight

ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}   # csrc F32Isa
ISA_ENV = "LMARITH_F32_ISA"


def isa_code(isa: Optional[str] = None) -> int:
    """The path code for `isa` (default: $LMARITH_F32_ISA, else auto)."""
    return cpp.isa_code(ISA_ENV, ISA_CODES, isa, lambda code: cpp._C.f32_isa_supported(code))


def isa_supported(isa: str) -> bool:
    """Whether the extension built and this CPU runs the named path."""
    return cpp.available() and cpp._C.f32_isa_supported(ISA_CODES[isa])


def f32_linear(x: torch.Tensor, weight: F32Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Runs lmarith._C.f32_matmul: x [M, K] -> [M, N] float32."""
    return prepared(weight, bias)(x)


def prepared(weight: F32Weight, bias: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """f32_linear for one fixed, already checked weight and bias (a model layer's): pointers,
    sizes and the instruction path are worked out once, so a call pays ~2 us of Python."""
    data = weight.data.contiguous()
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    bias_ptr = 0 if bias32 is None else bias32.data_ptr()
    kernel, n, k, isa = cpp._C.f32_matmul, weight.out_features, weight.in_features, isa_code()

    def call(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()
        out = torch.empty((x.shape[0], n), dtype=torch.float32)
        kernel(x.data_ptr(), x.shape[0], k, data.data_ptr(), n, bias_ptr, out.data_ptr(), isa)
        return out
    call.keep_alive = (data, bias32)   # the pointers stay valid as long as the call exists
    return call
