"""bfloat16 models on CPU run their linears through BF16Linear (ops.bf16_linear): the engine's
greedy tokens equal those of torch's bf16 nn.Linear layers, and the logits agree within a few
bf16 steps (same bf16 products, float32 sums in another order, so only ulp-level drift)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lmarith as la
from lmarith.bindings import ops
from lmarith.models import load_model
from lmarith.models.bf16_linear import BF16Linear, use_bf16_linears
from lmarith.worker import model_runner

pytestmark = pytest.mark.skipif(not ops.cpp_available(), reason="lmarith._C is not built")
PROMPTS = ["The cat sat", "Tell me about dogs and birds."]


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """Sizes that are not multiples of the kernel's 16-row blocks, with every bias."""
    from builders import make_model
    return make_model(tmp_path_factory.mktemp("bf16"), seed=4, hidden_size=72, intermediate_size=100,
                      attention_bias=True, mlp_bias=True)


def greedy(directory, max_tokens: int = 16) -> tuple[list[list[int]], int]:
    """The engine's greedy tokens for PROMPTS with dtype="bfloat16", and how many BF16Linear."""
    model = la.Model(str(directory), dtype="bfloat16")
    params = la.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with la.LLM(models=[model]) as llm:
        runner = llm.engine.worker.runners[model.spec]
        swapped = sum(isinstance(module, BF16Linear) for module in runner.model.modules())
        tokens = [output.token_ids for output in llm.generate(PROMPTS, model, params)]
    return tokens, swapped


def test_engine_greedy_tokens_match_torch_bf16_linears(odd_llama, monkeypatch):
    ours, swapped = greedy(odd_llama)
    assert swapped == 2 * 4 + 1                         # 4 projections a layer + the head
    monkeypatch.setattr(model_runner, "use_bf16_linears", lambda model: 0)
    theirs, unswapped = greedy(odd_llama)
    assert unswapped == 0
    assert ours == theirs


def test_logits_match_torch_bf16_linears(odd_llama):
    reference = load_model(str(odd_llama), dtype=torch.bfloat16)
    model = load_model(str(odd_llama), dtype=torch.bfloat16)
    assert use_bf16_linears(model) == 9
    assert sum(isinstance(m, BF16Linear) and m.bias is not None for m in model.modules()) == 8
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 72, generator=gen).bfloat16()
    with torch.inference_mode():
        for ours, theirs in zip(model.modules(), reference.modules()):
            if isinstance(ours, BF16Linear):
                x = torch.randn(5, ours.in_features, generator=gen).bfloat16()
                expected = theirs(x)
                assert isinstance(theirs, nn.Linear) and ours(x).dtype == torch.bfloat16
                torch.testing.assert_close(ours(x), expected, atol=2e-2, rtol=2 ** -7)
        expected = reference.compute_logits(hidden)
        torch.testing.assert_close(model.compute_logits(hidden), expected, atol=2e-2, rtol=2 ** -7)


def test_float32_models_keep_packed_float_linears(odd_llama):
    model = la.Model(str(odd_llama))
    with la.LLM(models=[model]) as llm:
        runner = llm.engine.worker.runners[model.spec]
        assert not any(isinstance(module, BF16Linear) for module in runner.model.modules())
