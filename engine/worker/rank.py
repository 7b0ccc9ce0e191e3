"""Rank: one tensor-parallel rank's share of a replica (its Worker, with models sharded and
its heads' share of every KV page) and the commands rank 0 broadcasts to it. Every rank runs
each command in the same order, so the collectives inside line up; `rank_main` is the loop
of ranks 1..N-1, each in its own process."""
from __future__ import annotations

import os
import pickle
from dataclasses import replace
from typing import Any, Union

import torch

from ..config import EngineConfig, ModelSpec
from ..decoding.vocab_shards import ShardRow, draw
from ..distributed import Communicator, vocab_ranges
from .model_runner import ForwardItem
from .worker import Worker

Blocks = dict[ModelSpec, Union[list[torch.Tensor], Exception]]


class Rank:
    """A rank's Worker and the logits shards of its last step (what `decode` reads)."""

    def __init__(self, config: EngineConfig, comm: Communicator) -> None:
        self.comm = comm
        self.worker = Worker(config, comm)
        self.step_logits: dict[ModelSpec, torch.Tensor] = {}

    def handle(self, command: tuple) -> Any:
        """Run one broadcast command: (name, *arguments)."""
        name, *arguments = command
        return getattr(self, f"do_{name}")(*arguments)

    def do_load(self, specs: list[ModelSpec]) -> list:
        """Load on every rank; each rank's error (None when it loaded), in rank order."""
        try:
            self.worker.load(specs)
            error = None
        except Exception as failure:
            error = failure
        return self.comm.gather_objects(_portable(error))

    def do_unload(self, specs: list[ModelSpec]) -> None:
        self.worker.unload(specs)

    def do_build_pool(self):
        return self.worker.build_pool()

    def do_attach(self, specs: list[ModelSpec]) -> None:
        self.worker.attach(specs)

    def do_execute(self, work: dict[ModelSpec, list[ForwardItem]],
                   copies: list[tuple[int, int]]) -> Blocks:
        """Pending page copies, one forward per model, then the gathered rows of the items
        that want whole-vocabulary logits; the rest stay this rank's shard."""
        for source, target in copies:
            self.worker.copy_page(source, target)
        results = self.worker.execute(work)
        self.step_logits = {spec: rows for spec, rows in results.items()
                            if not isinstance(rows, Exception)}
        blocks: Blocks = {}
        for spec, rows in results.items():
            blocks[spec] = rows if isinstance(rows, Exception) else self._blocks(spec, work[spec], rows)
        return blocks

    def _blocks(self, spec: ModelSpec, items: list[ForwardItem], rows: torch.Tensor) -> list[torch.Tensor]:
        shards = list(torch.split(rows, [item.num_logits for item in items]))
        wanted = [index for index, item in enumerate(items) if item.full_logits and item.num_logits]
        if not wanted:
            return shards
        full = self.gather_vocab(torch.cat([shards[index] for index in wanted]),
                                 self.worker.runners[spec].vocab_size)
        sizes = [shards[index].shape[0] for index in wanted]
        for index, block in zip(wanted, torch.split(full, sizes)):
            shards[index] = block
        return shards

    def gather_vocab(self, shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Whole-vocabulary rows [M, vocab_size] from every rank's columns of them."""
        ranges = vocab_ranges(vocab_size, self.comm.world_size)
        padded = shard.new_zeros(shard.shape[0], ranges[0].size)
        padded[:, : shard.shape[1]] = shard
        pieces = self.comm.all_gather(padded)
        return torch.cat([piece[:, : part.size] for piece, part in zip(pieces, ranges)], dim=1)

    def do_decode(self, rows: list[ShardRow]) -> list[int]:
        """Every row's token, drawn on the vocabulary shards of this step's logits."""
        first_spec = rows[0].term_rows[0][0]
        vocab = self.worker.runners[first_spec].vocab
        filler = self.step_logits[first_spec].new_zeros(vocab.size)

        def term(row: ShardRow, slot: int) -> torch.Tensor:   # a missing slot has weight 0
            if slot >= len(row.term_rows):
                return filler
            spec, index = row.term_rows[slot]
            return self.step_logits[spec][index]
        num_terms = max(len(row.term_rows) for row in rows)
        stacked = torch.stack([torch.stack([term(row, slot) for row in rows])
                               for slot in range(num_terms)])
        return draw(stacked, rows, vocab, self.comm)

    def do_stop(self) -> None:
        self.comm.close()


def _portable(error: BaseException | None):
    """The error itself when it pickles (to re-raise on rank 0), else its text."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return f"{type(error).__name__}: {error}"


def rank_threads(config: EngineConfig) -> int:
    """Threads of each rank: num_threads when given, else the cores split over the ranks."""
    return config.num_threads or max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no orphan awaits commands forever)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rank_main(rank: int, config: EngineConfig, port: int) -> None:
    """A non-zero rank's process: join rank 0's group, then run its commands until stop
    (and die with rank 0's process, should that be killed)."""
    _die_with_parent()
    torch.set_num_threads(rank_threads(config))
    device = f"cuda:{rank}" if config.device.startswith("cuda") else config.device
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    store = Communicator.join_store(port, config.tensor_parallel_size)
    comm = Communicator(rank, config.tensor_parallel_size, store, device)
    state = Rank(replace(config, device=device), comm)
    while True:
        command = comm.broadcast_object()
        state.handle(command)
        if command[0] == "stop":
            return

