"""bf16_linear through every face (and every instruction path of the C++ one) against the
torch reference kernels/reference_bf16.py, and the packed layout against the plain matrix.

Tolerances (per output element, from magnitude = |round_bf16(x)| @ |W|.T):
  * float32 results: 1e-5 * magnitude (the same bf16 products, float32 sums in another order);
  * bfloat16 results: that plus one bfloat16 step of the result, 2^-7 * |reference| (two
    float32 sums that differ slightly can round to neighbouring bf16 values);
  * small-integer inputs (every product and sum exact in float32): bit-equal on every face.
"""
from __future__ import annotations

import pytest
import torch

from lmarith.bindings import cpp_bf16, ops
from lmarith.errors import ConfigError
from lmarith.kernels import reference_bf16

OP = "bf16_linear"
SHAPES = [(1, 7, 5), (3, 33, 64), (17, 1, 2), (1, 100, 577), (17, 16, 1), (3, 48, 31),
          (1, 576, 64), (17, 100, 64)]     # (M, N, K): M 1/3/17, N below/at/over 16-row blocks, K odd/even
ISAS = [isa for isa in ("scalar", "avx2", "avx512bf16", "amx") if cpp_bf16.isa_supported(isa)]
TILE_ISAS = [isa for isa in ("amx",) if cpp_bf16.isa_supported(isa)]    # CPUs with AMX-BF16
DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    """(x [M, K] in dtype, W [N, K] bf16, bias [N] float32 or None), Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.1).bfloat16()
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias) -> None:
    """y against the reference with the tolerances of the module doc."""
    expected = reference_bf16.bf16_linear(x, reference_bf16.pack_weight(w), bias)
    assert y.dtype == x.dtype and y.shape == expected.shape
    magnitude = x.bfloat16().double().abs() @ w.double().abs().T
    bound = 1e-5 * magnitude + 1e-6
    if x.dtype == torch.bfloat16:
        bound = bound + 2.0 ** -7 * expected.double().abs()
    excess = (y.double() - expected.double()).abs() - bound
    assert excess.numel() == 0 or excess.max().item() <= 0, f"worst excess {excess.max().item():.3g}"


def integer_inputs(m: int, n: int, k: int, dtype: torch.dtype):
    """Small integers: every product and partial sum is exact in float32 (and in bf16 out)."""
    gen = torch.Generator().manual_seed(m * 31 + n)
    x = torch.randint(-3, 4, (m, k), generator=gen).to(dtype)
    w = torch.randint(-2, 3, (n, k), generator=gen).bfloat16()
    return x, w, torch.randint(-4, 5, (n,), generator=gen).float()


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (16, 2), (33, 577)], ids=str)
def test_pack_round_trip(shape) -> None:
    w = torch.randn(*shape).bfloat16()
    packed = ops.pack_bf16(w)
    n, k = shape
    assert packed.data.dtype == torch.int16
    assert tuple(packed.data.shape) == (-(-n // 16), -(-k // 2), 16, 2)
    assert torch.equal(reference_bf16.unpack_weight(packed), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_faces(face, run_face, shape, bias: bool, dtype: torch.dtype) -> None:
    x, w, b = make_inputs(*shape, dtype, bias)
    check(run_face(x, ops.pack_bf16(w), b), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_on_integers(face, run_face, dtype: torch.dtype) -> None:
    x, w, b = integer_inputs(9, 37, 75, dtype)
    expected = (x.double() @ w.double().T + b.double()).to(dtype)
    assert torch.equal(run_face(x, ops.pack_bf16(w), b), expected)


def test_empty_batch(face, run_face) -> None:
    y = run_face(torch.empty(0, 6), ops.pack_bf16(torch.randn(5, 6)), None)
    assert y.shape == (0, 5) and y.dtype == torch.float32


@pytest.mark.skipif(not ISAS, reason="lmarith._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_every_isa(monkeypatch, isa: str, dtype: torch.dtype) -> None:
    """Each instruction path forced; M from 1 to 9 and 17 covers every tile height of the
    8-row (AVX2: 4-row) kernels, full and partial; N and K odd; a large shape runs the
    OpenMP split; integer inputs must come out bit-equal."""
    monkeypatch.setenv(cpp_bf16.ISA_ENV, isa)
    for m in (*range(1, 10), 17):
        for bias in (False, True):
            x, w, b = make_inputs(m, 37, 75, dtype, bias, seed=m)
            check(ops.run(OP, "cpp", x, ops.pack_bf16(w), b), x, w, b)
        x, w, b = integer_inputs(m, 37, 75, dtype)
        assert torch.equal(ops.run(OP, "cpp", x, ops.pack_bf16(w), b),
                           (x.double() @ w.double().T + b.double()).to(dtype))
    x, w, b = make_inputs(5, 1000, 577, dtype, True)
    check(ops.run(OP, "cpp", x, ops.pack_bf16(w), b), x, w, b)
    strided = make_inputs(3, 1, 2 * 75, dtype, False)[0][:, ::2]        # non-contiguous x
    w = make_inputs(1, 7, 75, dtype, False)[1]
    check(ops.run(OP, "cpp", strided, ops.pack_bf16(w), None), strided, w, None)


@pytest.mark.parametrize("isa", TILE_ISAS)
@pytest.mark.parametrize("m", [1, 15, 16, 17, 33])
@pytest.mark.parametrize("n,k", [(37, 64), (65, 31), (16, 75), (130, 577)], ids=str)
def test_cpp_amx_tile_edges(monkeypatch, isa: str, m: int, n: int, k: int) -> None:
    """AMX tiles are 16 rows x 32 inputs, 4 output blocks a pass: M below, at and past 16 (and
    two tiles and a part), K with whole tiles only (64), none (31) and a remainder the
    vdpbf16ps path adds (75, 577), N with 1-5 blocks and partial ones; integers bit-equal."""
    monkeypatch.setenv(cpp_bf16.ISA_ENV, isa)
    for dtype in DTYPES:
        x, w, b = make_inputs(m, n, k, dtype, True, seed=m + n)
        check(ops.run(OP, "cpp", x, ops.pack_bf16(w), b), x, w, b)
        x, w, b = integer_inputs(m, n, k, dtype)
        assert torch.equal(ops.run(OP, "cpp", x, ops.pack_bf16(w), b),
                           (x.double() @ w.double().T + b.double()).to(dtype))


def test_cpp_isa_env_rejects_unknown(monkeypatch) -> None:
    if "cpp" not in ops.faces(OP):
        pytest.skip("lmarith._C is not built")
    monkeypatch.setenv(cpp_bf16.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="LMARITH_BF16_ISA"):
        ops.run(OP, "cpp", torch.randn(1, 4), ops.pack_bf16(torch.randn(3, 4)))


def test_cpp_isa_env_rejects_a_path_the_cpu_lacks(monkeypatch) -> None:
    """A forced path the CPU cannot run is a ConfigError when the call is prepared (at model
    load), naming the paths it can run; the CPU's answer is faked so every host checks it."""
    if "cpp" not in ops.faces(OP):
        pytest.skip("lmarith._C is not built")
    monkeypatch.setattr(cpp_bf16.cpp._C, "bf16_isa_supported", lambda code: code in (0, 1))
    monkeypatch.setenv(cpp_bf16.ISA_ENV, "amx")
    with pytest.raises(ConfigError, match=r"LMARITH_BF16_ISA=amx: this CPU cannot.*auto, scalar$"):
        cpp_bf16.prepared(ops.pack_bf16(torch.randn(3, 4)))
    monkeypatch.setenv(cpp_bf16.ISA_ENV, "scalar")
    assert cpp_bf16.isa_code() == cpp_bf16.ISA_CODES["scalar"]


