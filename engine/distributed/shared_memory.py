"""The shared-memory fast path of a CPU tensor-parallel group (lmarith.bindings.shm: a few
microseconds per small collective where gloo over loopback TCP takes about a millisecond).
All three collectives the ranks make every step ride on its in-place sum: an all-reduce
directly, an all-gather as the sum of zero-padded per-rank blocks (adding zeros is exact),
and rank 0's pickled command as bytes held in float32 (0..255, exact). Anything larger than
the segment's slots, or of another dtype, goes over gloo, on every rank alike."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

SHM_ENV = "LMARITH_TP_SHM"            # "0": every collective over gloo (for comparisons)
SHM_SLOT_BYTES = 4 << 20              # per rank and call parity: 2 x world x 4 MiB of /dev/shm
STORE_KEY = "lmarith_shm_segment"
IDLE_WAIT_S = 1e9                     # a rank awaits rank 0's next command as long as it takes


def open_shared_memory(store: dist.Store, rank: int, world_size: int, cpu_group,
                       timeout_s: float):
    """Every rank's handle on one segment, or None on every rank when any rank cannot use
    one (no extension, /dev/shm full, LMARITH_TP_SHM=0): the ranks agree over gloo."""
    from lmarith.bindings import shm
    handle, usable = None, os.environ.get(SHM_ENV, "1") != "0" and shm.available()
    try:
        if rank == 0:
            name = shm.new_name() if usable else ""
            if name:
                handle = shm.ShmAllReduce(name, 0, world_size, SHM_SLOT_BYTES, True, timeout_s)
            store.set(STORE_KEY, name)
        else:
            name = store.get(STORE_KEY).decode()
            if name and usable:
                handle = shm.ShmAllReduce(name, rank, world_size, SHM_SLOT_BYTES, False, timeout_s)
    except (RuntimeError, ValueError, OSError):    # this rank goes without; so will the others
        handle = None
    agreed = torch.tensor([0 if handle is None else 1], dtype=torch.int64)
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.MIN
    cpu_group.allreduce([agreed], options).wait()
    if handle is not None and not agreed.item():
        handle.close()
        handle = None
    return handle


def gather_through(handle, tensor: torch.Tensor, rank: int, world_size: int
                   ) -> Optional[list[torch.Tensor]]:
    """Every rank's tensor, as the sum of zero-padded blocks; None when it does not fit."""
    pooled = tensor.new_zeros((world_size, *tensor.shape))
    pooled[rank] = tensor
    return list(pooled.unbind(0)) if handle.all_reduce_(pooled, "sum") else None


def broadcast_bytes_through(handle, payload: bytes, rank: int) -> Optional[bytes]:
    """Rank 0's bytes on every rank (others pass b""); None when they do not fit (every rank
    learns the size first, so all fall back together). Ranks 1.. wait for the size without
    a timeout: an idle engine sends no command for as long as it likes."""
    size = torch.tensor([float(len(payload))], dtype=torch.float64)
    handle.all_reduce_(size, "sum", None if rank == 0 else IDLE_WAIT_S)
    count = int(size.item())
    data = torch.zeros(count, dtype=torch.float32)
    if not handle.supports(data):
        return None
    if rank == 0 and count:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    handle.all_reduce_(data, "sum")
    return payload if rank == 0 else data.to(torch.uint8).numpy().tobytes()
