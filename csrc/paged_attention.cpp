// paged_attention: causal attention of a step's query rows over their sequences' paged K/V
// (kernels/reference_attention.py is the specification), reading every key and value row in
// place through the block table: no gather, no mask tensor.
//
// Work items are (row block, kv heads, context split) (csrc/attention_layout.h): a row block
// is consecutive query rows of one sequence; with the query heads of the item's kv heads it
// forms "lanes" (one query vector each) that share every K/V row read; decode items take all
// kv heads, so a slot's heads are read together. Each item runs one pass of
// online softmax (running max m, sum l, accumulator acc[D]) over its context range, tile by
// tile (csrc/attention_tile.h): a tile's K/V rows are located once and scored against every
// lane; the lanes of one query row (its GQA group) share each row's load and widening
// (attention_group.h). A lane's visible keys form one interval (causal end, sliding-window
// start), so no position outside it, in particular no slot past the context, is ever read.
// When there are too few items to keep the threads busy (decode at batch 1), the context is
// split and the partial (m, l, acc) of each split are merged afterwards (flash-decoding).
#include <algorithm>
#include <type_traits>
#include <vector>

#ifdef LMARITH_OPENMP
#include <omp.h>
#endif
#include "attention_layout.h"
#include "attention_team.h"
#include "attention_tile.h"
#include "kernels.h"

namespace lmarith {
namespace {

using attention::HeadRange;
using attention::Layout;
using attention::RowBlock;
using attention::Scratch;
using attention::float_to_bf16;
using attention::grouped;
using attention::kGroupLanes;
using attention::kTile;
using attention::load;
using attention::load_tile;
using attention::plan_layout;
using attention::split_range;
using attention::step_work;
using attention::update_group;
using attention::update_lane;
using detail::fast_exp;

constexpr int64_t kParallelWork = 1 << 19;  // below it, one thread runs the call

// Calls fn(lane, row, head) for the item's lanes: by kv head, then row, then group member,
// so the lanes of one kv head are consecutive.
template <typename Fn>
void for_each_lane(const PagedAttentionArgs& a, const RowBlock& block, HeadRange heads, Fn fn) {
  const int64_t group = a.num_heads / a.kv_heads;
  int64_t lane = 0;
  for (int64_t kv_head = heads.begin; kv_head < heads.end; ++kv_head)
    for (int64_t row = block.row_begin; row < block.row_end; ++row)
      for (int64_t g = 0; g < group; ++g) fn(lane++, row, kv_head * group + g);
}

// Load the item's lanes: queries scaled to float, positions, empty state.
void start_lanes(const PagedAttentionArgs& a, const RowBlock& block, HeadRange heads,
                 Scratch& s) {
  const int64_t dim = a.head_dim;
  for_each_lane(a, block, heads, [&](int64_t lane, int64_t row, int64_t head) {
    const int64_t base = row * a.query_row_stride + head * a.query_head_stride;
    for (int64_t d = 0; d < dim; ++d)
      s.query[lane * dim + d] = load(a.query, a.query_dtype, base + d) * a.scale;
    std::fill_n(s.acc.data() + lane * dim, dim, 0.0f);
    s.max[lane] = -detail::kInf, s.sum[lane] = 0.0f;
    s.position[lane] = block.first_pos + row - block.row_begin;
  });
}

// One pass of online softmax of the item's lanes over its context range: per tile, each kv
// head's rows are loaded once and folded into that head's lanes.
template <typename Cache>
void run_item(const PagedAttentionArgs& a, const RowBlock& block, HeadRange heads,
              int64_t split, int64_t splits, Scratch& s) {
  start_lanes(a, block, heads, s);
  const bool by_group = grouped(a);
  const int64_t head_lanes = (block.row_end - block.row_begin) * (a.num_heads / a.kv_heads);
  int64_t begin, end;
  split_range(a, block, split, splits, begin, end);
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t count = std::min(kTile, end - t0);
    for (int64_t kv_head = heads.begin; kv_head < heads.end; ++kv_head) {
      load_tile<Cache>(a, block.seq, kv_head, t0, count, end, by_group, s);
      const int64_t first_lane = (kv_head - heads.begin) * head_lanes;
      const int64_t last_lane = first_lane + head_lanes;
      for (int64_t lane = first_lane, lanes; lane < last_lane; lane += lanes) {
        const int64_t pos = s.position[lane];
        const int64_t lo = a.sliding_window > 0 ? std::max(t0, pos - a.sliding_window + 1) : t0;
        const int64_t hi = std::min(t0 + count, pos + 1);
        lanes = 1;
        if (!by_group) {
          if (lo < hi) update_lane(a, lane, t0, lo, hi, s);
          continue;
        }
        while (lanes < attention::kGroupLanes && lane + lanes < last_lane &&
               s.position[lane + lanes] == pos)
          ++lanes;  // a row's lanes (one per group member) see the same keys
        if (lo < hi) update_group<Cache>(a, lane, lanes, t0, lo, hi, s);
      }
    }
  }
}

// Write a normalised output row (acc / sum) in the query's dtype; a row that saw no key
// (impossible for valid metadata: a row always sees itself) is written as zeros.
void write_row(const PagedAttentionArgs& a, int64_t index, const float* acc, float sum) {
  const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
  const int64_t dim = a.head_dim;
  if (a.query_dtype == AttnDtype::kBFloat16) {
    uint16_t* out = static_cast<uint16_t*>(a.out) + index * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = float_to_bf16(acc[d] * inverse);
  } else {
    float* out = static_cast<float*>(a.out) + index * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] = acc[d] * inverse;
  }
}

