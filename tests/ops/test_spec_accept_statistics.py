"""spec_accept's statistics through every face: with fixed seeds, the first token follows the
target law, acceptance rates are sum(min(p, q)), the first two tokens follow the joint law and
the bonus token the last target; wrong acceptance rules fail the same chi-square tests."""
from __future__ import annotations

import pytest
import torch

from lmarith.kernels import reference_speculative

try:
    from scipy.stats import chisquare
except ImportError:  # the same statistic, its p-value from the regularised gamma function
    chisquare = None

OP = "spec_accept"
# A chi-square p-value below this fails a law test (the seeds are fixed: no flakes).
MIN_P_VALUE = 1e-4
# Acceptance rates must lie within this many standard errors of their exact values.
RATE_SIGMAS = 5.0

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # interpreter's -inf math
              pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

# The statistics: V = 6. Position 0 has a fixed target p0 and draft q0 (a token with q = 0 <
# p and one with p = 0 < q); position 1's laws depend on the token at position 0, as a model's
# would: P1[a](y) = W[(y - a) % 6], Q1[a](y) = U[(y - a) % 6]; position 2 (the bonus) is P2.
STAT_VOCAB = 6
FIRST_TARGET = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.1, 0.0], dtype=torch.float64)
FIRST_DRAFT = torch.tensor([0.1, 0.3, 0.3, 0.0, 0.15, 0.15], dtype=torch.float64)
SECOND_TARGET = torch.stack([FIRST_TARGET.new_tensor([0.5, 0.3, 0.2, 0, 0, 0]).roll(a)
                             for a in range(6)])
SECOND_DRAFT = torch.stack([FIRST_TARGET.new_tensor([0.2, 0.4, 0, 0.2, 0.2, 0]).roll(a)
                            for a in range(6)])
BONUS_TARGET = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0], dtype=torch.float64)
_STAT_RUNS: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def stat_rows(face: str) -> int:
    """Rows per statistics run: 4000, or 600 where the face runs interpreted (~12 ms/row)."""
    return 600 if face == "triton" and not torch.cuda.is_available() else 4000


def statistics_inputs(rows: int) -> tuple[torch.Tensor, ...]:
    """K = 2 sampled rows over the laws above, x0 ~ q0 and x1 ~ Q1[x0], distinct seeds."""
    gen = torch.Generator().manual_seed(2024)
    first = torch.multinomial(FIRST_DRAFT, rows, replacement=True, generator=gen)
    second = torch.multinomial(SECOND_DRAFT[first], 1, generator=gen).flatten()
    target = torch.stack([FIRST_TARGET.expand(rows, -1), SECOND_TARGET[first],
                          BONUS_TARGET.expand(rows, -1)], dim=1).log().float()
    draft = torch.stack([FIRST_DRAFT.expand(rows, -1), SECOND_DRAFT[first]],
                        dim=1).log().float()
    seed = torch.arange(rows, dtype=torch.int64) * 2654435761 + 12345
    return (target, draft, torch.stack([first, second], dim=1), torch.full((rows,), 2), seed,
            torch.full((rows,), 17), torch.zeros(rows, dtype=torch.bool))


