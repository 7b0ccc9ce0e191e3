"""Linear layers with weights pre-packed for oneDNN on CPU.

torch's default CPU linear picks slow kernels for the skinny batches of decoding (a few to
a few dozen rows); oneDNN with a weight packed once at load runs the same products faster
(benchmarks/bench_latency.py measures the end-to-end decode speed)."""
from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    """True when this torch build has the oneDNN packed-linear ops."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """Inference-only nn.Linear whose float32 weight is stored in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, batch_hint: int = 16) -> int:
    """Swap every float32 CPU nn.Linear of the model for a PackedLinear; returns how many."""
    if not packing_available():
        return 0
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if isinstance(child, nn.Linear) and weight.dtype == torch.float32 and weight.device.type == "cpu":
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(swaps)
