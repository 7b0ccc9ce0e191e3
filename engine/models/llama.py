"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3) on a paged KV cache.

One implementation; the families differ only by config flags: qkv bias (Qwen2), per-head q/k
RMSNorm (Qwen3), sliding windows (Mistral), rope scaling, tied embeddings.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lmarith.bindings import ops
from lmarith.models.attention import AttentionMetadata, KVCache, paged_self_attention
from lmarith.models.config import ModelConfig
from lmarith.models.layers import CausalLMHead, GatedMLP, RMSNorm, RotaryEmbedding, WeightFiller
from lmarith.models.sharding import Split


class LlamaAttention(nn.Module):
    """Self-attention with fused QKV projection, rotary positions and grouped K/V heads."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.sizes), bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.sizes[0], config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.scale = self.head_dim ** -0.5
        self.window = config.sliding_window(layer)

    def shard_heads(self, world_size: int) -> None:
        """Keep 1/world_size of the heads (tensor parallelism split qkv_proj by heads)."""
        self.num_heads, self.num_kv_heads = self.num_heads // world_size, self.num_kv_heads // world_size
        self.sizes = [size // world_size for size in self.sizes]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """Attend the new tokens x [N, hidden] over their cached context; writes their K/V."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
            ops.rotary(q, *rope)
            ops.rotary(k, *rope)
        else:   # q and k sit side by side in qkv: one rotary call, in place
            ops.rotary(qkv[:, : self.sizes[0] + self.sizes[1]].view(num_tokens, -1, self.head_dim), *rope)
        out = paged_self_attention(q, k, v, cache, meta, self.scale, self.window)
        return self.o_proj(out.reshape(num_tokens, self.sizes[0]))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); each residual add is fused
    into the next norm (the running sum travels beside the block's output, as in vLLM)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One block over the step's new tokens: (its output, the residual sum before it);
        their sum is the block's result. residual None: x is the embedding."""
        if residual is None:
            hidden, residual = self.input_layernorm(x), x
        else:
            hidden, residual = self.input_layernorm(x, residual)
        hidden, residual = self.post_attention_layernorm(self.self_attn(hidden, rope, meta, cache), residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm (the `model.` prefix of checkpoint names)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


# Checkpoint projection name -> (our fused module, which part of it).
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaForCausalLM(CausalLMHead):
    """Llama-family causal LM: forward gives final hidden states, compute_logits the scores."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(config, device)
        self.native_stack = None    # CPU + quantized linears: models/native_stack.py sets it

    def input_embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def tensor_parallel_plan(self) -> dict[str, Split]:
        """How each layer splits over tensor-parallel ranks (see models/sharding.py)."""
        config = self.config
        kv = config.num_kv_heads * config.head_dim
        return {"qkv_proj": Split("column", (config.num_heads * config.head_dim, kv, kv)),
                "o_proj": Split("row"), "down_proj": Split("row"),
                "gate_up_proj": Split("column", (config.intermediate_size,) * 2),
                "embed_tokens": Split("vocab"), "lm_head": Split("head")}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """Hidden states [N, hidden] of this step's new tokens; their K/V go into kv_caches."""
        x, residual = self.model.embed_tokens(input_ids), None
        rope = self.rotary.cos_sin(positions, x.dtype)
        if self.native_stack is not None:   # the same layers in one C++ call
            summed = self.native_stack(x, rope, meta, kv_caches)
            if summed is not None:
                return self.model.norm(summed)
        for layer, cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, rope, meta, cache)
        return self.model.norm(x, residual)[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from (Hugging Face name, tensor) pairs, fusing q/k/v and gate/up."""
        filler = WeightFiller(self)
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module, _, leaf = name.rpartition(".")
            prefix, _, proj = module.rpartition(".")
            if proj in PACKED:
                fused, part = PACKED[proj]
                filler.fill(f"{prefix}.{fused}.{leaf}", tensor, self.part_rows(fused, part))
            else:
                filler.fill(name, tensor)
        filler.finish()

    def part_rows(self, fused: str, part: int) -> slice:
        """Rows of a fused projection that hold one checkpoint projection."""
        if fused == "gate_up_proj":
            size = self.config.intermediate_size
            return slice(part * size, (part + 1) * size)
        q_size = self.config.num_heads * self.config.head_dim
        kv_size = self.config.num_kv_heads * self.config.head_dim
        starts = [0, q_size, q_size + kv_size, q_size + 2 * kv_size]
        return slice(starts[part], starts[part + 1])
