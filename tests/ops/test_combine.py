"""combine through every face against kernels/reference.py: the reference's exact NaN/+-inf
pattern and its finite values to float32 tolerance, on mixed-group, zero-norm and padded
plans, with -inf entries and rows, and ties (in a row, across terms, between group sides)."""
from __future__ import annotations

import pytest
import torch

from lmarith.bindings import cpp, ops
from lmarith.kernels import reference

OP = "combine"
INF = float("inf")
# Tolerances. Quarter plans (multiples of 1/4, so every norm is exact in float32 and norm != 0
# cannot flip between faces; nonzero norms >= 1): finite values to 1e-4 abs + 1e-5 rel, near
# ties excluded. Gaussian plans: every entry to 2e-5 abs and rel, NaN where the reference's is.
QUARTER_ATOL, QUARTER_RTOL = 1e-4, 1e-5
GAUSSIAN_TOL = 2e-5
WEIGHT_STEPS = torch.tensor([-1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5])
COEF_STEPS = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # interpreter's -inf math
              pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]


def quarter_plan(batch: int, num_terms: int, num_groups: int, gen: torch.Generator):
    """A plan with mixed groups, negative and zero coefficients, and a linear block whose const
    keeps every nonzero total norm >= 1 (for a tight tolerance)."""
    num_blocks = 1 + 2 * num_groups
    pick = lambda steps, shape: steps[torch.randint(len(steps), shape, generator=gen)]  # noqa: E731
    weights = pick(WEIGHT_STEPS, (batch, num_blocks, num_terms))
    weights = weights * (torch.rand(batch, num_blocks, num_terms, generator=gen) < 0.7)
    consts = pick(torch.tensor([0.0, 0.0, 0.25, -0.25, 0.5]), (batch, num_blocks))
    coefs = pick(COEF_STEPS, (batch, num_groups))
    kinds = torch.where(torch.rand(batch, num_groups, generator=gen) < 0.5, 1, -1).to(torch.int32)
    norms = weights.sum(-1) + consts
    worst = torch.zeros(batch)
    if num_groups:
        sides = torch.maximum(norms[:, 1::2].abs(), norms[:, 2::2].abs())
        worst = (coefs.abs() * sides).sum(-1)
    consts[:, 0] = 1.0 + worst - weights[:, 0].sum(-1)
    return weights, consts, coefs, kinds


def make_zero_norm_row(weights, consts, coefs, row: int) -> None:
    """Weights +1/-1 (const 0): every norm is 0, so scores stay unnormalised."""
    weights[row], consts[row], coefs[row] = 0.0, 0.0, 0.0
    if weights.shape[2] >= 2:
        weights[row, 0, 0], weights[row, 0, 1] = 1.0, -1.0
        if coefs.shape[1]:
            weights[row, 1, 0], weights[row, 1, 1] = 1.0, -1.0
            weights[row, 2, 1], weights[row, 2, 0] = 1.0, -1.0
            coefs[row, 0] = -0.5
    else:
        weights[row, 0, 0], consts[row, 0] = 1.0, -1.0


def make_padded_row(logits, weights, consts, coefs, row: int, unused_from: int) -> None:
    """Terms >= unused_from get zero weight and garbage logits (NaN, +-inf) in this row."""
    weights[row, :, unused_from:] = 0.0
    garbage = torch.tensor([float("nan"), INF, -INF, 3e38])
    for term in range(unused_from, logits.shape[0]):
        logits[term, row] = garbage[torch.arange(logits.shape[2]) % 4]
    if unused_from == 0:
        consts[row], coefs[row] = 0.0, 0.0


