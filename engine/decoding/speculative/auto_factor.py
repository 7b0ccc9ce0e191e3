"""speculative_factor="auto": choose k per request from its measured acceptance rate, to
minimise the expected model forwards per generated token (the paper's criterion).

A term with factor k runs once per k steps and scores k positions: k - 1 drafted tokens and
the next one. With acceptance rate a per drafted token, a cycle keeps (1 - a^k) / (1 - a)
tokens on average and costs k forwards of the always-computed terms plus one of this term.
"""
from __future__ import annotations

PRIOR_ACCEPTANCE = 0.8      # before any verification
PRIOR_WEIGHT = 8.0          # ... counted as this many observed proposals


def expected_tokens(acceptance: float, factor: int) -> float:
    """Tokens a cycle of `factor` steps keeps on average."""
    if acceptance >= 1.0:
        return float(factor)
    return (1.0 - acceptance ** factor) / (1.0 - acceptance)


def smoothed_acceptance(accepted: int, proposed: int) -> float:
    return (accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (proposed + PRIOR_WEIGHT)


def choose_factor(acceptance: float, base_cost: float, max_factor: int) -> int:
    """The k in 1..max_factor with the fewest expected forwards per token."""
    def cost(factor: int) -> float:
        return (factor * base_cost + 1.0) / expected_tokens(acceptance, factor)
    return min(range(1, max_factor + 1), key=cost)
