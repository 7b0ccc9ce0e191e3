"""GPT-2 on a paged KV cache: learned positions, LayerNorm, fused QKV, GELU MLP."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lmarith.models.attention import AttentionMetadata, KVCache, paged_self_attention
from lmarith.models.config import ModelConfig
from lmarith.models.layers import CausalLMHead, WeightFiller, activation
from lmarith.models.sharding import Split

# HF GPT-2 stores these as Conv1D weights [in, out]; nn.Linear wants [out, in].
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that old GPT-2 checkpoints carry as if they were weights.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT2Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and no rotary positions."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale

    def shard_heads(self, world_size: int) -> None:
        """Keep 1/world_size of the heads (tensor parallelism split c_attn by heads)."""
        self.num_heads //= world_size

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """Attend the new tokens x [N, hidden] over their cached context; writes their K/V."""
        num_tokens = x.shape[0]
        qkv = self.c_attn(x).view(num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        out = paged_self_attention(q, k, v, cache, meta, self.scale)
        return self.c_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class GPT2MLP(nn.Module):
    """c_fc -> activation -> c_proj."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward block."""
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """One transformer block over the step's new tokens."""
        x = x + self.attn(self.ln_1(x), meta, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """Token and position embeddings, blocks, final LayerNorm (the `transformer.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class GPT2LMHeadModel(CausalLMHead):
    """GPT-2 causal LM: forward gives final hidden states, compute_logits the scores."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def tensor_parallel_plan(self) -> dict[str, Split]:
        """How each layer splits over tensor-parallel ranks (see models/sharding.py)."""
        hidden = self.config.hidden_size
        return {"c_attn": Split("column", (hidden,) * 3),
                "c_fc": Split("column", (self.config.intermediate_size,)),
                "c_proj": Split("row"), "wte": Split("vocab"), "lm_head": Split("head")}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """Hidden states [N, hidden] of this step's new tokens; their K/V go into kv_caches."""
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block, cache in zip(self.transformer.h, kv_caches):
            x = block(x, meta, cache)
        return self.transformer.ln_f(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from HF GPT-2 (name, tensor) pairs, transposing Conv1D weights."""
        filler = WeightFiller(self)
        for name, tensor in weights:
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            tied_head = name == "lm_head.weight" and self.config.tie_word_embeddings
            if name.endswith(MASK_BUFFERS) or tied_head:
                continue
            filler.fill(name, tensor.t() if name.endswith(CONV1D) else tensor)
        filler.finish()
