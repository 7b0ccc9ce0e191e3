"""Model implementations and loaders: our own torch decoder LMs running on a paged KV cache."""
from lmarith.models.attention import (AttentionMetadata, AttentionPlan, attend, build_metadata,
                                      paged_attention, plan_attention, store_kv)
from lmarith.models.config import ModelConfig, kv_bytes_per_token
from lmarith.models.gpt2 import GPT2LMHeadModel
from lmarith.models.llama import LlamaForCausalLM
from lmarith.models.loader import build_model, load_model
from lmarith.models.registry import UnsupportedModelError, parse_config, supported_architectures

__all__ = [
    "AttentionMetadata", "AttentionPlan", "GPT2LMHeadModel", "LlamaForCausalLM", "ModelConfig",
    "UnsupportedModelError", "attend", "build_metadata", "build_model", "kv_bytes_per_token",
    "load_model", "paged_attention", "parse_config", "plan_attention", "store_kv",
    "supported_architectures",
]
