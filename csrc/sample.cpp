// sample: one token per row by the reference's rule (kernels/reference.py): temperature,
// top-k, top-p, min-p, then an exponential race keyed by a counter-based hash. Exact
// reproduction of the reference's token choice, with no full sort of the vocabulary:
// top-k uses nth_element, top-p a radix selection on the probabilities' float bits, and
// the race skips tokens whose best possible Gumbel key cannot beat the current winner.
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "kernels.h"

namespace lmarith {
namespace {

using detail::argmax_first;
using detail::float_bits;
using detail::fast_exp;
using detail::is_finite;
using detail::kInf;
using detail::max_ignoring_nan;
using detail::mix32;
using detail::row_key;
using detail::uniform_from_hash;

inline float gumbel_from_uniform(float uniform) { return -std::log(-std::log(uniform)); }

// The race buckets hashes by their top bits; each bucket's Gumbel values lie below a bound.
constexpr int kBoundBits = 10;

// Upper bound of the Gumbel noise for each bucket (with a margin for logf rounding), so a
// token whose scaled value plus its bucket's bound is below the best key can be skipped.
const float* gumbel_bounds() {
  static const std::vector<float> bounds = [] {
    std::vector<float> table(size_t{1} << kBoundBits);
    for (size_t bucket = 0; bucket < table.size(); ++bucket) {
      const uint64_t last_hash = ((uint64_t{bucket} + 1) << (32 - kBoundBits)) - 1;
      const float gumbel = gumbel_from_uniform(uniform_from_hash(static_cast<uint32_t>(last_hash)));
      table[bucket] = gumbel + 1e-5f * (1.0f + std::fabs(gumbel));
    }
    return table;
  }();
  return bounds.data();
}

// Per-thread buffers of vocabulary size, kept across calls to avoid page-faulting new ones.
struct RowScratch {
  std::vector<float> scaled, probs, candidates, gathered;
  std::vector<uint8_t> flags;  // padded to whole 8-byte words, tail zero
};

RowScratch& thread_scratch(int64_t vocab) {
  thread_local RowScratch scratch;
  if (static_cast<int64_t>(scratch.scaled.size()) < vocab) {
    scratch.scaled.resize(vocab);
    scratch.probs.resize(vocab);
    scratch.candidates.resize(vocab);
    scratch.gathered.resize(vocab);
    scratch.flags.assign((vocab + 7) / 8 * 8, 0);
  }
  return scratch;
}

// How many values are >= threshold (vectorised; NaN never counts).
int64_t count_at_least(const float* values, int64_t count, float threshold) {
  int64_t hits = 0;
#pragma omp simd reduction(+ : hits)
  for (int64_t i = 0; i < count; ++i) hits += values[i] >= threshold;
  return hits;
}

// Block size for scans that skip stretches holding nothing of interest.
constexpr int64_t kScanBlock = 64;

// Copies the values >= threshold into out, in order; returns how many. Blocks without
// any are skipped after a vectorised count, dense ones compacted without branches.
size_t gather_at_least(const float* values, int64_t count, float threshold, float* out) {
  size_t kept = 0;
  for (int64_t start = 0; start < count; start += kScanBlock) {
    const int64_t stop = std::min(count, start + kScanBlock);
    const int64_t hits = count_at_least(values + start, stop - start, threshold);
    if (hits == 0) continue;
    if (hits < kScanBlock / 4) {
      for (int64_t i = start; i < stop; ++i)
        if (values[i] >= threshold) out[kept++] = values[i];
      continue;
    }
    for (int64_t i = start; i < stop; ++i) {
      out[kept] = values[i];
      kept += values[i] >= threshold;
    }
  }
  return kept;
}

// The k-th largest scaled value (ties at it are kept). Usually the top k lie within a few
// units of the maximum, so a ladder of thresholds max - 2^r finds a small candidate set
// holding them and nth_element runs on that; otherwise on a copy of the whole row, where
// NaN stands in as +inf (torch.sort puts NaN first).
float top_k_threshold(const float* scaled, int64_t vocab, int64_t k, RowScratch& scratch) {
  int any_nan = 0;
  const float row_max = max_ignoring_nan(scaled, vocab, any_nan);
  float* work = scratch.candidates.data();
  int64_t count = vocab;
  if (!any_nan && is_finite(row_max)) {
    for (int rung = 0; rung < 8; ++rung) {
      const float threshold = row_max - static_cast<float>(1 << rung);
      const int64_t hits = count_at_least(scaled, vocab, threshold);
      if (hits < k) continue;
      if (hits <= vocab / 4) count = static_cast<int64_t>(gather_at_least(scaled, vocab, threshold, work));
      break;
    }
  }
  if (count == vocab)
    for (int64_t i = 0; i < vocab; ++i) work[i] = scaled[i] != scaled[i] ? kInf : scaled[i];
  std::nth_element(work, work + (k - 1), work + count, std::greater<float>());
  return work[k - 1];
}

// Softmax over tokens kept by top-k and finiteness; dropped tokens get -1 in probs.
// Returns the largest probability, or -1 when no token survives.
float kept_softmax(const float* scaled, int64_t vocab, float threshold, float* probs) {
  float row_max = -kInf;
#pragma omp simd reduction(max : row_max)
  for (int64_t i = 0; i < vocab; ++i) {
    const bool kept = scaled[i] >= threshold && is_finite(scaled[i]);
    row_max = kept && scaled[i] > row_max ? scaled[i] : row_max;
  }
  if (row_max == -kInf) return -1.0f;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < vocab; ++i) {
    const bool kept = scaled[i] >= threshold && is_finite(scaled[i]);
    const float weight = kept ? fast_exp(scaled[i] - row_max) : 0.0f;
    probs[i] = kept ? weight : -1.0f;
    sum += weight;
  }
  const float inverse = 1.0f / sum;
  float max_prob = 0.0f;
#pragma omp simd reduction(max : max_prob)
  for (int64_t i = 0; i < vocab; ++i) {
    probs[i] = probs[i] >= 0.0f ? probs[i] * inverse : -1.0f;
    max_prob = probs[i] > max_prob ? probs[i] : max_prob;
  }
  return max_prob;
}

// A non-negative float's significand as an integer; times 2^(max(e, 1) - 150) it is the
// value, so a binade's mass is an exact integer sum.
inline uint64_t significand(uint32_t bits) {
  return (bits & 0x7FFFFFu) | ((bits & 0x7F800000u) ? 0x800000u : 0u);
}

inline double binade_scale(uint32_t binade) {
  return std::ldexp(1.0, static_cast<int>(binade < 1 ? 1 : binade) - 150);
}

// The top-p floor found so far; `reached` is false when the running mass never got to
// top_p (the values' total is below it).
struct Floor {
  float value;
  bool reached;
};

// Sorts values (all below mass `above` already counted) from the largest down and returns
// the first value, equal values taken together, at which the running mass reaches top_p.
Floor walk_sorted(float* values, size_t count, double above, double top_p) {
  std::sort(values, values + count, std::greater<float>());
  for (size_t i = 0; i < count;) {
    const float value = values[i];
    double group_mass = 0.0;
    for (; i < count && values[i] == value; ++i) group_mass += value;
    if (above + group_mass >= top_p) return {value, true};
    above += group_mass;
  }
  return {count ? values[count - 1] : 0.0f, false};
}

// Copies the values whose bits, shifted right by `shift`, equal `prefix`.
size_t gather_prefix(const float* values, int64_t count, int shift, uint32_t prefix, float* out) {
  size_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    out[kept] = values[i];
    kept += (float_bits(values[i]) >> shift) == prefix;
  }
  return kept;
}

