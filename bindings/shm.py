"""Shared-memory all-reduce among the tensor-parallel ranks of one host (lmarith._C.ShmAllReduce,
csrc/shm_allreduce.h): microseconds per small tensor, where gloo over loopback TCP takes about a
millisecond.

Rank 0 creates the segment (create=True) under a name unique to its group (new_name()) and
hands the name to the other ranks (e.g. through the group's TCPStore), which open it
(create=False, waiting up to timeout_s for it to appear). Every rank must then make the same
all_reduce_ calls, with the same shapes, dtypes and ops, in the same order.

all_reduce_(tensor, op) reduces in place and returns True, or returns False, touching nothing
and waiting for no peer, when the tensor is not a CPU tensor of float32, bfloat16 or float64
of at most max_bytes: the caller then uses its gloo group. The decision depends only on device,
dtype and size, which all ranks share for one collective, so they fall back together.

Result: x_0 + x_1 + x_2 + ... summed left to right in rank order, in float32 for float32 and
bfloat16 (rounded once to bfloat16, to nearest even) and in float64 for float64; every rank
gets the same bits. "max" propagates NaN. A peer that does not arrive within timeout_s raises
RuntimeError, and the object is unusable afterwards. One caller at a time (not thread-safe).
The creator unlinks the segment's name after the first completed call (every peer has mapped
it by then) or on close, so a crashed group leaves nothing in /dev/shm.
"""
from __future__ import annotations

import os
import uuid

import torch

from lmarith.bindings import cpp

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}   # csrc ShmDtype
OP_CODES = {"sum": 0, "max": 1}                                        # csrc ShmOp


def available() -> bool:
    """True when the C++ extension built with the shared-memory all-reduce."""
    return cpp.available() and hasattr(cpp._C, "ShmAllReduce")


def new_name(prefix: str = "lmarith_ar") -> str:
    """A segment name no other group uses: prefix, this process's id and a random suffix."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"


class ShmAllReduce:
    """One rank's handle on a shared-memory all-reduce group of world_size processes, for
    tensors of up to max_bytes bytes."""

    def __init__(self, name: str, rank: int, world_size: int, max_bytes: int, create: bool,
                 timeout_s: float = 60.0) -> None:
        cpp.require(torch.device("cpu"), "ShmAllReduce")
        self._native = cpp._C.ShmAllReduce(name, rank, world_size, max_bytes, create, timeout_s)
        self.name, self.rank, self.world_size = self._native.name, rank, world_size
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    def supports(self, tensor: torch.Tensor) -> bool:
        """Whether all_reduce_ takes this tensor (CPU, a supported dtype, at most max_bytes)."""
        return (tensor.device.type == "cpu" and tensor.dtype in DTYPE_CODES
                and tensor.numel() * tensor.element_size() <= self.max_bytes)

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum",
                    timeout_s: float | None = None) -> bool:
        """Reduce tensor in place over the ranks ("sum" or "max"); False (tensor untouched)
        when it is not supported, so the caller falls back to gloo. A non-contiguous tensor is
        reduced through a contiguous copy. timeout_s: this call's wait for the peers (default:
        the handle's)."""
        if op not in OP_CODES:
            raise ValueError(f"ShmAllReduce: op must be 'sum' or 'max', got {op!r}")
        if not self.supports(tensor):
            return False
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        self._native.all_reduce(work.data_ptr(), work.numel(), DTYPE_CODES[work.dtype],
                                OP_CODES[op], -1.0 if timeout_s is None else timeout_s)
        if work is not tensor:
            tensor.copy_(work)
        return True

    @property
    def closed(self) -> bool:
        return self._native.closed

    def close(self) -> None:
        """Unmap the segment (the creator also unlinks its name); calls after it raise."""
        self._native.close()

    def __enter__(self) -> "ShmAllReduce":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
