"""f32_linear through every face (and every instruction path of the C++ one) against the
torch reference kernels/reference_f32.py, the packed layout against the plain matrix, and the
F32Linear module against nn.Linear.

Tolerances (per output element, from magnitude = |x| @ |W|.T): 1e-5 * magnitude + 1e-6 (the
same float32 products summed in another order); small-integer inputs (every product and sum
exact in float32): bit-equal on every face.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmarith.bindings import cpp_f32, ops
from lmarith.kernels import reference_f32
from lmarith.models.f32_linear import F32Linear, use_f32_linears

OP = "f32_linear"
SHAPES = [(1, 7, 5), (3, 33, 64), (17, 1, 2), (1, 100, 577), (17, 16, 1), (9, 48, 31),
          (1, 576, 64), (17, 100, 64)]     # (M, N, K): M 1/3/9/17, N below/at/over 16-row blocks, K odd/even
ISAS = [isa for isa in ("scalar", "avx2", "avx512") if cpp_f32.isa_supported(isa)]
needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="needs the lmarith._C extension")


def make_inputs(m: int, n: int, k: int, bias: bool, seed: int = 0):
    """(x [M, K], W [N, K], bias [N] or None), Gaussian float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.1
    return x, w, (torch.randn(n, generator=gen) if bias else None)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias) -> None:
    """y against x @ W.T + bias within the module doc's tolerance."""
    expected = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert y.dtype == torch.float32 and y.shape == expected.shape
    bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
    excess = (y.double() - expected).abs() - bound
    assert excess.numel() == 0 or excess.max().item() <= 0, f"worst excess {excess.max().item():.3g}"


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (16, 2), (33, 577)], ids=str)
def test_pack_round_trip(shape) -> None:
    w = torch.randn(*shape)
    packed = ops.pack_f32(w)
    n, k = shape
    assert packed.data.dtype == torch.float32
    assert tuple(packed.data.shape) == (-(-n // 16), k, 16)
    assert torch.equal(reference_f32.unpack_weight(packed), w)
    assert torch.equal(packed.data[0, 0, :min(n, 16)], w[:16, 0])   # one block column = 16 rows


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_every_face_matches_the_matrix_product(face, run_face, shape, bias) -> None:
    x, w, b = make_inputs(*shape, bias)
    check(run_face(x, ops.pack_f32(w), b), x, w, b)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_instruction_path(monkeypatch, isa, shape) -> None:
    """Each path the CPU runs (tile sizes 1-8 rows, tails of K and of a 16-row block)."""
    monkeypatch.setenv(cpp_f32.ISA_ENV, isa)
    x, w, b = make_inputs(*shape, True, seed=1)
    check(ops.prepared_f32_linear(ops.pack_f32(w), b)(x), x, w, b)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [2, 5, 7, 8, 9, 17, 50])
@pytest.mark.parametrize("n,k", [(48, 1), (80, 63), (130, 192), (64, 193), (200, 577)], ids=str)
def test_panel_edges(monkeypatch, isa, m, n, k) -> None:
    """The AVX512 panels (8 rows x 3 blocks, 192 columns a pass) at and across their edges:
    partial row tiles, blocks past the last whole panel, K below, at and across 192, several
    row tiles over one pass; small integers bit-equal."""
    monkeypatch.setenv(cpp_f32.ISA_ENV, isa)
    x, w, b = make_inputs(m, n, k, True, seed=m + n + k)
    check(ops.prepared_f32_linear(ops.pack_f32(w), b)(x), x, w, b)
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randint(-3, 4, (m, k), generator=gen).float()
    w = torch.randint(-2, 3, (n, k), generator=gen).float()
    assert torch.equal(ops.prepared_f32_linear(ops.pack_f32(w), None)(x), x @ w.T)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
def test_small_integers_are_exact(monkeypatch, isa) -> None:
    monkeypatch.setenv(cpp_f32.ISA_ENV, isa)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (11, 70), generator=gen).float()
    w = torch.randint(-2, 3, (37, 70), generator=gen).float()
    b = torch.randint(-4, 5, (37,), generator=gen).float()
    assert torch.equal(ops.prepared_f32_linear(ops.pack_f32(w), b)(x), x @ w.T + b)


@needs_cpp
def test_large_product_runs_threaded_and_matches() -> None:
    """Past the threading threshold (M * N * K > 4M) the row blocks are split over threads."""
    x, w, b = make_inputs(33, 515, 300, True, seed=2)
    check(ops.f32_linear(x, ops.pack_f32(w), b), x, w, b)


def test_bad_inputs_say_what_to_change() -> None:
    w = ops.pack_f32(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"x must be a tensor \[M, 4\]"):
        ops.f32_linear(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match="a float32"):
        ops.f32_linear(torch.randn(2, 4).bfloat16(), w)
    with pytest.raises(ValueError, match="pack_f32"):
        ops.f32_linear(torch.randn(2, 4), torch.randn(8, 4))
    converted = reference_f32.F32Weight(w.data.double(), 8, 4)
    with pytest.raises(ValueError, match="float32 panels"):
        ops.f32_linear(torch.randn(2, 4), converted)
    with pytest.raises(ValueError, match=r"bias must be a tensor \[8\]"):
        ops.f32_linear(torch.randn(2, 4), w, torch.randn(3))
    if ISAS:
        with pytest.raises(ValueError, match="LMARITH_F32_ISA"):
            cpp_f32.isa_code("sse9")


@needs_cpp
def test_module_matches_nn_linear_and_swaps_only_float32_cpu_linears() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(19, 40), nn.ReLU(), nn.Linear(40, 3, bias=False).bfloat16())
    x = torch.randn(2, 5, 19)
    expected = model[0](x)
    assert use_f32_linears(model) == 1
    assert isinstance(model[0], F32Linear) and isinstance(model[2], nn.Linear)
    torch.testing.assert_close(model[0](x), expected, atol=1e-5, rtol=1e-5)
    assert "in_features=19, out_features=40, bias=True" in repr(model[0])


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", [(37, 75), (130, 577), (64, 64)], ids=str)
def test_a_row_does_not_depend_on_its_batch(monkeypatch, isa, n, k) -> None:
    """Every row sums in one order whatever the batch holds (panels, tail blocks and the
    one-block kernel alike): a request's greedy text must not change with its neighbours."""
    monkeypatch.setenv(cpp_f32.ISA_ENV, isa)
    x, w, b = make_inputs(17, n, k, True, seed=n + k)
    call = ops.prepared_f32_linear(ops.pack_f32(w), b)
    alone = torch.cat([call(x[i: i + 1]) for i in range(17)])
    for m in (2, 6, 7, 13, 17):
        assert torch.equal(call(x[:m]), alone[:m]), m
