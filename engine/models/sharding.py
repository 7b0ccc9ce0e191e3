"""Megatron-style tensor parallelism, applied while a model loads: each family names how its
layers split (`tensor_parallel_plan`); TensorParallel swaps the layers of the model's meta
skeleton for this rank's shares, and each checkpoint tensor is sliced as it is read (as
nano-vllm's weight loaders do), so no rank ever holds the whole model. Column-parallel projections (q/k/v, gate/up, c_fc)
keep their outputs split by heads or features; row-parallel ones (o/down/c_proj) take the
matching inputs and all-reduce their output; the embedding and the output head are split by
vocabulary, so the logits stay split too (the decoder reduces only per-row statistics)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmarith.distributed import Communicator, VocabRange, vocab_ranges
from lmarith.errors import ConfigError
from lmarith.models.config import ModelConfig


@dataclass(frozen=True)
class Split:
    """How one layer splits: "column" with the sizes of its fused parts (each split alike),
    "row" (split inputs, all-reduced output), "vocab" (the embedding) or "head"."""

    kind: str
    parts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Slicer:
    """What one rank keeps of a checkpoint tensor: "column" (its share of each part's rows),
    "row" (its share of the input columns), "vocab" (rows [start, end)) or "skip" (nothing:
    a row-parallel bias lives on rank 0 only); `target` renames the parameter."""

    kind: str
    rank: int
    world_size: int
    parts: tuple[int, ...] = ()
    vocab: VocabRange | None = None
    target: str | None = None

    def __call__(self, tensor: torch.Tensor, rows: slice | None):
        """(this rank's tensor, its rows in the local fused parameter)."""
        if self.kind == "vocab":
            return tensor[self.vocab.start: self.vocab.end], rows
        if self.kind == "row" and tensor.dim() == 2:
            share = tensor.shape[1] // self.world_size
            return tensor[:, self.rank * share: (self.rank + 1) * share], rows
        if self.kind == "row":           # the bias, on rank 0
            return tensor, rows
        if rows is None:                 # a checkpoint tensor holding every fused part
            return tensor[column_rows(self.parts, self.rank, self.world_size)], None
        share = tensor.shape[0] // self.world_size
        local = slice(rows.start // self.world_size, rows.stop // self.world_size)
        return tensor[self.rank * share: (self.rank + 1) * share], local


def column_rows(parts: Sequence[int], rank: int, world_size: int) -> torch.Tensor:
    """Output rows of a fused column-parallel weight that one rank keeps: its share of each part."""
    rows, start = [], 0
    for size in parts:
        share = size // world_size
        rows.append(torch.arange(start + rank * share, start + (rank + 1) * share))
        start += size
    return torch.cat(rows)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local.T) + b: this rank's input columns; the bias is added
    once, by rank 0."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Communicator) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    """The embedding rows of this rank's token ids; other ids look up zeros, and the sum over
    ranks (all-reduce) gives every rank the full embedding."""

    def __init__(self, vocab: VocabRange, dim: int, comm: Communicator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab.size, dim), requires_grad=False)
        self.vocab, self.comm = vocab, comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.vocab.start) & (input_ids < self.vocab.end)
        local = F.embedding(torch.where(mine, input_ids - self.vocab.start, 0), self.weight)
        return self.comm.all_reduce(local * mine[:, None].to(local.dtype))


def check_divisible(config: ModelConfig, world_size: int) -> None:
    """ConfigError unless heads, KV heads and the MLP width split evenly over the ranks."""
    sizes = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads,
             "intermediate size": config.intermediate_size}
    uneven = [f"{name} ({size})" for name, size in sizes.items() if size % world_size]
    if uneven:
        raise ConfigError(f"tensor_parallel_size={world_size} must divide the model's "
                          f"{', '.join(uneven)}; choose a size that divides them")


@dataclass
class TensorParallel:
    """How load_model shards a model: the rank's group and the tokenizer's vocabulary size.
    apply() runs on the model's meta skeleton, before any weight exists, so a rank only ever
    allocates its share; WeightFiller then slices each checkpoint tensor by `slicers`."""

    comm: Communicator
    vocab_size: int
    vocab: VocabRange | None = None

    def apply(self, model: nn.Module) -> None:
        """Replace the skeleton's layers by this rank's shares and record how to slice weights."""
        check_divisible(model.config, self.comm.world_size)
        self.vocab = vocab_ranges(self.vocab_size, self.comm.world_size)[self.comm.rank]
        plan = model.tensor_parallel_plan()
        slicers: dict[str, Slicer] = {}
        for prefix, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if name in plan:
                    full = f"{prefix}.{name}" if prefix else name
                    setattr(parent, name, self._local(child, full, plan[name], slicers))
        for module in model.modules():
            if hasattr(module, "shard_heads"):
                module.shard_heads(self.comm.world_size)
        model.weight_slicers = slicers

    def _local(self, layer: nn.Module, name: str, split: Split, slicers: dict) -> nn.Module:
        rank, size = self.comm.rank, self.comm.world_size
        make = lambda kind, **extra: Slicer(kind, rank, size, split.parts, self.vocab, **extra)  # noqa: E731
        if split.kind in ("vocab", "head"):
            slicers[f"{name}.weight"] = make("vocab")
            if split.kind == "vocab":
                return VocabParallelEmbedding(self.vocab, layer.weight.shape[1], self.comm)
            return nn.Linear(layer.in_features, self.vocab.size, bias=False)
        has_bias = layer.bias is not None
        if split.kind == "column":
            slicers.update({f"{name}.{leaf}": make("column") for leaf in ("weight", "bias")})
            return nn.Linear(layer.in_features, layer.out_features // size, bias=has_bias)
        slicers[f"{name}.weight"] = make("row", target=f"{name}.linear.weight")
        slicers[f"{name}.bias"] = make("row" if rank == 0 else "skip", target=f"{name}.linear.bias")
        return RowParallelLinear(layer.in_features // size, layer.out_features,
                                 has_bias and rank == 0, self.comm)


def local_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config of one rank's share: its heads (and so its KV bytes per token)."""
    return replace(config, num_heads=config.num_heads // world_size,
                   num_kv_heads=config.num_kv_heads // world_size,
                   intermediate_size=config.intermediate_size // world_size)
