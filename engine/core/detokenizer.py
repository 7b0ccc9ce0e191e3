"""Incremental detokenizer with stop strings, as vLLM does it: each new token is decoded
inside a short window of the tokens before it, so the work per token does not grow with the
answer, and a stop string is searched only where it could have just appeared. Text that could
still be the start of a stop string is held back from streaming until it cannot."""
from __future__ import annotations

from typing import Sequence

CONTEXT_TOKENS = 6     # tokens of the context that seed the window (leading spaces, merges)
REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


class Detokenizer:
    """The text of one request's generated tokens, grown token by token."""

    def __init__(self, tokenizer, context_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(stop)
        self.hold_back = max((len(s) - 1 for s in self.stop), default=0)
        self.text = ""
        self.stopped = False
        self.finished = False
        self.sent = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> bool:
        """Add one generated token; True when the text now contains a stop string."""
        if self.stopped:
            return True
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset:])
        if len(window_text) > len(prefix_text) and not window_text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._extend(window_text[len(prefix_text):])
        return self.stopped

    def append_text(self, delta: str) -> bool:
        """Add text decoded elsewhere (a nudging hand-off); True once a stop string is in."""
        if not self.stopped and delta:
            self._extend(delta)
        return self.stopped

    def finish(self) -> None:
        """The request ended: flush text held for an incomplete character, release hold-back."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self._extend(self._decode(self.ids[self.prefix_offset:])[len(prefix_text):])
            self.read_offset = len(self.ids)
        self.finished = True

    def _extend(self, delta: str) -> None:
        start = max(0, len(self.text) - self.hold_back)
        self.text += delta
        cuts = [cut for stop in self.stop for cut in [self.text.find(stop, start)] if cut >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.stopped = True

    def take_ready(self) -> str:
        """Text not streamed yet that no stop string can still claim."""
        done = self.finished or self.stopped
        ready = len(self.text) if done else max(self.sent, len(self.text) - self.hold_back)
        piece = self.text[self.sent:ready]
        self.sent = ready
        return piece