// After an item: its lanes' rows either go straight to the output (one split) or to the
// partials [splits, N * H, 2 + D] (m, l, acc) that merge_row combines.
void finish_item(const PagedAttentionArgs& a, const RowBlock& block, HeadRange heads,
                 int64_t split, int64_t splits, const Scratch& s, float* partials) {
  const int64_t dim = a.head_dim, outputs = a.num_tokens * a.num_heads;
  for_each_lane(a, block, heads, [&](int64_t lane, int64_t row, int64_t head) {
    const int64_t index = row * a.num_heads + head;
    const float* acc = s.acc.data() + lane * dim;
    if (splits == 1) return write_row(a, index, acc, s.sum[lane]);
    float* part = partials + (split * outputs + index) * (dim + 2);
    part[0] = s.max[lane], part[1] = s.sum[lane];
    std::copy(acc, acc + dim, part + 2);
  });
}

// Combine the splits' (m, l, acc) of one output row: exp(m_k - M) rescales each part.
void merge_row(const PagedAttentionArgs& a, int64_t index, int64_t splits,
               const float* partials, float* acc) {
  const int64_t dim = a.head_dim, stride = a.num_tokens * a.num_heads * (dim + 2);
  const float* row = partials + index * (dim + 2);
  float top = -detail::kInf, sum = 0.0f;
  for (int64_t k = 0; k < splits; ++k) top = std::max(top, row[k * stride]);
  std::fill_n(acc, dim, 0.0f);
  for (int64_t k = 0; k < splits; ++k) {
    const float* part = row + k * stride;
    if (part[1] == 0.0f) continue;  // an empty split (its m is -inf)
    const float weight = fast_exp(part[0] - top);
    sum += part[1] * weight;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) acc[d] += part[2 + d] * weight;
  }
  write_row(a, index, acc, sum);
}

// A plan's item `item`: which row block, kv heads and context split it is, run and written
// (to the output, or to the partials when the context is split).
template <typename Cache>
void run_planned_item(const PagedAttentionArgs& a, const std::vector<RowBlock>& blocks,
                      const Layout& layout, int64_t item, Scratch& s, float* partials) {
  const int64_t splits = layout.splits;
  const RowBlock& block = blocks[item / (layout.head_chunks * splits)];
  const HeadRange heads = layout.heads(item / splits % layout.head_chunks, a.kv_heads);
  run_item<Cache>(a, block, heads, item % splits, splits, s);
  finish_item(a, block, heads, item % splits, splits, s, partials);
}

// Scratch sized for one item of the plan.
Scratch item_scratch(const PagedAttentionArgs& a, const Layout& layout) {
  return Scratch(layout.rows_per_block * (a.num_heads / a.kv_heads) * layout.heads_per_item,
                 a.head_dim);
}

template <typename Cache>
void paged_attention_typed(const PagedAttentionArgs& a) {
  std::vector<RowBlock> blocks;
  const Layout layout = plan_layout(a, blocks);
  const int64_t splits = layout.splits, per_block = layout.head_chunks * splits;
  const int64_t items = static_cast<int64_t>(blocks.size()) * per_block;
  const int64_t outputs = a.num_tokens * a.num_heads;
  std::vector<float> partials(splits > 1 ? splits * outputs * (a.head_dim + 2) : 0);
  const bool parallel = attention::num_threads() > 1 && step_work(a, blocks) >= kParallelWork;
#ifdef LMARITH_OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    Scratch scratch = item_scratch(a, layout);
#ifdef LMARITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < items; ++item)
      run_planned_item<Cache>(a, blocks, layout, item, scratch, partials.data());
    if (splits > 1) {
#ifdef LMARITH_OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
      for (int64_t index = 0; index < outputs; ++index)
        merge_row(a, index, splits, partials.data(), scratch.acc.data());
    }
  }
}

template <typename Cache>
void team_typed(const PagedAttentionArgs& a, int id, int size, SpinBarrier& barrier,
                AttentionTeamState& state) {
  if (id == 0) {
    state.layout = plan_layout(a, state.blocks, size);
    const int64_t outputs = a.num_tokens * a.num_heads;
    state.partials.resize(state.layout.splits > 1 ? state.layout.splits * outputs * (a.head_dim + 2) : 0);
  }
  barrier.wait();
  const Layout& layout = state.layout;
  const int64_t splits = layout.splits, per_block = layout.head_chunks * splits;
  const int64_t items = static_cast<int64_t>(state.blocks.size()) * per_block;
  Scratch scratch = item_scratch(a, layout);
  for (int64_t item = id; item < items; item += size)
    run_planned_item<Cache>(a, state.blocks, layout, item, scratch, state.partials.data());
  if (splits == 1) return;
  barrier.wait();
  const int64_t outputs = a.num_tokens * a.num_heads;
  for (int64_t index = id; index < outputs; index += size)
    merge_row(a, index, splits, state.partials.data(), scratch.acc.data());
}

}  // namespace

void paged_attention(const PagedAttentionArgs& args) {
  if (args.num_tokens == 0) return;
  if (args.cache_dtype == AttnDtype::kBFloat16)
    paged_attention_typed<uint16_t>(args);
  else
    paged_attention_typed<float>(args);
}

void paged_attention_team(const PagedAttentionArgs& args, int id, int size, SpinBarrier& barrier,
                          AttentionTeamState& state) {
  if (args.num_tokens == 0) return;
  if (args.cache_dtype == AttnDtype::kBFloat16)
    team_typed<uint16_t>(args, id, size, barrier, state);
  else
    team_typed<float>(args, id, size, barrier, state);
}

}  // namespace lmarith
