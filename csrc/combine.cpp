// combine: evaluates a compiled formula plan over T models' logits, one row at a time.
// Pass 1 finds each active (term, row) log-softmax normaliser; a masked row (Plausible)
// then takes the maximum of its reference score; pass 2 builds the row's scores chunk by
// chunk (no [T, B, V] intermediates), masks the implausible tokens and normalises them.
// Semantics, including the -inf "forbidden" rules, follow kernels/reference.py exactly.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace lmarith {
namespace {

using detail::exp_nonpositive;
using detail::fast_exp;
using detail::is_finite;
using detail::kInf;

// Tokens per pass-2 chunk: the plan's row-blocks for one chunk stay in L1.
constexpr int64_t kChunk = 512;

inline float to_float(float value) { return value; }
inline float to_float(uint16_t bf16_bits) { return detail::bf16_to_float(bf16_bits); }

// log_softmax(x) = (x - max) - log_sum for one (term, row); NaN log_sum marks a row with
// NaN, +inf or only -inf logits, which makes every token's log-prob non-finite (as torch).
// all_finite says every log-prob of the row is finite, so no token can be forbidden by it.
struct TermNormaliser {
  float max;
  float log_sum;
  bool all_finite;
};

template <typename In>
TermNormaliser term_normaliser(const In* row, int64_t vocab) {
  float row_max = -kInf, row_min = kInf;
#pragma omp simd reduction(max : row_max) reduction(min : row_min)
  for (int64_t i = 0; i < vocab; ++i) {
    const float value = to_float(row[i]);
    row_max = value > row_max ? value : row_max;
    row_min = value < row_min ? value : row_min;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < vocab; ++i) sum += exp_nonpositive(to_float(row[i]) - row_max);
  const float log_sum = std::log(sum);
  const float lowest_log_prob = (row_min - row_max) - log_sum;  // log-probs are monotone in x
  return {row_max, log_sum, is_finite(lowest_log_prob) && is_finite(log_sum)};
}

// Read-only view of one row of the plan.
struct RowPlan {
  const float* weights;  // [R, T]
  const float* consts;   // [R]
  const float* coefs;    // [G]
  const int32_t* kinds;  // [G]
  int64_t num_blocks;
  int64_t num_groups;
  int64_t num_terms;
  const float* mask_weights;  // [T], null when the row is unmasked
  float mask_log_alpha;       // -inf when the row is unmasked

  float weight(int64_t block, int64_t term) const { return weights[block * num_terms + term]; }
  const float* block_weights(int64_t block) const { return weights + block * num_terms; }
  bool masked() const { return mask_weights != nullptr; }

  // Static norm N_r = sum_t w[r, t] + c[r], summed in term order like the reference.
  float block_norm(int64_t block) const {
    float norm = 0.0f;
    for (int64_t t = 0; t < num_terms; ++t) norm += weight(block, t);
    return norm + consts[block];
  }
};

RowPlan row_plan(const CombinePlan& plan, int64_t num_terms, int64_t row) {
  const int64_t blocks = plan.num_blocks, groups = plan.num_groups;
  const bool masked = plan.mask_log_alpha != nullptr && plan.mask_log_alpha[row] > -kInf;
  return {plan.weights + row * blocks * num_terms, plan.consts + row * blocks,
          plan.group_coefs + row * groups, plan.group_kinds + row * groups,
          blocks, groups, num_terms,
          masked ? plan.mask_weights + row * num_terms : nullptr,
          masked ? plan.mask_log_alpha[row] : -kInf};
}

// A term takes part in a row when any row-block (or the row's mask) gives it a nonzero
// (or NaN) weight.
bool term_active(const RowPlan& plan, int64_t term) {
  for (int64_t r = 0; r < plan.num_blocks; ++r)
    if (plan.weight(r, term) != 0.0f) return true;
  return plan.masked() && plan.mask_weights[term] != 0.0f;
}

// Per-thread buffers for one chunk: R row-block values, their forbidden counts, the total,
// and the mask's reference scores.
struct ChunkScratch {
  std::vector<float> values, forbidden, total, total_norm, block_norms, mask, mask_forbidden;
  explicit ChunkScratch(int64_t num_blocks)
      : values(num_blocks * kChunk), forbidden(num_blocks * kChunk), total(kChunk),
        total_norm(kChunk), block_norms(num_blocks), mask(kChunk), mask_forbidden(kChunk) {}
};

// block_values when every active term's log-probs are finite: nothing to forbid, so the
// same sums come out without tracking it.
template <typename In>
void clean_block_values(const float* weights, float base, int64_t num_terms,
                        const In* const* term_rows, const TermNormaliser* normalisers,
                        int64_t start, int64_t count, float* values) {
  for (int64_t i = 0; i < count; ++i) values[i] = base;
  for (int64_t t = 0; t < num_terms; ++t) {
    const float w = weights[t];
    if (w == 0.0f) continue;
    const In* src = term_rows[t] + start;
    const float shift = normalisers[t].max, log_sum = normalisers[t].log_sum;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) values[i] += w * ((to_float(src[i]) - shift) - log_sum);
  }
}

