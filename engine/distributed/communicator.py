"""Communicator: the collectives tensor parallelism needs, over one process group made from
a TCPStore (no global torch.distributed state, so several engines can live in one process).
Rank 0 drives: it broadcasts every command as a pickled object; every rank then joins the
same collectives in the same order."""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from .shared_memory import broadcast_bytes_through, gather_through, open_shared_memory


@dataclass
class CommStats:
    """What one rank's collectives cost so far: calls, bytes it sent in, seconds waited."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, num_bytes: int, started: float) -> None:
        self.calls += 1
        self.bytes += num_bytes
        self.seconds += time.perf_counter() - started


@dataclass(frozen=True)
class VocabRange:
    """The token ids [start, end) one rank holds of a vocabulary (its logits' columns)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def vocab_ranges(vocab_size: int, world_size: int) -> list[VocabRange]:
    """Equal contiguous shards of ceil(vocab_size / world_size) ids; the last may be shorter."""
    chunk = -(-vocab_size // world_size)
    return [VocabRange(min(r * chunk, vocab_size), min((r + 1) * chunk, vocab_size))
            for r in range(world_size)]


class Communicator:
    """One rank's handle on the tensor-parallel group: all-reduce, all-gather, object
    broadcast. A world of one is a valid communicator whose collectives do nothing."""

    def __init__(self, rank: int, world_size: int, store: Optional[dist.Store] = None,
                 device: str = "cpu", timeout_s: float = 300.0) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stats = CommStats()
        self.group = self.cpu_group = None
        if world_size > 1:   # objects go over gloo; tensors over NCCL when they live on CUDA
            timeout = timedelta(seconds=timeout_s)
            self.cpu_group = dist.ProcessGroupGloo(dist.PrefixStore("cpu", store), rank,
                                                   world_size, timeout)
            self.group = (dist.ProcessGroupNCCL(dist.PrefixStore("device", store), rank, world_size)
                          if device.startswith("cuda") else self.cpu_group)
        self.shm = None    # CPU ranks: the shared-memory path for small collectives
        if world_size > 1 and not device.startswith("cuda"):
            self.shm = open_shared_memory(store, rank, world_size, self.cpu_group, timeout_s)

    @staticmethod
    def host_store(world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
        """Rank 0's rendezvous store on a free local port (store.port tells the others)."""
        return dist.TCPStore("127.0.0.1", 0, world_size, True, timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    @staticmethod
    def join_store(port: int, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
        """A non-zero rank's client of rank 0's store."""
        return dist.TCPStore("127.0.0.1", port, world_size, False, timedelta(seconds=timeout_s))

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce in place over the ranks ("sum" or "max"); returns the tensor."""
        if self.group is not None:
            started = time.perf_counter()
            if self.shm is not None and self.shm.all_reduce_(tensor, op):
                self.stats.add(tensor.numel() * tensor.element_size(), started)
                return tensor
            options = dist.AllreduceOptions()
            options.reduceOp = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
            self.group.allreduce([tensor], options).wait()
            self.stats.add(tensor.numel() * tensor.element_size(), started)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor of the same shape, in rank order."""
        if self.group is None:
            return [tensor]
        started = time.perf_counter()
        gathered = None if self.shm is None else gather_through(self.shm, tensor, self.rank,
                                                                   self.world_size)
        if gathered is None:
            gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
            self.group.allgather([gathered], [tensor.contiguous()]).wait()
        self.stats.add(tensor.numel() * tensor.element_size(), started)
        return gathered

    def broadcast_object(self, value: Any = None) -> Any:
        """Rank 0's value, pickled, on every rank (others pass None)."""
        if self.cpu_group is None:
            return value
        payload = pickle.dumps(value) if self.rank == 0 else b""
        if self.shm is not None:
            started = time.perf_counter()
            received = broadcast_bytes_through(self.shm, payload, self.rank)
            self.stats.add(len(payload), started)
            if received is not None:
                return value if self.rank == 0 else pickle.loads(received)
        size = torch.zeros(1, dtype=torch.int64)
        size[0] = len(payload)
        self._broadcast(size)
        buffer = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == 0
                  else torch.empty(int(size[0]), dtype=torch.uint8))
        self._broadcast(buffer)
        return value if self.rank == 0 else pickle.loads(buffer.numpy().tobytes())

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's (small) value, in rank order, on every rank."""
        if self.cpu_group is None:
            return [value]
        payload = pickle.dumps(value)
        sizes = self._cpu_gather(torch.tensor([len(payload)], dtype=torch.int64))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return [pickle.loads(buf[: int(n.item())].numpy().tobytes())
                for buf, n in zip(self._cpu_gather(padded), sizes)]

    def _cpu_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.cpu_group.allgather([gathered], [tensor]).wait()
        return gathered

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if tensor.numel():
            started = time.perf_counter()
            options = dist.BroadcastOptions()
            options.rootRank = 0
            self.cpu_group.broadcast([tensor], options).wait()
            self.stats.add(tensor.numel() * tensor.element_size(), started)

    def close(self) -> None:
        """Release the process group."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        for group in {id(g): g for g in (self.group, self.cpu_group) if g is not None}.values():
            try:
                group.shutdown()
            except Exception:  # a peer already gone: nothing left to release
                pass
        self.group = self.cpu_group = None
