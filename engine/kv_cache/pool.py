"""The KV memory budget: one byte arena cut into equal pages that every model shares.

Design ("uniform page bytes"): page_bytes = page_tokens x the largest per-token KV footprint
among the models known when the pool is made; model m stores floor(page_bytes /
kv_bytes_per_token(m)) tokens per page. One free list and one budget serve all models; a
model with a smaller footprint wastes page_bytes mod its footprint per page (zero when all
models have one shape). A model loaded later joins without touching the arena when one of
its tokens fits in a page. Each model sees the arena as
[num_pages, layers, 2, page_size, kv_heads, head_dim].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional

import torch

from ..errors import ConfigError
from ..models.config import ModelConfig, kv_bytes_per_token


def free_memory_bytes(device: str = "cpu") -> int:
    """Memory available now on the device: free GPU memory, or available RAM on the CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget(kv_cache_bytes: Optional[int], kv_cache_fraction: float, device: str = "cpu") -> int:
    """The KV budget: an explicit byte count, or a fraction of the memory free now."""
    if kv_cache_bytes is not None:
        if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1:
            raise ConfigError(f"kv_cache_bytes must be a positive integer, got {kv_cache_bytes!r}")
        return kv_cache_bytes
    if isinstance(kv_cache_fraction, bool) or not isinstance(kv_cache_fraction, (int, float)) \
            or not 0 < kv_cache_fraction <= 0.9:
        raise ConfigError(f"kv_cache_fraction must be in (0, 0.9], got {kv_cache_fraction!r}")
    return int(free_memory_bytes(device) * kv_cache_fraction)


@dataclass
class ModelCacheView:
    """One model's per-layer (key_cache, value_cache) views of the shared arena."""

    page_size: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class KVCachePool:
    """The arena and every model's view of it, keyed by whatever keys the configs (ModelSpec)."""

    def __init__(self, kv_cache_bytes: int, configs: Mapping[Hashable, ModelConfig],
                 page_tokens: int = 16, device: str = "cpu") -> None:
        self.page_bytes = page_tokens * max(kv_bytes_per_token(c) for c in configs.values())
        self.num_pages = kv_cache_bytes // self.page_bytes
        if self.num_pages < 1:
            raise ConfigError(f"kv_cache_bytes={kv_cache_bytes} is smaller than one page "
                              f"({self.page_bytes} bytes); raise kv_cache_bytes")
        self.arena = torch.zeros(self.num_pages, self.page_bytes, dtype=torch.uint8, device=device)
        self.views: dict[Hashable, ModelCacheView] = {}
        for key, config in configs.items():
            self.add_view(key, config)

    def fits(self, config: ModelConfig) -> bool:
        """True when one token of this model's KV fits in a page."""
        return kv_bytes_per_token(config) <= self.page_bytes

    def add_view(self, key: Hashable, config: ModelConfig) -> ModelCacheView:
        """Give a model its view of the arena (no data moves); the model must fit a page."""
        if key not in self.views:
            if not self.fits(config):
                raise ValueError(f"{key}: one token's KV is larger than a page; rebuild the pool")
            self.views[key] = self._view(config, kv_bytes_per_token(config))
        return self.views[key]

    def _view(self, config: ModelConfig, footprint: int) -> ModelCacheView:
        page_size = self.page_bytes // footprint
        used = page_size * footprint
        typed = self.arena[:, :used].view(config.cache_dtype)
        shaped = typed.view(self.num_pages, config.num_layers, 2, page_size,
                            config.num_kv_heads, config.head_dim)
        layers = [(shaped[:, layer, 0], shaped[:, layer, 1]) for layer in range(config.num_layers)]
        return ModelCacheView(page_size, layers)

    def copy_page(self, source: int, target: int) -> None:
        """Copy-on-write support: duplicate a page's bytes (all models' layouts at once)."""
        self.arena[target].copy_(self.arena[source])
