"""The worker layer: `model_runner` turns a list of sequences' new tokens into one batched
forward of one model over the paged KV cache; `worker` owns every loaded model and the pool
they share, and runs one forward per model per step; `rank` and `parallel_worker` spread a
replica over tensor-parallel ranks (rank 0 drives, the others follow its commands)."""
from .model_runner import ForwardItem, ModelRunner
from .parallel_worker import ParallelWorker
from .worker import Worker

__all__ = ["ForwardItem", "ModelRunner", "ParallelWorker", "Worker"]
