// SpinBarrier: a barrier among the threads of a team that is already running (the decoder
// stack's one OpenMP team per decode step). OpenMP's own barrier under
// OMP_WAIT_POLICY=passive puts a waiting thread to sleep in the kernel, and waking it costs
// ~50-100 us on the 2-core hosts measured, more than a decode GEMV takes; this one spins
// (with pause) for a bounded time, then yields the core, so a thread preempted by another
// process does not leave its partner burning a core for long; such long waits are reported,
// so the caller can stop running as a team while the machine is contended.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lmarith {

class SpinBarrier {
 public:
  // Every thread calls join(team size) before its first wait (all pass the same size).
  void join(int threads) { threads_.store(threads, std::memory_order_release); }

  // Waits for the team; a wait longer than kLongWait (a partner preempted: another process
  // wants the core) is remembered in contended().
  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 ==
        threads_.load(std::memory_order_acquire)) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    bool yielding = false;
    for (int64_t spins = 1; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (yielding) {
        std::this_thread::yield();
      } else {
        pause();
      }
      if (spins % 256 == 0) {
        const auto waited = std::chrono::steady_clock::now() - start;
        yielding = waited > kSpinFor;
        if (waited > kLongWait) contended_.store(true, std::memory_order_relaxed);
      }
    }
  }

  bool contended() const { return contended_.load(std::memory_order_relaxed); }

 private:
  static constexpr std::chrono::microseconds kSpinFor{200};    // then yield the core
  static constexpr std::chrono::microseconds kLongWait{4000};  // longer than a quiet step's hiccups
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }
  std::atomic<int> threads_{0}, arrived_{0}, generation_{0};
  std::atomic<bool> contended_{false};
};

}  // namespace lmarith
