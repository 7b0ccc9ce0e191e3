"""The C++ face (lmarith._C) of quant_matmul on inputs already checked by bindings/checks.py.

The kernel's instruction path is chosen at run time from the CPU's features (AVX512-VNNI,
else AVX2, else scalar); the environment variable LMARITH_QUANT_ISA = vnni | avx2 | scalar
forces one (tests run every path on one CPU; a path the CPU lacks raises ConfigError). Read
per call, so a test can set it with monkeypatch."""
from __future__ import annotations


import torch

from lmarith.bindings import cpp
from lmarith.kernels.quant_formats import QuantWeight

QTYPE_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3, "q6_k": 4,   # csrc QuantType
               "q5_0": 5, "q5_1": 6}
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "vnni": 3}              # csrc QuantIsa
ISA_ENV = "LMARITH_QUANT_ISA"


def isa_code(isa: str | None = None) -> int:
    """The path code for `isa` (default: $LMARITH_QUANT_ISA, else auto)."""
    return cpp.isa_code(ISA_ENV, ISA_CODES, isa, lambda code: cpp._C.quant_isa_supported(code))


def isa_supported(isa: str) -> bool:
    """Whether the extension built and this CPU runs the named path."""
    return cpp.available() and cpp._C.quant_isa_supported(ISA_CODES[isa])


def quant_matmul(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """Runs lmarith._C.quant_matmul: x [M, K] float32/bfloat16 -> [M, N] float32."""
    return prepared(weight)(x)


def prepared(weight: QuantWeight):
    """quant_matmul for one fixed, already checked weight (a model layer's): codes, sizes and
    the instruction path are worked out once, so a decode step pays ~2 us per call, not ~20."""
    data = weight.data.contiguous()
    weight_args = (data.data_ptr(), QTYPE_CODES[weight.qtype], weight.out_features,
                   weight.row_bytes, isa_code())
    kernel, out_features = cpp._C.quant_matmul, weight.out_features

    def call(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous() if x.dtype == torch.bfloat16 else x.to(torch.float32).contiguous()
        out = torch.empty((x.shape[0], out_features), dtype=torch.float32)
        kernel(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], x.shape[1], *weight_args,
               out.data_ptr())
        return out
    call.keep_alive = data        # the pointer stays valid as long as the call exists
    return call
