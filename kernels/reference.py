"""Plain-torch reference faces of lmarith's kernels: the specification the Triton
(`lmarith.kernels`) and C++ (`lmarith._C`) faces are tested against.

combine(logits [T, B, V], plan tensors) -> (log_probs [B, V], lse [B])
    A plan row-block r (r = 0 .. R-1, R = 1 + 2G) is a linear combination of the terms'
    log-softmax values: S_r = sum_t weights[b, r, t] * L_t + consts[b, r], with static
    norm N_r = sum_t weights[b, r, t] + consts[b, r]. Row-block 0 is the linear part; group
    g combines row-blocks 1+2g (left) and 2+2g (right) with kind +1 (max, Union) or -1
    (min, Intersection), winner's norm taken per token, scaled by group_coefs[b, g]:
        value = S_0 + sum_g c_g * pick_g(S_l, S_r),  norm = N_0 + sum_g c_g * N_winner
    scores = value / norm where norm != 0, else value;  log_probs = scores - lse(scores).
    Forbidden tokens: a term with weight != 0 whose log-prob is -inf makes its row-block
    -inf there; a group whose picked side is -inf (with c_g != 0) makes the token -inf.
    Ties: max keeps the left side's norm, min the right side's (as the paper's code).
    Plausibility mask (optional, mask_weights [B, T] and mask_log_alpha [B], both or neither):
    the reference score M = sum_t mask_weights[b, t] * L_t, -inf where a term with weight != 0
    is not finite. A row with mask_log_alpha > -inf keeps the tokens with
    M >= max_x M + mask_log_alpha (none when M is -inf everywhere) and gives the others
    value -inf before the division by the norm; rows with -inf keep every token.

sample(log_probs [B, V], temperature, top_k, top_p, min_p, seed, step) -> tokens [B]
    temperature == 0: argmax (lowest index among ties). Otherwise scaled = log_probs / T,
    then top-k (keep scaled >= k-th largest; ties at the threshold are kept), top-p over the
    renormalised survivors (keep x iff the mass of survivors with probability strictly
    greater than p(x) is < top_p), min-p (keep p(x) >= min_p * max p), and an exponential
    race: argmax over kept x of scaled(x) - log(-log(u(seed, step, x))).
    u is a counter-based uniform in (0, 1): see `uniform`.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on uint32 values held in int64 tensors."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    x = x ^ (x >> 16)
    return x


def row_key(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per-row hash state from a 64-bit seed and a step counter (low 32 bits used)."""
    seed = seed.to(torch.int64)
    seed_lo = seed & MASK32
    seed_hi = (seed >> 32) & MASK32
    key = mix32(seed_lo ^ GOLDEN32)
    key = mix32(key ^ seed_hi)
    return mix32(key ^ (step.to(torch.int64) & MASK32))


def uniform(seed: torch.Tensor, step: torch.Tensor, vocab_size: int,
            first_token: int = 0) -> torch.Tensor:
    """Counter-based uniforms u[b, x] in (0, 1), float32, keyed by (seed[b], step[b], x), for
    the tokens x = first_token .. first_token + vocab_size - 1 (one shard of a vocabulary).

    u = ((h >> 9) + 0.5) * 2**-23 with h = mix32(row_key ^ x): 23 bits + 0.5 fit float32's
    24-bit mantissa exactly, so u lies in [2**-24, 1 - 2**-24], never 0 or 1.
    """
    tokens = torch.arange(first_token, first_token + vocab_size, dtype=torch.int64,
                          device=seed.device)
    return uniform_from_hash(mix32(row_key(seed, step)[:, None] ^ tokens[None, :]))


