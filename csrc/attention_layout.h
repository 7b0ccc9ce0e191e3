// Work layout of csrc/paged_attention.cpp: how one step's query rows, kv heads and context
// are cut into items for the thread team.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef LMARITH_OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace lmarith {
namespace attention {

constexpr int64_t kMaxLanes = 64;    // query vectors per item (rows x group heads)
constexpr int64_t kMinSplit = 256;   // fewest context positions worth a split of their own
constexpr int64_t kItemsPerThread = 8;

// A block of consecutive query rows of one sequence: rows [row_begin, row_end) of the flat
// batch, the first at absolute position first_pos; context = the sequence's cached length.
struct RowBlock {
  int64_t seq, row_begin, row_end, first_pos, context;
};

inline std::vector<RowBlock> row_blocks(const PagedAttentionArgs& a, int64_t rows_per_block) {
  std::vector<RowBlock> blocks;
  for (int64_t seq = 0; seq < a.num_seqs; ++seq) {
    const int64_t begin = a.query_start[seq], end = a.query_start[seq + 1];
    const int64_t first = a.context_lens[seq] - (end - begin);
    for (int64_t row = begin; row < end; row += rows_per_block)
      blocks.push_back({seq, row, std::min(end, row + rows_per_block), first + row - begin,
                        a.context_lens[seq]});
  }
  return blocks;
}

// The kv heads [begin, end) an item covers: all of them when its lanes are few (decode),
// so each slot's heads are read together, as one contiguous run of the cache.
struct HeadRange {
  int64_t begin, end;
};

// The context positions split `split` of `splits` of a block covers: the block's visible
// range [window start of its first row, its last row's position] cut into equal parts.
inline void split_range(const PagedAttentionArgs& a, const RowBlock& block, int64_t split,
                 int64_t splits, int64_t& begin, int64_t& end) {
  const int64_t last = block.first_pos + (block.row_end - block.row_begin);  // exclusive
  const int64_t first = a.sliding_window > 0
                            ? std::max<int64_t>(0, block.first_pos - a.sliding_window + 1) : 0;
  begin = first + (last - first) * split / splits;
  end = first + (last - first) * (split + 1) / splits;
}

// Threads an attention call may use: one when called from inside a running team (the
// decoder stack's), whose other threads are busy or waiting.
inline int64_t num_threads() {
#ifdef LMARITH_OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// Splits per item: enough items for every one of `threads`, each split at least kMinSplit
// positions.
inline int64_t choose_splits(const PagedAttentionArgs& a, int64_t base_items, int64_t threads) {
  const int64_t wanted = (kItemsPerThread * threads + base_items - 1) / base_items;
  return std::max<int64_t>(1, std::min(wanted, a.max_context_len / kMinSplit));
}

// Multiply-adds of the step (lanes x visible positions x head_dim, twice): below
// kParallelWork, waking the thread team costs more than it saves.
inline int64_t step_work(const PagedAttentionArgs& a, const std::vector<RowBlock>& blocks) {
  int64_t work = 0;
  for (const RowBlock& block : blocks) {
    int64_t begin, end;
    split_range(a, block, 0, 1, begin, end);
    work += (block.row_end - block.row_begin) * (end - begin);
  }
  return 2 * work * a.num_heads * a.head_dim;
}

// How a step is cut into items: query rows per block, kv heads per item (all of them for
// few rows), and context splits.
struct Layout {
  int64_t rows_per_block, heads_per_item, head_chunks, splits;
  HeadRange heads(int64_t chunk, int64_t kv_heads) const {
    return {chunk * heads_per_item, std::min(kv_heads, (chunk + 1) * heads_per_item)};
  }
};

// `threads`: the threads that will run the items (a running team's size, else ours).
inline Layout plan_layout(const PagedAttentionArgs& a, std::vector<RowBlock>& blocks,
                          int64_t threads = num_threads()) {
  const int64_t group = a.num_heads / a.kv_heads;
  int64_t longest = 1;
  for (int64_t seq = 0; seq < a.num_seqs; ++seq)
    longest = std::max(longest, a.query_start[seq + 1] - a.query_start[seq]);
  Layout layout{};
  layout.rows_per_block = std::max<int64_t>(1, std::min(longest, kMaxLanes / group));
  layout.heads_per_item = std::clamp<int64_t>(kMaxLanes / (layout.rows_per_block * group), 1,
                                              a.kv_heads);
  layout.head_chunks = (a.kv_heads + layout.heads_per_item - 1) / layout.heads_per_item;
  blocks = row_blocks(a, layout.rows_per_block);
  const int64_t base_items = static_cast<int64_t>(blocks.size()) * layout.head_chunks;
  layout.splits = choose_splits(a, std::max<int64_t>(1, base_items), threads);
  return layout;
}

}  // namespace attention
}  // namespace lmarith
