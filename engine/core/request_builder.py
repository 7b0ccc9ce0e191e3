"""Turning what a caller sent (prompt, formula, sampling parameters) into a validated Request:
every check a user can fail happens here, before anything is queued or reaches a kernel."""
from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Optional

from ..decoding.classifier import ClassifierInput, classifier_prompt_text, classifier_specs, has_classifier
from ..decoding.nudging import NudgingState, Side
from ..decoding.speculative import SpeculationState, speculation_plan
from ..errors import CacheExhaustedError, ConfigError, FormulaError, PromptError, SamplingParamsError
from ..formula import Formula, NgramDraft, Nudging, Speculative, compile_plan, served_by_engine
from ..sampling_params import SamplingParams
from ..worker import Worker
from ..worker.classifier_runner import ClassifierScorer
from .detokenizer import Detokenizer
from .request import Request
from .sequence import Sequence
from .tokenization import check_same_vocabulary, eos_token_ids, term_context_ids


@dataclass
class NewRequest:
    """A request as submitted, before validation."""

    request_id: str
    prompt: object          # text, or a conversation (list of {"role", "content"} messages)
    formula: Formula
    params: SamplingParams


ROLES = ("system", "user", "assistant")


def check_conversation(messages) -> list[dict[str, str]]:
    """A conversation: a non-empty list of {"role": system|user|assistant, "content": text};
    returns a copy, so the caller's later edits cannot reach the engine."""
    if not messages:
        raise PromptError("the conversation has no messages; give at least one user message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or \
                message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise PromptError(f"message {index} must be {{\"role\": one of {', '.join(ROLES)}, "
                              f"\"content\": text}}, got {message!r:.80}")
        checked.append({"role": message["role"], "content": check_text(message["content"], index)})
    return checked


def check_prompt(prompt):
    """A prompt is non-empty text that UTF-8 can encode, or a conversation (list of messages)."""
    if isinstance(prompt, list):
        return check_conversation(prompt)
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a str, got {type(prompt).__name__} ({prompt!r:.60}); "
                          "decode bytes first and pass one string per prompt")
    if not prompt:
        raise PromptError("the prompt is empty; give at least one character of text")
    return check_text(prompt)


def check_text(text: str, message: int = None) -> str:
    """Text must be valid Unicode (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        where = "the prompt" if message is None else f"message {message}"
        raise PromptError(f"{where} is not valid Unicode text ({error.reason} at position "
                          f"{error.start}); remove lone surrogates") from None
    return text


def check_formula(formula, max_terms: int) -> Formula:
    """A formula the engine can serve: valid, no reference-only nodes, not too many terms."""
    if not isinstance(formula, Formula):
        raise FormulaError(f"expected a formula (e.g. la.Model(path) or m.prompt(...) + ...), got "
                           f"{type(formula).__name__}")
    formula.validate()
    op = served_by_engine(formula)
    if op is not None:
        raise FormulaError(f"{op} formulas run in lmarith.reference.generate only for now")
    _check_classifier_speculation(formula)
    _check_nudging(formula)
    speculation_plan(formula)
    if len(formula.terms) > max_terms:
        raise ConfigError(f"the formula has {len(formula.terms)} terms but max_num_batched_tokens is "
                          f"{max_terms}; raise it to at least the number of terms")
    return formula


def _check_nudging(formula: Formula) -> None:
    """Nudging is a whole formula whose sides decode one token per step without classifiers."""
    if not isinstance(formula, Nudging):
        if any(isinstance(node, Nudging) for node in formula.nodes()):
            raise FormulaError("Nudging must be the whole formula, not part of one")
        return
    if any(term.speculative_factor != 1 for term in formula.terms) or any(
            isinstance(node, (Speculative, NgramDraft)) for node in formula.nodes()):
        raise FormulaError("speculation inside Nudging is not supported; drop "
                           "speculative_factor and Speculative from its base and nudger")
    if has_classifier(formula):
        raise FormulaError("Classifier terms inside Nudging are not supported yet; use the "
                           "Classifier in a plain formula, or drop it from the nudging sides")


def _check_classifier_speculation(formula: Formula) -> None:
    """Classifier terms read the decoded prefix, which speculation's verification (several
    positions per forward, drafts rolled back) does not give them: reject the combination."""
    if not has_classifier(formula):
        return
    speculative = any(isinstance(node, Speculative) for node in formula.nodes())
    if speculative or any(term.speculative_factor != 1 for term in formula.terms):
        raise FormulaError(f"{formula} combines Classifier terms with speculation, which the engine "
                           "cannot verify exactly yet; drop speculative_factor / Speculative, or "
                           "the Classifier")


class RequestBuilder:
    """Builds Requests against the loaded models and the current KV pool (loop thread only)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._seed_source = random.Random()
        self._vocabulary_checked: set[tuple] = set()
        self.classifiers = ClassifierScorer(worker.config.device)

    def build(self, new: NewRequest) -> Request:
        """A validated Request, not yet queued."""
        prompt = check_prompt(new.prompt)
        formula = check_formula(new.formula, self.worker.config.max_num_batched_tokens)
        runners = {term.spec: self.worker.runners[term.spec] for term in formula.terms}
        nudging = isinstance(formula, Nudging)
        sides = [formula.base, formula.nudger] if nudging else [formula]
        for side in sides:
            self._check_vocabulary({term.spec: runners[term.spec] for term in side.terms})
        terms = [term for side in sides for term in side.terms]
        extra = formula.max_nudge_tokens + 1 if nudging else 0
        sequences = [self._sequence(term, runners[term.spec], prompt, new.params, extra) for term in terms]
        first = runners[terms[0].spec]
        params = new.params
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        eos = frozenset(eos_token_ids(first.tokenizer, None) | set(first.config.eos_token_ids))
        plan = None if nudging else compile_plan(formula)
        request = Request(new.request_id, prompt, formula, plan, params, seed,
                          sequences, eos, next(self._arrivals),
                          Detokenizer(first.tokenizer, sequences[0].token_ids, params.stop))
        request.metrics.prompt_tokens = sum(seq.prompt_len for seq in sequences)
        request.metrics.term_forward_passes = [0] * len(sequences)
        request.speculation = speculation_plan(formula)
        request.classifier = self._classifier_input(formula, prompt, first.tokenizer)
        if (request.speculation is not None or nudging) and params.logprobs is not None:
            raise SamplingParamsError("logprobs are not reported for speculative or nudging "
                                      "formulas yet; drop logprobs or the speculation/nudging")
        if nudging:
            request.nudging = self._nudging_state(formula, runners, params)
        if request.speculation is not None:
            request.spec_state = SpeculationState(len(sequences), request.speculation.step_factors())
        self._check_fits(request)
        return request

    def _classifier_input(self, formula: Formula, prompt, tokenizer) -> Optional[ClassifierInput]:
        """Load the formula's classifiers (each once: later requests find it loaded; a bad one
        raises ModelLoadError naming it) and give what its Classifier terms read; None without."""
        specs = classifier_specs(formula)
        for spec in specs:
            self.classifiers.load(spec)
        return ClassifierInput(self.classifiers, classifier_prompt_text(prompt), tokenizer) if specs else None

    def _check_vocabulary(self, runners: dict) -> None:
        models = tuple(sorted(runners, key=repr))
        if models not in self._vocabulary_checked:
            check_same_vocabulary({spec: runners[spec].tokenizer for spec in models})
            self._vocabulary_checked.add(models)

    def _nudging_state(self, formula: Nudging, runners: dict, params: SamplingParams) -> NudgingState:
        """Both sides of a nudging request; tokens are handed over when they share a vocabulary."""
        slot = 0
        sides = []
        for side in (formula.base, formula.nudger):
            runner = runners[side.terms[0].spec]
            ends = set() if params.ignore_eos else (
                eos_token_ids(runner.tokenizer, None) | set(runner.config.eos_token_ids))
            sides.append(Side(list(range(slot, slot + len(side.terms))), runner.tokenizer, side,
                              compile_plan(side), frozenset(ends | set(params.stop_token_ids))))
            slot += len(side.terms)
        same = sides[0].tokenizer.get_vocab() == sides[1].tokenizer.get_vocab()
        if formula.handover == "tokens" and not same:
            raise FormulaError("Nudging(handover='tokens') needs one tokenizer on both sides; these "
                               "differ, so use handover='auto' (text hand-offs)")
        state = NudgingState(sides[0], sides[1], formula.gamma, formula.max_nudge_tokens,
                             formula.full_drafts, shared_tokens=same and formula.handover != "text",
                             base_params=dataclasses.replace(params, logprobs=1, max_tokens=1))
        state.start_round()
        return state

    def _sequence(self, term, runner, prompt: str, params: SamplingParams, extra: int = 0) -> Sequence:
        context = term_context_ids(term, runner.tokenizer, prompt)
        if len(context) + params.max_tokens + extra > runner.max_context:
            raise PromptError(
                f"term {term} has a {len(context)}-token context; with max_tokens="
                f"{params.max_tokens} it exceeds the model's {runner.max_context}-token window; "
                "shorten the prompt or lower max_tokens")
        page_size = self.worker.pool.views[term.spec].page_size
        return Sequence(next(self._seq_ids), term.spec, page_size, list(context),
                        prompt_len=len(context), term=term)

    def _check_fits(self, request: Request) -> None:
        num_pages, needed = self.worker.pool.num_pages, request.pages_needed()
        if needed > num_pages:
            raise CacheExhaustedError(
                f"request {request.request_id} needs {needed} KV pages for its "
                f"prompt and max_tokens across {len(request.sequences)} terms, but the pool has "
                f"{num_pages}; raise kv_cache_bytes or lower max_tokens")
