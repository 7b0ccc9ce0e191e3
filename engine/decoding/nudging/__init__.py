"""Nudging: a base model writes, a small aligned nudger writes the words where the base is
uncertain. `words` decides which drafted words a round takes, `state` holds one request's
answer, sides and round, `text` moves the answer between tokenizers."""
from .state import NudgingState, Phase, Side
from .text import common_prefix, decode_after, encode
from .words import Draft, Probe, Take, Wait, candidates, decide, split_words

__all__ = ["Draft", "NudgingState", "Phase", "Probe", "Side", "Take", "Wait", "candidates",
           "common_prefix", "decide", "decode_after", "encode", "split_words"]
