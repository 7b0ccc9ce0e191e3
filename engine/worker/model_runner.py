"""ModelRunner: one loaded model and its tokenizer, and the batched forward of one step over
every sequence (of every term and request) that uses this model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelSpec
from ..errors import ModelLoadError
from ..kv_cache.pool import ModelCacheView
from ..models.attention import build_metadata
from ..models.loading import load_model, load_tokenizer
from ..models.packed_linear import pack_linears


@dataclass
class ForwardItem:
    """One sequence's share of a step: token ids [start, start + count) get computed;
    logits are wanted for the last `num_logits` of them (1 for decode, k+1 to verify k)."""

    token_ids: list[int]
    block_table: list[int]
    start: int
    count: int
    num_logits: int = 1


class ModelRunner:
    """Runs one model's batched forward over paged KV for a list of ForwardItems."""

    def __init__(self, spec: ModelSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self.model = load_model(spec.path, spec.torch_dtype, device, spec.quantization)
        self.num_packed_linears = pack_linears(self.model) if device == "cpu" else 0
        self.config = self.model.config
        self.tokenizer = load_tokenizer(spec.path)
        self.vocab_size = len(self.tokenizer)
        if self.vocab_size > self.config.vocab_size:
            raise ModelLoadError(f"{spec.path}: the tokenizer has {self.vocab_size} tokens but the "
                                 f"model only {self.config.vocab_size} logits")

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def execute(self, items: list[ForwardItem], cache: ModelCacheView) -> torch.Tensor:
        """One forward over all items; returns logits [sum(num_logits), vocab] in item order."""
        input_ids, positions, logit_rows = [], [], []
        for item in items:
            input_ids += item.token_ids[item.start: item.start + item.count]
            positions += range(item.start, item.start + item.count)
            end = len(input_ids)
            logit_rows += range(end - item.num_logits, end)
        meta = build_metadata([i.count for i in items], [i.start + i.count for i in items],
                              [i.block_table for i in items], cache.page_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, meta, cache.layers)
        rows = torch.tensor(logit_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[rows])[:, : self.vocab_size]
