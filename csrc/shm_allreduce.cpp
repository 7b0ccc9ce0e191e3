// ShmAllReduce (shm_allreduce.h): the segment's life cycle, the publish/wait protocol and the
// rank-ordered reduction. Waiting spins briefly with a CPU pause, then yields the core, then
// sleeps on a futex that the late rank's publish wakes, so ranks sharing cores with each other
// (or with other processes) still progress: a woken sleeper preempts a CPU hog at once, where a
// yielding rank would wait out the hog's time slice.
#include "shm_allreduce.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lmarith {

constexpr uint64_t kMagic = 0x6c6d617231415202ull;  // "lmar" "AR", layout version 2

struct alignas(64) ShmHeader {
  std::atomic<uint64_t> ready{0};  // kMagic once the creator has filled in the header
  int64_t world_size = 0;
  int64_t max_bytes = 0;
  alignas(64) std::atomic<int32_t> sleepers{0};  // ranks asleep on some rank's call word
};

struct alignas(64) ShmFlag {
  std::atomic<uint32_t> call{0};     // the last call this rank published (mod 2^32; a futex)
  std::atomic<uint64_t> meta[2]{};   // what it reduces in its call of each parity
};

static_assert(std::atomic<uint64_t>::is_always_lock_free && sizeof(std::atomic<uint32_t>) == 4,
              "shared-memory atomics must be lock-free and plain-sized");

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kMaxRanks = 64;
constexpr int kSpins = 512;               // pauses (~15 us on current x86) before yielding
constexpr double kYieldSeconds = 50e-6;   // then yield this long before sleeping on a futex
constexpr double kSleepSeconds = 0.01;    // longest single futex sleep (re-checks the timeout)
constexpr int64_t kChunk = 1024;          // elements reduced per pass (accumulator in L1)

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string seconds(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3g s", value);
  return text;
}

std::runtime_error system_error(const std::string& what, int error) {
  return std::runtime_error(what + ": " + std::strerror(error));
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Shared (not process-private) futex operations on a word of the mapped segment.
void futex_wait(std::atomic<uint32_t>& word, uint32_t seen, double timeout_s) {
  const auto nanos = static_cast<long>(timeout_s * 1e9);
  const timespec limit{nanos / 1000000000L, nanos % 1000000000L};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT, seen, &limit, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr,
          0);
}

// Whether a published call word has reached call (wrap-safe: ranks are at most one apart).
inline bool reached(uint32_t seen, uint64_t call) {
  return static_cast<int32_t>(seen - static_cast<uint32_t>(call)) >= 0;
}

// Waits until word reaches call: kSpins pauses (a peer on another core arrives in
// microseconds), then sched_yield for kYieldSeconds (a peer sharing this core gets to run),
// then futex sleeps, which the peer's publish wakes and which let the scheduler run the peer
// or anything else meanwhile. Returns the seconds waited past the spinning, or -1 once that
// exceeds timeout_s.
double wait_for(std::atomic<uint32_t>& word, uint64_t call, std::atomic<int32_t>& sleepers,
                double timeout_s) {
  for (int spin = 0; spin < kSpins; ++spin) {
    if (reached(word.load(std::memory_order_acquire), call)) return 0.0;
    cpu_relax();
  }
  const auto start = Clock::now();
  for (;;) {
    if (reached(word.load(std::memory_order_acquire), call)) return seconds_since(start);
    const double waited = seconds_since(start);
    if (waited > timeout_s) return -1.0;
    if (waited < kYieldSeconds) {
      sched_yield();
      continue;
    }
    sleepers.fetch_add(1, std::memory_order_seq_cst);   // pairs with publish()'s check
    const uint32_t seen = word.load(std::memory_order_seq_cst);
    if (!reached(seen, call)) futex_wait(word, seen, std::min(kSleepSeconds, timeout_s - waited));
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }
}

// Polls ready() every millisecond for up to timeout_s; false if it never became true.
template <typename Ready>
bool poll_for(Ready ready, double timeout_s) {
  const auto start = Clock::now();
  while (!ready()) {
    if (seconds_since(start) > timeout_s) return false;
    const timespec nap{0, 1000000};
    nanosleep(&nap, nullptr);
  }
  return true;
}

