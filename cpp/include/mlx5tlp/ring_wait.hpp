// mlx5tlp/ring_wait.hpp — how producers of a full ring block and are woken (used by ring.hpp).
//
// RoomWaiters is the blocking half of the ring: a producer that finds no room spins briefly
// (the consumer is probably running and frees slots within a few hundred nanoseconds), then
// registers as a waiter and sleeps on a futex; the consumer, after handing slots back, wakes
// the waiters only when there are any: on its hot path that costs one load of a line that
// nobody writes while nobody waits. shut_down() wakes everyone for good (a closing gateway).
//
// No lost wake-up (a Dekker pair; all four operations are seq_cst, one total order):
//   consumer: tail.store(new_tail) ; n = waiters.load() ; if n (and room): seq.fetch_add(1), WAKE
//   producer: waiters.fetch_add(1) ; s = seq.load() ; look at tail ; FUTEX_WAIT(seq, s)
// Either the consumer's load sees the registration (and it wakes: the bump makes a FUTEX_WAIT
// on the old value return at once), or the registration comes later in the total order, and
// then the producer's look at tail sees the new tail and it does not sleep. The consumer wakes
// only once a useful amount of room is free (hysteresis: producers then move many records per
// wake-up instead of the consumer and the producers taking turns per batch); whenever it stops
// consuming it wakes them for any room at all (Ring::wake_waiters), so no waiter sleeps while
// room sits unused.
//
// Thread-safety: wait()/shut_down() from any thread; notify() from the ring's consumer.
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>
#include <thread>

#include "mlx5tlp/deadline.hpp"
#include "mlx5tlp/futex.hpp"

namespace mlx5tlp {

inline constexpr std::size_t kCacheLine = 64;

namespace ring_detail {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Polling step i = 0, 1, 2, ... of a thread that has nothing to block on (tests, benchmarks, a
// layout without a wake-up mechanism): 64 PAUSE spins (the other side is probably running right
// now), then yields (it may need our core). Never a sleep: the core's waiters block on futexes
// and are woken; they do not guess how long to sleep.
inline void backoff(unsigned i) noexcept {
  if (i < 64) cpu_relax();
  else std::this_thread::yield();
}

// PAUSE spins a blocking producer makes (re-trying) before it sleeps on the futex.
inline constexpr unsigned kSpinBeforeSleep = 128;

}  // namespace ring_detail

// Outcome of a blocking push.
enum class PushStatus : uint8_t {
  pushed,     // everything was pushed
  timed_out,  // the deadline passed with the ring still full
  too_long,   // a record longer than slot_bytes() (or null with a length): never pushed
  shut_down,  // shutdown() was called while (or before) the producer had to wait
};

class RoomWaiters {
 public:
  // A producer with no room. `attempt()` tries to push (true: done); `has_room()` looks at the
  // consumer's index with seq_cst loads (the producer half of the Dekker pair).
  template <class Attempt, class HasRoom>
  PushStatus wait(const Deadline& deadline, Attempt& attempt, HasRoom&& has_room) noexcept {
    // relaxed (all statistics here): nothing is ordered by them.
    stats_.full_waits.fetch_add(1, std::memory_order_relaxed);
    if (deadline.expired()) {  // do not wait at all: one more try
      if (attempt()) return PushStatus::pushed;
      stats_.push_timeouts.fetch_add(1, std::memory_order_relaxed);
      return PushStatus::timed_out;
    }
    for (unsigned i = 0; i < ring_detail::kSpinBeforeSleep; ++i) {
      if (is_shut_down()) return PushStatus::shut_down;
      ring_detail::cpu_relax();
      if (attempt()) return PushStatus::pushed;
    }
    // seq_cst: the registration half of the Dekker pair (see the top of this file).
    line_.waiters.fetch_add(1, std::memory_order_seq_cst);
    PushStatus st = PushStatus::timed_out;
    for (;;) {
      // seq_cst: after our registration in the total order; pairs with shut_down()'s store.
      if (line_.shut.load(std::memory_order_seq_cst) != 0) {
        st = PushStatus::shut_down;
        break;
      }
      // seq_cst: read BEFORE looking for room, so that a wake-up after our look changes it.
      const uint32_t seq = line_.seq.load(std::memory_order_seq_cst);
      if (attempt()) {
        st = PushStatus::pushed;
        break;
      }
      if (has_room()) continue;  // room appeared, but another producer took it first
      stats_.sleeps.fetch_add(1, std::memory_order_relaxed);
      // Blocking point: until the consumer frees slots, shut_down(), or the deadline.
      if (!futex_wait(line_.seq, seq, deadline)) {
        st = attempt() ? PushStatus::pushed : PushStatus::timed_out;
        break;
      }
    }
    // release: the consumer only tests the count for zero; nothing is read through it.
    line_.waiters.fetch_sub(1, std::memory_order_release);
    if (st == PushStatus::timed_out) stats_.push_timeouts.fetch_add(1, std::memory_order_relaxed);
    return st;
  }

