#include "last_error.hpp"

#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "state.hpp"

namespace mlx5tlp::sim {

namespace {
thread_local char t_message[512];
}

int fail(int err, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(t_message, sizeof t_message, fmt, ap);
  va_end(ap);
  errno = err;
  return err;
}

void clear_error() noexcept { t_message[0] = '\0'; }

const char* last_error() noexcept { return t_message; }

}  // namespace mlx5tlp::sim

// Copies the calling thread's last error message (NUL-terminated, truncated to len) and
// returns its full length.
M5A_EXPORT size_t mlx5tlp_sim_last_error(char* buf, size_t len) {
  const char* m = mlx5tlp::sim::last_error();
  const size_t n = std::strlen(m);
  if (buf != nullptr && len > 0) {
    const size_t k = n < len - 1 ? n : len - 1;
    std::memcpy(buf, m, k);
    buf[k] = '\0';
  }
  return n;
}
