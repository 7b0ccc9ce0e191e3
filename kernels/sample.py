"""Triton face of `sample`: temperature, top-k, top-p, min-p and a counter-based Gumbel race.

Semantics are those of `lmarith.kernels.reference.sample`. One program per row, tiled over the
vocabulary. No sort: the top-k threshold and the top-p cut are found by a radix search over
the 32-bit patterns of the values, RADIX_BITS bits per pass over the row (each pass counts,
or sums, the tokens above 2**RADIX_BITS candidate thresholds at once). Passes per sampled row:
32/RADIX_BITS (top-k, if active) + 1 (softmax stats) + 32/RADIX_BITS (top-p, if active) + 1
(race). Greedy rows take a single argmax pass.

The hash and the uniforms are bit-exact with the reference; the float32 exp/log differ from
torch's by an ulp now and then, which can only matter on a knife edge (two race keys within
an ulp, or a top-p / min-p boundary hit to float32 precision).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
GOLDEN32: tl.constexpr = tl.constexpr(0x9E3779B9)
MIX_MUL1: tl.constexpr = tl.constexpr(0x7FEB352D)
MIX_MUL2: tl.constexpr = tl.constexpr(0x846CA68B)


@triton.jit
def _mix32(x):
    """lowbias32 hash on uint32: multiplications wrap and shifts are logical."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, MIX_MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, MIX_MUL2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, step):
    """Per-row hash state from the int64 seed (both halves) and the low 32 bits of the step."""
    seed_lo = seed.to(tl.uint32)
    seed_hi = (seed >> 32).to(tl.uint32)
    key = _mix32(seed_lo ^ tl.full(seed_lo.shape, GOLDEN32, tl.uint32))
    key = _mix32(key ^ seed_hi)
    return _mix32(key ^ step.to(tl.uint32))


@triton.jit
def _uniform(key, cols):
    """u = ((h >> 9) + 0.5) * 2**-23 in float32 with h = mix32(key ^ token): the reference's u."""
    hashed = _mix32(cols.to(tl.uint32) ^ key)
    return ((hashed >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _gumbel(key, cols):
    """-log(-log(u)) in float32: adding it and taking the argmax is the exponential race."""
    return -tl.log(-tl.log(_uniform(key, cols)))


@triton.jit
def _load_scaled(base, cols, mask, temperature):
    """(scaled, order): log_probs / temperature with IEEE rounding (as torch divides), -inf off
    the row, and a uint32 whose unsigned order is scaled's float order (-0.0 as +0.0)."""
    x = tl.load(base + cols, mask=mask, other=NEG_INF).to(tl.float32)
    x = tl.math.div_rn(x, tl.zeros_like(x) + temperature)
    bits = (x + 0.0).to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) != 0, tl.full(bits.shape, 0xFFFFFFFF, tl.uint32),
                    tl.full(bits.shape, 0x80000000, tl.uint32))
    return x, bits ^ flip


@triton.jit
def _probs(x, order, cut_k, top_max, inv_sum):
    """(kept, p): the finite top-k survivors and their softmax exp(x - max) / sum, else 0."""
    kept = (order >= cut_k) & (tl.abs(x) < float("inf"))
    return kept, tl.where(kept, tl.exp(tl.where(kept, x - top_max, 0.0)) * inv_sum, 0.0)


