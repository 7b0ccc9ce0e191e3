// spec_accept: speculative verification by the reference's rule
// (kernels/reference_speculative.py). Each row walks its proposals in order: greedy rows
// accept while the proposal is the target's argmax, sampled rows while u_j * q < p. The
// settling position's token comes from an exponential race over the residual max(0, p - q)
// (over p where it is empty), computed exactly as the reference computes it (float32 expf,
// logf, the counter-based hash), but only for tokens whose best possible key, bounded from
// the target log-prob and the hash's top bits, can still beat the current winner.
#include <cmath>
#include <vector>

#include "kernels.h"

namespace lmarith {
namespace {

using detail::argmax_first;
using detail::kInf;
using detail::mix32;
using detail::row_key;
using detail::uniform_from_hash;

constexpr uint32_t kStreamSalt = 0x85EBCA6Bu;

// reference_speculative.stream_key: the 32-bit key of one random stream of a row.
inline uint32_t stream_key(uint32_t row, int64_t stream) {
  const uint32_t salt = mix32((static_cast<uint32_t>(stream + 1) * detail::kGolden) ^ kStreamSalt);
  return mix32(row ^ salt);
}

// log(E) = log(-log(u)) for the race: a token's key is its base minus this.
inline float race_noise(uint32_t hash) { return std::log(-std::log(uniform_from_hash(hash))); }

// The race buckets hashes by their top bits; -noise of every hash in a bucket lies below
// the bucket's bound (u, hence -noise, grows with the hash).
constexpr int kBoundBits = 10;
constexpr uint32_t kTopBucket = (1u << kBoundBits) - 1;

const float* noise_bounds() {
  static const std::vector<float> bounds = [] {
    std::vector<float> table(size_t{1} << kBoundBits);
    for (size_t bucket = 0; bucket < table.size(); ++bucket) {
      const uint64_t last_hash = ((uint64_t{bucket} + 1) << (32 - kBoundBits)) - 1;
      const float lifted = -race_noise(static_cast<uint32_t>(last_hash));
      table[bucket] = lifted + 1e-5f * (1.0f + std::fabs(lifted));
    }
    return table;
  }();
  return bounds.data();
}

// Upper bound of a token's key base, log(residual) or t, from its target log-prob t:
// residual <= expf(t), plus margins for expf/logf rounding and subnormal expf results.
inline float base_bound(float target) {
  const float clamped = target > -87.0f ? target : -87.0f;
  const float bound = clamped + 1e-6f * std::fabs(clamped) + 1e-6f;
  return target > 88.0f ? kInf : bound;
}

// One settling position: target log-probs, the proposal's log-probs (nullptr for the empty
// proposal, q = 0) and whether some token has a positive residual.
struct RaceLaw {
  const float* target;
  const float* draft;
  bool residual;
};

inline float residual_at(const float* target, const float* draft, int64_t token) {
  return std::exp(target[token]) - (draft ? std::exp(draft[token]) : 0.0f);
}

// Whether some token has expf(t) - expf(d) > 0. Tokens with t > d are tried first (one
// usually settles it), those with -inf < t < d only when none does: exp need not be monotone.
bool has_residual(const float* target, const float* draft, int64_t vocab) {
  for (int64_t x = 0; x < vocab; ++x) {
    const float limit = draft ? draft[x] : -kInf;
    if (target[x] > limit && residual_at(target, draft, x) > 0.0f) return true;
  }
  if (!draft) return false;
  for (int64_t x = 0; x < vocab; ++x)
    if (target[x] > -kInf && target[x] < draft[x] && residual_at(target, draft, x) > 0.0f)
      return true;
  return false;
}

// The reference's key of one token, NaN counted as -inf: log(residual) - noise, or
// t - noise where the residual is empty.
float race_key(const RaceLaw& law, int64_t token, uint32_t hash) {
  float base = law.target[token];
  if (law.residual) {
    const float residual = residual_at(law.target, law.draft, token);
    if (!(residual > 0.0f)) return -kInf;
    base = std::log(residual);
  }
  const float key = base - race_noise(hash);
  return key == key ? key : -kInf;
}

// The running argmax of the race: highest key, lowest index among equal keys (tokens may
// be offered in any order). Starts at token 0, the answer when every key is -inf.
struct RaceLeader {
  float key = -kInf;
  int64_t token = 0;

