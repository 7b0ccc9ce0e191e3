"""All-reduce latency between processes of one host: the shared-memory path
(lmarith.bindings.shm) against a gloo ProcessGroup over a TCPStore, in the same run.

This process is rank 0; ranks 1.. are spawned. Every rank holds both groups. Each round times
--calls back-to-back sum all-reduces of one [--shape] float32 tensor on each path, the
two paths alternating round by round after a barrier; the table reports the median round as
microseconds per call, and gloo's time over shm's. A tensor-parallel decode step of a 30-layer
model makes 61 such calls.

    python benchmarks/bench_allreduce.py [--world-size 2] [--calls 1000] [--rounds 3]
                                         [--shape 1 576]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from lmarith.bindings import shm

TIMEOUT = timedelta(seconds=120)
MAX_BYTES = 1 << 20


def gloo_all_reduce(group: dist.ProcessGroup):
    """A sum all-reduce over the gloo group, called the way Communicator.all_reduce calls it."""
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.SUM
    return lambda tensor: group.allreduce([tensor], options).wait()


def time_calls(reduce, tensor: torch.Tensor, calls: int, barrier) -> float:
    """Seconds per call of `calls` reductions, started together after a barrier."""
    barrier()
    started = time.perf_counter()
    for _ in range(calls):
        reduce(tensor)
    return (time.perf_counter() - started) / calls


def run_rank(rank: int, args: argparse.Namespace, store: dist.Store, name: str) -> dict[str, float]:
    """Both groups on this rank (rank 0 creates the shm segment); the median seconds per call
    of each path."""
    torch.set_num_threads(1)
    group = dist.ProcessGroupGloo(store, rank, args.world_size, TIMEOUT)
    shm_group = shm.ShmAllReduce(name, rank, args.world_size, MAX_BYTES, create=rank == 0,
                                 timeout_s=120)
    tensor = torch.randn(args.shape)
    if not shm_group.supports(tensor):
        raise SystemExit(f"a {list(args.shape)} float32 tensor exceeds the {MAX_BYTES}-byte slots")
    paths = {"shm": shm_group.all_reduce_, "gloo": gloo_all_reduce(group)}
    barrier = lambda: group.barrier().wait()  # noqa: E731
    for reduce in paths.values():             # warm up both paths
        time_calls(reduce, tensor, 100, barrier)
    rounds = {path: [] for path in paths}
    for _ in range(args.rounds):
        for path, reduce in paths.items():
            rounds[path].append(time_calls(reduce, tensor, args.calls, barrier))
    barrier()
    shm_group.close()
    return {path: statistics.median(times) for path, times in rounds.items()}


def peer_main(rank: int, args: argparse.Namespace, port: int, name: str) -> None:
    """A spawned rank: join rank 0's store and run."""
    store = dist.TCPStore("127.0.0.1", port, args.world_size, False, TIMEOUT)
    run_rank(rank, args, store, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 576])
    args = parser.parse_args()
    store = dist.TCPStore("127.0.0.1", 0, args.world_size, True, TIMEOUT, wait_for_workers=False)
    name = shm.new_name("lmarith_bench")
    context = multiprocessing.get_context("spawn")
    peers = [context.Process(target=peer_main, args=(rank, args, store.port, name))
             for rank in range(1, args.world_size)]
    for peer in peers:
        peer.start()
    result = run_rank(0, args, store, name)
    for peer in peers:
        peer.join()
    print(f"sum all-reduce of {list(args.shape)} float32 among {args.world_size} processes, "
          f"median of {args.rounds} rounds of {args.calls} calls:")
    for path, seconds in result.items():
        print(f"  {path:>4}: {seconds * 1e6:9.1f} us per call")
    print(f"  gloo / shm: {result['gloo'] / result['shm']:.1f}x")


if __name__ == "__main__":
    main()
