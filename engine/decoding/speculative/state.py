"""One request's speculation in flight: the tokens drawn but not yet verified by every term
(with the law each was drawn from and which terms that law read), and every term's logits
at each open position, counted from the first unverified position."""
from __future__ import annotations

from typing import Optional

import torch


class SpeculationState:
    """Open positions i = 0, 1, ... stand for output positions len(output_ids) + i."""

    def __init__(self, num_terms: int, factors: list[int]) -> None:
        self.num_terms = num_terms
        self.factors = factors                           # each term's k now ("auto" resolved)
        self.tokens: list[int] = []                      # pending (unverified) tokens
        self.laws: list[Optional[torch.Tensor]] = []     # filtered log-probs; None: a proposal
        self.levels: list[tuple[bool, ...]] = []         # terms the token's law read
        self.logits: list[dict[int, torch.Tensor]] = []  # per open position: term -> logits [V]
        self.random_step = 0                             # one per draw or verification

    def present(self, index: int) -> tuple[bool, ...]:
        """Which terms have logits at open position `index`."""
        have = self.logits[index] if index < len(self.logits) else {}
        return tuple(slot in have for slot in range(self.num_terms))

    def put_logits(self, index: int, slot: int, row: torch.Tensor) -> None:
        while len(self.logits) <= index:
            self.logits.append({})
        self.logits[index][slot] = row

    def push(self, token: int, law: Optional[torch.Tensor], level: tuple[bool, ...]) -> None:
        """A newly drawn (or proposed, law None) token at the next open position."""
        self.tokens.append(token)
        self.laws.append(law)
        self.levels.append(level)

    def replace_from(self, index: int, token: int, law: torch.Tensor) -> None:
        """The token at `index` is resampled: it and its law change, everything after goes."""
        del self.tokens[index + 1:], self.laws[index + 1:], self.levels[index + 1:]
        del self.logits[index + 1:]
        self.tokens[index], self.laws[index], self.levels[index] = token, law, self.present(index)

    def pop_verified(self) -> Optional[int]:
        """The leading pending token once every term verified it (its position closes)."""
        if not self.tokens or not all(self.levels[0]):
            return None
        token = self.tokens.pop(0)
        del self.laws[0], self.levels[0]
        if self.logits:
            del self.logits[0]
        return token

    def next_random_step(self) -> int:
        self.random_step += 1
        return self.random_step

    def reset(self) -> None:
        """Forget everything unverified (the request was preempted and will recompute)."""
        self.tokens, self.laws, self.levels, self.logits = [], [], [], []
