"""Text hand-offs between tokenizers: encode a piece of the answer without special tokens,
decode tokens in the context of the ones before them (so leading spaces and byte-level
pieces come out right), and find how much of two token lists agree."""
from __future__ import annotations

from typing import Sequence

CONTEXT_TOKENS = 6     # tokens before a piece that its decoding is anchored on


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text alone (no BOS or other special tokens); [] for empty text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode_after(tokenizer, ids: Sequence[int], start: int) -> str:
    """The text ids[start:] adds to ids[:start], decoded inside a short window before it."""
    window = max(0, start - CONTEXT_TOKENS)
    head = _decode(tokenizer, ids[window:start])
    whole = _decode(tokenizer, ids[window:])
    return whole[len(head):] if whole.startswith(head) else _decode(tokenizer, ids[start:])


def _decode(tokenizer, ids: Sequence[int]) -> str:
    if not ids:
        return ""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    limit = min(len(first), len(second))
    for index in range(limit):
        if first[index] != second[index]:
            return index
    return limit
