"""quant_matmul through every face against kernels/reference_quant.py, and the reference's
dequantize / quantize_q8_0 against the gguf package bit for bit.

Tolerances (per output element, from |x| @ |W|.T = `magnitude`):
  * torch and Triton faces vs the fp32 reference: 1e-5 * magnitude (float32 sums in another
    order);
  * the C++ face vs the reference that quantises the activations the same way
    (reference_quant.quant_matmul_q8, exact integer dots there): 1e-5 * magnitude;
  * the C++ face vs the plain fp32 reference: activation quantisation moves each x by at
    most half a step, max|x over its 32-block| / 254, so the error is at most
    (blockmax|x| @ |W|.T) / 254 (+ the float32 slack): about 1e-2 relative, loose.
The C++ face runs once per instruction path this CPU has (LMARITH_QUANT_ISA forced).
"""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lmarith.bindings import cpp_quant, ops
from lmarith.kernels import reference_quant
from lmarith.kernels.quant_formats import QTYPES, QuantWeight

OP = "quant_matmul"
GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
        "q4_1": GGMLQuantizationType.Q4_1, "q5_0": GGMLQuantizationType.Q5_0,
        "q5_1": GGMLQuantizationType.Q5_1, "q4_k": GGMLQuantizationType.Q4_K,
        "q6_k": GGMLQuantizationType.Q6_K}
SMALL = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")   # 32-weight blocks, gguf can quantize them
HALVES = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2),
          "q4_k": (0, 2), "q6_k": (208,)}        # byte offsets of each block's fp16 scales
SHAPES = [(1, 7, 288), (3, 96, 64), (17, 1, 32), (17, 96, 288), (1, 1, 32), (3, 7, 32),
          (17, 7, 64), (1, 96, 288)]      # (M, N, K): every M, N, K of 1/3/17, 1/7/96, 32/64/288
K_SHAPES = [(1, 7, 512), (3, 96, 256), (17, 1, 512), (1, 96, 256)]
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
ISAS = [isa for isa in ("scalar", "avx2", "vnni") if cpp_quant.isa_supported(isa)]


