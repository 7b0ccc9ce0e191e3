"""Named decoding-time methods as one-liners: each returns a formula, so it runs wherever a
formula does (LLM.generate and stream, the server's `formula` field, speculation). Terms are
log-probabilities l = log_softmax(logits); the papers' logit equations differ from these by a
constant per position, which the final softmax removes, so the laws are the papers'.

    import lmarith as la
    f = la.methods.classifier_free_guidance(m.prompt("Write formally."), m, guidance_scale=1.5)
"""
from __future__ import annotations

from typing import Sequence, Union as TypingUnion

from .errors import FormulaError
from .formula import Classifier, ClassifierSpec, Formula, Plausible, SelfDebias, TopPTopK, Union
from .formula.node import coefficient

__all__ = ["classifier_free_guidance", "contrastive_decoding", "dexperts", "emulated_fine_tuning", "fudge",
           "proxy_tuning", "self_debiasing"]


def classifier_free_guidance(conditional: Formula, unconditional: Formula,
                             guidance_scale: float = 1.5) -> Formula:
    """CFG for language models (Sanchez et al., arXiv 2306.17806): l_u + g (l_c - l_u);
    g = 1 is the conditional model alone, g ~ 1.5 is typical."""
    scale = coefficient(guidance_scale, "guidance_scale")
    return unconditional + scale * (conditional - unconditional)


def contrastive_decoding(expert: Formula, amateur: Formula, alpha: float = 0.1) -> Formula:
    """Contrastive decoding (Li et al., arXiv 2210.15097): l_expert - l_amateur on the tokens
    with p_expert >= alpha * max p_expert, -inf elsewhere (norm 0: only the softmax applies)."""
    return Plausible(expert - amateur, expert, alpha=alpha)


def dexperts(base: Formula, expert: Formula, anti_expert: Formula, alpha: float = 2.0,
             top_p: float = 0.9) -> Formula:
    """DExperts (Liu et al., arXiv 2105.03023): the base's top-p nucleus first, then
    l_base + alpha (l_expert - l_anti) on it (-inf outside the nucleus)."""
    weight = coefficient(alpha, "alpha")
    return TopPTopK(base, top_p=top_p) + weight * (expert - anti_expert)


def proxy_tuning(base: Formula, tuned: Formula, untuned: Formula, alpha: float = 1.0) -> Formula:
    """Proxy-tuning (Liu et al., arXiv 2401.08565): l_base + alpha (l_tuned - l_untuned), a
    small tuned/untuned pair steering a large base model."""
    return base + coefficient(alpha, "alpha") * (tuned - untuned)


def emulated_fine_tuning(large_base: Formula, small_tuned: Formula, small_base: Formula,
                         beta: float = 1.0) -> Formula:
    """EFT up-scaling (Mitchell et al., arXiv 2310.12962): l_large_base + beta
    (l_small_tuned - l_small_base), the small model's fine-tuning transplanted onto the large."""
    return large_base + coefficient(beta, "beta") * (small_tuned - small_base)


def self_debiasing(model: Formula, biased: Sequence[Formula], strength: float = 50.0) -> Formula:
    """Self-debiasing (Schick et al., arXiv 2103.00453): push down every token the model finds
    more likely when prompted to be biased (`biased`: e.g. m.prompt("The following text is
    rude:")), by exp(strength * min(p - max_biased p, 0)), as the paper's decay function."""
    biased = list(biased)
    if not biased:
        raise FormulaError("self_debiasing needs at least one biased formula, e.g. "
                           "m.prompt('The following text contains rude language:')")
    bias = biased[0] if len(biased) == 1 else Union(*biased)
    return SelfDebias(model, bias, strength=strength)


def fudge(base: Formula, classifier: TypingUnion[ClassifierSpec, str], k: int = 200,
          strength: float = 1.0) -> Formula:
    """FUDGE (Yang & Klein, arXiv 2104.05218): steer `base` towards an attribute a with a
    classifier of partial text, by Bayes' rule p(x_t | x_<t, a) ∝ p(x_t | x_<t) P(a | x_<=t):

        l_base(x_t) + strength * (log P(a | x_<t x_t) - log P(a | x_<t))   on the top-k x_t of base
        l_base(x_t)                                                         elsewhere

    (the subtracted log P(a | x_<t) is the Bayes normaliser's per-token form: a candidate the
    classifier rates like the prefix keeps its base probability). `classifier` is a
    ClassifierSpec (or a path: label 1, template "{input}"); strength 1 is the paper's rule.
    The paper samples among the top-k only: pass TopPTopK(base, top_k=k) as base for that.
    Each step scores k + 1 texts per request with the classifier (no KV cache); not with
    speculation."""
    return base + coefficient(strength, "strength") * Classifier(base, classifier, k)