def quarter_inputs(num_terms: int, batch: int, vocab: int, num_groups: int, seed: int):
    """Logits with -inf entries, tied values, identical rows across terms, an all -inf term
    row, and a quarter plan with random, zero-norm and padded rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_terms, batch, vocab, generator=gen) * 3.0
    holes = torch.rand(num_terms, batch, vocab, generator=gen) < 0.02
    holes[:, 0::6] = False  # rows with only finite logits take the kernels' faster path
    logits[holes] = -INF
    logits[:, 2::4] = torch.round(logits[:, 2::4] * 2.0) / 2.0
    if num_terms >= 3:
        logits[2, 1::2] = logits[0, 1::2]
    weights, consts, coefs, kinds = quarter_plan(batch, num_terms, num_groups, gen)
    for row in range(batch):
        if row % 6 == 3:
            make_zero_norm_row(weights, consts, coefs, row)
        elif row % 6 == 4:
            make_padded_row(logits, weights, consts, coefs, row, unused_from=min(1, num_terms))
        elif row % 6 == 5:
            make_padded_row(logits, weights, consts, coefs, row, unused_from=0)
    if batch > 7:
        logits[0, 7] = -INF
        weights[7, 0, 0] = 1.0
    return logits, weights, consts, coefs, kinds


def near_tie_tokens(logits, weights, consts, coefs) -> torch.Tensor:
    """Tokens where a group's two sides differ by float noise but carry different norms:
    the pick there is a discontinuity of the spec, so the faces may legitimately differ."""
    values, norms = reference._row_blocks(reference._term_log_probs(logits), weights, consts)
    near = torch.zeros(values.shape[0], values.shape[2], dtype=torch.bool)
    for group in range(coefs.shape[1]):
        left, right = values[:, 1 + 2 * group], values[:, 2 + 2 * group]
        close = ((left - right).abs() <= 1e-4 * (1.0 + left.abs())) & (left != right)
        differ = (norms[:, 1 + 2 * group] != norms[:, 2 + 2 * group])[:, None]
        near |= close & differ & (coefs[:, group] != 0)[:, None]
    return near


def assert_same_pattern(got: torch.Tensor, want: torch.Tensor) -> None:
    """Identical NaN, -inf and +inf positions."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs"
    assert torch.equal(got == -INF, want == -INF), "-inf pattern differs"
    assert torch.equal(got == INF, want == INF), "+inf pattern differs"


def assert_matches(run_face, logits, weights, consts, coefs, kinds, gaussian=False, **knobs):
    """The face against the reference: dtype, shape, special values, then finite values to
    QUARTER_* (near ties excluded) or, for a gaussian plan, every entry to GAUSSIAN_TOL."""
    got, got_lse = run_face(logits, weights, consts, coefs, kinds, **knobs)
    want, want_lse = reference.combine(logits, weights, consts, coefs, kinds)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_same_pattern(got, want)
    if gaussian:
        tol = {"rtol": GAUSSIAN_TOL, "atol": GAUSSIAN_TOL, "equal_nan": True}
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(got_lse, want_lse, **tol)
        return got, got_lse
    assert_same_pattern(got_lse, want_lse)
    checked = torch.isfinite(want) & ~near_tie_tokens(logits.float(), weights, consts, coefs)
    torch.testing.assert_close(got[checked], want[checked], atol=QUARTER_ATOL, rtol=QUARTER_RTOL)
    finite_rows = torch.isfinite(want_lse)
    torch.testing.assert_close(got_lse[finite_rows], want_lse[finite_rows],
                               atol=QUARTER_ATOL, rtol=QUARTER_RTOL)
    return got, got_lse


