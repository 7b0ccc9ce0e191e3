"""The C++ decoder stack (models/native_stack.py) against the Python layer loop it replaces:
the same kernels in the same order, so the logits of every token of a prefill / chunked
prefill / decode schedule are bit-equal, for every GGUF block format, mixed formats in one
projection, packed float32 and bfloat16 weights, qkv bias (Qwen2), sliding windows (Mistral), GQA and llama-3 rope; models it
cannot run keep the loop; bad metadata raises instead of writing outside the cache; the
engine uses it and gives the loop's tokens."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as GGML

import lmarith as la
from lmarith.bindings import ops
from lmarith.models import load_model
from lmarith.models.bf16_linear import use_bf16_linears
from lmarith.models.f32_linear import use_f32_linears
from lmarith.models.native_stack import ENV, NativeStack, eligible, use_native_stack
from models.test_models import PagedRunner, hf_model, random_sequences, run_schedule, write_gguf
from models.test_quantized import FORMATS, model_sizes, quantizer

pytestmark = pytest.mark.skipif(not ops.cpp_available(), reason="needs the lmarith._C extension")


def loop_and_stack_logits(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """run_schedule's logits through the Python loop, then through the stack."""
    sequences = random_sequences(model.config.vocab_size)
    model.native_stack = None
    loop = run_schedule(model, sequences)
    assert use_native_stack(model)
    return loop, run_schedule(model, sequences)


def assert_equal_logits(model) -> None:
    loop, stack = loop_and_stack_logits(model)
    for ours, ref in zip(stack, loop):
        assert torch.equal(ours, ref), float((ours - ref).abs().max())


@pytest.mark.parametrize("qtype", FORMATS)
def test_every_gguf_format_matches_the_loop(tmp_path, qtype):
    hf = hf_model("llama", **model_sizes(qtype))
    write_gguf(hf, "llama", tmp_path / "model.gguf", quantizer(lambda name: qtype))
    assert_equal_logits(load_model(str(tmp_path / "model.gguf"), quantization="auto"))


def test_mixed_formats_in_one_projection(tmp_path):
    hf = hf_model("llama_tied_gqa3")
    choose = lambda name: GGML.Q8_0 if "attn_v" in name else GGML.Q4_1   # noqa: E731
    write_gguf(hf, "llama", tmp_path / "model.gguf", quantizer(choose))
    model = load_model(str(tmp_path / "model.gguf"), quantization="auto")
    assert model.model.layers[0].self_attn.qkv_proj.qtypes == ["q4_1", "q8_0"]
    assert_equal_logits(model)


