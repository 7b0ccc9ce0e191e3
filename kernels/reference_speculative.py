"""Plain-torch reference face of spec_accept: exact speculative verification of proposed
tokens, the specification the Triton (`lmarith.kernels.spec_accept`) and C++ faces follow.

spec_accept(target_log_probs [B, K+1, V], draft_log_probs [B, K, V], draft_tokens [B, K],
            num_drafts [B], seed [B], step [B], greedy [B]) -> (num_accepted [B] int32,
                                                                next_token [B] int64)
    Row b verifies its first n = num_drafts[b] (0 <= n <= K) proposals x_j = draft_tokens[b, j]
    in order. Both laws are normalised log-probs, already filtered (temperature, top-k, top-p,
    min-p); p = exp(target), q = exp(draft), in float32.
    - greedy[b]: x_j is accepted iff it is the argmax of target[b, j] (lowest index on ties).
      next_token is the argmax of target[b, r] at the first rejection r, or of target[b, n]
      when all n are accepted (the bonus token).
    - otherwise x_j is accepted iff q(x_j) > 0 and u_j * q(x_j) < p(x_j) (strict), with
      u_j = uniform(stream 2j). At the first rejection r, next_token is drawn from the residual
      normalise(max(0, p - q)) at r by an exponential race, argmax_x log(p(x) - q(x)) - log(E_x),
      E_x = -log(uniform(stream 2r + 1, x)); no normalisation, no sort. If no token has
      p > q (a degenerate row) the race runs over p itself; a row with p = 0 everywhere gives
      token 0. When all n are accepted, next_token is the race over p at position n with
      stream 2n + 1 (the residual of an empty proposal: the bonus token).
    Randomness is counter-based, keyed by (seed[b], step[b], stream, token), so a row's result
    never depends on its batch. Callers give every verification of a request its own step.
    num_accepted[b] is the number of leading proposals accepted (0 .. n).
"""
from __future__ import annotations

import torch

from .reference import GOLDEN32, MASK32, mix32, row_key, uniform_from_hash

STREAM_SALT = 0x85EBCA6B


def stream_key(seed: torch.Tensor, step: torch.Tensor, stream: int) -> torch.Tensor:
    """Per-row 32-bit key of one random stream of a verification (int64 tensor [B])."""
    salt = mix32(torch.tensor(((stream + 1) * GOLDEN32 ^ STREAM_SALT) & MASK32, dtype=torch.int64))
    return mix32(row_key(seed, step) ^ salt.to(seed.device))


def accept_uniform(seed: torch.Tensor, step: torch.Tensor, position: int) -> torch.Tensor:
    """u_j in (0, 1), float32 [B]: the acceptance draw of proposal `position`."""
    return uniform_from_hash(mix32(stream_key(seed, step, 2 * position)))


def race_noise(seed: torch.Tensor, step: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """log(E_x) = log(-log(u_x)) [B, V] for the race at `position` (stream 2 * position + 1)."""
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=seed.device)
    key = stream_key(seed, step, 2 * position + 1)
    u = uniform_from_hash(mix32(key[:, None] ^ tokens[None, :]))
    return torch.log(-torch.log(u))


def residual_race(target: torch.Tensor, draft: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax_x log(max(0, p - q)(x)) - noise(x), over p where the residual is empty [B]."""
    residual = (torch.exp(target) - torch.exp(draft)).clamp_min(0.0)
    keys = torch.log(residual) - noise
    fallback = target - noise
    empty = ~(residual > 0).any(dim=-1, keepdim=True)
    keys = torch.where(empty, fallback, keys)
    keys = torch.where(torch.isnan(keys), float("-inf"), keys)
    return torch.argmax(keys, dim=-1)


def spec_accept(target_log_probs: torch.Tensor, draft_log_probs: torch.Tensor,
                draft_tokens: torch.Tensor, num_drafts: torch.Tensor, seed: torch.Tensor,
                step: torch.Tensor, greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted counts and the corrected (or bonus) token per row; see the module docstring."""
    target = target_log_probs.float()
    draft = draft_log_probs.float()
    draft_tokens = draft_tokens.long()
    batch, max_drafts = draft_tokens.shape
    vocab = target.shape[-1]
    rows = torch.arange(batch, device=target.device)
    num_accepted = torch.zeros(batch, dtype=torch.int32, device=target.device)
    next_token = torch.zeros(batch, dtype=torch.int64, device=target.device)
    open_rows = torch.ones(batch, dtype=torch.bool, device=target.device)
    empty_draft = torch.full((batch, vocab), float("-inf"), device=target.device)
    for position in range(max_drafts + 1):
        proposing = open_rows & (num_drafts.to(torch.int64) > position)
        ending = open_rows & ~proposing            # all proposals accepted: the bonus token
        tokens = draft_tokens[:, min(position, max_drafts - 1)] if max_drafts else rows * 0
        if max_drafts:
            target_p = torch.exp(target[rows, position, tokens])
            draft_q = torch.exp(draft[rows, min(position, max_drafts - 1), tokens])
            argmax = torch.argmax(target[:, position], dim=-1)
            sampled_ok = (draft_q > 0) & (accept_uniform(seed, step, position) * draft_q < target_p)
            accepted = torch.where(greedy, tokens == argmax, sampled_ok) & proposing
        else:
            accepted = torch.zeros_like(proposing)
        rejected = proposing & ~accepted
        law_q = draft[:, position] if position < max_drafts else empty_draft
        law_q = torch.where(ending[:, None], empty_draft, law_q)
        settled = rejected | ending
        if settled.any():
            raced = residual_race(target[:, position], law_q, race_noise(seed, step, position, vocab))
            picked = torch.where(greedy, torch.argmax(target[:, position], dim=-1), raced)
            next_token = torch.where(settled, picked, next_token)
        num_accepted += accepted.to(torch.int32)
        open_rows &= accepted
    return num_accepted, next_token