// Bins of a radix pass: exact significand sums and element counts.
struct RadixBins {
  std::vector<uint64_t> mass;
  std::vector<uint32_t> count;
  explicit RadixBins(size_t size) : mass(size, 0), count(size, 0) {}
};

// Where the running mass, scanned from the top bin down, reaches top_p: that bin and the
// mass above it. When it never does, `reached` is false and bin is the lowest nonempty one.
struct Crossing {
  int bin;
  double above;
  bool reached;
};

Crossing find_crossing(const RadixBins& bins, int top_bin, double shared_scale, bool per_binade,
                       double above, double top_p) {
  Crossing lowest{-1, above, false};
  for (int bin = top_bin; bin >= 0; --bin) {
    if (bins.count[bin] == 0) continue;
    const double scale = per_binade ? binade_scale(static_cast<uint32_t>(bin)) : shared_scale;
    const double mass = static_cast<double>(bins.mass[bin]) * scale;
    if (above + mass >= top_p) return {bin, above, true};
    lowest = {bin, above, false};
    above += mass;
  }
  return lowest;
}

// Exact top-p floor over `count` probabilities (negative entries are dropped tokens):
// the value v with mass(p > v) < top_p <= mass(p >= v), by a radix selection on the float
// bits (binade, then 11 more bits, then a sort of what is left). Binade masses are exact
// integer sums of significands; only the running total is rounded (in double).
Floor radix_floor(const float* probs, int64_t count, double top_p, float* gathered) {
  constexpr int kSortLimit = 512;
  if (count <= kSortLimit) return walk_sorted(gathered, gather_at_least(probs, count, 0.0f, gathered), 0.0, top_p);
  RadixBins binades(512);  // bins 256..511 collect the negative markers of dropped tokens
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t bits = float_bits(probs[i]);
    binades.mass[bits >> 23] += significand(bits);
    binades.count[bits >> 23] += 1;
  }
  const Crossing top = find_crossing(binades, 255, 0.0, true, 0.0, top_p);
  if (!top.reached) return {0.0f, false};
  const auto binade = static_cast<uint32_t>(top.bin);
  if (binades.count[binade] <= kSortLimit) {
    const size_t kept = gather_prefix(probs, count, 23, binade, gathered);
    return {walk_sorted(gathered, kept, top.above, top_p).value, true};
  }
  constexpr int kSubBits = 11, kSubShift = 23 - kSubBits;
  constexpr uint32_t kSubBins = 1u << kSubBits;
  constexpr uint32_t kSpareBins = 8;  // values outside the binade, spread so their
  RadixBins subs(kSubBins + kSpareBins);  // updates do not queue on one counter
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t bits = float_bits(probs[i]);
    const uint32_t spare = kSubBins + static_cast<uint32_t>(i % kSpareBins);
    const uint32_t bin = (bits >> 23) == binade ? (bits >> kSubShift) & (kSubBins - 1) : spare;
    subs.mass[bin] += significand(bits);
    subs.count[bin] += 1;
  }
  const Crossing sub = find_crossing(subs, kSubBins - 1, binade_scale(binade), false, top.above, top_p);
  const uint32_t prefix = (binade << kSubBits) | static_cast<uint32_t>(sub.bin);
  const size_t kept = gather_prefix(probs, count, kSubShift, prefix, gathered);
  return {walk_sorted(gathered, kept, sub.above, top_p).value, true};
}

