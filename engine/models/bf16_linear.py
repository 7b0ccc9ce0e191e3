"""Linear layers with bfloat16 weights packed once at load for the C++ bf16 kernel on CPU.

torch's CPU bf16 linear barely beats float32 at the skinny batches of decoding, though it
reads half the bytes; `ops.bf16_linear` (csrc/bf16_matmul.cpp, AVX512-BF16 where the CPU has
it) streams the packed weight once per call and keeps the batch's rows in registers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmarith.bindings import ops
from lmarith.kernels.reference_bf16 import BF16Weight


class BF16Linear(nn.Module):
    """Inference-only nn.Linear whose bf16 weight is held in bf16_linear's packed layout;
    the output has the input's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = ops.pack_bf16(linear.weight.detach())
        # int16 bit patterns: counted as parameters, never converted by a model's .to(dtype)
        self.packed = nn.Parameter(weight.data, requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._call = None

    def packed_weight(self) -> BF16Weight:
        """The packed weight as the op takes it."""
        return BF16Weight(self.packed.data, self.out_features, self.in_features)

    def _apply(self, fn, *args, **kwargs):
        self._call = None             # the tensors may have moved: prepare again
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._call is None:        # weight checked and pointers taken once, not every step
            bias = None if self.bias is None else self.bias.data
            self._call = ops.prepared_bf16_linear(self.packed_weight(), bias)
        if x.dim() == 2:              # the engine's flat [tokens, features]: no reshapes
            return self._call(x)
        y = self._call(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_bf16_linears(model: nn.Module) -> int:
    """Swap every bfloat16 CPU nn.Linear of the model (those inside tensor-parallel wrappers
    too) for a BF16Linear, when the C++ kernel is built; returns how many."""
    if not ops.cpp_available():
        return 0
    swaps: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            weight: Optional[torch.Tensor] = getattr(child, "weight", None)
            if isinstance(child, nn.Linear) and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, BF16Linear(child))
    return len(swaps)
