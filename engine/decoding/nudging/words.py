"""Which of the nudger's drafted words a round takes, as the paper's code decides it: the
draft is split on spaces (after its leading spaces); the first word is always taken, each
further word while the base is uncertain there (top-1 < gamma) and does not already predict
it; a possibly partial last word is dropped. `decide` also works on a draft still being
written (full_drafts=False): it waits while the answer could still change."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

INCOMPLETE = "\ufffd"     # a decoder's mark for bytes of a character not complete yet


@dataclass(frozen=True)
class Probe:
    """The base model's view at a word boundary: its drawn token, that token's text (None
    for an end token, which matches no word) and the top-1 probability there; available is
    False when the boundary falls inside a token, so the base cannot be asked there."""

    token: int = -1
    text: Optional[str] = None
    top_prob: float = 0.0
    available: bool = True


@dataclass(frozen=True)
class Draft:
    """The nudger's draft so far: its text, whether it is complete (max tokens reached or
    the nudger ended), and whether it ended the answer."""

    text: str
    done: bool
    ended: bool = False


@dataclass(frozen=True)
class Wait:
    """Nothing decided yet: probe the base at `boundary` (candidate word `word`), or, when
    boundary is None, draft more."""

    word: Optional[int] = None
    boundary: Optional[int] = None


@dataclass(frozen=True)
class Take:
    """Take draft text[:cut]; then the base continues with probe.token (hand_off), the
    answer ends (finish), or a new nudging round starts (neither)."""

    cut: int
    probe: Optional[Probe] = None
    finish: bool = False

    @property
    def hand_off(self) -> bool:
        return self.probe is not None


Decision = Union[Wait, Take]


def split_words(text: str) -> tuple[str, list[str]]:
    """(leading spaces, words split on single spaces), as the paper's code splits a draft."""
    body = text.lstrip(" ")
    return text[: len(text) - len(body)], body.split(" ")


def boundary(prefix: str, words: list[str], index: int) -> int:
    """Offset in the draft of the space before words[index] (the end of words[:index])."""
    return len(prefix) + len(" ".join(words[:index]))


def clean_text(text: str) -> str:
    """The draft without a trailing incomplete character (its bytes are still coming)."""
    return text.rstrip(INCOMPLETE)


def decide(draft: Draft, probes: dict[int, Probe], gamma: float, full_drafts: bool) -> Decision:
    """The round's decision once it can be made, else what it waits for."""
    text = clean_text(draft.text) if not draft.done else draft.text
    if draft.ended:
        return Take(len(clean_text(text)), finish=True)
    if full_drafts and not draft.done:
        return Wait()
    prefix, words = split_words(text)
    for index in range(1, len(words)):
        final = draft.done or index < len(words) - 1
        if final and not words[index]:
            continue                           # two spaces in a row: no word to test
        cut = boundary(prefix, words, index)
        probe = probes.get(index)
        if probe is None:
            return Wait(index, cut)
        if not words[index]:
            return Wait()                       # a word, or a second space? draft more
        verdict = _judge(" " + words[index], probe, gamma, final)
        if verdict is None:
            return Wait()                       # the word could still grow into a match
        if verdict:
            return Take(cut, probe)
    if not draft.done:
        return Wait()
    cut = len(clean_text(text)) if len(words) == 1 else boundary(prefix, words, len(words) - 1)
    return Take(cut)


def _judge(word: str, probe: Probe, gamma: float, final: bool) -> Optional[bool]:
    """True: the base takes over before this word; False: the word is the nudger's;
    None: undecided until more of the word is drafted."""
    if not probe.available:
        return False
    if probe.top_prob >= gamma:
        return True
    if probe.text is None:
        return False
    if word.startswith(probe.text):
        return True
    if not final and probe.text.startswith(word):
        return None
    return False


def candidates(text: str) -> list[tuple[int, int]]:
    """(word index, boundary) of every word after the first that a whole draft offers."""
    prefix, words = split_words(text)
    return [(index, boundary(prefix, words, index)) for index in range(1, len(words)) if words[index]]