def test_dispatch_and_prepared_call() -> None:
    x, w, b = make_inputs(3, 40, 96, torch.bfloat16, True)
    packed = ops.pack_bf16(w)
    expected_face = "cpp" if ops.cpp_available() else "torch"
    assert ops.face_for(OP, x.device) == expected_face
    check(ops.bf16_linear(x, packed, b), x, w, b)
    call = ops.prepared_bf16_linear(packed, b)
    assert torch.equal(call(x), ops.bf16_linear(x, packed, b))
    with pytest.raises(ValueError, match=r"\[M, 96\]"):
        call(x[:, :10])


@pytest.mark.parametrize("bad, message", [
    (lambda x, w, b: (x[:, :3], w, b), r"\[M, 8\]"),
    (lambda x, w, b: (x[None], w, b), r"\[M, 8\]"),
    (lambda x, w, b: (x.double(), w, b), "float32 or bfloat16"),
    (lambda x, w, b: (x, w.data, b), "BF16Weight"),
    (lambda x, w, b: (x, w, b[:2]), r"bias must be a tensor \[5\]"),
    (lambda x, w, b: (x.numpy(), w, b), "tensor"),
])
def test_input_checks(bad, message: str) -> None:
    x, w, b = make_inputs(2, 5, 8, torch.float32, True)
    with pytest.raises(ValueError, match=message):
        ops.bf16_linear(*bad(x, ops.pack_bf16(w), b))