  void offer(const RaceLaw& law, const float* bounds, uint32_t stream, int64_t token_id) {
    const uint32_t hash = mix32(stream ^ static_cast<uint32_t>(token_id));
    if (base_bound(law.target[token_id]) + bounds[hash >> (32 - kBoundBits)] < key) return;
    const float candidate = race_key(law, token_id, hash);
    if (candidate > key || (candidate == key && token_id < token)) {
      key = candidate;
      token = token_id;
    }
  }
};

// Flags tokens with t > -inf (the only ones with a finite key) in the top hash bucket:
// few, and the likeliest to set a high bar. Vectorised.
void mark_top_bucket(const float* __restrict target, int64_t vocab, uint32_t stream,
                     uint8_t* __restrict flags) {
  const auto count = static_cast<int32_t>(vocab);
  for (int32_t i = 0; i < count; ++i) {
    const uint32_t bucket = mix32(stream ^ static_cast<uint32_t>(i)) >> (32 - kBoundBits);
    flags[i] = (target[i] > -kInf) & (bucket == kTopBucket);
  }
}

// Flags tokens outside the top bucket whose key bound reaches `lower_bound`, a key some
// token attains. Vectorised.
void mark_contenders(const float* __restrict target, int64_t vocab, uint32_t stream,
                     float lower_bound, uint8_t* __restrict flags) {
  const float finite_bound = noise_bounds()[kTopBucket - 1];
  const auto count = static_cast<int32_t>(vocab);
  for (int32_t i = 0; i < count; ++i) {
    const uint32_t bucket = mix32(stream ^ static_cast<uint32_t>(i)) >> (32 - kBoundBits);
    const bool may_win = base_bound(target[i]) + finite_bound >= lower_bound;
    flags[i] = (target[i] > -kInf) & may_win & (bucket != kTopBucket);
  }
}

// Offers every flagged token to the leader, skipping empty 8-byte words of flags.
void offer_flagged(const uint8_t* flags, int64_t vocab, const RaceLaw& law, uint32_t stream,
                   RaceLeader& leader) {
  const float* bounds = noise_bounds();
  for (int64_t start = 0; start < vocab; start += 8) {
    uint64_t word;
    std::memcpy(&word, flags + start, sizeof(word));
    if (word == 0) continue;
    for (int64_t i = start; i < start + 8 && i < vocab; ++i)
      if (flags[i]) leader.offer(law, bounds, stream, i);
  }
}

// reference_speculative.residual_race for one row: the target's argmax and the top-bucket
// tokens set a bar, then only tokens that could still clear it get their exact key.
int64_t residual_race(const RaceLaw& law, int64_t vocab, uint32_t stream, uint8_t* flags) {
  RaceLeader leader;
  leader.offer(law, noise_bounds(), stream, argmax_first(law.target, vocab));
  mark_top_bucket(law.target, vocab, stream, flags);
  offer_flagged(flags, vocab, law, stream, leader);
  mark_contenders(law.target, vocab, stream, leader.key, flags);
  offer_flagged(flags, vocab, law, stream, leader);
  return leader.token;
}

// Flags of vocabulary size per thread, padded to whole 8-byte words with a zero tail.
uint8_t* thread_flags(int64_t vocab) {
  thread_local std::vector<uint8_t> flags;
  if (static_cast<int64_t>(flags.size()) < vocab) flags.assign((vocab + 7) / 8 * 8, 0);
  return flags.data();
}

// One row's slices: target [K+1, V], draft [K, V], tokens [K], n proposals to verify.
struct RowView {
  const float* target;
  const float* draft;
  const int64_t* tokens;
  int64_t drafts;
  int64_t vocab;
  uint32_t key;
};

struct RowResult {
  int32_t accepted;
  int64_t token;
};

// Greedy rows: accept while the proposal is the argmax; the argmax where that stops.
RowResult greedy_row(const RowView& row) {
  for (int64_t j = 0;; ++j) {
    const int64_t best = argmax_first(row.target + j * row.vocab, row.vocab);
    if (j == row.drafts || row.tokens[j] != best) return {static_cast<int32_t>(j), best};
  }
}

// Proposal j of a sampled row is accepted iff q > 0 and u_j * q < p (u_j: stream 2j).
bool sampled_accepts(const RowView& row, int64_t j) {
  const int64_t token = row.tokens[j];
  if (token < 0 || token >= row.vocab) return false;
  const float p = std::exp(row.target[j * row.vocab + token]);
  const float q = std::exp(row.draft[j * row.vocab + token]);
  const float u = uniform_from_hash(mix32(stream_key(row.key, 2 * j)));
  return q > 0.0f && u * q < p;
}

// Sampled rows: accept while the test passes, then race over the residual at the first
// rejection r (stream 2r + 1), or over p at n when all are accepted (stream 2n + 1).
RowResult sampled_row(const RowView& row, uint8_t* flags) {
  int64_t j = 0;
  while (j < row.drafts && sampled_accepts(row, j)) ++j;
  const float* target = row.target + j * row.vocab;
  const float* draft = j < row.drafts ? row.draft + j * row.vocab : nullptr;
  const RaceLaw law{target, draft, has_residual(target, draft, row.vocab)};
  return {static_cast<int32_t>(j), residual_race(law, row.vocab, stream_key(row.key, 2 * j + 1), flags)};
}

}  // namespace

void spec_accept(const SpecAcceptInputs& inputs, int64_t batch, int64_t max_drafts, int64_t vocab,
                 int32_t* num_accepted, int64_t* next_token) {
  noise_bounds();
#ifdef LMARITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (batch * (max_drafts + 1) * vocab >= detail::kParallelRowElements)
#endif
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t drafts = inputs.num_drafts[b] < 0 ? 0 : inputs.num_drafts[b];
    const RowView row{inputs.target_log_probs + b * (max_drafts + 1) * vocab,
                      inputs.draft_log_probs + b * max_drafts * vocab,
                      inputs.draft_tokens + b * max_drafts,
                      drafts < max_drafts ? drafts : max_drafts, vocab,
                      row_key(inputs.seed[b], inputs.step[b])};
    const RowResult result = inputs.greedy[b] ? greedy_row(row) : sampled_row(row, thread_flags(vocab));
    num_accepted[b] = result.accepted;
    next_token[b] = result.token;
  }
}

}  // namespace lmarith
