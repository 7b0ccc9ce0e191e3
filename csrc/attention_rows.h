// How csrc/paged_attention.cpp finds K and V rows in the paged cache: a walker over one kv
// head's positions through the block table, and the prefetch of a tile's rows.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lmarith {
namespace attention {

// Walks one kv head's K and V rows position by position: within a page the row pointers
// advance by the slot stride; the block table is read (and the page's rows located) only
// when a row of a new page is asked for, so no entry past the sequence's pages is read.
template <typename Cache>
class RowWalker {
 public:
  RowWalker(const PagedAttentionArgs& args, int64_t seq, int64_t kv_head, int64_t t)
      : a_(args), table_(args.block_tables + seq * args.table_width), head_(kv_head),
        page_(t / args.page_size), slot_(t % args.page_size) {}

  const Cache* key_row() {
    if (stale_) locate();
    return key_;
  }
  const Cache* value_row() {
    if (stale_) locate();
    return value_;
  }
  void next() {
    if (++slot_ == a_.page_size) {
      slot_ = 0, ++page_, stale_ = true;
    } else if (!stale_) {
      key_ += a_.key.slot_stride, value_ += a_.value.slot_stride;
    }
  }

 private:
  const Cache* row(const PagedCacheView& view) const {
    return static_cast<const Cache*>(view.data) + table_[page_] * view.page_stride +
           slot_ * view.slot_stride + head_ * view.head_stride;
  }
  void locate() { key_ = row(a_.key), value_ = row(a_.value), stale_ = false; }

  const PagedAttentionArgs& a_;
  const int64_t* table_;
  int64_t head_, page_, slot_;
  const Cache* key_ = nullptr;
  const Cache* value_ = nullptr;
  bool stale_ = true;
};

// Ask for positions [t, t + count)'s K and V rows early: pages are scattered, so the
// hardware prefetcher loses the stream at every page boundary.
template <typename Cache>
void prefetch_rows(const PagedAttentionArgs& a, int64_t seq, int64_t kv_head, int64_t t,
                   int64_t count) {
  const int64_t bytes = a.head_dim * static_cast<int64_t>(sizeof(Cache));
  for (RowWalker<Cache> walk(a, seq, kv_head, t); count > 0; --count, walk.next()) {
    const char* k = reinterpret_cast<const char*>(walk.key_row());
    const char* v = reinterpret_cast<const char*>(walk.value_row());
    for (int64_t byte = 0; byte < bytes; byte += 64)
      __builtin_prefetch(k + byte, 0, 2), __builtin_prefetch(v + byte, 0, 2);
  }
}

}  // namespace attention
}  // namespace lmarith