def gaussian_inputs(terms: int, rows: int, vocab: int, groups: int, seed: int):
    """Logits with -inf entries and exact ties (also across terms, so row-blocks tie too) and
    a plan of sparse Gaussian weights, small consts, signed or zero coefs, mixed kinds."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(terms, rows, vocab, generator=gen)
    logits[torch.rand(terms, rows, vocab, generator=gen) < 0.05] = -INF
    logits[:, :, 1::9] = logits[:, :, :1]
    if terms > 1:
        logits[1, :, :vocab // 4] = logits[0, :, :vocab // 4]
    blocks = 1 + 2 * groups
    weights = torch.randn(rows, blocks, terms, generator=gen)
    weights[torch.rand(rows, blocks, terms, generator=gen) < 0.3] = 0.0
    consts = 0.2 * torch.randn(rows, blocks, generator=gen)
    coefs = torch.randn(rows, groups, generator=gen)
    coefs[torch.rand(rows, groups, generator=gen) < 0.2] = 0.0
    kinds = torch.where(torch.rand(rows, groups, generator=gen) < 0.5, 1, -1).to(torch.int32)
    return logits, weights, consts, coefs, kinds


# Every (T, B) pair on the small vocabulary; a spread of them on the large ones, which the
# interpreter is too slow for.
SMALL_SHAPES = [(t, b, 111) for t in range(1, 6) for b in (1, 7, 33)]
LARGE_SHAPES = [(1, 33, 32000), (2, 7, 32000), (3, 1, 32000), (4, 7, 32000), (5, 1, 32000),
                (1, 7, 49152), (2, 1, 49152), (3, 33, 49152), (4, 1, 49152), (5, 7, 49152)]
QUARTER_SHAPES = SMALL_SHAPES + [pytest.param(*s, marks=pytest.mark.compiled_faces)
                                 for s in LARGE_SHAPES]


@pytest.mark.parametrize("num_terms,batch,vocab", QUARTER_SHAPES)
def test_combine_matches_reference(run_face, num_terms: int, batch: int, vocab: int) -> None:
    """Quarter plans with zero-norm, padded and all-forbidden rows, 0 to 2 groups."""
    inputs = quarter_inputs(num_terms, batch, vocab, (num_terms + batch) % 3,
                            seed=num_terms * 1000 + batch + vocab)
    got, lse = assert_matches(run_face, *inputs)
    if batch > 7:  # row 7: an active term -inf everywhere, so no token survives
        assert not torch.isfinite(got[7]).any() and lse[7] == -INF


@pytest.mark.parametrize("terms,rows,vocab,groups,dtype", [
    (1, 1, 111, 0, torch.float32), (2, 7, 1000, 1, torch.float32),
    (3, 7, 111, 2, torch.float16), (4, 7, 1000, 1, torch.bfloat16),
    (2, 33, 111, 1, torch.float32)])
def test_combine_matches_reference_gaussian_plans(run_face, terms, rows, vocab, groups, dtype):
    """Gaussian plans on float32, float16 and bfloat16 logits, to the tight tolerance."""
    logits, *plan = gaussian_inputs(terms, rows, vocab, groups, 1000 * terms + 10 * rows + groups)
    assert_matches(run_face, logits.to(dtype), *plan, gaussian=True)


@pytest.mark.faces("triton")
def test_combine_triton_tiling_knobs(run_face) -> None:
    """Several vocabulary splits per row and a small tile (cross-split lse merging)."""
    logits, *plan = gaussian_inputs(3, 2, 1000, 2, seed=3022)
    assert_matches(run_face, logits, *plan, splits=3, block_v=128, gaussian=True)


def test_combine_zero_norm_padding_and_strides(run_face) -> None:
    """Zero-norm rows (a - b), padded rows whose unused term is garbage, permuted logits."""
    logits, weights, consts, coefs, kinds = gaussian_inputs(3, 4, 111, 1, seed=7)
    weights[0] = torch.tensor([[1.0, -1.0, 0.0]] * 3)
    consts[0] = 0.0
    weights[1:3, :, 2] = 0.0
    logits[2, 1] = float("nan")
    logits[2, 2] = INF
    strided = logits.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert_matches(run_face, strided, weights, consts, coefs, kinds, gaussian=True)


def test_combine_ties_take_left_norm_for_max_and_right_for_min(run_face) -> None:
    """Equal sides with different norms: max keeps the left norm, min the right one.

    Exact ties two ways: logits 0 and very negative (exact log-probs: left = L_a, norm 1, and
    right = 2 * L_b, norm 2, tie on tokens 0 and 1); and term 1 one-hot at token 5, where
    L0 (norm 1) and L0 + L1 (norm 2) tie, with the expected scores worked out."""
    left = torch.tensor([0.0, -200.0, -300.0, -400.0, -500.0, -600.0])
    right = torch.tensor([0.0, -100.0, -160.0, -190.0, -240.0, -280.0])
    logits = torch.stack([left, right])[:, None, :].expand(2, 2, -1).contiguous()
    weights = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]).expand(2, 3, 2).contiguous()
    kinds = torch.tensor([[1], [-1]], dtype=torch.int32)
    assert_matches(run_face, logits, weights, torch.zeros(2, 3), torch.ones(2, 1), kinds,
                   gaussian=True)
    logits = torch.randn(2, 1, 257, generator=torch.Generator().manual_seed(5))
    logits[1] = -INF
    logits[1, 0, 5] = 0.0
    weights = torch.tensor([[[0.5, 0.0], [1.0, 0.0], [1.0, 1.0]]])
    scores = {}
    for kind in (1, -1):
        kinds = torch.tensor([[kind]], dtype=torch.int32)
        got, lse = assert_matches(run_face, logits, weights, torch.zeros(1, 3),
                                  torch.tensor([[2.0]]), kinds)
        scores[kind] = got[0, 5] + lse[0]
    log_prob = torch.log_softmax(logits[0, 0], -1)[5]
    torch.testing.assert_close(scores[1], 2.5 * log_prob / 2.5)
    torch.testing.assert_close(scores[-1], 2.5 * log_prob / 4.5)


def test_combine_forbidden_rules(run_face) -> None:
    """-inf in an active term forbids the token; in a zero-weight term it does not; a group
    whose picked side is -inf forbids it only when its coefficient is nonzero."""
    logits = torch.zeros(3, 1, 4)
    logits[0, 0, 0] = logits[1, 0, 1] = logits[2, 0, 2] = -INF
    weights = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                             [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    plan = (weights, torch.zeros(1, 5), torch.tensor([[1.0, 0.0]]),
            torch.tensor([[-1, 1]], dtype=torch.int32))
    got, _ = run_face(logits, *plan)
    want, _ = reference.combine(logits, *plan)
    assert torch.equal(got == -INF, torch.tensor([[True, True, True, False]]))
    assert_same_pattern(got, want)


def test_combine_forbidden_token_under_negative_norm(run_face) -> None:
    """A forbidden token divided by a negative norm becomes +inf in the reference; match it."""
    logits = torch.tensor([[[0.0, -INF, 1.0, 2.0]], [[1.0, 0.5, -INF, 0.0]]])
    empty = torch.zeros(1, 0)
    assert_matches(run_face, logits, torch.tensor([[[-1.0, 0.0]]]), torch.zeros(1, 1),
                   empty, empty.to(torch.int32), gaussian=True)


@pytest.mark.compiled_faces
def test_combine_bfloat16_logits(run_face) -> None:
    """bfloat16 logits (the C++ face reads their raw bits) on a large vocabulary."""
    logits, *plan = quarter_inputs(3, 7, 32000, 1, seed=11)
    assert_matches(run_face, logits.to(torch.bfloat16), *plan)


def test_combine_accepts_other_dtypes_and_layouts(run_face) -> None:
    """float64 strided logits and weights, int64 kinds: converted, same result."""
    logits, weights, consts, coefs, kinds = quarter_inputs(2, 5, 111, 1, seed=3)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    got, _ = run_face(strided.double(), weights.double(), consts, coefs, kinds.long())
    want, _ = reference.combine(logits, weights, consts, coefs, kinds)
    assert_same_pattern(got, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=QUARTER_ATOL, rtol=QUARTER_RTOL)


@pytest.mark.parametrize("batch,vocab", [
    (7, 111), pytest.param(7, 32000, marks=pytest.mark.compiled_faces)])
def test_combine_rows_are_independent_of_batching(run_face, batch: int, vocab: int) -> None:
    """A row's result depends only on that row, whatever the batch and thread split."""
    logits, weights, consts, coefs, kinds = quarter_inputs(3, batch, vocab, 1, seed=12)
    rows, _ = run_face(logits, weights, consts, coefs, kinds)
    singles = [run_face(logits[:, i:i + 1], weights[i:i + 1], consts[i:i + 1], coefs[i:i + 1],
                        kinds[i:i + 1])[0] for i in range(batch)]
    assert torch.equal(rows.nan_to_num(), torch.cat(singles).nan_to_num())


