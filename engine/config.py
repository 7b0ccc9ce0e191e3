"""Settings as dataclasses: ModelSpec (which weights, in which dtype) keys the model runners,
the KV views and the prefix cache; EngineConfig holds the engine's limits. Both are checked
when made, so a bad value fails at the call that gave it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError, ModelLoadError

DTYPES = ("float32", "bfloat16", "float16", "auto", "q8_0")
QUANTIZED = ("auto", "q8_0")   # quantized linear layers; activations and KV cache in float32


@dataclass(frozen=True)
class ModelSpec:
    """One set of weights: a Hugging Face directory or a .gguf file, run in one dtype.
    "auto": a GGUF file keeps its quantization (a float checkpoint loads as float32);
    "q8_0": projections quantised to q8_0 at load."""

    path: str
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ModelLoadError(f"a model path must be a non-empty string, got {self.path!r}")
        object.__setattr__(self, "path", str(self.path))
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"dtype {self.dtype!r} of model {self.path} is not supported; "
                                 f"use one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self):
        """The torch dtype the (float) weights, activations and KV cache use."""
        import torch
        return torch.float32 if self.dtype in QUANTIZED else getattr(torch, self.dtype)

    @property
    def quantization(self) -> Optional[str]:
        """"auto" or "q8_0" for quantized linear layers, else None."""
        return self.dtype if self.dtype in QUANTIZED else None

    def __str__(self) -> str:
        return f"{self.path} ({self.dtype})"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# "auto": each model's KV in its own dtype; "bfloat16" halves a float32 model's KV bytes
# (attention reads them widened to float32), which long contexts are bound by on CPU.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """What one engine may use: KV budget in bytes (per tensor-parallel rank), running
    requests, tokens computed per step (longer prompts are chunked), tokens per KV page,
    device, CPU threads (per rank), the tensor-parallel size (ranks per replica) and the KV
    cache's dtype (KV_CACHE_DTYPES)."""

    kv_cache_bytes: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    page_tokens: int = 16
    device: str = "cpu"
    num_threads: Optional[int] = None
    tensor_parallel_size: int = 1
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                              f"{self.kv_cache_dtype!r}")
        for name in ("kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "page_tokens",
                     "tensor_parallel_size"):
            _positive_int(name, getattr(self, name))
        if self.num_threads is not None:
            _positive_int("num_threads", self.num_threads)
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