def test_pack_checks() -> None:
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        ops.pack_bf16(torch.randn(4))
    with pytest.raises(ValueError, match="floating-point"):
        ops.pack_bf16(torch.ones(2, 2, dtype=torch.int32))


def rounding_cases() -> torch.Tensor:
    """float32 values at and beside bf16 rounding ties, of both signs and many scales."""
    base = torch.tensor([1.0, 1.5, 3.0, 0.1, 1000.0, 6.0e-5, 3.0e38])
    ulp = torch.tensor([2.0 ** -7, 2.0 ** -7, 2.0 ** -6, 2.0 ** -11, 2.0 ** 2, 2.0 ** -22, 2.0 ** 120])
    ties = torch.cat([base + ulp / 2, base + 1.5 * ulp, base + ulp / 2 * (1 + 2.0 ** -16)])
    values = torch.cat([base, ties, -ties, torch.tensor([0.0, -0.0, 1e-40, -3e-39])])
    return values[:48] if values.numel() >= 48 else torch.cat([values, values])[:48]


@pytest.mark.skipif(not ISAS, reason="lmarith._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [48, 37])
def test_cpp_rounding_is_torchs(monkeypatch, isa: str, n: int) -> None:
    """Outputs and fp32 activations round to bf16 bit for bit as torch does (ties to even,
    infinities, NaN as NaN), whole 16-column blocks (the AVX-512 store) and a partial one."""
    monkeypatch.setenv(cpp_bf16.ISA_ENV, isa)
    bias = rounding_cases()[:n].clone()
    bias[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    out = ops.run(OP, "cpp", x, ops.pack_bf16(torch.ones(n, 16).bfloat16()), bias)
    want = bias.bfloat16()
    assert torch.isnan(out[:, 2]).all()
    keep = torch.arange(n) != 2
    assert torch.equal(out[:, keep].view(torch.int16), want[keep].expand(3, -1).view(torch.int16))
    finite = rounding_cases()[:n]
    finite = finite[finite.abs() > 1e-30]                       # AMX reads bf16 denormals as 0
    x32 = finite.reshape(1, -1).repeat(2, 1)
    identity = torch.eye(finite.numel()).bfloat16()
    assert torch.equal(ops.run(OP, "cpp", x32, ops.pack_bf16(identity), None), x32.bfloat16().float())
    signaling = torch.zeros(1, 16)
    signaling.view(torch.int32)[0, 0] = 0x7F800001              # a signaling NaN stays a NaN
    out = ops.run(OP, "cpp", signaling, ops.pack_bf16(torch.eye(16).bfloat16()), None)
    assert torch.isnan(out[0, 0])


@pytest.mark.skipif(not ISAS, reason="lmarith._C is not built")
@pytest.mark.parametrize("isa", ISAS)
def test_a_row_does_not_depend_on_its_batch(monkeypatch, isa: str) -> None:
    """Every row sums in one order whatever the batch holds (AMX tiles and their remainder)."""
    monkeypatch.setenv(cpp_bf16.ISA_ENV, isa)
    x, w, b = make_inputs(33, 130, 577, torch.float32, True, seed=4)
    call = ops.prepared_bf16_linear(ops.pack_bf16(w), b)
    alone = torch.cat([call(x[i: i + 1]) for i in range(33)])
    for m in (2, 9, 16, 17, 33):
        assert torch.equal(call(x[:m]), alone[:m]), m
