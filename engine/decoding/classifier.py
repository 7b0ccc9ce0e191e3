"""Classifier terms inside a step: every candidate text of every row that uses a classifier
is scored in one batched forward per ClassifierSpec, and each row gets the closure
Formula.log_probs calls for its Classifier nodes (log P(c | prefix + t) - log P(c | prefix)).

A row's candidates are the top-k tokens of each Classifier's base, known only by evaluating
the formula; so the formula is first evaluated with placeholder scores to collect them (exact
whenever a Classifier's base has no Classifier inside it), the texts are scored, and the
real evaluation reads the scores. A candidate missed by the first pass (a Classifier nested
in another's base) is scored on demand in an extra forward, so the result is always exact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from ..formula import Classifier, ClassifierSpec, Formula

if TYPE_CHECKING:
    from ..worker.classifier_runner import ClassifierScorer

Scores = Callable[[Classifier, torch.Tensor], torch.Tensor]


def classifier_prompt_text(prompt: Any) -> str:
    """The text a classifier reads before the generated text: the prompt itself, or for a
    conversation (list of messages) the content of its last user message ("" without one)."""
    if isinstance(prompt, str):
        return prompt
    users = [message["content"] for message in prompt if message.get("role") == "user"]
    return users[-1] if users else ""


def has_classifier(formula: Formula) -> bool:
    """True when some node of the formula is a Classifier."""
    return any(isinstance(node, Classifier) for node in formula.nodes())


def classifier_specs(formula: Formula) -> list[ClassifierSpec]:
    """The distinct ClassifierSpecs of a formula, in first-appearance order."""
    return list(dict.fromkeys(node.classifier for node in formula.nodes() if isinstance(node, Classifier)))


@dataclass(frozen=True)
class ClassifierInput:
    """What a row's Classifier terms need: the scorer holding the loaded classifiers, the
    prompt text, the tokens generated so far and the tokenizer that decodes them."""

    scorer: "ClassifierScorer"
    prompt_text: str
    tokenizer: Any
    generated: tuple[int, ...] = ()

    def at(self, generated: Sequence[int]) -> "ClassifierInput":
        """The same request after these generated tokens (copied, so later appends do not
        reach it)."""
        return dataclasses.replace(self, generated=tuple(generated))

    def texts(self, candidates: Sequence[int]) -> list[str]:
        """[prefix] + [prefix + t for each candidate t], as decoded text: prompt text plus the
        decoding of the generated tokens (with t)."""
        generated = list(self.generated)
        return [self.prompt_text + self.tokenizer.decode(generated)] + \
            [self.prompt_text + self.tokenizer.decode(generated + [int(t)]) for t in candidates]


class _StepScores:
    """Classifier log-probs of the texts of one step, keyed by (scorer, spec, text)."""

    def __init__(self) -> None:
        self.wanted: dict[tuple, dict[str, None]] = {}
        self.scored: dict[tuple, dict[str, float]] = {}

    def want(self, source: ClassifierInput, spec: ClassifierSpec, texts: list[str]) -> None:
        self.wanted.setdefault((source.scorer, spec), {}).update(dict.fromkeys(texts))

    def run(self) -> None:
        """One batched forward per (scorer, spec) over the texts not scored yet."""
        for key, texts in self.wanted.items():
            known = self.scored.setdefault(key, {})
            missing = [text for text in texts if text not in known]
            if missing:
                scorer, spec = key
                known.update(zip(missing, scorer.log_prob(spec, missing).tolist()))
        self.wanted = {}

    def lookup(self, source: ClassifierInput, spec: ClassifierSpec, texts: list[str]) -> list[float]:
        known = self.scored.get((source.scorer, spec), {})
        if any(text not in known for text in texts):
            self.want(source, spec, texts)
            self.run()
            known = self.scored[(source.scorer, spec)]
        return [known[text] for text in texts]


def _collector(source: ClassifierInput, step: _StepScores) -> Scores:
    """Placeholder scores (zeros) that record the texts each Classifier node asks about."""
    def collect(node: Classifier, candidates: torch.Tensor) -> torch.Tensor:
        for row in candidates.tolist():
            step.want(source, node.classifier, source.texts(row))
        return torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
    return collect


def _reader(source: ClassifierInput, step: _StepScores) -> Scores:
    """The real scores: log P(c | prefix + t) - log P(c | prefix) per candidate."""
    def read(node: Classifier, candidates: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in candidates.tolist():
            prefix, *rest = step.lookup(source, node.classifier, source.texts(row))
            rows.append([value - prefix for value in rest])
        return torch.tensor(rows, dtype=torch.float32, device=candidates.device)
    return read


def classifier_closures(formulas: Sequence[Formula], stacked: Sequence[torch.Tensor],
                        inputs: Sequence[Optional[ClassifierInput]]) -> list[Optional[Scores]]:
    """Per row, the classifier_scores closure for Formula.log_probs (None for rows without a
    Classifier or without an input); stacked[i] is row i's term logits [T, 1, V]. All rows'
    texts are scored together: one classifier forward per spec for the whole step."""
    step = _StepScores()
    closures: list[Optional[Scores]] = []
    for formula, logits, source in zip(formulas, stacked, inputs):
        if source is None or not has_classifier(formula):
            closures.append(None)
            continue
        formula.log_probs(logits, classifier_scores=_collector(source, step))
        closures.append(_reader(source, step))
    step.run()
    return closures
