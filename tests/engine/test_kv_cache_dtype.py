"""kv_cache_dtype: a float32 model's KV cache stored as bfloat16 (half the bytes a long
context reads per step): the pool holds twice the pages for the same budget, attention reads
the rounded K/V (logits within bf16 rounding of the float32 cache's, and not equal to them),
the C++ decoder stack reads it too (same tokens as the Python loop), bad values are refused."""
from __future__ import annotations

import pytest
import torch

import lmarith as la
from lmarith.config import EngineConfig
from lmarith.errors import ConfigError
from lmarith.models import load_model
from lmarith.models.native_stack import ENV
from models.test_models import PagedRunner, hf_model, random_sequences, run_schedule


def test_bad_kv_cache_dtype_is_refused():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        EngineConfig(1 << 20, kv_cache_dtype="float16")
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        la.LLM(kv_cache_bytes=1 << 20, kv_cache_dtype="int8")


def bf16_cache_runner(model) -> PagedRunner:
    """A PagedRunner whose NaN-filled arena is bfloat16 while the model runs float32."""
    runner = PagedRunner(model)
    runner.arena = runner.arena.to(torch.bfloat16)
    runner.caches = [(runner.arena[:, 2 * i], runner.arena[:, 2 * i + 1])
                     for i in range(model.config.num_layers)]
    return runner


def test_bf16_cache_logits_stay_within_its_rounding(tmp_path, monkeypatch):
    hf_model("llama").save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    sequences = random_sequences(model.config.vocab_size)
    exact = run_schedule(model, sequences)
    import models.test_models as schedule_module
    monkeypatch.setattr(schedule_module, "PagedRunner", lambda m: bf16_cache_runner(m))
    rounded = run_schedule(model, sequences)
    for ours, ref in zip(rounded, exact):
        assert not torch.equal(ours, ref)                  # the cache really is bf16
        error = float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        assert error < 2e-2, error


@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_engine_pool_and_stack_with_a_bf16_cache(tmp_path, monkeypatch, dtype):
    from builders import make_model
    model = la.Model(str(make_model(tmp_path / "m", seed=2)), dtype=dtype)
    params = la.SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    prompts = ["The cat sat", "A dog ran far away"]
    pages = {}
    for kv in ("auto", "bfloat16"):
        with la.LLM(kv_cache_bytes=1 << 22, models=[model], kv_cache_dtype=kv) as llm:
            runner = llm.engine.worker.runners[model.spec]
            assert runner.config.cache_dtype == (torch.bfloat16 if kv == "bfloat16" else torch.float32)
            pages[kv] = llm.engine.worker.pool.num_pages
            outputs = llm.generate(prompts, model, params)
            assert [len(o.token_ids) for o in outputs] == [9, 9]
            if kv == "bfloat16" and dtype == "q8_0":
                assert runner.native_stack
                fast = [o.token_ids for o in outputs]
    assert pages["bfloat16"] == 2 * pages["auto"]
    if dtype == "q8_0":       # the C++ stack and the Python loop read the bf16 cache alike
        monkeypatch.setenv(ENV, "0")
        with la.LLM(kv_cache_bytes=1 << 22, models=[model], kv_cache_dtype="bfloat16") as llm:
            assert [o.token_ids for o in llm.generate(prompts, model, params)] == fast


def test_cli_flag_reaches_the_engine():
    from lmarith.entrypoints.cli import build_parser
    from lmarith.entrypoints.cli_common import engine_kwargs
    args = build_parser().parse_args(["generate", "--kv-cache-dtype", "bfloat16", "hello"])
    assert engine_kwargs(args)["kv_cache_dtype"] == "bfloat16"
