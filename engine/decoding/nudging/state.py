"""One nudging request's state: the answer as text (the truth both sides share), each side's
tokens of it, the current round's draft and the base's probes at its word boundaries. With
one tokenizer on both sides the tokens are shared and never re-encoded (the fast path);
otherwise each side re-encodes the answer at a hand-off, so no text is lost or repeated."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from .text import common_prefix, decode_after, encode
from .words import Draft, Probe, clean_text


class Phase(enum.Enum):
    DRAFT = "draft"      # the nudger drafts (and, word by word, the base is probed)
    BASE = "base"        # the base continues until it is uncertain


@dataclass
class Lookahead:
    """A whole draft still being written after the base took over (full_drafts): the base's
    pieces are held back until the draft shows whether it ends the answer (then they are
    dropped and the whole draft is the answer's end) or not (then they go out)."""

    text_len: int                                   # the answer before this round's words
    base_len: int
    held: list = field(default_factory=list)        # (ids, text, nudged) not handed out yet
    base_idle: bool = False                         # the base stopped (uncertain, end, budget)
    round_pending: bool = False                     # a new round waits for the draft

    @property
    def held_tokens(self) -> int:
        return sum(len(ids) for ids, _, _ in self.held)


@dataclass
class Side:
    """The base or the nudger: its sequences (slots in request.sequences), tokenizer,
    formula and plan, end tokens, and its token ids of the answer written so far."""

    slots: list[int]
    tokenizer: Any
    formula: Any
    plan: Any
    end_ids: frozenset[int]
    ids: list[int] = field(default_factory=list)


@dataclass
class NudgingState:
    """Rounds of one request (owned by the engine loop's thread)."""

    base: Side
    nudger: Side
    gamma: float
    max_nudge_tokens: int
    full_drafts: bool
    shared_tokens: bool                 # one tokenizer: hand off tokens, not text
    text: str = ""                      # the answer so far
    phase: Phase = Phase.DRAFT
    draft_context: list[int] = field(default_factory=list)   # nudger ids the draft follows
    draft_ids: list[int] = field(default_factory=list)
    draft_texts: list[str] = field(default_factory=lambda: [""])   # text of draft_ids[:k]
    probes: dict[int, Probe] = field(default_factory=dict)
    pending: dict[int, list[int]] = field(default_factory=dict)    # word -> base answer ids
    run_start: int = 0                  # base.ids index where the base's current run began
    run_chars: int = 0                  # of the run's text, the part already in `text`
    last_words: Optional[str] = None
    repeats: int = 0
    draws: int = 0                      # random draws so far (each its own sampler step)
    rounds: int = 0
    needs: dict[int, int] = field(default_factory=dict)   # slot -> first position with logits
    base_params: Any = None             # the request's SamplingParams with logprobs=1 (top-1)
    run_complete: bool = True           # the base's run so far decodes to whole characters
    lookahead: Optional[Lookahead] = None

    @property
    def draft(self) -> Draft:
        ended = bool(self.draft_ids) and self.draft_ids[-1] in self.nudger.end_ids
        done = ended or len(self.draft_ids) >= self.max_nudge_tokens
        return Draft(self.draft_texts[-1], done, ended)

    def next_draw(self) -> int:
        self.draws += 1
        return self.draws

    def start_round(self) -> None:
        """A new round: the nudger re-reads the answer (in its own tokens) and drafts."""
        self.phase = Phase.DRAFT
        self.draft_ids, self.draft_texts = [], [""]
        self.probes, self.pending = {}, {}
        self.rounds += 1
        self.lookahead = None
        if not self.shared_tokens:
            self.nudger.ids = encode(self.nudger.tokenizer, self.text)
        self.draft_context = list(self.nudger.ids)

    def add_draft_token(self, token: int) -> None:
        self.draft_ids.append(token)
        ids = self.draft_context + self.draft_ids
        self.draft_texts.append(decode_after(self.nudger.tokenizer, ids, len(self.draft_context)))

    def probe_ids(self, cut: int) -> Optional[list[int]]:
        """The base's answer ids up to draft boundary `cut`, or None when no token of the
        draft ends exactly there (the base cannot be asked at that point)."""
        piece = self.draft_texts[-1][:cut]
        if not self.shared_tokens:
            return encode(self.base.tokenizer, self.text + piece)
        if piece in self.draft_texts:
            return self.base.ids + self.draft_ids[: self.draft_texts.index(piece)]
        return None

    def take_draft(self, cut: int, room: int) -> tuple[list[int], str]:
        """Commit draft text[:cut] (at most `room` base tokens): the base's ids and the text
        added to the answer. The nudger re-reads the answer at the next round."""
        piece = clean_text(self.draft_texts[-1][:cut])
        if self.shared_tokens:
            new_ids = self.base.ids + self._draft_tokens(piece)
        else:
            new_ids = encode(self.base.tokenizer, self.text + piece)
        start = common_prefix(self.base.ids, new_ids)
        ids = new_ids[start:][:max(room, 0)]
        if len(ids) < len(new_ids) - start:      # cut to the length budget
            piece = clean_text(decode_after(self.base.tokenizer, new_ids[:start] + ids, start))
        self.base.ids = new_ids[:start] + ids
        if self.shared_tokens:
            self.nudger.ids = list(self.base.ids)
        self.text += piece
        self.run_start, self.run_chars, self.run_complete = len(self.base.ids), 0, True
        return ids, piece

    def _draft_tokens(self, piece: str) -> list[int]:
        """Draft tokens spelling exactly `piece`: the longest whole-token prefix, and the
        rest (part of a token) re-encoded."""
        usable = len(self.draft_ids) - (1 if self.draft.ended else 0)   # never the end token
        whole = max(k for k, text in enumerate(self.draft_texts[: usable + 1]) if piece.startswith(text))
        rest = piece[len(self.draft_texts[whole]):]
        return self.draft_ids[:whole] + encode(self.nudger.tokenizer, rest)

    def add_base_token(self, token: int) -> str:
        """Append a base token; returns the text it completes (empty while a character's
        bytes are still coming)."""
        self.base.ids.append(token)
        if self.shared_tokens:
            self.nudger.ids = list(self.base.ids)
        whole = decode_after(self.base.tokenizer, self.base.ids, self.run_start)
        run = clean_text(whole)
        self.run_complete = run == whole      # False while a character's bytes are coming
        delta = run[self.run_chars:]
        self.run_chars = len(run)
        self.text += delta
        return delta

    def roll_back(self) -> None:
        """Undo everything since the lookahead began (the whole draft ends the answer)."""
        look = self.lookahead
        self.text = self.text[: look.text_len]
        del self.base.ids[look.base_len:]
        if self.shared_tokens:
            self.nudger.ids = list(self.base.ids)
        self.run_start, self.run_chars, self.run_complete = len(self.base.ids), 0, True
        self.lookahead = None

    def note_words(self, words: str) -> bool:
        """Record a round's nudging words; True on the third repeat in a row (stop)."""
        if words == self.last_words:
            self.repeats += 1
            return self.repeats >= 3
        self.last_words, self.repeats = words, 0
        return False
