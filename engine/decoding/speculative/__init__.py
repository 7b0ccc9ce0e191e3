"""Exact speculative sampling: across formula terms (speculative_factor), with a draft
formula (Speculative), or with the model-free n-gram drafter. `laws` says which law each
position is drawn from, `state` holds a request's unverified tokens, `ngram` proposes by
prompt lookup and `verifier` checks a batch of them with the spec_accept kernel."""
from .laws import Law, SpeculationPlan, speculation_plan
from .ngram import propose_ngram
from .state import SpeculationState
from .verifier import VerifyResult, VerifyRow, verify

__all__ = ["Law", "SpeculationPlan", "SpeculationState", "VerifyResult", "VerifyRow",
           "propose_ngram", "speculation_plan", "verify"]
