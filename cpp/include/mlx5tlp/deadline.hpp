// mlx5tlp/deadline.hpp — the one timeout type of the core: a saturating point in time.
//
// Every blocking call of the core takes a Deadline, never a raw duration, so that "forever",
// "do not wait" and "huge" mean the same thing everywhere:
//   Deadline::never()           waits until the condition holds (or the object closes);
//   Deadline::after(0ns)        is already expired: try once, never block;
//   Deadline::after(d)          saturates: a duration beyond the clock's range is never().
// Deadline::in_seconds() is the one conversion from a caller's number of seconds (Python's
// timeouts): NaN and negative values are refused with Error(invalid_argument) naming `what`;
// +inf and values beyond ~100 years mean never(). A deadline is fixed when it is made, so a
// bulk call that loops over chunks bounds the whole call, not each chunk.
//
// Thread-safety: a value type.
#pragma once

#include <time.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  static constexpr Deadline never() noexcept { return Deadline(Clock::time_point::max()); }
  // Expired already: the caller tries once and does not wait.
  static Deadline poll() noexcept { return Deadline(Clock::now()); }
  static Deadline after(std::chrono::nanoseconds d) noexcept {
    const auto now = Clock::now();
    if (d.count() <= 0) return Deadline(now);
    // Saturate instead of overflowing: anything past the clock's range is "never".
    const auto room = std::chrono::duration_cast<std::chrono::nanoseconds>(
        Clock::time_point::max() - now);
    if (d >= room) return never();
    return Deadline(now + std::chrono::duration_cast<Clock::duration>(d));
  }
  // Seconds from a caller: NaN / negative refused; +inf / > kMaxSeconds is never().
  static Deadline in_seconds(double seconds, const char* what = "timeout") {
    return after_or_never(duration_from_seconds(seconds, what));
  }

  // The duration form of in_seconds() (for settings such as a drain timeout that are stored
  // and turned into a deadline later): nanoseconds::max() stands for "forever".
  static std::chrono::nanoseconds duration_from_seconds(double seconds, const char* what) {
    if (std::isnan(seconds))
      throw Error(ErrorKind::invalid_argument, what, EINVAL,
                  std::string(what) + " is NaN: give seconds >= 0, or None/inf for no limit");
    if (seconds < 0)
      throw Error(ErrorKind::invalid_argument, what, EINVAL,
                  std::string(what) + " is negative (" + std::to_string(seconds) +
                      "): give seconds >= 0, or None/inf for no limit");
    if (seconds > kMaxSeconds) return std::chrono::nanoseconds::max();
    return std::chrono::nanoseconds(static_cast<int64_t>(seconds * 1e9));
  }
  // after(d), where nanoseconds::max() (duration_from_seconds' "forever") is never().
  static Deadline after_or_never(std::chrono::nanoseconds d) noexcept {
    return d == std::chrono::nanoseconds::max() ? never() : after(d);
  }

  bool is_never() const noexcept { return at_ == Clock::time_point::max(); }
  bool expired() const noexcept { return !is_never() && Clock::now() >= at_; }
  Clock::time_point at() const noexcept { return at_; }
  // Time left: 0 once expired, nanoseconds::max() for never().
  std::chrono::nanoseconds remaining() const noexcept {
    if (is_never()) return std::chrono::nanoseconds::max();
    const auto now = Clock::now();
    return now >= at_ ? std::chrono::nanoseconds(0)
                      : std::chrono::duration_cast<std::chrono::nanoseconds>(at_ - now);
  }
  // Relative timeout for futex(2)/ppoll(2); false for never() (pass no timeout).
  bool remaining_timespec(timespec* ts) const noexcept {
    if (is_never()) return false;
    const int64_t ns = remaining().count();
    ts->tv_sec = static_cast<time_t>(ns / 1000000000);
    ts->tv_nsec = static_cast<long>(ns % 1000000000);
    return true;
  }
  Deadline earliest(const Deadline& o) const noexcept { return at_ <= o.at_ ? *this : o; }

  // 100 years: beyond this a caller means "no limit", and nanosecond counts stay in range.
  static constexpr double kMaxSeconds = 100.0 * 365 * 24 * 3600;

 private:
  constexpr explicit Deadline(Clock::time_point at) noexcept : at_(at) {}
  Clock::time_point at_;
};

}  // namespace mlx5tlp