@pytest.mark.parametrize("family", ["qwen2", "mistral_window", "llama3_rope", "llama_tied_gqa3"])
def test_q8_0_checkpoints_match_the_loop(tmp_path, family):
    """Float checkpoints quantised at load: qkv bias, sliding window, rope scaling, GQA 3:1."""
    hf_model(family).save_pretrained(tmp_path)
    assert_equal_logits(load_model(str(tmp_path), quantization="q8_0"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral_window", "llama_tied_gqa3"])
def test_float32_packed_linears_match_the_loop(tmp_path, family):
    """Float32 checkpoints with F32Linear projections (what the engine gives a CPU model):
    the stack reads the same packed panels through the same kernel."""
    hf_model(family).save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert use_f32_linears(model) > 0 and eligible(model)
    assert_equal_logits(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral_window", "llama_tied_gqa3"])
def test_bfloat16_packed_linears_match_the_loop(tmp_path, family):
    """A bfloat16 model with BF16Linear projections: the stack rounds every activation to
    bfloat16 where the loop's ops do (bias added before the rounding), so it is bit-equal too."""
    hf_model(family).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert use_bf16_linears(model) > 0 and eligible(model)
    assert_equal_logits(model)


def assert_packed_float_stacks_match(tmp_path, threads: int, **sizes) -> None:
    """With `threads` threads, a float32 model with F32Linear and a bfloat16 one with
    BF16Linear (GQA 3:1, sizes overridden) give the loop's logits through the stack."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype, swap in ((torch.float32, use_f32_linears), (torch.bfloat16, use_bf16_linears)):
            hf_model("llama_tied_gqa3", **sizes).save_pretrained(tmp_path / str(dtype))
            model = load_model(str(tmp_path / str(dtype)), dtype=dtype)
            assert swap(model) > 0
            assert_equal_logits(model)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2])
def test_serial_and_team_steps_match_the_loop(tmp_path, monkeypatch, threads):
    """Steps of up to 16 rows run as one thread team when there are 2+ threads (every step of
    the default schedule); a longer prefill, or one thread, runs the serial layer loop. A
    schedule with a 20- and a 17-token prefill then decode steps covers both."""
    import models.test_models as schedules
    monkeypatch.setattr(schedules, "SCHEDULE", [(20, 17, 3), (1, 1, 1), (2, 1, 1), (1, 1, 1)])
    assert_packed_float_stacks_match(tmp_path, threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_quantized_team_steps_match_the_loop(tmp_path, monkeypatch, threads):
    """Quantized projections in team steps too: each thread quantises the activations and
    takes its share of 16-row chunks across a projection's parts (q4_1 q/k beside q8_0 v) and
    adds the bias (qwen2's qkv) to its own columns: bit-equal to the loop either way."""
    import models.test_models as schedules
    monkeypatch.setattr(schedules, "SCHEDULE", [(20, 17, 3), (1, 1, 1), (2, 1, 1), (1, 1, 1)])
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hf = hf_model("llama_tied_gqa3")
        choose = lambda name: GGML.Q8_0 if "attn_v" in name else GGML.Q4_1   # noqa: E731
        write_gguf(hf, "llama", tmp_path / "mixed.gguf", quantizer(choose))
        assert_equal_logits(load_model(str(tmp_path / "mixed.gguf"), quantization="auto"))
        hf_model("qwen2").save_pretrained(tmp_path / "qwen2")
        assert_equal_logits(load_model(str(tmp_path / "qwen2"), quantization="q8_0"))
    finally:
        torch.set_num_threads(saved)


def test_team_attention_splits_long_contexts_like_the_loop(tmp_path, monkeypatch):
    """Past 512 tokens of context a decode step's attention is cut into context splits whose
    partial softmaxes are merged; in a team step the threads share the splits and the merge
    (csrc/attention_team.h). A 600-token prefill, then decode steps, with 2 threads."""
    import models.test_models as schedules
    monkeypatch.setattr(schedules, "SCHEDULE", [(600, 3, 2), (1, 1, 1), (1, 1, 1), (2, 1, 1)])
    monkeypatch.setattr(schedules.PagedRunner.__init__, "__defaults__", (180, 0))
    assert_packed_float_stacks_match(tmp_path, 2, max_position_embeddings=1024)


def test_models_it_cannot_run_keep_the_loop(tmp_path, monkeypatch):
    """Unpacked float weights, q/k norms (Qwen3), and LMARITH_NATIVE_STACK=0 are not eligible."""
    hf_model("llama").save_pretrained(tmp_path / "llama")
    hf_model("qwen3").save_pretrained(tmp_path / "qwen3")
    assert not eligible(load_model(str(tmp_path / "llama")))
    assert not eligible(load_model(str(tmp_path / "qwen3"), quantization="q8_0"))
    quantized = load_model(str(tmp_path / "llama"), quantization="q8_0")
    assert eligible(quantized)
    monkeypatch.setenv(ENV, "0")
    assert not eligible(quantized) and not use_native_stack(quantized)


def test_bad_slots_raise_before_writing(tmp_path):
    """A slot page past the cache is a ValueError and the arena is untouched."""
    hf_model("llama").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), quantization="q8_0")
    stack, runner = NativeStack(model), PagedRunner(model)
    from lmarith.models.attention import build_metadata
    meta = build_metadata([2], [2], [[0]], 16)
    meta.slot_pages = torch.tensor([0, runner.arena.shape[0]])
    before = runner.arena.clone()
    x = torch.randn(2, model.config.hidden_size)
    rope = model.rotary.cos_sin(torch.arange(2), torch.float32)
    with pytest.raises(ValueError, match="outside the cache"):
        stack(x, rope, meta, runner.caches)
    assert torch.equal(runner.arena.isnan(), before.isnan())


def test_engine_runs_the_stack_and_gives_the_loops_tokens(tmp_path, monkeypatch):
    from builders import make_model
    directory = str(make_model(tmp_path / "m", seed=4))
    model = la.Model(directory, dtype="q8_0")
    params = la.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = ["The cat sat", "A dog ran far away"]
    with la.LLM(models=[model]) as llm:
        assert llm.engine.worker.runners[model.spec].native_stack
        fast = [o.token_ids for o in llm.generate(prompts, model, params)]
    monkeypatch.setenv(ENV, "0")
    with la.LLM(models=[model]) as llm:
        assert not llm.engine.worker.runners[model.spec].native_stack
        slow = [o.token_ids for o in llm.generate(prompts, model, params)]
    assert fast == slow