// Masses (float sums: only a guide to pick a candidate set, the exact selection decides)
// of the probabilities >= max_prob * 4^-(r+1), r = 0..7, in one vectorised pass.
struct Ladder {
  static constexpr int kRungs = 8;
  float threshold[kRungs];
  float mass[kRungs];
};

Ladder mass_ladder(const float* probs, int64_t vocab, float max_prob) {
  Ladder ladder{};
  float threshold = max_prob;
  for (float& rung : ladder.threshold) rung = threshold *= 0.25f;
  const float t0 = ladder.threshold[0], t1 = ladder.threshold[1], t2 = ladder.threshold[2],
              t3 = ladder.threshold[3], t4 = ladder.threshold[4], t5 = ladder.threshold[5],
              t6 = ladder.threshold[6], t7 = ladder.threshold[7];
  float m0 = 0, m1 = 0, m2 = 0, m3 = 0, m4 = 0, m5 = 0, m6 = 0, m7 = 0;
#pragma omp simd reduction(+ : m0, m1, m2, m3, m4, m5, m6, m7)
  for (int64_t i = 0; i < vocab; ++i) {
    const float p = probs[i];
    m0 += p >= t0 ? p : 0.0f;
    m1 += p >= t1 ? p : 0.0f;
    m2 += p >= t2 ? p : 0.0f;
    m3 += p >= t3 ? p : 0.0f;
    m4 += p >= t4 ? p : 0.0f;
    m5 += p >= t5 ? p : 0.0f;
    m6 += p >= t6 ? p : 0.0f;
    m7 += p >= t7 ? p : 0.0f;
  }
  const float masses[Ladder::kRungs] = {m0, m1, m2, m3, m4, m5, m6, m7};
  std::copy(masses, masses + Ladder::kRungs, ladder.mass);
  return ladder;
}

