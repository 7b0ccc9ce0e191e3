"""Test-wide setup. Without a GPU the Triton kernels run in the interpreter, which must be on
before any @triton.jit runs; with one they are compiled for real. Shared fixtures: tiny
models with one tokenizer, built once per session."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from builders import make_model  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory):
    """Same tokenizer, twice the KV heads of llama_dir: twice its KV bytes per token."""
    return make_model(tmp_path_factory.mktemp("wide"), "llama", seed=5, num_key_value_heads=4)


@pytest.fixture(scope="session")
def huge_kv_dir(tmp_path_factory):
    """Same tokenizer, 8 layers x 4 KV heads: 8x llama_dir's KV bytes per token, so with
    page_tokens=4 one of its tokens does not fit in a page sized for llama_dir."""
    return make_model(tmp_path_factory.mktemp("huge"), "llama", seed=7, num_key_value_heads=4,
                      num_hidden_layers=8)