  // The consumer, right after its seq_cst store of the new tail: wakes the waiters if there are
  // any and `enough()` (enough room to be worth a wake-up: see BasicRing::hand_back).
  template <class Enough>
  void notify(Enough&& enough) noexcept {
    // seq_cst: the consumer half of the Dekker pair; a plain load on x86 and Arm (ldar).
    if (line_.waiters.load(std::memory_order_seq_cst) != 0 && enough()) {
      stats_.wakes.fetch_add(1, std::memory_order_relaxed);
      wake_all();
    }
  }

  void shut_down() noexcept {
    // seq_cst: a waiter checks shut after registering and before sleeping; the bump in
    // wake_all() then makes a FUTEX_WAIT on the old value return at once.
    line_.shut.store(1, std::memory_order_seq_cst);
    wake_all();
  }
  bool is_shut_down() const noexcept {
    // acquire: pairs with shut_down(); nothing else is read through it.
    return line_.shut.load(std::memory_order_acquire) != 0;
  }

  uint64_t full_waits() const noexcept { return stats_.full_waits.load(std::memory_order_relaxed); }
  uint64_t push_timeouts() const noexcept {
    return stats_.push_timeouts.load(std::memory_order_relaxed);
  }
  uint64_t sleeps() const noexcept { return stats_.sleeps.load(std::memory_order_relaxed); }
  uint64_t wakes() const noexcept { return stats_.wakes.load(std::memory_order_relaxed); }

 private:
  void wake_all() noexcept {
    // seq_cst: a waiter that read seq before this bump finds FUTEX_WAIT's value check failing;
    // one that reads it after sees our tail (or shut) store.
    line_.seq.fetch_add(1, std::memory_order_seq_cst);
    futex_wake(line_.seq, INT_MAX);
  }

  // Written only when a producer has to sleep or the consumer wakes one: in steady state the
  // consumer's load in notify() hits a clean line.
  struct alignas(kCacheLine) Line {
    std::atomic<uint32_t> waiters{0};  // producers registered in wait()
    std::atomic<uint32_t> seq{0};      // the futex word: bumped by every wake-up
    std::atomic<uint32_t> shut{0};     // shut_down() was called
  };
  struct alignas(kCacheLine) Stats {
    std::atomic<uint64_t> full_waits{0};     // blocking pushes that found the ring full
    std::atomic<uint64_t> push_timeouts{0};  // ... and gave up at their deadline
    std::atomic<uint64_t> sleeps{0};         // futex waits of producers
    std::atomic<uint64_t> wakes{0};          // notify() calls that woke producers
  };
  static_assert(sizeof(Line) == kCacheLine && sizeof(Stats) == kCacheLine, "one line each");
  Line line_;
  Stats stats_;
};

}  // namespace mlx5tlp
