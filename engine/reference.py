"""The slow, obviously correct decoder: the oracle the engine is tested against.

At every step each term's whole sequence (context + generated tokens) runs through the
transformers model with no cache, the formula turns the stacked last-position logits into
log-probs, and the reference sampler picks the token every term appends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .core.tokenization import check_same_vocabulary, eos_token_ids, term_context_ids
from .decoding.classifier import ClassifierInput, classifier_prompt_text
from .formula import Classifier, Formula, Model
from .kernels import reference as kernel_reference
from .worker.classifier_runner import ClassifierScorer, from_pretrained_args


@dataclass
class ReferenceOutput:
    """One prompt's generation."""

    token_ids: list[int]
    text: str
    finish_reason: str


def load_hf_model(model: Model):
    """transformers model and tokenizer for a Model spec (HF directory or .gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = from_pretrained_args(model.path)
    hf_model = AutoModelForCausalLM.from_pretrained(**args, dtype=getattr(torch, model.dtype))
    return hf_model.eval(), AutoTokenizer.from_pretrained(**args)


def sample_one(log_probs: torch.Tensor, temperature: float, top_k: int, top_p: float,
               min_p: float, seed: int, step: int) -> int:
    """One token from log-probs [1, V] with the reference sampler (same rule as the kernels)."""
    token = kernel_reference.sample(
        log_probs, torch.tensor([temperature]), torch.tensor([top_k], dtype=torch.int32),
        torch.tensor([top_p]), torch.tensor([min_p]), torch.tensor([seed]), torch.tensor([step]))
    return int(token[0])


def _last_logits(hf_model, ids: list[int], vocab_size: int) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
    return logits[:vocab_size]


def generate(formula: Formula, prompts: Sequence[str], max_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             seed: int = 0, stop_at_eos: bool = True, models: Optional[dict] = None) -> list[ReferenceOutput]:
    """Decode each prompt under the formula, one uncached forward per term per step."""
    formula.validate()
    terms = formula.terms
    models = models if models is not None else {}
    for term in terms:
        if term.model not in models:
            models[term.model] = load_hf_model(term.model)
    tokenizers = {m: models[m][1] for m in {t.model for t in terms}}
    vocab_size = check_same_vocabulary(tokenizers)
    tokenizer = tokenizers[terms[0].model]
    eos = eos_token_ids(tokenizer, getattr(models[terms[0].model][0], "generation_config", None))
    scorer = ClassifierScorer()
    outputs = []
    for prompt in prompts:
        contexts = [term_context_ids(t, models[t.model][1], prompt) for t in terms]
        generated: list[int] = []
        finish_reason = "length"
        for step in range(max_tokens):
            stacked = torch.stack([_last_logits(models[t.model][0], ctx + generated, vocab_size)
                                   for t, ctx in zip(terms, contexts)])[:, None, :]
            scores = _classifier_scores(scorer, tokenizer, prompt, generated)
            log_probs = formula.log_probs(stacked, classifier_scores=scores)
            token = sample_one(log_probs, temperature, top_k, top_p, min_p, seed, step)
            generated.append(token)
            if stop_at_eos and token in eos:
                finish_reason = "stop"
                break
        outputs.append(ReferenceOutput(generated, tokenizer.decode(generated, skip_special_tokens=True),
                                       finish_reason))
    return outputs


def _classifier_scores(scorer: ClassifierScorer, tokenizer, prompt, generated: list[int]):
    """Closure giving Classifier nodes log P(c | prefix + t) - log P(c | prefix) on candidates
    (prefix: the prompt text, a conversation's last user message, + the decoded tokens)."""
    source = ClassifierInput(scorer, classifier_prompt_text(prompt), tokenizer, tuple(generated))

    def score(node: Classifier, candidates: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in candidates.tolist():
            log_probs = scorer.log_prob(node.classifier, source.texts(row))
            rows.append(log_probs[1:] - log_probs[0])
        return torch.stack(rows)
    return score


def joint_law(formula: Formula, prompt: str, num_tokens: int, *, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
              models: Optional[dict] = None) -> dict[tuple[int, ...], float]:
    """The exact probability of each sequence of the first num_tokens tokens under the
    formula and the sampler's filters (EOS not special), enumerated prefix by prefix: the
    law a statistical test of the engine compares its samples with."""
    terms = formula.validate().terms
    models = models if models is not None else {}
    for term in terms:
        if term.model not in models:
            models[term.model] = load_hf_model(term.model)
    vocab_size = check_same_vocabulary({t.model: models[t.model][1] for t in terms})
    contexts = [term_context_ids(t, models[t.model][1], prompt) for t in terms]
    controls = (torch.tensor([temperature]), torch.tensor([top_k], dtype=torch.int32),
                torch.tensor([top_p]), torch.tensor([min_p]))
    law = {(): 1.0}
    for _ in range(num_tokens):
        grown = {}
        for prefix, mass in law.items():
            stacked = torch.stack([_last_logits(models[t.model][0], ctx + list(prefix), vocab_size)
                                   for t, ctx in zip(terms, contexts)])[:, None, :]
            probs = kernel_reference.filtered_log_probs(formula.log_probs(stacked), *controls).exp()[0]
            for token in torch.nonzero(probs > 0).flatten().tolist():
                grown[prefix + (token,)] = mass * float(probs[token])
        law = grown
    return law