def test_combine_rejects_bad_shapes(face: str) -> None:
    """Every face is behind the same checks (bindings/checks.py)."""
    logits, weights, consts, coefs, kinds = quarter_inputs(2, 3, 111, 1, seed=1)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.run(OP, face, logits, weights[:, :, :1], consts, coefs, kinds)
    with pytest.raises(ValueError, match=r"logits must be \[T, B, V\]"):
        ops.run(OP, face, logits[0], weights, consts, coefs, kinds)
    with pytest.raises(ValueError, match="group_kinds must be an integer"):
        ops.run(OP, face, logits, weights, consts, coefs, kinds.float())


def test_falls_back_to_reference_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without lmarith._C the CPU dispatch takes the torch face; the cpp face says why not."""
    inputs = quarter_inputs(2, 3, 111, 1, seed=2)
    monkeypatch.setattr(cpp, "_C", None)
    assert "cpp" not in ops.faces(OP) and ops.face_for(OP, torch.device("cpu")) == "torch"
    got, _ = ops.combine(*inputs)
    want, _ = reference.combine(*inputs)
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    with pytest.raises(RuntimeError, match="not available"):
        ops.combine_cpp(*inputs)


def test_dispatch_picks_the_face_for_the_device() -> None:
    """CUDA -> triton; CPU -> cpp when lmarith._C built, else torch; ops.combine checks its
    inputs and runs that face (as does combine_cpp the cpp one); unknown faces fail."""
    cpu_face = "cpp" if ops.cpp_available() else "torch"
    assert ops.face_for(OP, torch.device("cpu")) == cpu_face
    assert ops.face_for(OP, torch.device("cuda")) == "triton"
    assert ops.faces(OP) == ["torch", "triton"] + ["cpp"] * ops.cpp_available()
    logits, weights, *plan = quarter_inputs(2, 3, 111, 1, seed=1)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.combine(logits, weights[:, :, :1], *plan)
    dispatched, _ = ops.combine(logits, weights, *plan)
    assert torch.equal(dispatched, ops.run(OP, cpu_face, logits, weights, *plan)[0])
    if ops.cpp_available():
        assert torch.equal(ops.combine_cpp(logits, weights, *plan)[0], dispatched)
    with pytest.raises(ValueError, match="no 'cuda' face"):
        ops.run(OP, "cuda", logits, weights, *plan)
