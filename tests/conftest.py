"""Test-wide setup. Without a GPU the Triton kernels run in the interpreter, which must be on
before any @triton.jit runs; with one they are compiled for real. Shared fixtures: `face`
devices for the ops tests."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
