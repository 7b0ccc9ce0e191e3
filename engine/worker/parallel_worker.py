"""ParallelWorker: rank 0 of a tensor-parallel replica, with the Worker's interface. It starts
ranks 1..N-1 (one process each), and for every call broadcasts the command, then runs it on
its own rank: loading (each rank keeps its share of every layer), the pool (each rank holds
its heads' share of every page, so rank 0's block manager and page tables serve all),
page copies (sent with the next forward), the forwards, and the draws on vocabulary shards."""
from __future__ import annotations

import multiprocessing
import threading
from typing import Iterable, Union

import torch

from ..config import EngineConfig, ModelSpec
from ..decoding import DecodeRow, Sampled, next_tokens
from ..decoding.vocab_shards import ShardRow
from ..distributed import Communicator
from ..errors import ConfigError, EngineError, ModelLoadError
from .model_runner import ForwardItem
from .rank import Blocks, Rank, rank_main, rank_threads


class ParallelWorker:
    """The driver of N ranks; every public method is one broadcast command."""

    def __init__(self, config: EngineConfig) -> None:
        size = config.tensor_parallel_size
        if config.device.startswith("cuda") and size > torch.cuda.device_count():
            raise ConfigError(f"tensor_parallel_size={size} needs {size} GPUs, this machine has "
                              f"{torch.cuda.device_count()}; lower tensor_parallel_size")
        torch.set_num_threads(rank_threads(config))
        store = Communicator.host_store(size)
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=rank_main, args=(rank, config, store.port),
                                          daemon=True, name=f"lmarith-tp-rank{rank}")
                          for rank in range(1, size)]
        for process in self.processes:
            process.start()
        device = "cuda:0" if config.device.startswith("cuda") else config.device
        self.config = config
        self.rank = Rank(config, Communicator(0, size, store, device))
        self._store = store
        self._lock = threading.Lock()
        self._copies: list[tuple[int, int]] = []
        self._closed = False
        self.sharded_draws = 0          # rows drawn on vocabulary shards
        self.gathered_draws = 0         # rows drawn from whole-vocabulary (gathered) logits

    @property
    def runners(self):
        return self.rank.worker.runners

    @property
    def pool(self):
        return self.rank.worker.pool

    @property
    def forward_calls(self):
        return self.rank.worker.forward_calls

    def _call(self, *command):
        """Broadcast a command and run it here; EngineError once a rank has died."""
        with self._lock:
            dead = [p.name for p in self.processes if not p.is_alive()]
            if self._closed or dead:
                raise EngineError(f"the tensor-parallel ranks are gone ({', '.join(dead) or 'closed'}); "
                                  "create a new LLM")
            self.rank.comm.broadcast_object(command)
            return self.rank.handle(command)

    def load(self, specs: Iterable[ModelSpec]) -> None:
        """Load on every rank (all or none, on every rank)."""
        specs = list(specs)
        missing = [spec for spec in specs if spec not in self.runners]
        errors = self._call("load", specs)
        failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
        if not failed:
            return
        self._call("unload", missing)
        rank, error = failed[0]
        if isinstance(error, BaseException):
            raise error
        raise ModelLoadError(f"tensor-parallel rank {rank} could not load the models: {error}")

    def needs_new_pool(self, specs: Iterable[ModelSpec]) -> bool:
        return self.rank.worker.needs_new_pool(specs)

    def build_pool(self):
        self._copies.clear()
        return self._call("build_pool")

    def attach(self, specs: Iterable[ModelSpec]) -> None:
        self._call("attach", list(specs))

    def copy_page(self, source: int, target: int) -> None:
        """Queued: every rank copies its share just before the next forward reads the page."""
        self._copies.append((source, target))

    def execute_items(self, work: dict[ModelSpec, list[ForwardItem]]) -> Blocks:
        """One sharded forward per model on every rank; each item's logits block is either
        whole-vocabulary (item.full_logits) or rank 0's vocabulary shard."""
        compact = {spec: [item.compact() for item in items] for spec, items in work.items()}
        copies, self._copies = self._copies, []
        return self._call("execute", compact, copies)

    def next_tokens(self, rows: list[DecodeRow]) -> list[Union[Sampled, Exception]]:
        """Rows holding shards are drawn on the shards by every rank together; rows holding
        whole-vocabulary logits (gathered for them) are drawn here as without parallelism."""
        located = [self._locate(row) for row in rows]
        results: list[Union[Sampled, Exception]] = [Sampled(0)] * len(rows)
        local = [i for i, refs in enumerate(located) if refs is None]
        self.gathered_draws += len(local)
        for index, token in zip(local, next_tokens([rows[i] for i in local]) if local else []):
            results[index] = token
        sharded = [i for i, refs in enumerate(located) if refs is not None]
        self.sharded_draws += len(sharded)
        if sharded:
            jobs = [ShardRow(located[i], rows[i].plan, rows[i].params.temperature,
                             rows[i].params.top_k, rows[i].params.min_p, rows[i].seed, rows[i].step)
                    for i in sharded]
            try:
                drawn: list = [Sampled(token) for token in self._call("decode", jobs)]
            except Exception as error:  # this step's sharded rows fail, the engine goes on
                drawn = [error] * len(jobs)
            for index, token in zip(sharded, drawn):
                results[index] = token
        return results

    def _locate(self, row: DecodeRow):
        """(model, row) of each of the row's term logits in this step's shards, or None when
        the row holds whole-vocabulary logits."""
        refs = []
        for term in row.term_logits:
            ref = next(((spec, (term.storage_offset() - shard.storage_offset()) // shard.stride(0))
                        for spec, shard in self.rank.step_logits.items()
                        if term.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr()),
                       None)
            if ref is None:
                return None
            refs.append(ref)
        return refs

    def shutdown(self) -> None:
        """Stop every rank (idempotent)."""
        if self._closed:
            return
        try:
            self._call("stop")
        except Exception:  # a rank already died: stop the rest below
            pass
        self._closed = True
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