@triton.jit
def _argmax_pass(base, V, BLOCK_V: tl.constexpr):
    """Index of the row maximum, lowest index among ties."""
    best = tl.full([], NEG_INF, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
        tile_best = tl.max(x, axis=0)
        tile_idx = v0 + tl.argmax(x, axis=0, tie_break_left=True)
        better = tile_best > best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    return best_idx


@triton.jit
def _top_k_cut(base, V, temperature, k, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Order key of the k-th largest scaled value: the largest c with #{order >= c} >= k."""
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    cut = tl.zeros([], tl.uint32)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        cands = cut | (digits << shift)
        counts = tl.zeros([1 << RADIX_BITS], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            _, order = _load_scaled(base, cols, mask, temperature)
            above = (order[None, :] >= cands[:, None]) & mask[None, :]
            counts += tl.sum(above.to(tl.int32), axis=1)
        cut = tl.max(tl.where(counts >= k, cands, 0), axis=0)
    return cut


@triton.jit
def _softmax_stats(base, V, temperature, cut_k, BLOCK_V: tl.constexpr):
    """(max, 1 / sum exp(x - max)) over the finite top-k survivors."""
    run_max = tl.full([], NEG_INF, tl.float32)
    run_sum = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x, order = _load_scaled(base, cols, mask, temperature)
        x = tl.where((order >= cut_k) & (tl.abs(x) < float("inf")), x, NEG_INF)
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        shift = tl.where(new_max > NEG_INF, new_max, 0.0)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        run_max = new_max
    return run_max, 1.0 / run_sum


@triton.jit
def _top_p_cut(base, V, temperature, cut_k, top_max, inv_sum, top_p,
               BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Probability bit pattern c such that x is kept iff bits(p(x)) > c, and a keep-all flag.

    mass(c) = sum of p over bits(p) > c is non-increasing in c, and x is kept iff
    mass(bits(p(x))) < top_p, so c is the largest pattern with mass(c) >= top_p. Masses are
    float64, as in the reference. keep_all covers mass(0) < top_p.
    """
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    target = top_p.to(tl.float64)
    cut = tl.zeros([], tl.uint32)
    keep_all = tl.zeros([], tl.int1)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        cands = cut | (digits << shift)
        mass = tl.zeros([1 << RADIX_BITS], tl.float64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            x, order = _load_scaled(base, cols, mask, temperature)
            _, p = _probs(x, order, cut_k, top_max, inv_sum)
            bits = p.to(tl.uint32, bitcast=True)
            above = bits[None, :] > cands[:, None]
            mass += tl.sum(tl.where(above, p.to(tl.float64)[None, :], 0.0), axis=1)
        first = tl.sum(tl.where(digits == 0, mass, 0.0), axis=0) < target
        keep_all = tl.where(shift == 32 - RADIX_BITS, first, keep_all)
        cut = tl.max(tl.where(mass >= target, cands, 0), axis=0)
    return cut, keep_all


@triton.jit
def _race(base, V, temperature, cut_k, top_max, inv_sum, cut_p, keep_all_p, min_p, key,
          BLOCK_V: tl.constexpr):
    """Exponential race: argmax of scaled + gumbel over the kept tokens, lowest index on ties."""
    best = tl.full([], NEG_INF, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    floor = min_p * inv_sum
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x, order = _load_scaled(base, cols, mask, temperature)
        kept, p = _probs(x, order, cut_k, top_max, inv_sum)
        # keep_all_p is widened before use: the interpreter mistypes broadcast scalar bools.
        keep_p = (p.to(tl.uint32, bitcast=True) > cut_p) | (tl.zeros_like(cols) + keep_all_p != 0)
        keep = kept & keep_p & (p >= floor)
        race_keys = tl.where(keep, x + _gumbel(key, cols), NEG_INF)
        tile_best = tl.max(race_keys, axis=0)
        tile_idx = v0 + tl.argmax(race_keys, axis=0, tie_break_left=True)
        better = tile_best > best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    return best_idx


@triton.jit
def _sample_kernel(log_probs_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,
                   step_ptr, out_ptr, V, stride_b,
                   BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """One row: greedy argmax, or top-k / top-p / min-p filtering and the Gumbel race."""
    row = tl.program_id(0)
    base = log_probs_ptr + row.to(tl.int64) * stride_b
    temperature = tl.load(temperature_ptr + row)
    if temperature > 0:
        k = tl.load(top_k_ptr + row)
        cut_k = tl.zeros([], tl.uint32)
        if (k > 0) & (k < V):
            cut_k = _top_k_cut(base, V, temperature, k, BLOCK_V, RADIX_BITS)
        top_max, inv_sum = _softmax_stats(base, V, temperature, cut_k, BLOCK_V)
        top_p = tl.load(top_p_ptr + row)
        cut_p = tl.zeros([], tl.uint32)
        keep_all_p = tl.full([], 1, tl.int1)
        if top_p < 1.0:
            cut_p, keep_all_p = _top_p_cut(base, V, temperature, cut_k, top_max, inv_sum, top_p,
                                           BLOCK_V, RADIX_BITS)
        key = _row_key(tl.load(seed_ptr + row), tl.load(step_ptr + row))
        token = _race(base, V, temperature, cut_k, top_max, inv_sum, cut_p, keep_all_p,
                      tl.load(min_p_ptr + row), key, BLOCK_V)
    else:
        token = _argmax_pass(base, V, BLOCK_V)
    tl.store(out_ptr + row, token.to(tl.int64))


def _default_tiling(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, RADIX_BITS): wide tiles and few search passes for the interpreter, whose cost
    is per op; register-sized [2**RADIX_BITS, BLOCK_V] search tiles on GPUs."""
    if device.type != "cuda":
        return min(max(16, triton.next_power_of_2(vocab)), 4096), 8
    return 256, 4


def sample(log_probs: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, *,
           block_v: int | None = None, radix_bits: int | None = None) -> torch.Tensor:
    """Draw one token per row (see `reference.sample`); returns int64 tokens [B].

    log_probs [B, V] (last dim contiguous); temperature, top_p, min_p [B] float;
    top_k [B] int (<= 0 or >= V: off); seed [B] int64; step [B] int. `block_v` (power of two)
    and `radix_bits` (1, 2, 4 or 8 bits per search pass) are tuning knobs.
    """
    rows, vocab = log_probs.shape
    device = log_probs.device
    if log_probs.stride(1) != 1:
        log_probs = log_probs.contiguous()
    out = torch.zeros(rows, dtype=torch.int64, device=device)
    if rows == 0 or vocab == 0:
        return out

    default_block, default_radix = _default_tiling(vocab, device)

    def per_row(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(device=device, dtype=dtype).reshape(rows).contiguous()

    _sample_kernel[(rows,)](
        log_probs, per_row(temperature, torch.float32), per_row(top_k, torch.int64),
        per_row(top_p, torch.float32), per_row(min_p, torch.float32),
        per_row(seed, torch.int64), per_row(step, torch.int64), out, vocab, log_probs.stride(0),
        BLOCK_V=block_v or default_block, RADIX_BITS=radix_bits or default_radix)
    return out
