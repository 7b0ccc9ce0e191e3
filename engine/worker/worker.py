"""Worker: the models of one replica and the KV pool they share. It loads models (all of a
request's or none, from any thread), gives each its view of the pool, and runs one batched
forward per model per step, reporting a failing model's exception instead of raising it so
that only the requests on that model fail."""
from __future__ import annotations

import ctypes
import gc
import threading
from collections import Counter
from typing import Iterable, Optional, Union

import torch

from ..config import EngineConfig, ModelSpec
from ..distributed import Communicator
from ..kv_cache.pool import KVCachePool
from .model_runner import ForwardItem, ModelRunner

Results = dict[ModelSpec, Union[torch.Tensor, Exception]]


def release_freed_memory() -> None:
    """Return the heap pages that loading freed (checkpoint tensors, unpacked weights) to
    the OS; glibc keeps them otherwise, and a rank's resident memory should be its share."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class Worker:
    """Loaded models (ModelRunner per ModelSpec), the KV pool, and the per-step forwards."""

    def __init__(self, config: EngineConfig, comm: Optional[Communicator] = None) -> None:
        self.config = config
        self.comm = comm            # a tensor-parallel rank's group: models load sharded
        self.runners: dict[ModelSpec, ModelRunner] = {}
        self.pool: Optional[KVCachePool] = None
        self.forward_calls: Counter[ModelSpec] = Counter()
        self._load_lock = threading.Lock()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)

    def load(self, specs: Iterable[ModelSpec]) -> None:
        """Load every spec not loaded yet; if any fails, none of them is registered."""
        with self._load_lock:
            missing = [spec for spec in dict.fromkeys(specs) if spec not in self.runners]
            loaded = {spec: ModelRunner(spec, self.config.device, self.comm, self.config.kv_cache_dtype)
                      for spec in missing}
            self.runners.update(loaded)
            if loaded:
                release_freed_memory()

    def unload(self, specs: Iterable[ModelSpec]) -> None:
        """Forget models that no request uses (undoes a load that failed on another rank)."""
        with self._load_lock:
            for spec in specs:
                self.runners.pop(spec, None)

    def needs_new_pool(self, specs: Iterable[ModelSpec]) -> bool:
        """True when there is no pool yet or one of these models' tokens does not fit a page."""
        if self.pool is None:
            return True
        return any(not self.pool.fits(self.runners[spec].config) for spec in specs)

    def build_pool(self) -> KVCachePool:
        """A new arena sized for every loaded model (only while nothing holds pages)."""
        configs = {spec: runner.config for spec, runner in self.runners.items()}
        self.pool = KVCachePool(self.config.kv_cache_bytes, configs, self.config.page_tokens,
                                self.config.device)
        return self.pool

    def attach(self, specs: Iterable[ModelSpec]) -> None:
        """Give each model its view of the existing pool (no data moves)."""
        for spec in specs:
            self.pool.add_view(spec, self.runners[spec].config)

    def execute(self, work: dict[ModelSpec, list[ForwardItem]]) -> Results:
        """One forward per model: its logits rows in item order, or the exception it raised."""
        results: Results = {}
        for spec, items in work.items():
            self.forward_calls[spec] += 1
            try:
                results[spec] = self.runners[spec].execute(items, self.pool.views[spec])
            except Exception as error:  # isolate: only this model's requests fail
                results[spec] = error
        return results

    def execute_items(self, work: dict[ModelSpec, list[ForwardItem]]
                      ) -> dict[ModelSpec, Union[list[torch.Tensor], Exception]]:
        """execute, with each model's logits cut into one block per item (num_logits rows)."""
        results = self.execute(work)
        return {spec: rows if isinstance(rows, Exception)
                else list(torch.split(rows, [item.num_logits for item in work[spec]]))
                for spec, rows in results.items()}

    def copy_page(self, source: int, target: int) -> None:
        """Copy-on-write: duplicate one page of the pool."""
        self.pool.copy_page(source, target)

    def shutdown(self) -> None:
        """Nothing to release in one process."""
