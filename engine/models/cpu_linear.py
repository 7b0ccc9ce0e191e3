"""CpuLinear: an inference-only nn.Linear whose weight is packed once at load for one of the
C++ CPU matmul kernels (bf16_linear, f32_linear); subclasses name the op's pack and prepare
functions. The packed weight is a parameter (counted, moved with the model), but never
converted by a model's .to(dtype): subclasses store bit patterns or float32 panels."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class CpuLinear(nn.Module):
    """Holds `packed` (the op's packed weight data) and a float32 bias; calls the op's
    prepared face, prepared on first use and again after the tensors move."""

    def __init__(self, linear: nn.Linear, packed_weight) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = nn.Parameter(packed_weight.data, requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._call: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def packed_weight(self):
        """The packed weight as the op takes it."""
        raise NotImplementedError

    def prepare(self, bias: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The op bound to this layer's weight and bias."""
        raise NotImplementedError

    def _apply(self, fn, *args, **kwargs):
        self._call = None             # the tensors may have moved: prepare again
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._call is None:        # weight checked and pointers taken once, not every step
            self._call = self.prepare(None if self.bias is None else self.bias.data)
        if x.dim() == 2:              # the engine's flat [tokens, features]: no reshapes
            return self._call(x)
        y = self._call(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(model: nn.Module, dtype: torch.dtype, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every CPU nn.Linear of the model with weights of `dtype` (those inside
    tensor-parallel wrappers too) by make(linear); returns how many."""
    swaps: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            weight: Optional[torch.Tensor] = getattr(child, "weight", None)
            if isinstance(child, nn.Linear) and weight.dtype == dtype and weight.device.type == "cpu":
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, make(child))
    return len(swaps)
