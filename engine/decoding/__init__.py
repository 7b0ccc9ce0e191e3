"""Decoding: what happens to a step's logits. `composer` evaluates every request's formula
over its stacked term logits (fused combine kernels), `sampler` draws each request's token
(fused sample kernel) with failures isolated per request. Speculative verification and
nudging hand-offs will live beside them (speculative/, nudging/)."""
from .composer import compose, stack_term_logits
from .sampler import DecodeRow, Sampled, next_tokens, sampling_tensors

__all__ = ["DecodeRow", "Sampled", "compose", "next_tokens", "sampling_tensors", "stack_term_logits"]
