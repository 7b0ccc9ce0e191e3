"""The worker layer: `model_runner` turns a list of sequences' new tokens into one batched
forward of one model over the paged KV cache; `worker` owns every loaded model and the pool
they share, and runs one forward per model per step. Tensor-parallel ranks will live here."""
from .model_runner import ForwardItem, ModelRunner
from .worker import Worker

__all__ = ["ForwardItem", "ModelRunner", "Worker"]
