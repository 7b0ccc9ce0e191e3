"""The slow, obviously correct nudging decoder, written as the paper's code runs it: every
call re-encodes the answer as text and runs uncached transformers forwards; the nudger
drafts a whole draft, each later word is tested by asking the base at its boundary, and the
base continues greedily until it is uncertain. The oracle the engine's nudging is tested on
(greedy decoding; the engine's text and token hand-offs must both match it)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .core.tokenization import eos_token_ids, term_context_ids
from .decoding.nudging import common_prefix, decode_after, encode, split_words
from .decoding.nudging.words import INCOMPLETE, boundary, clean_text
from .formula import Formula, Nudging
from .reference import ReferenceOutput, load_hf_model


class _Side:
    """One formula over its HF models: its greedy token and top-1 probability after text."""

    def __init__(self, formula: Formula, models: dict, prompt: str, ignore_eos: bool) -> None:
        self.formula = formula
        self.models = [models[term.model] for term in formula.terms]
        self.tokenizer = self.models[0][1]
        self.contexts = [term_context_ids(term, tokenizer, prompt)
                         for term, (_, tokenizer) in zip(formula.terms, self.models)]
        self.ends = set() if ignore_eos else eos_token_ids(self.tokenizer, None)

    def next(self, answer_ids: list[int]) -> tuple[int, float]:
        """(argmax token, its probability) of the formula after these answer tokens."""
        with torch.inference_mode():
            stacked = torch.stack([model(torch.tensor([context + answer_ids])).logits[0, -1].float()
                                   for (model, _), context in zip(self.models, self.contexts)])
        log_probs = self.formula.log_probs(stacked[:, None, :])[0]
        token = int(torch.argmax(log_probs))
        return token, math.exp(float(log_probs[token]))


def nudging_generate(formula: Nudging, prompts: Sequence[str], max_tokens: int = 32, *,
                     ignore_eos: bool = False, models: Optional[dict] = None) -> list[ReferenceOutput]:
    """Greedy nudging of each prompt; token_ids are the base tokenizer's ids of each piece."""
    models = models if models is not None else {}
    for term in formula.terms:
        if term.model not in models:
            models[term.model] = load_hf_model(term.model)
    outputs = []
    for prompt in prompts:
        base = _Side(formula.base, models, prompt, ignore_eos)
        nudger = _Side(formula.nudger, models, prompt, ignore_eos)
        outputs.append(_answer(formula, base, nudger, max_tokens))
    return outputs


def _answer(formula: Nudging, base: _Side, nudger: _Side, max_tokens: int) -> ReferenceOutput:
    """One answer: rounds until the nudger ends it, the budget runs out or words repeat."""
    answer = {"text": "", "base_ids": [], "ids": []}     # base_ids: the base's tokens of it
    last_words, repeats = None, 0
    while True:
        draft_text, ended = _draft(formula, nudger, answer["text"])
        if ended:
            _commit(base, answer, clean_text(draft_text), max_tokens)
            return _output(answer, "length" if len(answer["ids"]) >= max_tokens else "stop")
        cut, token = _words(formula, base, answer["text"], draft_text)
        words = clean_text(draft_text[:cut])
        repeats = repeats + 1 if words == last_words else 0
        last_words = words
        if repeats >= 3:
            return _output(answer, "stop")
        _commit(base, answer, words, max_tokens)
        if len(answer["ids"]) >= max_tokens:
            return _output(answer, "length")
        if token is not None and token not in base.ends:
            reason = _continue(formula, base, answer, token, max_tokens)
            if reason is not None:
                return _output(answer, reason)


def _output(answer: dict, reason: str) -> ReferenceOutput:
    return ReferenceOutput(answer["ids"], answer["text"], reason)


def _draft(formula: Nudging, nudger: _Side, text: str) -> tuple[str, bool]:
    """The nudger's greedy draft after the answer text, and whether it ended the answer."""
    context = encode(nudger.tokenizer, text)
    draft: list[int] = []
    while len(draft) < formula.max_nudge_tokens:
        token, _ = nudger.next(context + draft)
        if token in nudger.ends:
            return decode_after(nudger.tokenizer, context + draft, len(context)), True
        draft.append(token)
    return decode_after(nudger.tokenizer, context + draft, len(context)), False


def _words(formula: Nudging, base: _Side, text: str, draft_text: str) -> tuple[int, Optional[int]]:
    """(cut of the draft taken, base's first token when it takes over, else None)."""
    prefix, words = split_words(draft_text)
    for index in range(1, len(words)):
        if not words[index]:
            continue
        cut = boundary(prefix, words, index)
        context = encode(base.tokenizer, text + draft_text[:cut])
        token, top_prob = base.next(context)
        token_text = None if token in base.ends else decode_after(base.tokenizer, context + [token], len(context))
        if top_prob >= formula.gamma or (token_text is not None and (" " + words[index]).startswith(token_text)):
            return cut, token
    if len(words) == 1:
        return len(clean_text(draft_text)), None
    return boundary(prefix, words, len(words) - 1), None


def _commit(base: _Side, answer: dict, piece: str, max_tokens: int) -> None:
    """Add nudger text: the base re-encodes the answer; its new ids (cut to the budget)."""
    new_ids = encode(base.tokenizer, answer["text"] + piece)
    start = common_prefix(answer["base_ids"], new_ids)
    added = new_ids[start:][: max_tokens - len(answer["ids"])]
    if len(added) < len(new_ids) - start:
        piece = clean_text(decode_after(base.tokenizer, new_ids[:start] + added, start))
    answer["text"] += piece
    answer["base_ids"] = new_ids[:start] + added
    answer["ids"] = answer["ids"] + added


def _continue(formula: Nudging, base: _Side, answer: dict, token: int, max_tokens: int) -> Optional[str]:
    """The base writes from `token` on until it is uncertain (None), ends or runs out."""
    base_ids, before = answer["base_ids"], answer["text"]
    run_start = len(base_ids)
    while True:
        base_ids.append(token)
        answer["ids"] = answer["ids"] + [token]
        run = decode_after(base.tokenizer, base_ids, run_start)
        answer["text"] = before + clean_text(run)
        if token in base.ends:
            return "stop"
        if len(answer["ids"]) >= max_tokens:
            return "length"
        token, top_prob = base.next(base_ids)
        if top_prob < formula.gamma and not run.endswith(INCOMPLETE):
            return None