// Smallest probability kept by top-p (keep x iff the mass of tokens with probability
// strictly greater than p(x) is < top_p, so the kept set is {p >= floor}). The nucleus
// usually sits far above the tail, so a ladder of thresholds max_prob * 4^-r finds a
// candidate set {p >= threshold} holding more than top_p of the mass; the exact
// selection then runs on those values, and on the whole row only as a fallback.
float top_p_floor(const float* probs, int64_t vocab, double top_p, float max_prob,
                  RowScratch& scratch) {
  if (max_prob >= top_p) return max_prob;
  float* candidates = scratch.candidates.data();
  float* gathered = scratch.gathered.data();
  const Ladder ladder = mass_ladder(probs, vocab, max_prob);
  for (int rung = 0; rung < Ladder::kRungs; ++rung) {
    if (ladder.mass[rung] < top_p + 1e-4) continue;
    if (count_at_least(probs, vocab, ladder.threshold[rung]) > vocab / 4) break;
    const size_t count = gather_at_least(probs, vocab, ladder.threshold[rung], candidates);
    const Floor floor = radix_floor(candidates, static_cast<int64_t>(count), top_p, gathered);
    if (floor.reached) return floor.value;
    break;
  }
  const Floor floor = radix_floor(probs, vocab, top_p, gathered);
  return floor.reached ? floor.value : 0.0f;  // total below top_p: every survivor stays
}

// Index of the first token whose probability equals max_prob (the most likely survivor).
int64_t first_equal(const float* probs, int64_t vocab, float max_prob) {
  for (int64_t start = 0; start < vocab; start += kScanBlock) {
    const int64_t stop = std::min(vocab, start + kScanBlock);
    int found = 0;
#pragma omp simd reduction(| : found)
    for (int64_t i = start; i < stop; ++i) found |= probs[i] == max_prob;
    if (!found) continue;
    for (int64_t i = start; i < stop; ++i)
      if (probs[i] == max_prob) return i;
  }
  return 0;
}

inline float race_key(float scaled, uint32_t hash) {
  return scaled + gumbel_from_uniform(uniform_from_hash(hash));
}

constexpr uint32_t kTopBucket = (1u << kBoundBits) - 1;

// Marks tokens with prob >= floor in the top hash bucket (Gumbel noise >= ~6.9, possibly
// infinite): few, and the likeliest to hold the winning key. Vectorised.
void mark_top_bucket(const float* __restrict probs, int64_t vocab, float floor, uint32_t key,
                     uint8_t* __restrict flags) {
  const auto count = static_cast<int32_t>(vocab);
  for (int32_t i = 0; i < count; ++i) {
    const uint32_t bucket = mix32(key ^ static_cast<uint32_t>(i)) >> (32 - kBoundBits);
    flags[i] = (probs[i] >= floor) & (bucket != kTopBucket ? 0 : 1);
  }
}

// Marks tokens with prob >= floor outside the top bucket whose scaled value plus the
// largest finite bucket bound reaches `lower_bound`, a key some kept token attains.
void mark_contenders(const float* __restrict scaled, const float* __restrict probs,
                     int64_t vocab, float floor, uint32_t key, float lower_bound,
                     uint8_t* __restrict flags) {
  const float finite_bound = gumbel_bounds()[kTopBucket - 1];
  const auto count = static_cast<int32_t>(vocab);
  for (int32_t i = 0; i < count; ++i) {
    const uint32_t bucket = mix32(key ^ static_cast<uint32_t>(i)) >> (32 - kBoundBits);
    const bool may_win = scaled[i] + finite_bound >= lower_bound;
    flags[i] = (probs[i] >= floor) & may_win & (bucket != kTopBucket);
  }
}

