"""rms_norm, rotary and silu_mul through every face against the torch reference
(kernels/reference_layers.py), on odd shapes, and the fused decoder layer they make.

Tolerances: bfloat16 results are bit-equal (the C++ face rounds where torch rounds; silu
may differ by one bf16 step where the two exps straddle a rounding boundary, so silu
allows 2^-7 relative); float32 results within 2e-6 relative + 1e-6 (other summation orders,
fused multiply-adds)."""
from __future__ import annotations

import pytest
import torch

from lmarith.bindings import ops
from lmarith.kernels import reference_layers

OP = "rms_norm"   # the conftest's `face` parameter; these tests name their faces themselves

DTYPES = [torch.float32, torch.bfloat16]


def faces(op: str) -> list[str]:
    return ops.faces(op)


def close(actual: torch.Tensor, expected: torch.Tensor, bf16_rtol: float = 0.0) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.bfloat16 and bf16_rtol == 0.0:
        assert torch.equal(actual, expected)
        return
    rtol = bf16_rtol if expected.dtype == torch.bfloat16 else 2e-6
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("face_name", faces("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 576), (7, 33), (3, 5, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(face_name, dtype, shape, with_residual) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    residual = torch.randn(shape, generator=gen).to(dtype) if with_residual else None
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    normed, summed = ops.run("rms_norm", face_name, x, weight, 1e-5, residual)
    expected, expected_sum = reference_layers.rms_norm(x, weight, 1e-5, residual)
    close(normed, expected)
    if with_residual:
        assert torch.equal(summed, expected_sum)
    else:
        assert summed is None


@pytest.mark.parametrize("face_name", faces("rms_norm"))
def test_rms_norm_of_a_zero_row_is_zero(face_name) -> None:
    """eps keeps an all-zero row finite."""
    normed, _ = ops.run("rms_norm", face_name, torch.zeros(2, 9), torch.ones(9), 1e-6)
    assert torch.equal(normed, torch.zeros(2, 9))


@pytest.mark.parametrize("face_name", faces("rotary"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,dim", [(1, 1, 2), (5, 3, 64), (17, 4, 10)])
def test_rotary_in_place_on_strided_rows(face_name, dtype, rows, heads, dim) -> None:
    """q and k inside a wider qkv row (strided rows), rotated in place; v untouched."""
    gen = torch.Generator().manual_seed(rows * heads + dim)
    qkv = torch.randn(rows, (heads + 1) * dim, generator=gen).to(dtype)
    angles = torch.rand(rows, 1, dim, generator=gen) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = qkv.clone()
    reference_layers.rotary(expected[:, : heads * dim].view(rows, heads, dim), cos, sin)
    actual = qkv.clone()
    assert ops.run("rotary", face_name, actual[:, : heads * dim].view(rows, heads, dim), cos, sin) is None
    close(actual, expected)
    assert torch.equal(actual[:, heads * dim:], qkv[:, heads * dim:])


@pytest.mark.parametrize("face_name", faces("rotary"))
def test_rotary_at_position_zero_is_identity(face_name) -> None:
    x = torch.randn(3, 2, 8)
    rotated = x.clone()
    ops.run("rotary", face_name, rotated, torch.ones(3, 1, 8), torch.zeros(3, 1, 8))
    assert torch.equal(rotated, x)


@pytest.mark.parametrize("face_name", faces("silu_mul"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 3072), (9, 2 * 37), (2, 3, 16)])
def test_silu_mul_matches_reference(face_name, dtype, shape) -> None:
    gen = torch.Generator().manual_seed(shape[-1])
    gate_up = (torch.randn(shape, generator=gen) * 4).to(dtype)
    close(ops.run("silu_mul", face_name, gate_up), reference_layers.silu_mul(gate_up), bf16_rtol=2 ** -7)


def test_silu_mul_extremes() -> None:
    """Large negative gates give 0 (not NaN), large positive ones pass the gate through."""
    for face_name in faces("silu_mul"):
        gate_up = torch.tensor([[-1e4, 0.0, 50.0, 2.0, 3.0, 4.0]])
        out = ops.run("silu_mul", face_name, gate_up)
        torch.testing.assert_close(out, torch.tensor([[-0.0, 0.0, 200.0]]))


@pytest.mark.parametrize("op,args", [
    ("rms_norm", (torch.zeros(2, 4), torch.ones(5), 1e-5)),
    ("rms_norm", (torch.zeros(2, 4), torch.ones(4), 1e-5, torch.zeros(2, 3))),
    ("rms_norm", (torch.zeros(2, 4), torch.ones(4), 0.0)),
    ("rotary", (torch.zeros(2, 3, 5), torch.ones(2, 1, 5), torch.ones(2, 1, 5))),
    ("rotary", (torch.zeros(2, 3, 4), torch.ones(2, 1, 4).bfloat16(), torch.ones(2, 1, 4))),
    ("silu_mul", (torch.zeros(2, 5),)),
    ("silu_mul", (torch.zeros(2, 4, dtype=torch.int64),)),
])
def test_bad_inputs_raise_the_same_error_on_every_face(op, args) -> None:
    for face_name in faces(op):
        with pytest.raises(ValueError):
            ops.run(op, face_name, *args)


def test_float16_falls_back_to_the_reference() -> None:
    """A dtype the C++ kernels do not read still gets the reference's answer."""
    x = torch.randn(3, 8, dtype=torch.float16)
    weight = torch.randn(8, dtype=torch.float16)
    for face_name in faces("rms_norm"):
        torch.testing.assert_close(ops.run("rms_norm", face_name, x, weight, 1e-5)[0],
                                   reference_layers.rms_norm(x, weight, 1e-5)[0])
