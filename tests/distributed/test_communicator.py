"""Communicator between 2 spawned processes, with the shared-memory path and over gloo
alone: the same results (all-reduce sum/max, all-gather, object broadcast of small and
large payloads), and a rank awaiting a command longer than the timeout still gets it."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from lmarith.distributed import Communicator

TIMEOUT_S = 8.0     # the shm handle's wait for peers (and gloo's, which must outlast a spawn)


def _collectives(comm: Communicator) -> dict:
    gen = torch.Generator().manual_seed(comm.rank)
    values = torch.randn(3, 577, generator=gen)
    values[0, 5] = float("-inf")
    summed = comm.all_reduce(values.clone(), "sum")
    maxed = comm.all_reduce(values.clone(), "max")
    gathered = comm.all_gather(torch.stack([values[1, :4].double(), values[2, :4].double()]))
    small = comm.broadcast_object({"step": 7, "ids": list(range(50))} if comm.rank == 0 else None)
    large = comm.broadcast_object(list(range(400_000)) if comm.rank == 0 else None)  # > 4 MiB as floats
    return {"sum": summed, "max": maxed, "gathered": torch.stack(gathered), "small": small,
            "large_len": len(large), "large_sum": sum(large)}


def _peer(port: int, shm: str, idle_s: float, results) -> None:
    os.environ["LMARITH_TP_SHM"] = shm
    comm = Communicator(1, 2, Communicator.join_store(port, 2), timeout_s=TIMEOUT_S)
    # tensors go back as numpy arrays, pickled by value: a torch tensor would be shared by a
    # file descriptor that this process's exit can revoke before the parent reads it
    mine = {key: value.numpy() if isinstance(value, torch.Tensor) else value
            for key, value in _collectives(comm).items()}
    results.put(("peer", mine, comm.shm is not None, comm.broadcast_object()))
    comm.close()


def _run(shm: str, idle_s: float = 0.0):
    os.environ["LMARITH_TP_SHM"] = shm
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store = Communicator.host_store(2)
    peer = context.Process(target=_peer, args=(store.port, shm, idle_s, results), daemon=True)
    peer.start()
    try:
        comm = Communicator(0, 2, store, timeout_s=TIMEOUT_S)
        mine = _collectives(comm)
        time.sleep(idle_s)                 # the peer waits for this command meanwhile
        comm.broadcast_object("after the pause")
        _, theirs, used_shm, late = results.get(timeout=20)
        theirs = {key: torch.from_numpy(value) if hasattr(value, "dtype") else value
                  for key, value in theirs.items()}
        peer.join(30)
        comm.close()
        return mine, theirs, used_shm, late
    finally:
        os.environ.pop("LMARITH_TP_SHM", None)
        if peer.is_alive():
            peer.kill()


@pytest.fixture(scope="module")
def runs():
    return {shm: _run(shm) for shm in ("1", "0")}


def test_both_ranks_agree_and_shm_equals_gloo(runs):
    (mine, theirs, used_shm, _), (gloo_mine, _, gloo_used, _) = runs["1"], runs["0"]
    assert used_shm and not gloo_used
    for key in ("sum", "max", "gathered"):
        assert torch.equal(mine[key], theirs[key]), key
        assert torch.allclose(mine[key], gloo_mine[key], rtol=0, atol=1e-6), key
    assert mine["gathered"][0].equal(theirs["gathered"][0])
    assert theirs["small"] == {"step": 7, "ids": list(range(50))}
    assert theirs["large_len"] == 400_000 and theirs["large_sum"] == sum(range(400_000))


def test_an_idle_rank_waits_past_the_timeout_for_the_next_command():
    _, _, used_shm, late = _run("1", idle_s=TIMEOUT_S + 1.5)
    assert used_shm and late == "after the pause"
