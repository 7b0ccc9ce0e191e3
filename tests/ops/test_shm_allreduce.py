"""lmarith.bindings.shm: the shared-memory all-reduce between 2 and 3 spawned processes gives
exactly the rank-ordered float32 sum / max (bfloat16: that float32 result rounded once), 200
calls in a row of mixed shapes, dtypes and ops (both slot sets, many times); a peer that never
arrives, or dies, raises RuntimeError within the timeout; unsupported tensors fall back (False)
without waiting for anyone; the creator leaves nothing in /dev/shm."""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import traceback

import pytest
import torch

from lmarith.bindings import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="lmarith._C lacks ShmAllReduce")

MAX_BYTES = 1 << 16
CALLS = 200
SHAPES = [(1,), (7, 5), (576,), (3, 576), None]     # None: as many elements as max_bytes holds
DTYPES = [torch.float32, torch.bfloat16]
OPS = ["sum", "max"]


def case(call: int) -> tuple[tuple[int, ...], torch.dtype, str]:
    """The shape, dtype and op of one call: every combination, cycling."""
    shape = SHAPES[call % len(SHAPES)]
    dtype = DTYPES[call // len(SHAPES) % len(DTYPES)]
    op = OPS[call // (len(SHAPES) * len(DTYPES)) % len(OPS)]
    if shape is None:
        shape = (MAX_BYTES // torch.empty((), dtype=dtype).element_size(),)
    return shape, dtype, op


def rank_input(call: int, rank: int, shape, dtype) -> torch.Tensor:
    """Rank `rank`'s tensor in call `call`, reproducible by every rank."""
    generator = torch.Generator().manual_seed(1000 * call + rank)
    return (torch.randn(shape, generator=generator) * 10.0 ** (rank - 1)).to(dtype)


def expected(call: int, world_size: int, shape, dtype, op: str) -> torch.Tensor:
    """The reduction in rank order, in float32, rounded once to dtype."""
    result = rank_input(call, 0, shape, dtype).float()
    for rank in range(1, world_size):
        part = rank_input(call, rank, shape, dtype).float()
        result = result + part if op == "sum" else torch.maximum(result, part)
    return result.to(dtype)


def reduce_calls(group: shm.ShmAllReduce, rank: int, world_size: int) -> None:
    """CALLS all-reduces back to back (so a fast rank runs ahead into the other slot set),
    checked afterwards. The (7, 5) tensors are non-contiguous views, and every tenth call an
    int64 tensor falls back on every rank without desynchronising the group."""
    cases = [case(call) for call in range(CALLS)]
    tensors = [rank_input(call, rank, shape, dtype) for call, (shape, dtype, _) in enumerate(cases)]
    tensors = [t.t().contiguous().t() if t.shape == (7, 5) else t for t in tensors]
    for call, (tensor, (_, _, op)) in enumerate(zip(tensors, cases)):
        assert group.all_reduce_(tensor, op) is True
        if call % 10 == 0:
            assert group.all_reduce_(torch.ones(3, dtype=torch.int64)) is False
    for call, (tensor, (shape, dtype, op)) in enumerate(zip(tensors, cases)):
        want = expected(call, world_size, shape, dtype, op)
        assert torch.equal(tensor, want), f"call {call} {shape} {dtype} {op}: rank {rank} differs"


def rank_main(rank: int, world_size: int, name: str, results) -> None:
    """One spawned rank: open (or, rank 0, create) the group, run the calls, report."""
    try:
        with shm.ShmAllReduce(name, rank, world_size, MAX_BYTES, create=rank == 0,
                              timeout_s=30.0) as group:
            reduce_calls(group, rank, world_size)
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def run_ranks(world_size: int) -> None:
    """Spawn world_size ranks; fail with the first rank's error (or on a hang)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    name = shm.new_name("lmarith_test")
    processes = [context.Process(target=rank_main, args=(rank, world_size, name, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        reports = dict(results.get(timeout=120) for _ in processes)
    except queue.Empty:
        reports = {"?": "a rank neither finished nor failed within 120 s"}
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    errors = [f"rank {rank}:\n{error}" for rank, error in reports.items() if error]
    assert not errors, "\n".join(errors)
    assert not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_rank_ordered_reduction(world_size):
    run_ranks(world_size)


def dying_creator_main(rank: int, name: str, results) -> None:
    """Rank 0 makes 5 calls and exits without closing; rank 1 reports how its 6th call ends."""
    group = shm.ShmAllReduce(name, rank, 2, MAX_BYTES, create=rank == 0, timeout_s=1.0)
    for _ in range(5):
        group.all_reduce_(torch.ones(576))
    if rank == 0:
        os._exit(0)
    started = time.perf_counter()
    try:
        group.all_reduce_(torch.ones(576))
        results.put("the 6th call returned")
    except RuntimeError as error:
        results.put((str(error), time.perf_counter() - started))
    group.close()


def test_dead_creator_gives_runtime_error_and_leaves_no_segment():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    name = shm.new_name("lmarith_test")
    processes = [context.Process(target=dying_creator_main, args=(rank, name, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    error, waited = results.get(timeout=60)
    for process in processes:
        process.join(timeout=10)
    assert "timeout" in error and "rank 0" in error
    assert 1.0 <= waited < 5.0
    assert not os.path.exists(f"/dev/shm/{name}")


def test_one_rank_is_a_copy_and_unlinks_after_first_call():
    name = shm.new_name("lmarith_test")
    with shm.ShmAllReduce(name, 0, 1, MAX_BYTES, create=True) as group:
        assert os.path.exists(f"/dev/shm/{name}")
        tensor = torch.randn(3, 576)
        want = tensor.clone()
        assert group.all_reduce_(tensor, "max")
        assert torch.equal(tensor, want)
        assert not os.path.exists(f"/dev/shm/{name}")


def test_missing_peer_raises_within_timeout():
    with shm.ShmAllReduce(shm.new_name("lmarith_test"), 0, 2, MAX_BYTES, create=True,
                          timeout_s=0.5) as group:
        started = time.perf_counter()
        with pytest.raises(RuntimeError, match="timeout.*rank 1"):
            group.all_reduce_(torch.ones(576))
        assert 0.5 <= time.perf_counter() - started < 5.0
        with pytest.raises(RuntimeError, match="unusable"):
            group.all_reduce_(torch.ones(576))


def test_missing_creator_raises_within_timeout():
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="found no segment"):
        shm.ShmAllReduce(shm.new_name("lmarith_test"), 1, 2, MAX_BYTES, create=False,
                         timeout_s=0.3)
    assert time.perf_counter() - started < 5.0


def test_mismatched_peer_is_refused():
    name = shm.new_name("lmarith_test")
    with shm.ShmAllReduce(name, 0, 2, MAX_BYTES, create=True):
        with pytest.raises(RuntimeError, match="same world_size and max_bytes"):
            shm.ShmAllReduce(name, 1, 2, 2 * MAX_BYTES, create=False, timeout_s=1.0)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_ranks_that_disagree_raise():
    """Two ranks as threads of this process (the calls release the GIL), sizes differing."""
    name = shm.new_name("lmarith_test")
    groups = [shm.ShmAllReduce(name, rank, 2, MAX_BYTES, create=rank == 0, timeout_s=5.0)
              for rank in range(2)]
    errors = {}

    def reduce(rank: int) -> None:
        try:
            groups[rank].all_reduce_(torch.ones(576 + rank))
        except RuntimeError as error:
            errors[rank] = str(error)

    threads = [threading.Thread(target=reduce, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for group in groups:
        group.close()
    assert sorted(errors) == [0, 1]
    assert "rank 1 reduces 577 elements" in errors[0]


def test_unsupported_tensors_fall_back_without_waiting():
    """No peer exists, so anything but an immediate False would time out."""
    with shm.ShmAllReduce(shm.new_name("lmarith_test"), 0, 2, MAX_BYTES, create=True,
                          timeout_s=5.0) as group:
        started = time.perf_counter()
        too_large = torch.ones(MAX_BYTES // 4 + 1)
        assert group.all_reduce_(too_large) is False
        assert torch.equal(too_large, torch.ones(MAX_BYTES // 4 + 1))
        assert group.all_reduce_(torch.ones(4, dtype=torch.int32)) is False
        assert group.all_reduce_(torch.ones(4, dtype=torch.float16)) is False
        with pytest.raises(ValueError, match="op must be"):
            group.all_reduce_(torch.ones(4), "mean")
        assert time.perf_counter() - started < 1.0
