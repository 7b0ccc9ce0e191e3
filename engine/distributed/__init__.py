"""The bottom layer of tensor parallelism: a Communicator over one torch.distributed process
group (gloo on CPU, NCCL on CUDA) that models, the decoder and the worker ranks share."""
from .communicator import Communicator, VocabRange, vocab_ranges

__all__ = ["Communicator", "VocabRange", "vocab_ranges"]
