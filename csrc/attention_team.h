// paged_attention run by all threads of a team that is already running (the decoder stack's
// decode step, csrc/decoder_stack.cpp): the lead plans the items, every thread runs its share
// of them and of the merge, meeting at the team's barrier, so a step's attention uses every
// core without waking OpenMP's team per layer. Results equal paged_attention's for the same
// plan (the same items, each computed by one thread).
#pragma once

#include <vector>

#include "attention_layout.h"
#include "kernels.h"
#include "spin_barrier.h"

namespace lmarith {

// What the lead plans and every member reads: one per team, reused layer after layer.
struct AttentionTeamState {
  std::vector<attention::RowBlock> blocks;
  attention::Layout layout{};
  std::vector<float> partials;
};

// Every member calls it with the same args; it returns after the member's share of the merge
// (the caller synchronises before reading the output).
void paged_attention_team(const PagedAttentionArgs& args, int id, int size, SpinBarrier& barrier,
                          AttentionTeamState& state);

}  // namespace lmarith
