// Minimal test support for the C++ tests: CHECK / CHECK_THROWS_KIND and a failure count.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace mlx5tlp_test {
inline int& failures() {
  static int n = 0;
  return n;
}
inline int finish(const char* name) {
  if (failures() == 0) std::printf("%s: all checks passed\n", name);
  else std::printf("%s: %d check(s) FAILED\n", name, failures());
  return failures() == 0 ? 0 : 1;
}
}  // namespace mlx5tlp_test

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++mlx5tlp_test::failures();                                               \
    }                                                                           \
  } while (0)

// Runs `stmt`, which must throw mlx5tlp::Error of kind `k` (and errno `err` when non-zero).
#define CHECK_THROWS_KIND(stmt, k, err)                                                   \
  do {                                                                                    \
    bool thrown_ = false;                                                                 \
    try {                                                                                 \
      stmt;                                                                               \
    } catch (const mlx5tlp::Error& e_) {                                                  \
      thrown_ = true;                                                                     \
      if (e_.kind() != (k) || ((err) != 0 && e_.error_number() != (err))) {              \
        std::fprintf(stderr, "%s:%d: %s threw kind %d errno %d (%s)\n", __FILE__, __LINE__, \
                     #stmt, int(e_.kind()), e_.error_number(), e_.what());                \
        ++mlx5tlp_test::failures();                                                       \
      }                                                                                   \
    }                                                                                     \
    if (!thrown_) {                                                                       \
      std::fprintf(stderr, "%s:%d: %s did not throw\n", __FILE__, __LINE__, #stmt);     \
      ++mlx5tlp_test::failures();                                                         \
    }                                                                                     \
  } while (0)
