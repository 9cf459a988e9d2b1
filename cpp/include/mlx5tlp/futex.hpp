// mlx5tlp/futex.hpp — blocking on a 32-bit word until another thread (or process) wakes it.
//
// The core's one blocking primitive for waiters that must be woken rather than poll: a producer
// on a full ring, a flush() caller, the gateway's idle writer, and (shared, across processes)
// the writer waiting for the software device's consumer index. Linux futex(2):
//   futex_wait(word, expected, deadline, shared)  blocks while *word == expected, until woken,
//                                                 until the deadline, or spuriously;
//   futex_wake(word, n, shared)                   wakes up to n waiters of word.
// The caller always re-checks its condition after futex_wait returns (wake-ups may be spurious,
// and FUTEX_WAIT returns at once when *word != expected: that is what closes the window between
// "I looked and must wait" and "I sleep"). `shared`: false for process-private words (faster:
// no page lookup), true for a word in a MAP_SHARED mapping that other processes wake.
//
// Thread-safety: free functions; the word is an atomic the caller owns.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>

#include "mlx5tlp/deadline.hpp"

namespace mlx5tlp {

static_assert(sizeof(std::atomic<uint32_t>) == 4 && std::atomic<uint32_t>::is_always_lock_free,
              "a futex word is a lock-free 32-bit atomic");

namespace futex_detail {
inline long call(const volatile void* word, int op, uint32_t val, const timespec* ts) noexcept {
  return ::syscall(SYS_futex, word, op, val, ts, nullptr, 0);
}
}  // namespace futex_detail

// Blocks while *word == expected (checked atomically by the kernel), at most until `deadline`.
// Returns false only when the deadline passed; true on a wake-up, a changed value (EAGAIN),
// a signal (EINTR) or a spurious return: the caller re-checks its condition either way.
inline bool futex_wait(const void* word, uint32_t expected, const Deadline& deadline,
                       bool shared) noexcept {
  if (deadline.expired()) return false;
  timespec ts{};
  const bool timed = deadline.remaining_timespec(&ts);
  const int op = shared ? FUTEX_WAIT : (FUTEX_WAIT | FUTEX_PRIVATE_FLAG);
  // Blocking point: the thread sleeps in the kernel until woken, the value differs, or the
  // relative timeout (recomputed from the deadline) elapses.
  const long rc = futex_detail::call(word, op, expected, timed ? &ts : nullptr);
  if (rc == 0) return true;
  return errno != ETIMEDOUT;
}

inline bool futex_wait(const std::atomic<uint32_t>& word, uint32_t expected,
                       const Deadline& deadline, bool shared = false) noexcept {
  return futex_wait(static_cast<const void*>(&word), expected, deadline, shared);
}

// Wakes up to n waiters (INT_MAX: all). Returns how many were woken (0 on error).
inline int futex_wake(const void* word, int n, bool shared) noexcept {
  const int op = shared ? FUTEX_WAKE : (FUTEX_WAKE | FUTEX_PRIVATE_FLAG);
  const long rc = futex_detail::call(word, op, static_cast<uint32_t>(n), nullptr);
  return rc > 0 ? static_cast<int>(rc) : 0;
}

inline int futex_wake(const std::atomic<uint32_t>& word, int n = INT_MAX,
                      bool shared = false) noexcept {
  return futex_wake(static_cast<const void*>(&word), n, shared);
}

}  // namespace mlx5tlp
