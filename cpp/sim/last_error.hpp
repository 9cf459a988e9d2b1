// Why the calling thread's last failing software-device call failed, in words: the errno the
// C ABI returns says what kind of failure it was; this says which path, field or limit.
// Read through mlx5tlp_sim_last_error (sim_abi.h). Thread-local: no locking, no allocation.
#pragma once

#include <cerrno>

namespace mlx5tlp::sim {

// Records the message (printf-style) for this thread, sets errno = err and returns err.
int fail(int err, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// Forgets the message (a call that succeeds leaves no stale reason behind).
void clear_error() noexcept;
// The message of the last fail() on this thread ("" if none since clear_error()).
const char* last_error() noexcept;

}  // namespace mlx5tlp::sim
