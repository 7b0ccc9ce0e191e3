// One tile of csrc/paged_attention.cpp's online softmax: the per-thread scratch, locating
// (and prefetching) a tile's K/V rows, and folding the tile into one lane (attention_simd.h)
// or into a group of lanes that see the same keys (attention_group.h).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_group.h"
#include "attention_rows.h"
#include "attention_simd.h"
#include "kernels.h"

namespace lmarith {
namespace attention {

using detail::fast_exp;

constexpr int64_t kTile = 32;        // context positions located and scored together
constexpr int64_t kScoreStride = kTile + 16;  // one lane's scores in a group's tile

// Whether lanes go through attention_group.h's shared-row tiles (else one lane at a time).
// LMARITH_ATTENTION_GROUPS=0 keeps the per-lane path (for A/B runs).
inline bool grouped(const PagedAttentionArgs& a) {
  static const bool enabled = [] {
    const char* knob = std::getenv("LMARITH_ATTENTION_GROUPS");
    return !(knob && std::string(knob) == "0");
  }();
  return kHasGroupTiles && enabled && a.head_dim % 16 == 0;
}

// Per-thread state of one item: lanes' scaled queries, positions and online-softmax state,
// plus one tile's K/V rows: as float pointers (into the cache, or widened copies for
// bfloat16) for the per-lane path, as the cache's own rows for grouped tiles.
struct Scratch {
  std::vector<float> query, acc, max, sum, key_rows, value_rows, scores;
  std::vector<int64_t> position;
  const float* keys[kTile];
  const float* values[kTile];
  const void* raw_keys[kTile];
  const void* raw_values[kTile];
  const void* ahead_keys[kTile];    // the next tile's rows, for grouped tiles' prefetch
  const void* ahead_values[kTile];
  int64_t ahead_count = 0;          // rows of them not yet prefetched
  Scratch(int64_t lanes, int64_t dim)
      : query(lanes * dim), acc(lanes * dim), max(lanes), sum(lanes), key_rows(kTile * dim),
        value_rows(kTile * dim), scores(kGroupLanes * kScoreStride), position(lanes) {}
};

// Locate the next tile's K and V rows (below end) for update_group to prefetch.
template <typename Cache>
void locate_ahead(const PagedAttentionArgs& a, int64_t seq, int64_t kv_head, int64_t t0,
                  int64_t end, Scratch& s) {
  s.ahead_count = std::max<int64_t>(0, std::min(kTile, end - t0));
  RowWalker<Cache> walk(a, seq, kv_head, t0);
  for (int64_t t = 0; t < s.ahead_count; ++t, walk.next())
    s.ahead_keys[t] = walk.key_row(), s.ahead_values[t] = walk.value_row();
}

// Locate the K and V rows of positions [t0, t0 + count) (widening bfloat16 ones to float
// unless `raw`: grouped tiles read the cache's rows), and prefetch (or, raw, locate) the
// next tile's.
template <typename Cache>
void load_tile(const PagedAttentionArgs& a, int64_t seq, int64_t kv_head, int64_t t0,
               int64_t count, int64_t end, bool raw, Scratch& s) {
  if (raw)
    locate_ahead<Cache>(a, seq, kv_head, t0 + kTile, end, s);
  else
    prefetch_rows<Cache>(a, seq, kv_head, t0 + kTile, std::min(kTile, end - t0 - kTile));
  RowWalker<Cache> walk(a, seq, kv_head, t0);
  for (int64_t t = 0; t < count; ++t, walk.next()) {
    const Cache* k = walk.key_row();
    const Cache* v = walk.value_row();
    if (raw) {
      s.raw_keys[t] = k, s.raw_values[t] = v;
    } else if constexpr (std::is_same_v<Cache, float>) {
      s.keys[t] = k, s.values[t] = v;
    } else {
      float* kw = s.key_rows.data() + t * a.head_dim;
      float* vw = s.value_rows.data() + t * a.head_dim;
#pragma omp simd
      for (int64_t d = 0; d < a.head_dim; ++d) kw[d] = bf16_to_float(k[d]), vw[d] = bf16_to_float(v[d]);
      s.keys[t] = kw, s.values[t] = vw;
    }
  }
}

// Fold tile positions [lo, hi) (absolute; inside the lane's visible interval) into one lane:
// score them, raise the running max, rescale the old state by exp(old max - new max).
inline void update_lane(const PagedAttentionArgs& a, int64_t lane, int64_t t0, int64_t lo,
                        int64_t hi, Scratch& s) {
  const int64_t dim = a.head_dim, count = hi - lo;
  float* scores = s.scores.data();
  score_keys(s.query.data() + lane * dim, s.keys + (lo - t0), count, dim, scores);
  float tile_max = -detail::kInf;
#pragma omp simd reduction(max : tile_max)
  for (int64_t t = 0; t < count; ++t) tile_max = std::max(tile_max, scores[t]);
  const float new_max = std::max(s.max[lane], tile_max);
  const float alpha = fast_exp(s.max[lane] - new_max);  // 0 while the lane saw nothing
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < count; ++t) {
    scores[t] = fast_exp(scores[t] - new_max);
    sum += scores[t];
  }
  accumulate_values(s.acc.data() + lane * dim, alpha, scores, s.values + (lo - t0), count, dim);
  s.max[lane] = new_max, s.sum[lane] = s.sum[lane] * alpha + sum;
}

// Fold tile positions [lo, hi) into `lanes` consecutive lanes that see the same keys, with
// each K/V row read once for all of them (attention_group.h).
template <typename Cache>
void update_group(const PagedAttentionArgs& a, int64_t lane, int64_t lanes, int64_t t0,
                  int64_t lo, int64_t hi, Scratch& s) {
  const int64_t dim = a.head_dim, count = hi - lo, bytes = dim * sizeof(Cache);
  const Ahead ahead_keys{s.ahead_keys, s.ahead_count, bytes};
  const Ahead ahead_values{s.ahead_values, s.ahead_count, bytes};
  s.ahead_count = 0;  // the tile's first group prefetches them, the others need not
  float* scores = s.scores.data();
  score_lanes<Cache>(lanes, s.query.data() + lane * dim, s.raw_keys + (lo - t0), count, dim,
                     scores, kScoreStride, ahead_keys);
  float alpha[kGroupLanes];
  for (int64_t l = 0; l < lanes; ++l) {
    float* lane_scores = scores + l * kScoreStride;
    const float new_max = std::max(s.max[lane + l], max_of(lane_scores, count));
    alpha[l] = fast_exp(s.max[lane + l] - new_max);  // 0 while the lane saw nothing
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) lane_scores[t] = fast_exp(lane_scores[t] - new_max);
    s.sum[lane + l] = s.sum[lane + l] * alpha[l] + sum_of(lane_scores, count);
    s.max[lane + l] = new_max;
  }
  accumulate_lanes<Cache>(lanes, s.acc.data() + lane * dim, alpha, scores, kScoreStride,
                          s.raw_values + (lo - t0), count, dim, ahead_values);
}

}  // namespace attention
}  // namespace lmarith
