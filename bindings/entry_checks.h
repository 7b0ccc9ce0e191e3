// What the pybind11 entries (bindings/module.cpp, layer_module.cpp, stack_module.cpp) share:
// addresses as typed pointers, the GGML block formats' sizes, and the checks that every
// address a kernel will read or write comes from sizes that keep it in bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lmarith {
namespace entry {

template <typename T>
T* address_as(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Values per block and bytes per block of quant_matmul's formats, by qtype code 0..6
// (q8_0 q4_0 q4_1 q4_k q6_k q5_0 q5_1; csrc QuantType).
constexpr int64_t kQuantBlock[] = {32, 32, 32, 256, 256, 32, 32};
constexpr int64_t kQuantBlockBytes[] = {34, 18, 20, 144, 210, 22, 24};
constexpr int kQuantTypes = 7;

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

// Paged-attention metadata must keep every read inside the cache: rows partition [0, N) in
// order, each sequence's query rows fit its context, and every page its context uses is a
// real page. Returns the longest context.
inline int64_t check_paged_metadata(const int64_t* query_start, const int64_t* context_lens,
                                    const int64_t* block_tables, int64_t num_seqs,
                                    int64_t table_width, int64_t num_tokens, int64_t page_size,
                                    int64_t num_pages) {
  require(query_start[0] == 0 && query_start[num_seqs] == num_tokens,
          "paged_attention: query_start must run from 0 to the number of query rows");
  int64_t longest = 0;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t q_len = query_start[seq + 1] - query_start[seq], ctx = context_lens[seq];
    require(q_len >= 0 && q_len <= ctx, "paged_attention: sequence " + std::to_string(seq) +
                                            " needs 0 <= query rows <= context length");
    const int64_t pages = (ctx + page_size - 1) / page_size;
    require(pages <= table_width, "paged_attention: block table too narrow for sequence " +
                                      std::to_string(seq));
    for (int64_t p = 0; q_len > 0 && p < pages; ++p) {
      const int64_t page = block_tables[seq * table_width + p];
      require(page >= 0 && page < num_pages, "paged_attention: page id " + std::to_string(page) +
                                                 " outside the cache's " +
                                                 std::to_string(num_pages) + " pages");
    }
    if (q_len > 0) longest = std::max(longest, ctx);
  }
  return longest;
}

// Every (page, offset) slot a store_kv writes lies inside a cache of num_pages pages of
// page_size slots (a negative page marks padding and is skipped).
inline void check_slots(const int64_t* pages, const int64_t* offsets, int64_t tokens,
                        int64_t num_pages, int64_t page_size) {
  for (int64_t n = 0; n < tokens; ++n)
    if (pages[n] >= num_pages || (pages[n] >= 0 && (offsets[n] < 0 || offsets[n] >= page_size)))
      throw std::invalid_argument("store_kv: token " + std::to_string(n) + "'s slot (" +
                                  std::to_string(pages[n]) + ", " + std::to_string(offsets[n]) +
                                  ") is outside the cache's pages");
}

}  // namespace entry
}  // namespace lmarith