inline float widen(float value) { return value; }
inline double widen(double value) { return value; }
inline float widen(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline void narrow(float value, float* out) { *out = value; }
inline void narrow(double value, double* out) { *out = value; }
// Round to nearest even, NaN to the canonical quiet NaN: torch's float -> bfloat16.
inline void narrow(float value, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  *out = nan ? 0x7fc0 : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

template <bool kMax, typename Acc>
inline Acc combine(Acc acc, Acc value) {
  if constexpr (kMax) return (value > acc || value != value) ? value : acc;  // NaN wins
  else return acc + value;
}

// out = slots[0] (op) slots[1] (op) ... left to right, accumulated in Acc, rounded once.
template <bool kMax, typename T, typename Acc>
void reduce_slots(const char* const* slots, int world_size, int64_t numel, T* out) {
  Acc acc[kChunk];
  for (int64_t start = 0; start < numel; start += kChunk) {
    const int64_t count = std::min(kChunk, numel - start);
    const T* first = reinterpret_cast<const T*>(slots[0]) + start;
    for (int64_t i = 0; i < count; ++i) acc[i] = widen(first[i]);
    for (int rank = 1; rank < world_size; ++rank) {
      const T* part = reinterpret_cast<const T*>(slots[rank]) + start;
      for (int64_t i = 0; i < count; ++i) acc[i] = combine<kMax, Acc>(acc[i], widen(part[i]));
    }
    for (int64_t i = 0; i < count; ++i) narrow(acc[i], out + start + i);
  }
}

template <bool kMax>
void reduce_dtype(const char* const* slots, int ranks, int64_t n, ShmDtype dtype, void* out) {
  if (dtype == ShmDtype::kFloat32)
    reduce_slots<kMax, float, float>(slots, ranks, n, static_cast<float*>(out));
  else if (dtype == ShmDtype::kBFloat16)
    reduce_slots<kMax, uint16_t, float>(slots, ranks, n, static_cast<uint16_t*>(out));
  else
    reduce_slots<kMax, double, double>(slots, ranks, n, static_cast<double*>(out));
}

int64_t element_size(ShmDtype dtype) {
  const int code = static_cast<int>(dtype);
  if (code < 0 || code > 2)
    throw std::invalid_argument("shm all_reduce: dtype must be 0 (f32), 1 (bf16) or 2 (f64)");
  return code == 0 ? 4 : code == 1 ? 2 : 8;
}

// "N elements, dtype D, op O" for a published meta word (numel << 8 | dtype << 4 | op).
std::string describe(uint64_t meta) {
  return std::to_string(meta >> 8) + " elements, dtype " + std::to_string(meta >> 4 & 15) +
         ", op " + std::to_string(meta & 15);
}

std::string segment_name(const std::string& name) {
  const std::string full = (!name.empty() && name[0] == '/') ? name : "/" + name;
  if (full.size() < 2 || full.size() > 255 || full.find('/', 1) != std::string::npos)
    throw std::invalid_argument("shm all_reduce: name must be 1-254 characters without '/', "
                                "got '" + name + "'");
  return full;
}

}  // namespace

ShmAllReduce::ShmAllReduce(const std::string& name, int rank, int world_size, int64_t max_bytes,
                           bool create, double timeout_s)
    : name_(segment_name(name)), rank_(rank), world_size_(world_size), max_bytes_(max_bytes),
      slot_stride_(round_up(max_bytes, 64)), creator_(create), timeout_s_(timeout_s) {
  if (world_size < 1 || world_size > kMaxRanks || rank < 0 || rank >= world_size)
    throw std::invalid_argument("shm all_reduce: need 1 <= world_size <= " +
                                std::to_string(kMaxRanks) + " and 0 <= rank < world_size");
  if (max_bytes <= 0 || max_bytes > (int64_t{1} << 40) / world_size)
    throw std::invalid_argument("shm all_reduce: need 0 < max_bytes <= 2^40 / world_size");
  if (!(timeout_s > 0)) throw std::invalid_argument("shm all_reduce: need timeout_s > 0");
  const int64_t flags_bytes = world_size * int64_t{sizeof(ShmFlag)};
  const int64_t data_offset = round_up(int64_t{sizeof(ShmHeader)} + flags_bytes, 4096);
  size_ = static_cast<std::size_t>(data_offset + 2 * world_size * slot_stride_);
  try {
    create ? create_segment() : open_segment();
  } catch (...) {
    close();
    throw;
  }
  flags_ = reinterpret_cast<ShmFlag*>(base_ + sizeof(ShmHeader));
  data_ = base_ + data_offset;
}

ShmAllReduce::~ShmAllReduce() { close(); }

// A fresh, zeroed segment whose pages are reserved now (a full /dev/shm fails here, not with
// SIGBUS later); a stale segment left by a dead creator of the same name is replaced.
void ShmAllReduce::create_segment() {
  int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0 && errno == EEXIST) {
    shm_unlink(name_.c_str());
    fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  }
  if (fd < 0) throw system_error("shm all_reduce: cannot create " + name_, errno);
  linked_ = true;
  const int error = ftruncate(fd, static_cast<off_t>(size_)) != 0 ? errno
                    : posix_fallocate(fd, 0, static_cast<off_t>(size_));
  if (error != 0) {
    ::close(fd);
    throw system_error("shm all_reduce: cannot reserve " + std::to_string(size_) +
                       " bytes of /dev/shm for " + name_, error);
  }
  map_segment(fd);
  header_ = new (base_) ShmHeader();
  for (int rank = 0; rank < world_size_; ++rank)
    new (base_ + sizeof(ShmHeader) + rank * sizeof(ShmFlag)) ShmFlag();
  header_->world_size = world_size_;
  header_->max_bytes = max_bytes_;
  header_->ready.store(kMagic, std::memory_order_release);
}