def statistics_run(run_face, face: str) -> dict[str, torch.Tensor]:
    """The face's outputs on statistics_inputs (once per face), plus the first two emitted
    tokens: where position 0 was rejected the second comes from a bonus-only call (K = 0)
    on P1[first token], at the next step."""
    rows = stat_rows(face)
    if (face, rows) not in _STAT_RUNS:
        args = statistics_inputs(rows)
        accepted, next_token = run_face(*args)
        proposals = args[2]
        first = torch.where(accepted >= 1, proposals[:, 0], next_token)
        second = torch.where(accepted >= 2, proposals[:, 1], next_token)
        redo = (accepted == 0).nonzero().flatten()
        follow_target = SECOND_TARGET[first[redo]][:, None].log().float()
        _, follow = run_face(follow_target, torch.zeros(len(redo), 0, STAT_VOCAB),
                             torch.zeros(len(redo), 0, dtype=torch.int64),
                             torch.zeros(len(redo), dtype=torch.int64), args[4][redo],
                             args[5][redo] + 1, args[6][redo])
        second[redo] = follow
        _STAT_RUNS[face, rows] = {"accepted": accepted, "next_token": next_token,
                                  "first": first, "second": second}
    return _STAT_RUNS[face, rows]


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of the token counts to the cell probabilities probs (flattened);
    0 when a cell of probability 0 is hit."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    probs = probs.flatten().double()
    possible = probs > 0
    if counts[~possible].sum() > 0:
        return 0.0
    expected = probs[possible] / probs[possible].sum() * counts.sum()
    if chisquare is not None:
        return float(chisquare(counts[possible].numpy(), expected.numpy()).pvalue)
    statistic = ((counts[possible] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(possible.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


def test_first_token_follows_the_target(run_face, face: str) -> None:
    """The first emitted token (x0 if accepted, else the residual draw) has law p0."""
    run = statistics_run(run_face, face)
    p_value = chi_square_p_value(run["first"], FIRST_TARGET)
    assert p_value > MIN_P_VALUE, f"chi-square p = {p_value:.2e}: {torch.bincount(run['first'])}"


def assert_rate(hits: torch.Tensor, rate: float) -> None:
    """The fraction of True in hits lies within RATE_SIGMAS standard errors of rate."""
    bound = RATE_SIGMAS * (rate * (1 - rate) / hits.numel()) ** 0.5
    assert abs(hits.double().mean() - rate) <= bound, f"{hits.double().mean():.4f} vs {rate:.4f}"


def test_acceptance_rates_are_sum_min(run_face, face: str) -> None:
    """P(accept x0) = sum min(p0, q0) = 0.65; P(accept both) = 0.65 * sum min(W, U) = 0.325."""
    accepted = statistics_run(run_face, face)["accepted"]
    first_rate = float(torch.minimum(FIRST_TARGET, FIRST_DRAFT).sum())
    second_rate = float(torch.minimum(SECOND_TARGET[0], SECOND_DRAFT[0]).sum())
    assert_rate(accepted >= 1, first_rate)
    assert_rate(accepted == 2, first_rate * second_rate)


def test_first_two_tokens_follow_the_joint_law(run_face, face: str) -> None:
    """(y0, y1) has law p0(y0) * P1[y0](y1), over the 36 cells (15 possible)."""
    run = statistics_run(run_face, face)
    joint = FIRST_TARGET[:, None] * SECOND_TARGET
    p_value = chi_square_p_value(run["first"] * STAT_VOCAB + run["second"], joint)
    assert p_value > MIN_P_VALUE, f"chi-square p = {p_value:.2e}"


def test_bonus_token_follows_the_last_target(run_face, face: str) -> None:
    """Rows that accept both proposals draw the bonus token from P2 (position K)."""
    run = statistics_run(run_face, face)
    p_value = chi_square_p_value(run["next_token"][run["accepted"] == 2], BONUS_TARGET)
    assert p_value > MIN_P_VALUE, f"chi-square p = {p_value:.2e}"


def first_token_by_rule(rule: str, rows: int) -> torch.Tensor:
    """The first emitted token of statistics_inputs under an acceptance rule written here,
    on the reference's own uniforms: "exact" (u q < p, then the residual race), "inverted"
    (u p < q: acceptance min(1, q/p)) or "race over p" (the residual replaced by p)."""
    _, _, proposals, _, seed, step, _ = statistics_inputs(rows)
    proposal = proposals[:, 0]
    u = reference_speculative.accept_uniform(seed, step, 0)
    target_p, draft_q = FIRST_TARGET.float()[proposal], FIRST_DRAFT.float()[proposal]
    if rule == "inverted":
        accept = u * target_p < draft_q
    else:
        accept = (draft_q > 0) & (u * draft_q < target_p)
    law = FIRST_TARGET if rule == "race over p" else (FIRST_TARGET - FIRST_DRAFT).clamp_min(0)
    keys = law.float().log() - reference_speculative.race_noise(seed, step, 0, STAT_VOCAB)
    return torch.where(accept, proposal, keys.argmax(dim=-1))


@pytest.mark.parametrize("rows", [600, 4000])
def test_law_test_has_power_against_wrong_rules(rows: int) -> None:
    """The chi-square test of test_first_token_follows_the_target, on the same inputs and
    uniforms, passes the exact rule (which is the reference's, token for token) and fails
    both wrong ones, at both run sizes."""
    exact = first_token_by_rule("exact", rows)
    args = statistics_inputs(rows)
    accepted, next_token = reference_speculative.spec_accept(*args)
    assert torch.equal(exact, torch.where(accepted >= 1, args[2][:, 0], next_token))
    assert chi_square_p_value(exact, FIRST_TARGET) > MIN_P_VALUE
    for rule in ("inverted", "race over p"):
        p_value = chi_square_p_value(first_token_by_rule(rule, rows), FIRST_TARGET)
        assert p_value < MIN_P_VALUE, f"{rule}: chi-square p = {p_value:.2e}, no power"