def uniform_from_hash(hashed: torch.Tensor) -> torch.Tensor:
    """float32 uniform in (0, 1) from 32-bit hashes held in int64."""
    return ((hashed >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def gumbel(seed: torch.Tensor, step: torch.Tensor, vocab_size: int,
           first_token: int = 0) -> torch.Tensor:
    """-log(-log(u)) in float32: adding it and taking argmax is the exponential race."""
    u = uniform(seed, step, vocab_size, first_token)
    return -torch.log(-torch.log(u))


def _term_log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _row_blocks(log_probs: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor):
    """Values S [B, R, V] and static norms N [B, R] of the plan's linear row-blocks."""
    num_terms = log_probs.shape[0]
    values = consts[:, :, None].expand(-1, -1, log_probs.shape[-1]).clone()
    forbidden = torch.zeros_like(values, dtype=torch.bool)
    for t in range(num_terms):
        w = weights[:, :, t][:, :, None]
        lp = log_probs[t][:, None, :]
        active = w != 0
        finite = torch.isfinite(lp)
        values = values + torch.where(active & finite, w * torch.where(finite, lp, 0.0), 0.0)
        forbidden |= active & ~finite
    values = values.masked_fill(forbidden, float("-inf"))
    norms = weights.sum(dim=-1) + consts
    return values, norms


def plausible_tokens(log_probs: torch.Tensor, mask_weights: torch.Tensor,
                     mask_log_alpha: torch.Tensor, reduce_max=None) -> torch.Tensor:
    """The plausibility mask [B, V]: True where a token is kept (see the module docstring).
    reduce_max turns this block's row maxima [B, 1] into the whole vocabulary's (for shards)."""
    scores, _ = _row_blocks(log_probs, mask_weights.float()[:, None, :],
                            torch.zeros_like(mask_weights[:, :1], dtype=torch.float32))
    scores = scores[:, 0, :]
    row_max = scores.max(dim=-1, keepdim=True).values if scores.shape[-1] else \
        torch.full_like(scores[:, :1], float("-inf"))
    row_max = row_max if reduce_max is None else reduce_max(row_max)
    log_alpha = mask_log_alpha.float()[:, None]
    threshold = torch.where(row_max == float("-inf"), float("inf"), row_max + log_alpha)
    return (log_alpha == float("-inf")) | (scores >= threshold)


def plan_scores(log_probs: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
                group_coefs: torch.Tensor, group_kinds: torch.Tensor,
                mask_weights: torch.Tensor | None = None, mask_log_alpha: torch.Tensor | None = None,
                reduce_max=None) -> torch.Tensor:
    """The plan's unnormalised scores [B, V] from the terms' log-probs [T, B, V]: every step of
    combine but the final log-sum-exp. Pointwise in V except the mask's row maximum, which
    reduce_max completes when the columns are one shard of the vocabulary."""
    values, norms = _row_blocks(log_probs, weights.float(), consts.float())
    total = values[:, 0, :]
    total_norm = norms[:, 0:1].expand_as(total).clone()
    for g in range(group_coefs.shape[1]):
        left, right = values[:, 1 + 2 * g, :], values[:, 2 + 2 * g, :]
        is_max = (group_kinds[:, g] > 0)[:, None]
        left_wins = torch.where(is_max, left >= right, left < right)
        picked = torch.where(left_wins, left, right)
        picked_norm = torch.where(left_wins, norms[:, 1 + 2 * g, None], norms[:, 2 + 2 * g, None])
        coef = group_coefs[:, g, None].float()
        active = coef != 0
        total = torch.where(active & torch.isneginf(picked), float("-inf"),
                            total + torch.where(active, coef * picked, 0.0))
        total_norm = total_norm + torch.where(active, coef * picked_norm, 0.0)
    if mask_weights is not None:
        kept = plausible_tokens(log_probs, mask_weights, mask_log_alpha, reduce_max)
        total = total.masked_fill(~kept, float("-inf"))
    scores = torch.where(total_norm != 0, total / torch.where(total_norm != 0, total_norm, 1.0), total)
    return torch.where(torch.isnan(scores), float("-inf"), scores)


def combine(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
            group_coefs: torch.Tensor, group_kinds: torch.Tensor,
            mask_weights: torch.Tensor | None = None, mask_log_alpha: torch.Tensor | None = None):
    """Evaluate a compiled formula plan on stacked raw logits; see the module docstring.

    logits [T, B, V] (any float dtype); weights [B, R, T] f32; consts [B, R] f32;
    group_coefs [B, G] f32; group_kinds [B, G] int32 (+1 max, -1 min); optional
    plausibility mask mask_weights [B, T] f32 and mask_log_alpha [B] f32 (-inf: row unmasked).
    Returns (log_probs [B, V] f32, lse [B] f32).
    """
    scores = plan_scores(_term_log_probs(logits), weights, consts, group_coefs, group_kinds,
                         mask_weights, mask_log_alpha)
    lse = torch.logsumexp(scores, dim=-1)
    return scores - lse[:, None], lse


def _top_k_mask(scaled: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    vocab_size = scaled.shape[-1]
    k = torch.where((top_k <= 0) | (top_k >= vocab_size), vocab_size, top_k).to(torch.int64)
    sorted_desc = torch.sort(scaled, dim=-1, descending=True).values
    threshold = sorted_desc.gather(1, (k - 1)[:, None])
    return scaled >= threshold


def _top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep x iff the mass of tokens with probability strictly greater than p(x) < top_p."""
    ascending = torch.sort(probs.double(), dim=-1).values
    suffix = torch.flip(torch.cumsum(torch.flip(ascending, [-1]), dim=-1), [-1])
    suffix = torch.cat([suffix, torch.zeros_like(suffix[:, :1])], dim=-1)
    first_greater = torch.searchsorted(ascending, probs.double(), right=True)
    mass_greater = suffix.gather(1, first_greater)
    return (mass_greater < top_p.double()[:, None]) | (top_p[:, None] >= 1.0)


def _safe_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """Per-row divisor [B, 1]: the temperature, or 1 for greedy rows (they use the argmax)."""
    return torch.where(temperature > 0, temperature, 1.0).float()[:, None]


def _kept(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
          top_p: torch.Tensor, min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs / T, mask of the tokens temperature, top-k, top-p and min-p keep)."""
    log_probs = log_probs.float()
    vocab_size = log_probs.shape[-1]
    scaled = log_probs / _safe_temperature(temperature)
    keep = torch.isfinite(scaled)
    if ((top_k > 0) & (top_k < vocab_size)).any():      # skipped sorts change no mask
        keep &= _top_k_mask(scaled, top_k)
    masked = scaled.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    if (top_p < 1.0).any():
        keep &= _top_p_mask(probs, top_p.float())
    max_prob = probs.max(dim=-1, keepdim=True).values
    keep &= probs >= min_p.float()[:, None] * max_prob
    return scaled, keep


def filtered_log_probs(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The law `sample` draws from, as normalised log-probs [B, V] (-inf where filtered out).
    Greedy rows (temperature <= 0) come back as log_probs, unfiltered: they use the argmax."""
    if not (temperature > 0).any():
        return log_probs.float()
    vocab_size = log_probs.shape[-1]
    filters = ((top_k > 0) & (top_k < vocab_size)).any() or (top_p < 1.0).any() or (min_p > 0).any()
    if filters:
        scaled, keep = _kept(log_probs, temperature, top_k, top_p, min_p)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    else:  # temperature only: the same law without building the masks
        scaled = log_probs.float() / _safe_temperature(temperature)
    law = torch.log_softmax(scaled, dim=-1)
    law = torch.where(torch.isnan(law), float("-inf"), law)
    return torch.where((temperature > 0)[:, None], law, log_probs.float())


def sample(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
           step: torch.Tensor) -> torch.Tensor:
    """Draw one token per row; see the module docstring for the exact rule."""
    greedy = torch.argmax(log_probs.float(), dim=-1)
    scaled, keep = _kept(log_probs, temperature, top_k, top_p, min_p)
    keys = torch.where(keep, scaled + gumbel(seed, step, scaled.shape[-1]), float("-inf"))
    raced = torch.argmax(keys, dim=-1)
    return torch.where(temperature > 0, raced, greedy)
