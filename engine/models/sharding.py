"""Megatron-style tensor parallelism, applied to a loaded model (as gpt-fast does): each
family names how its layers split (`tensor_parallel_plan`), and each layer here knows how to
take its rank's share of a full layer. Column-parallel projections (q/k/v, gate/up, c_fc)
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


def column_rows(parts: Sequence[int], rank: int, world_size: int) -> torch.Tensor:
    """Output rows of a fused column-parallel weight that one rank keeps: its share of each part."""
    rows, start = [], 0
    for size in parts:
        share = size // world_size
        rows.append(torch.arange(start + rank * share, start + (rank + 1) * share))
        start += size
    return torch.cat(rows)


def column_parallel(linear: nn.Linear, parts: Sequence[int], rank: int, world_size: int) -> nn.Linear:
    """A smaller nn.Linear holding this rank's rows of every part (bias likewise)."""
    rows = column_rows(parts, rank, world_size)
    return _linear(linear.weight.detach()[rows], None if linear.bias is None else linear.bias.detach()[rows])


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local.T) + b: this rank's input columns; the bias is added
    once, by rank 0."""

    def __init__(self, linear: nn.Linear, comm: Communicator) -> None:
        super().__init__()
        share = linear.in_features // comm.world_size
        columns = slice(comm.rank * share, (comm.rank + 1) * share)
        bias = linear.bias.detach() if linear.bias is not None and comm.rank == 0 else None
        self.linear = _linear(linear.weight.detach()[:, columns], bias)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    """The embedding rows of this rank's token ids; other ids look up zeros, and the sum over
    ranks (all-reduce) gives every rank the full embedding."""

    def __init__(self, embedding: nn.Embedding, vocab: VocabRange, comm: Communicator) -> None:
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach()[vocab.start: vocab.end].clone(),
                                   requires_grad=False)
        self.vocab, self.comm = vocab, comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.vocab.start) & (input_ids < self.vocab.end)
        local = F.embedding(torch.where(mine, input_ids - self.vocab.start, 0), self.weight)
        return self.comm.all_reduce(local * mine[:, None].to(local.dtype))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=False)
    return layer


def check_divisible(config: ModelConfig, world_size: int) -> None:
    """ConfigError unless heads, KV heads and the MLP width split evenly over the ranks."""
    sizes = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads,
             "intermediate size": config.intermediate_size}
    uneven = [f"{name} ({size})" for name, size in sizes.items() if size % world_size]
    if uneven:
        raise ConfigError(f"tensor_parallel_size={world_size} must divide the model's "
                          f"{', '.join(uneven)}; choose a size that divides them")


def shard_model(model: nn.Module, comm: Communicator, vocab_size: int) -> VocabRange:
    """Replace the model's layers by this rank's shares, in place; returns the token ids
    [start, end) whose logits this rank computes (vocab_size: the tokenizer's)."""
    if any(type(module).__name__ == "QuantLinear" for module in model.modules()):
        raise ConfigError("tensor parallelism runs float weights; load quantized models with "
                          "tensor_parallel_size=1, or give dtype float32/bfloat16")
    check_divisible(model.config, comm.world_size)
    vocab = vocab_ranges(vocab_size, comm.world_size)[comm.rank]
    plan = model.tensor_parallel_plan()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            split = plan.get(name)
            if split is not None:
                setattr(parent, name, _shard(child, split, vocab, comm))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.input_embedding().weight
    for module in model.modules():
        if hasattr(module, "shard_heads"):
            module.shard_heads(comm.world_size)
    return vocab


def _shard(layer: nn.Module, split: Split, vocab: VocabRange, comm: Communicator) -> nn.Module:
    if split.kind == "column":
        return column_parallel(layer, split.parts, comm.rank, comm.world_size)
    if split.kind == "row":
        return RowParallelLinear(layer, comm)
    if split.kind == "vocab":
        return VocabParallelEmbedding(layer, vocab, comm)
    rows = torch.arange(vocab.start, vocab.end)
    return _linear(layer.weight.detach()[rows], None)


def local_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config of one rank's share: its heads (and so its KV bytes per token)."""
    return replace(config, num_heads=config.num_heads // world_size,
                   num_kv_heads=config.num_kv_heads // world_size,
                   intermediate_size=config.intermediate_size // world_size)
