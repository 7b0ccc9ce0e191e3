"""The paged KV cache shared by every model: `pool` owns the one byte arena and each model's
view of it, `block_manager` hands out pages to sequences (ref counts, copy-on-write,
truncation for rollback, all-or-nothing admission) and `prefix_cache` finds committed pages
by their chained hash. Page ids are all the engine above sees."""
from .block_manager import BlockManager, PagedSequence
from .pool import KVCachePool, ModelCacheView, free_memory_bytes, kv_budget
from .prefix_cache import Page, PrefixCache, page_hash

__all__ = ["BlockManager", "KVCachePool", "ModelCacheView", "Page", "PagedSequence", "PrefixCache",
           "free_memory_bytes", "kv_budget", "page_hash"]
