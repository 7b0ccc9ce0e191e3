"""ModelConfig: the architecture facts our model implementations need, read from config.json."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Shape and numerics of one decoder LM, independent of where its weights come from."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    kv_dtype: torch.dtype | None = None     # the KV cache's dtype when not the model's

    @property
    def cache_dtype(self) -> torch.dtype:
        """What the paged KV cache stores (kv_cache_dtype, else the model's dtype)."""
        return self.kv_dtype or self.dtype

    def sliding_window(self, layer: int) -> int | None:
        """Attention window of one layer (None means full causal attention)."""
        return self.sliding_windows[layer] if self.sliding_windows else None


def kv_bytes_per_token(config: ModelConfig) -> int:
    """Bytes of K and V cache one token needs across all layers."""
    itemsize = torch.empty((), dtype=config.cache_dtype).element_size()
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize


def eos_ids(*values: Any) -> tuple[int, ...]:
    """Merge eos ids given as ints, lists or None into one ordered tuple without repeats."""
    merged: list[int] = []
    for value in values:
        items = value if isinstance(value, (list, tuple)) else [value]
        merged += [int(v) for v in items if v is not None and int(v) not in merged]
    return tuple(merged)


def rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from v5 `rope_parameters` or the older `rope_theta` / `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    params.update(raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    return theta, (None if kind == "default" else {"rope_type": kind, **params})


def layer_windows(raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window: `layer_types` when given, else Mistral's global window."""
    window = raw.get("sliding_window")
    model_type = raw.get("model_type", "")
    if window is None or (model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window")):
        return ()
    types = raw.get("layer_types")
    if types is None and model_type in ("qwen2", "qwen3"):
        first = raw.get("max_window_layers", num_layers)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def llama_config(raw: dict[str, Any], dtype: torch.dtype) -> ModelConfig:
    """ModelConfig for the Llama family (Llama, Mistral, Qwen2, Qwen3) from a config.json dict."""
    model_type = raw.get("model_type", "llama")
    heads = raw["num_attention_heads"]
    layers = raw["num_hidden_layers"]
    theta, scaling = rope_settings(raw)
    return ModelConfig(
        architecture=raw["architectures"][0], vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=layers, num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm_eps=raw.get("rms_norm_eps", 1e-6), hidden_act=raw.get("hidden_act", "silu"),
        rope_theta=theta, rope_scaling=scaling,
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_windows=layer_windows(raw, layers),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids(raw.get("eos_token_id")),
        dtype=dtype,
    )


def gpt2_config(raw: dict[str, Any], dtype: torch.dtype) -> ModelConfig:
    """ModelConfig for GPT-2 from a config.json dict."""
    hidden = raw["n_embd"]
    heads = raw["n_head"]
    return ModelConfig(
        architecture=raw["architectures"][0], vocab_size=raw["vocab_size"],
        hidden_size=hidden, intermediate_size=raw.get("n_inner") or 4 * hidden,
        num_layers=raw["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=raw.get("n_positions", 1024),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        hidden_act=raw.get("activation_function", "gelu_new"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids(raw.get("eos_token_id")),
        dtype=dtype,
    )
