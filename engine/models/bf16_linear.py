"""Linear layers with bfloat16 weights packed once at load for the C++ bf16 kernel on CPU.

torch's CPU bf16 linear barely beats float32 at the skinny batches of decoding, though it
reads half the bytes; `ops.bf16_linear` (csrc/bf16_matmul.cpp, AVX512-BF16 where the CPU has
it) streams the packed weight once per call and keeps the batch's rows in registers."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from lmarith.bindings import ops
from lmarith.kernels.reference_bf16 import BF16Weight
from lmarith.models.cpu_linear import CpuLinear, swap_linears


class BF16Linear(CpuLinear):
    """Inference-only nn.Linear whose bf16 weight is held in bf16_linear's packed layout
    (int16 bit patterns); the output has the input's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, ops.pack_bf16(linear.weight.detach()))

    def packed_weight(self) -> BF16Weight:
        return BF16Weight(self.packed.data, self.out_features, self.in_features)

    def prepare(self, bias: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return ops.prepared_bf16_linear(self.packed_weight(), bias)


def use_bf16_linears(model: nn.Module) -> int:
    """Swap every bfloat16 CPU nn.Linear of the model for a BF16Linear, when the C++ kernel is
    built; returns how many."""
    return swap_linears(model, torch.bfloat16, BF16Linear) if ops.cpp_available() else 0