def make_weight(qtype: str, n: int, k: int, seed: int = 0) -> QuantWeight:
    """32-block formats: gguf's quantisation of Gaussian weights. K-quants (gguf cannot
    quantize them): random bytes, which are valid blocks once the fp16 scales are finite."""
    gen = torch.Generator().manual_seed(seed)
    if qtype in SMALL:
        w = torch.randn(n, k, generator=gen)
        return QuantWeight(qtype, torch.from_numpy(gguf_quantize(w.numpy(), GGML[qtype])), n, k)
    block, block_bytes = QTYPES[qtype]
    data = torch.randint(0, 256, (n, k // block * block_bytes), dtype=torch.uint8, generator=gen)
    blocks = data.view(n, k // block, block_bytes)
    for offset in HALVES[qtype]:
        halves = (torch.rand(n, k // block, 1, generator=gen) * 0.02).half()
        blocks[..., offset:offset + 2] = halves.view(torch.uint8).reshape(n, k // block, 2)
    return QuantWeight(qtype, data, n, k)


def make_x(m: int, k: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian activations with a few outliers and, in row 0, an all-zero 32-block."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, ::37] *= 8.0
    if m:
        x[0, :32] = 0.0
    return x.to(dtype)


def magnitude(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    return x.double().abs() @ reference_quant.dequantize(weight).double().abs().T


def quantisation_bound(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """(max |x| over each element's 32-block) @ |W|.T / 254: activation rounding's worst case."""
    m, k = x.shape
    block_max = x.double().abs().reshape(m, -1, 32).amax(dim=-1, keepdim=True)
    return block_max.expand(m, k // 32, 32).reshape(m, k) @ \
        reference_quant.dequantize(weight).double().abs().T / 254


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    excess = (actual.double() - expected.double()).abs() - bound - 1e-6
    assert excess.max().item() <= 0, f"worst excess {excess.max().item():.3g}"


def check_face(face: str, y: torch.Tensor, x: torch.Tensor, weight: QuantWeight) -> None:
    """The face's result against the references, with the tolerances of the module doc."""
    expected = reference_quant.quant_matmul(x, weight)
    scale = magnitude(x, weight)
    if face == "cpp":
        assert_close(y, reference_quant.quant_matmul_q8(x, weight), 1e-5 * scale)
        assert_close(y, expected, quantisation_bound(x, weight) * 1.001 + 1e-5 * scale)
    else:
        assert_close(y, expected, 1e-5 * scale)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_dequantize_matches_gguf(qtype: str) -> None:
    k = 3 * QTYPES[qtype][0]
    weight = make_weight(qtype, 9, k, seed=3)
    expected = gguf_dequantize(weight.data.numpy(), GGML[qtype])
    assert torch.equal(ops.dequantize(weight), torch.from_numpy(expected))


@pytest.mark.parametrize("qtype", SMALL)
def test_dequantize_random_bytes(qtype: str) -> None:
    """Arbitrary quants (not only what quantisation produces), e.g. q8_0's -128."""
    block_bytes = QTYPES[qtype][1]
    data = torch.randint(0, 256, (5, 2 * block_bytes), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))
    for offset in HALVES[qtype]:
        blocks = data.view(5, 2, block_bytes)
        blocks[..., offset:offset + 2] = torch.full((5, 2, 1), 0.25).half().view(torch.uint8).view(5, 2, 2)
    weight = QuantWeight(qtype, data, 5, 64)
    expected = gguf_dequantize(data.numpy(), GGML[qtype])
    assert torch.equal(reference_quant.dequantize(weight), torch.from_numpy(expected))


def test_quantize_q8_0_matches_gguf() -> None:
    w = torch.randn(13, 96, generator=torch.Generator().manual_seed(6))
    w[2, :32] = 0.0                                   # a zero block: d = 0, q = 0
    quantized = ops.quantize_q8_0(w)
    assert quantized.qtype == "q8_0" and quantized.out_features == 13
    assert torch.equal(quantized.data, torch.from_numpy(gguf_quantize(w.numpy(), GGML["q8_0"])))


@pytest.mark.parametrize("qtype", SMALL)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_faces_small_blocks(face, run_face, qtype: str, shape) -> None:
    m, n, k = shape
    weight, x = make_weight(qtype, n, k), make_x(m, k)
    check_face(face, run_face(x, weight), x, weight)


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k"])
@pytest.mark.parametrize("shape", K_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_faces_k_quants(face, run_face, qtype: str, shape) -> None:
    m, n, k = shape
    weight, x = make_weight(qtype, n, k), make_x(m, k)
    check_face(face, run_face(x, weight), x, weight)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_bf16_activations(face, run_face, qtype: str) -> None:
    k = 288 if qtype in SMALL else 512
    weight, x = make_weight(qtype, 7, k), make_x(3, k, dtype=torch.bfloat16)
    check_face(face, run_face(x, weight), x.float(), weight)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_empty_batch(face, run_face, qtype: str) -> None:
    weight = make_weight(qtype, 7, QTYPES[qtype][0])
    y = run_face(torch.empty(0, QTYPES[qtype][0]), weight)
    assert y.shape == (0, 7) and y.dtype == torch.float32


@pytest.mark.skipif(not ISAS, reason="lmarith._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_cpp_every_isa(monkeypatch, isa: str, qtype: str) -> None:
    """Each instruction path forced, odd block counts (tails) and M > 1 included; the M values
    cover full and partial 8-row activation tiles of the SIMD kernels (4, 5, 8, 16, 17, 33)."""
    monkeypatch.setenv(cpp_quant.ISA_ENV, isa)
    shapes = ([(17, 96, 288), (1, 7, 32), (3, 1, 64), (4, 7, 64), (5, 96, 288), (8, 3, 96),
               (16, 7, 288), (33, 5, 96)] if qtype in SMALL else
              [(17, 96, 512), (1, 7, 256), (5, 9, 768), (8, 3, 256), (33, 5, 512)])
    for m, n, k in shapes:
        weight, x = make_weight(qtype, n, k, seed=m), make_x(m, k, seed=n)
        check_face("cpp", ops.run(OP, "cpp", x, weight), x, weight)
    strided = make_x(3, 2 * shapes[0][2])[:, ::2]                    # non-contiguous x
    weight = make_weight(qtype, 7, shapes[0][2])
    check_face("cpp", ops.run(OP, "cpp", strided, weight), strided, weight)


@pytest.mark.skipif(not ISAS, reason="lmarith._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_cpp_a_row_does_not_depend_on_its_batch(monkeypatch, isa: str, qtype: str) -> None:
    """Each activation row's outputs are bit for bit the same alone and in batches of every
    tile height (partial tiles, and output rows in partial groups of the 16 reduced
    together): a request's greedy text must not change with its neighbours."""
    monkeypatch.setenv(cpp_quant.ISA_ENV, isa)
    k = 288 if qtype in SMALL else 512
    weight, x = make_weight(qtype, 37, k, seed=5), make_x(17, k, seed=6)
    alone = torch.cat([ops.run(OP, "cpp", x[i: i + 1], weight) for i in range(17)])
    for m in (2, 7, 8, 9, 17):
        assert torch.equal(ops.run(OP, "cpp", x[:m], weight), alone[:m]), m


def test_cpp_isa_env_rejects_unknown(monkeypatch) -> None:
    if "cpp" not in ops.faces(OP):
        pytest.skip("lmarith._C is not built")
    monkeypatch.setenv(cpp_quant.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="LMARITH_QUANT_ISA"):
        ops.run(OP, "cpp", make_x(1, 32), make_weight("q8_0", 1, 32))


def test_dispatch_on_cpu_uses_best_face() -> None:
    weight, x = make_weight("q4_1", 96, 288), make_x(3, 288)
    face = ops.face_for(OP, x.device)
    check_face(face, ops.quant_matmul(x, weight), x, weight)


@pytest.mark.parametrize("bad, message", [
    (lambda x, w: (x[:, :32], w), "in_features"),
    (lambda x, w: (x[None], w), r"\[M, K\]"),
    (lambda x, w: (x.double(), w), "float32 or bfloat16"),
    (lambda x, w: (x, w.data), "QuantWeight"),
    (lambda x, w: (x.numpy(), w), "torch.Tensor"),
])
def test_input_checks(bad, message: str) -> None:
    args = bad(make_x(2, 64), make_weight("q4_0", 3, 64))
    with pytest.raises(ValueError, match=message):
        ops.quant_matmul(*args)


def test_quantize_q8_0_checks() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        ops.quantize_q8_0(torch.randn(2, 40))