// Waits (up to timeout_s) for the creator's segment to exist, be sized and be filled in.
void ShmAllReduce::open_segment() {
  const auto start = Clock::now();
  int fd = -1;
  struct stat info {};
  const bool sized = poll_for([&] {
    if (fd >= 0) ::close(fd);
    fd = shm_open(name_.c_str(), O_RDWR, 0);
    if (fd < 0 && errno != ENOENT)
      throw system_error("shm all_reduce: cannot open " + name_, errno);
    return fd >= 0 && fstat(fd, &info) == 0 && info.st_size > 0;
  }, timeout_s_);
  if (!sized) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("shm all_reduce: rank " + std::to_string(rank_) +
                             " found no segment " + name_ + " within " + seconds(timeout_s_) +
                             "; did its creator (rank 0) start?");
  }
  if (info.st_size != static_cast<off_t>(size_)) {
    ::close(fd);
    throw std::runtime_error("shm all_reduce: segment " + name_ + " has " +
                             std::to_string(info.st_size) + " bytes, expected " +
                             std::to_string(size_) +
                             "; do all ranks pass the same world_size and max_bytes?");
  }
  map_segment(fd);
  header_ = reinterpret_cast<ShmHeader*>(base_);
  const auto ready = [&] { return header_->ready.load(std::memory_order_acquire) == kMagic; };
  if (!poll_for(ready, timeout_s_ - seconds_since(start)))
    throw std::runtime_error("shm all_reduce: segment " + name_ + " was never initialised");
  if (header_->world_size != world_size_ || header_->max_bytes != max_bytes_)
    throw std::runtime_error("shm all_reduce: segment " + name_ + " was made for world_size " +
                             std::to_string(header_->world_size) + ", max_bytes " +
                             std::to_string(header_->max_bytes));
}

void ShmAllReduce::map_segment(int fd) {
  void* base = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int error = errno;
  ::close(fd);
  if (base == MAP_FAILED) throw system_error("shm all_reduce: cannot map " + name_, error);
  base_ = static_cast<char*>(base);
}

