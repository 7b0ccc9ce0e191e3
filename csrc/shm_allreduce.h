// ShmAllReduce: an in-place all-reduce among world_size processes of one host through a POSIX
// shared-memory segment (/dev/shm), for tensor parallelism on CPU where a gloo all-reduce of a
// few KiB costs a millisecond. No torch headers: callers pass a contiguous buffer's address.
//
// Segment layout: a header, one 64-byte-aligned flag per rank (its published call number and,
// per call parity, what it reduces), then 2 x world_size data slots of max_bytes each. In call
// k a rank copies its buffer into its slot of set k % 2, publishes k (release), waits until
// every rank published k (acquire), and reduces all of set k % 2 into its buffer. A rank can
// only start call k + 2 (rewriting set k % 2) after every rank published call k + 1, i.e.
// after every rank finished reading call k's slots. The creator unlinks the segment's name
// once the first call completes (every rank has mapped it by then), so a crash leaks nothing.
//
// Every rank sums (or maxes) the slots in rank order, out[i] = ((x0[i] + x1[i]) + x2[i]) + ...,
// in float32 for float32 and bfloat16 (bfloat16 is rounded once, to nearest even, at the end)
// and in float64 for float64, so all ranks get bit-identical results. max propagates NaN.
#pragma once

#include <cstdint>
#include <string>

namespace lmarith {

enum class ShmDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat64 = 2 };
enum class ShmOp : int { kSum = 0, kMax = 1 };

struct ShmHeader;
struct ShmFlag;

class ShmAllReduce {
 public:
  // create: this process makes the segment (rank 0 by convention), replacing a stale one of
  // the same name; otherwise it waits up to timeout_s for the creator to make it. The name
  // must be unique per group (a leading '/' is added when missing).
  ShmAllReduce(const std::string& name, int rank, int world_size, int64_t max_bytes, bool create,
               double timeout_s);
  ~ShmAllReduce();
  ShmAllReduce(const ShmAllReduce&) = delete;
  ShmAllReduce& operator=(const ShmAllReduce&) = delete;

  // Reduce numel elements at data in place over all ranks; every rank must make the same
  // calls in the same order. Throws std::runtime_error when a peer does not arrive within
  // timeout_s (this call's, when positive, else the object's; the object is unusable
  // afterwards) or when the ranks' calls disagree.
  void all_reduce(void* data, int64_t numel, ShmDtype dtype, ShmOp op, double timeout_s = -1.0);

  // Unmap the segment; its creator also unlinks the name if that is not done yet.
  void close();

  const std::string& name() const { return name_; }
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int64_t max_bytes() const { return max_bytes_; }
  bool closed() const { return base_ == nullptr; }

 private:
  void create_segment();
  void open_segment();
  void map_segment(int fd);
  void wait_for_peers(uint64_t call, double timeout_s);
  void check_peers_agree(uint64_t call, uint64_t meta);
  void unlink_name();
  char* slot(uint64_t call, int rank) const;

  std::string name_;
  int rank_;
  int world_size_;
  int64_t max_bytes_;
  int64_t slot_stride_;
  bool creator_;
  bool linked_ = false;
  bool broken_ = false;
  double timeout_s_;
  uint64_t calls_ = 0;
  std::size_t size_ = 0;
  char* base_ = nullptr;
  ShmHeader* header_ = nullptr;
  ShmFlag* flags_ = nullptr;
  char* data_ = nullptr;
};

}  // namespace lmarith
