"""Linear layers with float32 weights packed once at load for the C++ f32 kernel on CPU.

oneDNN's and MKL's float32 GEMVs stream a decode step's weights at well under the memory's
read rate; `ops.f32_linear` (csrc/f32_matmul.cpp) reads each packed 16-row block once per
call with the batch's rows in registers (benchmarks/bench_f32.py measures both). The native
decoder stack (models/native_stack.py) reads the same packed weights."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from lmarith.bindings import ops
from lmarith.kernels.reference_f32 import F32Weight
from lmarith.models.cpu_linear import CpuLinear, swap_linears


class F32Linear(CpuLinear):
    """Inference-only nn.Linear whose float32 weight is held in f32_linear's packed layout
    (float32 [ceil(N/16), K, 16])."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, ops.pack_f32(linear.weight.detach()))

    def packed_weight(self) -> F32Weight:
        return F32Weight(self.packed.data, self.out_features, self.in_features)

    def prepare(self, bias: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return ops.prepared_f32_linear(self.packed_weight(), bias)


def use_f32_linears(model: nn.Module) -> int:
    """Swap every float32 CPU nn.Linear of the model for an F32Linear, when the C++ kernel is
    built; returns how many."""
    return swap_linears(model, torch.float32, F32Linear) if ops.cpp_available() else 0