char* ShmAllReduce::slot(uint64_t call, int rank) const {
  return data_ + ((call & 1) * world_size_ + rank) * slot_stride_;
}

void ShmAllReduce::all_reduce(void* data, int64_t numel, ShmDtype dtype, ShmOp op,
                              double timeout_s) {
  if (closed()) throw std::runtime_error("shm all_reduce " + name_ + ": closed");
  if (broken_)
    throw std::runtime_error("shm all_reduce " + name_ + ": unusable after an earlier failure");
  const int64_t itemsize = element_size(dtype);
  if (op != ShmOp::kSum && op != ShmOp::kMax)
    throw std::invalid_argument("shm all_reduce: op must be 0 (sum) or 1 (max)");
  if (numel < 0 || numel > max_bytes_ / itemsize)
    throw std::invalid_argument("shm all_reduce: " + std::to_string(numel) +
                                " elements exceed max_bytes " + std::to_string(max_bytes_));
  const uint64_t call = ++calls_, parity = call & 1;
  const uint64_t meta = static_cast<uint64_t>(numel) << 8 | static_cast<uint64_t>(dtype) << 4 |
                        static_cast<uint64_t>(op);
  if (numel > 0) std::memcpy(slot(call, rank_), data, numel * itemsize);
  ShmFlag& mine = flags_[rank_];
  mine.meta[parity].store(meta, std::memory_order_relaxed);
  mine.call.store(static_cast<uint32_t>(call), std::memory_order_seq_cst);
  if (header_->sleepers.load(std::memory_order_seq_cst) > 0) futex_wake(mine.call);
  wait_for_peers(call, timeout_s > 0 ? timeout_s : timeout_s_);
  check_peers_agree(call, meta);
  const char* parts[kMaxRanks];
  for (int rank = 0; rank < world_size_; ++rank) parts[rank] = slot(call, rank);
  if (op == ShmOp::kSum) reduce_dtype<false>(parts, world_size_, numel, dtype, data);
  else reduce_dtype<true>(parts, world_size_, numel, dtype, data);
  if (creator_ && linked_) unlink_name();  // every peer has mapped the segment by now
}

// Every peer's publication of call, within timeout_s for all of them together.
void ShmAllReduce::wait_for_peers(uint64_t call, double timeout_s) {
  double budget = timeout_s;
  for (int peer = 0; peer < world_size_; ++peer) {
    if (peer == rank_) continue;
    const double waited = wait_for(flags_[peer].call, call, header_->sleepers, budget);
    if (waited >= 0) {
      budget -= waited;
      continue;
    }
    broken_ = true;
    const uint32_t behind = static_cast<uint32_t>(call) - flags_[peer].call.load();
    throw std::runtime_error(
        "shm all_reduce " + name_ + ": rank " + std::to_string(rank_) + " waited " +
        seconds(timeout_s) + " (timeout) for rank " + std::to_string(peer) + " to reach call " +
        std::to_string(call) + " (it is at call " + std::to_string(call - behind) +
        "); is that process alive? This all-reduce group is unusable now");
  }
}

void ShmAllReduce::check_peers_agree(uint64_t call, uint64_t meta) {
  for (int peer = 0; peer < world_size_; ++peer) {
    const uint64_t theirs = flags_[peer].meta[call & 1].load(std::memory_order_relaxed);
    if (theirs == meta) continue;
    broken_ = true;
    throw std::runtime_error("shm all_reduce " + name_ + ": at call " + std::to_string(call) +
                             " rank " + std::to_string(peer) + " reduces " + describe(theirs) +
                             " but rank " + std::to_string(rank_) + " " + describe(meta));
  }
}

void ShmAllReduce::unlink_name() {
  shm_unlink(name_.c_str());
  linked_ = false;
}

void ShmAllReduce::close() {
  if (creator_ && linked_) unlink_name();
  if (base_ != nullptr) munmap(base_, size_);
  base_ = nullptr;
  header_ = nullptr;
  flags_ = nullptr;
  data_ = nullptr;
}

}  // namespace lmarith
