"""Model-free drafting by prompt lookup: the tokens that followed the most recent earlier
occurrence of the sequence's last n tokens, trying n from the largest down."""
from __future__ import annotations

from typing import Sequence


def propose_ngram(tokens: Sequence[int], max_n: int, min_n: int, k: int) -> list[int]:
    """Up to k tokens continuing `tokens`, or [] when no suffix of min_n+ tokens recurs."""
    if k <= 0:
        return []
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = list(tokens[length - n:])
        for start in range(length - n - 1, -1, -1):
            if list(tokens[start:start + n]) == suffix:
                return list(tokens[start + n: start + n + k])
    return []