// base + sum of active w * log-prob over tokens [start, start + count) for one row of
// weights [T] (a row-block S_r, or the mask's reference score), or -inf where an active
// term's log-prob is not finite.
template <typename In>
void block_values(const float* weights, float base, int64_t num_terms, const In* const* term_rows,
                  const TermNormaliser* normalisers, int64_t start, int64_t count,
                  float* values, float* forbidden) {
  bool may_forbid = false;
  for (int64_t t = 0; t < num_terms; ++t)
    may_forbid |= weights[t] != 0.0f && !normalisers[t].all_finite;
  if (!may_forbid) {
    clean_block_values(weights, base, num_terms, term_rows, normalisers, start, count, values);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    values[i] = base;
    forbidden[i] = 0.0f;
  }
  for (int64_t t = 0; t < num_terms; ++t) {
    const float w = weights[t];
    if (w == 0.0f) continue;
    const In* src = term_rows[t] + start;
    const float shift = normalisers[t].max, log_sum = normalisers[t].log_sum;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const float log_prob = (to_float(src[i]) - shift) - log_sum;
      const bool finite = is_finite(log_prob);
      const float product = w * log_prob;
      values[i] += finite ? product : 0.0f;
      forbidden[i] += finite ? 0.0f : 1.0f;
    }
  }
  for (int64_t i = 0; i < count; ++i) values[i] = forbidden[i] > 0.0f ? -kInf : values[i];
}

// Folds group g into the running total: pick max (Union) or min (Intersection) of the
// two sides, scale by coef; a picked -inf forbids the token. On ties max keeps the left
// side (and its norm), min the right side, as the reference does.
template <bool kIsMax>
void apply_group(const float* left, const float* right, float left_norm, float right_norm,
                 float coef, int64_t count, float* total, float* total_norm) {
  #pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const bool left_wins = kIsMax ? left[i] >= right[i] : left[i] < right[i];
    const float picked = left_wins ? left[i] : right[i];
    const float picked_norm = left_wins ? left_norm : right_norm;
    const float added = total[i] + coef * picked;
    total[i] = picked == -kInf ? -kInf : added;
    total_norm[i] += coef * picked_norm;
  }
}

// The mask's reference scores M for tokens [start, start + count), into scratch.mask.
template <typename In>
const float* mask_scores(const RowPlan& plan, const In* const* term_rows,
                         const TermNormaliser* normalisers, int64_t start, int64_t count,
                         ChunkScratch& scratch) {
  block_values(plan.mask_weights, 0.0f, plan.num_terms, term_rows, normalisers, start, count,
               scratch.mask.data(), scratch.mask_forbidden.data());
  return scratch.mask.data();
}

// The masked row's threshold: max_x M + log(alpha), or +inf (keep nothing) when M is -inf
// everywhere. M is computed by the same code as in chunk_scores, so ties are exact.
template <typename In>
float mask_threshold(const RowPlan& plan, const In* const* term_rows,
                     const TermNormaliser* normalisers, int64_t vocab, ChunkScratch& scratch) {
  float row_max = -kInf;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t count = vocab - start < kChunk ? vocab - start : kChunk;
    const float* mask = mask_scores(plan, term_rows, normalisers, start, count, scratch);
    for (int64_t i = 0; i < count; ++i) row_max = mask[i] > row_max ? mask[i] : row_max;
  }
  return row_max == -kInf ? kInf : row_max + plan.mask_log_alpha;
}

