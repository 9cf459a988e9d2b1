// Minimal test support for the C++ tests: CHECK, CHECK_THROWS_KIND / _ERRNO, a failure count
// that any thread may bump, and which sanitizer (if any) the test was built with.
#pragma once

#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "mlx5tlp/error.hpp"

#if defined(__SANITIZE_THREAD__)
#define MLX5TLP_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MLX5TLP_TEST_TSAN 1
#endif
#endif
#ifndef MLX5TLP_TEST_TSAN
#define MLX5TLP_TEST_TSAN 0
#endif
#if defined(__SANITIZE_ADDRESS__)
#define MLX5TLP_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MLX5TLP_TEST_ASAN 1
#endif
#endif
#ifndef MLX5TLP_TEST_ASAN
#define MLX5TLP_TEST_ASAN 0
#endif

namespace mlx5tlp_test {

inline std::atomic<int>& failures() {
  static std::atomic<int> n{0};
  return n;
}

inline int finish(const char* name) {
  const int n = failures().load();
  if (n == 0) std::printf("%s: all checks passed\n", name);
  else std::printf("%s: %d check(s) FAILED\n", name, n);
  return n == 0 ? 0 : 1;
}

constexpr int kAnyKind = -1;

// Runs f(), which must throw mlx5tlp::Error of kind `kind` (kAnyKind: any) and errno `err`
// (0: any errno).
template <typename F>
void check_throws(const char* file, int line, const char* text, F&& f, int kind, int err) {
  try {
    f();
  } catch (const mlx5tlp::Error& e) {
    if ((kind != kAnyKind && int(e.kind()) != kind) || (err != 0 && e.error_number() != err)) {
      std::fprintf(stderr, "%s:%d: %s threw kind %d errno %d (%s)\n", file, line, text,
                   int(e.kind()), e.error_number(), e.what());
      ++failures();
    }
    return;
  }
  std::fprintf(stderr, "%s:%d: %s did not throw\n", file, line, text);
  ++failures();
}

}  // namespace mlx5tlp_test

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++mlx5tlp_test::failures();                                                    \
    }                                                                                \
  } while (0)

#define CHECK_THROWS_KIND(stmt, k, err)                                                  \
  mlx5tlp_test::check_throws(__FILE__, __LINE__, #stmt, [&] { stmt; }, int(k), (err))

#define CHECK_THROWS_ERRNO(stmt, err)                                                    \
  mlx5tlp_test::check_throws(__FILE__, __LINE__, #stmt, [&] { stmt; },                   \
                             mlx5tlp_test::kAnyKind, (err))
