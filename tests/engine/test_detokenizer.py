"""The incremental detokenizer: its text equals a full decode, each token costs a bounded
window of decoding, and stop strings are cut and held back exactly."""
from __future__ import annotations

import pytest

from builders import make_tokenizer
from lmarith.core.detokenizer import CONTEXT_TOKENS, Detokenizer

TEXTS = ["The cat sat on the mat.", "Déjà vu — naïve café, 東京 and emoji 🐉🐈!",
         "Once upon a time there was a small robot who loved to read books about the sea."]


class CountingTokenizer:
    """Wraps a tokenizer to record how many ids each decode call reads."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(extra_text=" ".join(TEXTS))


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_a_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = tokenizer("Prompt:")["input_ids"]
    counting = CountingTokenizer(tokenizer)
    detokenizer = Detokenizer(counting, context)
    streamed = ""
    for token in ids:
        assert not detokenizer.append(token)
        streamed += detokenizer.take_ready()
    detokenizer.finish()
    streamed += detokenizer.take_ready()
    full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert detokenizer.text == streamed == full
    assert max(counting.lengths) <= CONTEXT_TOKENS + 8, "work per token must not grow with the text"


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    text = TEXTS[2]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = Detokenizer(tokenizer, [], stop=["robot", "zzz"])
    streamed, stopped_at = "", None
    for index, token in enumerate(ids):
        if detokenizer.append(token):
            stopped_at = index
            break
        streamed += detokenizer.take_ready()
        assert "rob" not in streamed, "text that may start a stop string is held back"
    assert stopped_at is not None
    detokenizer.finish()
    streamed += detokenizer.take_ready()
    assert streamed == detokenizer.text == text[: text.index("robot")]


def test_hold_back_is_released_when_no_stop_matches(tokenizer):
    ids = tokenizer("a small robot", add_special_tokens=False)["input_ids"]
    detokenizer = Detokenizer(tokenizer, [], stop=["robots!"])
    pieces = []
    for token in ids:
        detokenizer.append(token)
        pieces.append(detokenizer.take_ready())
    assert "".join(pieces) != "a small robot", "the tail could still become 'robots!'"
    detokenizer.finish()
    assert "".join(pieces) + detokenizer.take_ready() == "a small robot"
