"""Quantized linear layers: a model's projections keep a GGUF file's quantized blocks (no
dequantised copy), or a float checkpoint's are quantised to q8_0 at load, and run through
`ops.quant_matmul` (C++ int8 dot products on CPU, Triton dequant-matmul on CUDA).

A fused projection (q/k/v, gate/up) is the row-concatenation of its checkpoint parts; parts
that share a quantization are one matrix, mixed ones (a Q4_K_M file's q/k vs v) stay parts
whose outputs are concatenated. Tensors the file stores unquantized stay float layers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmarith.bindings import ops
from lmarith.kernels.quant_formats import QTYPES, QuantWeight

QUANTIZATIONS = ("auto", "q8_0")   # ModelSpec dtypes that mean "quantized linear layers"


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W held as quantized row blocks (one or more parts)."""

    def __init__(self, parts: list[QuantWeight], bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if len({part.in_features for part in parts}) != 1:
            raise ValueError("every part of a QuantLinear must have the same in_features")
        self.qtypes = [part.qtype for part in parts]
        self.part_rows = [part.out_features for part in parts]
        self.in_features = parts[0].in_features
        self.out_features = sum(self.part_rows)
        for index, part in enumerate(parts):
            self.register_buffer(f"blocks{index}", part.data)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def parts(self) -> list[QuantWeight]:
        return [QuantWeight(qtype, getattr(self, f"blocks{index}"), rows, self.in_features)
                for index, (qtype, rows) in enumerate(zip(self.qtypes, self.part_rows))]

    def _apply(self, fn, *args, **kwargs):
        self._calls = None            # the buffers may have moved: prepare again
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_calls", None) is None:   # weights checked once, not every step
            self._calls = [ops.prepared_quant_matmul(part) for part in self.parts()]
        flat = x.reshape(-1, self.in_features)
        outputs = [call(flat) for call in self._calls]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, qtypes={'+'.join(self.qtypes)}"


def quantize_linears_q8_0(model: nn.Module) -> int:
    """Replace every float nn.Linear whose in_features is a multiple of 32 with a q8_0
    QuantLinear (the lm_head too, tied or not); returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and child.in_features % QTYPES["q8_0"][0] == 0]
    for parent, name, child in swaps:
        weight = ops.quantize_q8_0(child.weight.detach().float().contiguous())
        setattr(parent, name, QuantLinear([weight], child.bias))
    return len(swaps)


def replace_linear(model: nn.Module, name: str, parts: list[QuantWeight]) -> None:
    """Swap the nn.Linear at dotted `name` for a QuantLinear over parts (its bias kept)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, leaf)
    rows = sum(part.out_features for part in parts)
    if rows != linear.out_features or parts[0].in_features != linear.in_features:
        raise ValueError(f"{name}: quantized parts give [{rows}, {parts[0].in_features}], the layer "
                         f"is [{linear.out_features}, {linear.in_features}]")
    setattr(parent, leaf, QuantLinear(merge_parts(parts), linear.bias))


def merge_parts(parts: list[QuantWeight]) -> list[QuantWeight]:
    """Adjacent parts of one quantization become one matrix (their rows concatenated)."""
    merged: list[QuantWeight] = []
    for part in parts:
        if merged and merged[-1].qtype == part.qtype:
            last = merged.pop()
            part = QuantWeight(part.qtype, torch.cat([last.data, part.data]),
                               last.out_features + part.out_features, part.in_features)
        merged.append(part)
    return merged


def count_quantized(model: nn.Module) -> int:
    return sum(1 for module in model.modules() if isinstance(module, QuantLinear))
