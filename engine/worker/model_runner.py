"""ModelRunner: one loaded model and its tokenizer, and the batched forward of one step over
every sequence (of every term and request) that uses this model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelSpec
from ..distributed import Communicator, VocabRange
from ..errors import ConfigError, ModelLoadError
from ..kv_cache.pool import ModelCacheView
from ..models.attention import build_metadata
from ..models.loading import check_model_path, load_model, load_tokenizer
from ..models.bf16_linear import use_bf16_linears
from ..models.f32_linear import use_f32_linears
from ..models.native_stack import use_native_stack
from ..models.packed_linear import pack_linears
from ..models.sharding import TensorParallel, local_config


@dataclass
class ForwardItem:
    """One sequence's share of a step: token ids [start, start + count) get computed;
    logits are wanted for the last `num_logits` of them (1 for decode, k+1 to verify k)."""

    token_ids: list[int]
    block_table: list[int]
    start: int
    count: int
    num_logits: int = 1
    full_logits: bool = True    # tensor parallel: gather every vocabulary shard of its logits
    ids_offset: int = 0         # token_ids[0] is the token at this position

    def new_token_ids(self) -> list[int]:
        """The ids this step computes."""
        first = self.start - self.ids_offset
        return self.token_ids[first: first + self.count]

    def compact(self) -> "ForwardItem":
        """The same item carrying only the ids this step computes (cheap to send to ranks)."""
        return ForwardItem(self.new_token_ids(), self.block_table, self.start, self.count,
                           self.num_logits, self.full_logits, self.start)


class ModelRunner:
    """Runs one model's batched forward over paged KV for a list of ForwardItems."""

    def __init__(self, spec: ModelSpec, device: str = "cpu",
                 comm: Optional[Communicator] = None, kv_cache_dtype: str = "auto") -> None:
        self.spec = spec
        self.device = device
        parallel, tokenizer = None, None
        if comm is not None and comm.world_size > 1:   # shards need the tokenizer's vocabulary
            if spec.quantization is not None:
                raise ConfigError(f"tensor parallelism runs float weights, but {spec} is quantized; "
                                  "give dtype float32 or bfloat16, or tensor_parallel_size=1")
            check_model_path(spec.path)
            tokenizer = load_tokenizer(spec.path)
            parallel = TensorParallel(comm, len(tokenizer))
        self.model = load_model(spec.path, spec.torch_dtype, device, spec.quantization, parallel)
        self.config = self.model.config
        self.tokenizer = tokenizer or load_tokenizer(spec.path)
        self.vocab_size = len(self.tokenizer)
        if self.vocab_size > self.config.vocab_size:
            raise ModelLoadError(f"{spec.path}: the tokenizer has {self.vocab_size} tokens but the "
                                 f"model only {self.config.vocab_size} logits")
        self.vocab = VocabRange(0, self.vocab_size) if parallel is None else parallel.vocab
        if parallel is not None:    # the pool sizes this rank's KV by its heads
            self.config = local_config(self.config, comm.world_size)
        if kv_cache_dtype != "auto":
            self.config = dataclasses.replace(self.config, kv_dtype=getattr(torch, kv_cache_dtype))
        # CPU: float32 and bfloat16 linears packed for the C++ kernels (float32 ones for
        # oneDNN when the extension is missing)
        self.num_packed_linears = (use_f32_linears(self.model) + pack_linears(self.model)
                                   + use_bf16_linears(self.model) if device == "cpu" else 0)
        # CPU, quantized llama-family: the decoder layers run as one C++ call per step
        self.native_stack = device == "cpu" and use_native_stack(self.model)

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def execute(self, items: list[ForwardItem], cache: ModelCacheView) -> torch.Tensor:
        """One forward over all items; returns logits [sum(num_logits), vocab] in item order."""
        input_ids, positions, logit_rows = [], [], []
        for item in items:
            input_ids += item.new_token_ids()
            positions += range(item.start, item.start + item.count)
            end = len(input_ids)
            logit_rows += range(end - item.num_logits, end)
        meta = build_metadata([i.count for i in items], [i.start + i.count for i in items],
                              [i.block_table for i in items], cache.page_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, meta, cache.layers)
        rows = torch.tensor(logit_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[rows])[:, : self.vocab.size]
