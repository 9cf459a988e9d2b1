// Shared by the libFuzzer targets: a property check that stops the run as a crash (libFuzzer
// then saves the input as crash-<sha1>), and helpers over TLP fields.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "mlx5tlp/tlp.hpp"

// abort(), not an exception: libFuzzer reports any deadly signal with the input that caused it.
#define FUZZ_CHECK(cond, ...)                                                   \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "%s:%d: property violated: %s: ", __FILE__, __LINE__, \
                   #cond);                                                      \
      std::fprintf(stderr, __VA_ARGS__);                                        \
      std::fprintf(stderr, "\n");                                               \
      std::abort();                                                             \
    }                                                                           \
  } while (0)

namespace fuzz {

using mlx5tlp::tlp::Kind;
using mlx5tlp::tlp::Tlp;

inline bool is_completion(Kind k) {
  return k == Kind::Cpl || k == Kind::CplD || k == Kind::CplLk || k == Kind::CplDLk;
}
inline bool is_message(Kind k) { return k == Kind::Msg || k == Kind::MsgD; }
inline bool is_cfg(Kind k) {
  return k == Kind::CfgRd0 || k == Kind::CfgWr0 || k == Kind::CfgRd1 || k == Kind::CfgWr1;
}
inline bool is_mem(Kind k) { return k == Kind::MRd || k == Kind::MRdLk || k == Kind::MWr; }

// Whether two TLPs carry the same fields, payload bytes compared (not pointers). The first
// differing field's name goes to *what.
inline bool same(const Tlp& a, const Tlp& b, const char** what) {
#define FUZZ_FIELD(f)             \
  if (a.f != b.f) {               \
    *what = #f;                   \
    return false;                 \
  }
  FUZZ_FIELD(kind) FUZZ_FIELD(fmt) FUZZ_FIELD(type) FUZZ_FIELD(tc) FUZZ_FIELD(attr)
  FUZZ_FIELD(td) FUZZ_FIELD(ep) FUZZ_FIELD(length) FUZZ_FIELD(requester_id)
  FUZZ_FIELD(completer_id) FUZZ_FIELD(tag) FUZZ_FIELD(first_be) FUZZ_FIELD(last_be)
  FUZZ_FIELD(address) FUZZ_FIELD(dest_id) FUZZ_FIELD(status) FUZZ_FIELD(bcm)
  FUZZ_FIELD(byte_count) FUZZ_FIELD(lower_address) FUZZ_FIELD(message_code)
  FUZZ_FIELD(routing) FUZZ_FIELD(digest) FUZZ_FIELD(data_len)
#undef FUZZ_FIELD
  if (a.data_len != 0 && std::memcmp(a.data, b.data, a.data_len) != 0) {
    *what = "data";
    return false;
  }
  return true;
}

}  // namespace fuzz
