"""Architecture name (config.json `architectures[0]`) -> model class and config parser."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lmarith.errors import UnsupportedModelError
from lmarith.models.config import ModelConfig, gpt2_config, llama_config
from lmarith.models.gpt2 import GPT2LMHeadModel
from lmarith.models.llama import LlamaForCausalLM


ConfigParser = Callable[[dict[str, Any], torch.dtype], ModelConfig]

MODELS: dict[str, tuple[type[nn.Module], ConfigParser]] = {
    "LlamaForCausalLM": (LlamaForCausalLM, llama_config),
    "MistralForCausalLM": (LlamaForCausalLM, llama_config),
    "Qwen2ForCausalLM": (LlamaForCausalLM, llama_config),
    "Qwen3ForCausalLM": (LlamaForCausalLM, llama_config),
    "GPT2LMHeadModel": (GPT2LMHeadModel, gpt2_config),
}

# config.json `model_type` (also GGUF `general.architecture`) -> architecture name.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def supported_architectures() -> list[str]:
    """Architecture names load_model accepts."""
    return sorted(MODELS)


def lookup(architecture: str) -> tuple[type[nn.Module], ConfigParser]:
    """Model class and config parser for an architecture, or UnsupportedModelError."""
    if architecture not in MODELS:
        raise UnsupportedModelError(
            f"unsupported model architecture {architecture!r}; "
            f"supported: {', '.join(supported_architectures())}")
    return MODELS[architecture]


def parse_config(raw: dict[str, Any], dtype: torch.dtype = torch.float32) -> ModelConfig:
    """ModelConfig from a config.json dict; UnsupportedModelError for unknown architectures."""
    model_type = raw.get("model_type", "<missing>")
    architectures = raw.get("architectures") or [MODEL_TYPES.get(model_type, model_type)]
    return lookup(architectures[0])[1]({**raw, "architectures": architectures}, dtype)


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The class implementing config.architecture."""
    return lookup(config.architecture)[0]