// Scores for tokens [start, start + count) of one row, written to out; returns their max.
// A masked row's tokens with reference score below threshold get value -inf.
template <typename In>
float chunk_scores(const RowPlan& plan, const In* const* term_rows,
                  const TermNormaliser* normalisers, int64_t start, int64_t count,
                  float threshold, ChunkScratch& scratch, float* out) {
  for (int64_t r = 0; r < plan.num_blocks; ++r)
    block_values(plan.block_weights(r), plan.consts[r], plan.num_terms, term_rows, normalisers,
                 start, count, scratch.values.data() + r * kChunk,
                 scratch.forbidden.data() + r * kChunk);
  float* total = scratch.total.data();
  float* total_norm = scratch.total_norm.data();
  const float* values = scratch.values.data();
  const float* norms = scratch.block_norms.data();
  for (int64_t i = 0; i < count; ++i) {
    total[i] = values[i];
    total_norm[i] = norms[0];
  }
  for (int64_t g = 0; g < plan.num_groups; ++g) {
    const float coef = plan.coefs[g];
    if (coef == 0.0f) continue;
    const float* left = values + (1 + 2 * g) * kChunk;
    const float* right = values + (2 + 2 * g) * kChunk;
    if (plan.kinds[g] > 0)
      apply_group<true>(left, right, norms[1 + 2 * g], norms[2 + 2 * g], coef, count, total, total_norm);
    else
      apply_group<false>(left, right, norms[1 + 2 * g], norms[2 + 2 * g], coef, count, total, total_norm);
  }
  if (plan.masked()) {
    const float* mask = mask_scores(plan, term_rows, normalisers, start, count, scratch);
    for (int64_t i = 0; i < count; ++i) total[i] = mask[i] >= threshold ? total[i] : -kInf;
  }
  float chunk_max = -kInf;
#pragma omp simd reduction(max : chunk_max)
  for (int64_t i = 0; i < count; ++i) {
    const float norm = total_norm[i];
    const float quotient = total[i] / (norm != 0.0f ? norm : 1.0f);
    const float raw = norm != 0.0f ? quotient : total[i];
    const float score = raw != raw ? -kInf : raw;
    out[start + i] = score;
    chunk_max = score > chunk_max ? score : chunk_max;
  }
  return chunk_max;
}

// Subtracts logsumexp from a row whose max is row_max, in place, and returns it
// (as torch.logsumexp: an infinite max shifts by 0).
float normalise_row(float* scores, int64_t vocab, float row_max) {
  float sum = 0.0f;
  if (is_finite(row_max)) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < vocab; ++i) sum += exp_nonpositive(scores[i] - row_max);
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < vocab; ++i) sum += fast_exp(scores[i]);
  }
  const float shift = is_finite(row_max) ? row_max : 0.0f;
  const float lse = std::log(sum) + shift;
  for (int64_t i = 0; i < vocab; ++i) scores[i] -= lse;
  return lse;
}

template <typename In>
void combine_row(const In* logits, int64_t num_terms, int64_t batch, int64_t vocab,
                 const RowPlan& plan, int64_t row, const TermNormaliser* normalisers,
                 ChunkScratch& scratch, float* out, float* lse) {
  std::vector<const In*> term_rows(num_terms);
  for (int64_t t = 0; t < num_terms; ++t) term_rows[t] = logits + (t * batch + row) * vocab;
  for (int64_t r = 0; r < plan.num_blocks; ++r) scratch.block_norms[r] = plan.block_norm(r);
  const float threshold =
      plan.masked() ? mask_threshold(plan, term_rows.data(), normalisers, vocab, scratch) : -kInf;
  float row_max = -kInf;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t count = vocab - start < kChunk ? vocab - start : kChunk;
    row_max = std::max(row_max, chunk_scores(plan, term_rows.data(), normalisers, start, count,
                                             threshold, scratch, out));
  }
  *lse = normalise_row(out, vocab, row_max);
}

template <typename In>
void combine_typed(const In* logits, int64_t num_terms, int64_t batch, int64_t vocab,
                   const CombinePlan& plan, float* log_probs, float* lse) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<TermNormaliser> normalisers(num_terms * batch, TermNormaliser{nan, nan, false});
  const int64_t pairs = num_terms * batch;
  const bool parallel = pairs * vocab >= detail::kParallelRowElements;
#ifdef LMARITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t row = pair % batch, term = pair / batch;
    if (term_active(row_plan(plan, num_terms, row), term))
      normalisers[row * num_terms + term] = term_normaliser(logits + pair * vocab, vocab);
  }
#ifdef LMARITH_OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    ChunkScratch scratch(plan.num_blocks);
#ifdef LMARITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t row = 0; row < batch; ++row)
      combine_row(logits, num_terms, batch, vocab, row_plan(plan, num_terms, row), row,
                  normalisers.data() + row * num_terms, scratch, log_probs + row * vocab,
                  lse + row);
  }
}

}  // namespace

void combine(const void* logits, LogitsDtype dtype, int64_t num_terms, int64_t batch,
             int64_t vocab, const CombinePlan& plan, float* log_probs, float* lse) {
  if (dtype == LogitsDtype::kBFloat16)
    combine_typed(static_cast<const uint16_t*>(logits), num_terms, batch, vocab, plan, log_probs, lse);
  else
    combine_typed(static_cast<const float*>(logits), num_terms, batch, vocab, plan, log_probs, lse);
}

bool built_with_openmp() {
#ifdef LMARITH_OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace lmarith