// The running argmax of the race: highest key, lowest index among equal keys, so tokens
// may be visited in any order.
struct RaceLeader {
  float key;
  int64_t token;

  void offer(const float* scaled, const float* bounds, uint32_t row_key, int64_t token_id) {
    const uint32_t hash = mix32(row_key ^ static_cast<uint32_t>(token_id));
    if (scaled[token_id] + bounds[hash >> (32 - kBoundBits)] < key) return;
    const float candidate = race_key(scaled[token_id], hash);
    if (candidate > key || (candidate == key && token_id < token)) {
      key = candidate;
      token = token_id;
    }
  }
};

// Offers every flagged token to the leader, skipping empty 8-byte words of flags.
void offer_flagged(const uint8_t* flags, int64_t vocab, const float* scaled, uint32_t row_key,
                   RaceLeader& leader) {
  const float* bounds = gumbel_bounds();
  for (int64_t start = 0; start < vocab; start += 8) {
    uint64_t word;
    std::memcpy(&word, flags + start, sizeof(word));
    if (word == 0) continue;
    for (int64_t i = start; i < start + 8 && i < vocab; ++i)
      if (flags[i]) leader.offer(scaled, bounds, row_key, i);
  }
}

// Exponential race over tokens with prob >= floor: argmax of scaled + Gumbel noise, lowest
// index on ties. The most likely survivor and the top-bucket tokens set a high bar first;
// then only tokens that could still clear it (few) get the two logs.
int64_t exponential_race(const float* scaled, const float* probs, int64_t vocab, float floor,
                         float max_prob, uint32_t key, uint8_t* flags) {
  const int64_t favourite = first_equal(probs, vocab, max_prob);
  RaceLeader leader{-kInf, favourite};
  leader.offer(scaled, gumbel_bounds(), key, favourite);
  mark_top_bucket(probs, vocab, floor, key, flags);
  offer_flagged(flags, vocab, scaled, key, leader);
  mark_contenders(scaled, probs, vocab, floor, key, leader.key, flags);
  offer_flagged(flags, vocab, scaled, key, leader);
  return leader.token;
}

struct RowParams {
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
  uint32_t key;
};

int64_t sample_row(const float* log_probs, int64_t vocab, const RowParams& params,
                   RowScratch& scratch) {
  if (!(params.temperature > 0.0f)) return argmax_first(log_probs, vocab);
  float* scaled = scratch.scaled.data();
  float* probs = scratch.probs.data();
  const float temperature = params.temperature;
  for (int64_t i = 0; i < vocab; ++i) scaled[i] = log_probs[i] / temperature;
  float threshold = -kInf;
  if (params.top_k > 0 && params.top_k < vocab)
    threshold = top_k_threshold(scaled, vocab, params.top_k, scratch);
  const float max_prob = kept_softmax(scaled, vocab, threshold, probs);
  if (max_prob < 0.0f) return 0;
  float floor = 0.0f;
  if (!(params.top_p >= 1.0f)) {
    if (!(params.top_p > 0.0f)) return 0;
    floor = top_p_floor(probs, vocab, static_cast<double>(params.top_p), max_prob, scratch);
  }
  if (!(params.min_p <= 0.0f)) {
    const float min_floor = params.min_p * max_prob;
    if (!(min_floor <= max_prob)) return 0;  // min_p > 1 or NaN keeps nothing
    floor = std::max(floor, min_floor);
  }
  return exponential_race(scaled, probs, vocab, floor, max_prob, params.key, scratch.flags.data());
}

}  // namespace

void sample(const float* log_probs, int64_t batch, int64_t vocab, const SampleParams& params,
            int64_t* tokens) {
  gumbel_bounds();
#ifdef LMARITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (batch * vocab >= detail::kParallelRowElements)
#endif
  for (int64_t row = 0; row < batch; ++row) {
    const RowParams row_params{params.temperature[row], params.top_k[row], params.top_p[row],
                               params.min_p[row], row_key(params.seed[row], params.step[row])};
    tokens[row] = sample_row(log_probs + row * vocab, vocab, row_params, thread_scratch(vocab));
  }
}

}  // namespace lmarith
