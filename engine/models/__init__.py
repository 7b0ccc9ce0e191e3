"""Our own decoder LMs on a paged KV cache: Llama (SmolLM2, Mistral, Qwen2, Qwen3) and GPT-2,
their layers, the attention they call through the ops dispatch, configs, the architecture
registry, and loading/ (HF safetensors and GGUF). Models know nothing of formulas."""
from lmarith.errors import UnsupportedModelError
from lmarith.models.attention import AttentionMetadata, build_metadata, paged_self_attention
from lmarith.models.config import ModelConfig, kv_bytes_per_token
from lmarith.models.gpt2 import GPT2LMHeadModel
from lmarith.models.llama import LlamaForCausalLM
from lmarith.models.loading import build_model, load_model, load_tokenizer
from lmarith.models.registry import parse_config, supported_architectures

__all__ = [
    "AttentionMetadata", "GPT2LMHeadModel", "LlamaForCausalLM", "ModelConfig",
    "UnsupportedModelError", "build_metadata", "build_model", "kv_bytes_per_token", "load_model",
    "load_tokenizer", "paged_self_attention", "parse_config", "supported_architectures",
]
