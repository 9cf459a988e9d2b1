// The device model's checks of completions against the requests it sent (PCIe Base
// Specification, 2.2.9 Completion Rules and 2.3.1.1 Data Return for Read Requests): requester
// id + tag must match an outstanding non-posted request, memory-read byte counts count down to
// the remainder and lower addresses follow the first enabled byte, IO/config completions carry
// byte count 4 and lower address 0, UR/CA/CRS completions carry no data.
//
// Input is a private copy of a record (never the shared page). Not thread-safe: one host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>

#include "mlx5tlp/sim_abi.h"

namespace mlx5tlp::sim {

struct Outstanding {
  bool memory;         // MRd: byte counts split; IO/Cfg: a single completion with BC 4
  bool expects_data;   // a read
  uint32_t remaining;  // bytes still to be returned
  uint32_t next_la;    // expected lower address (7 bits) of the next completion
};

class Checker {
 public:
  m5a_sim_host_stats stats{};

  void track_request(const uint8_t* p, size_t len);
  void check_completion(const uint8_t* p, size_t len);
  // Counts an error and keeps its text (the last one) in stats.last_error.
  void fail(const char* fmt, uint32_t a, uint32_t b, uint32_t c) {
    ++stats.errors;
    std::snprintf(stats.last_error, sizeof stats.last_error, fmt, a, b, c);
  }

 private:
  std::map<uint32_t, Outstanding> outstanding;  // key: requester id << 16 | tag
};

}  // namespace mlx5tlp::sim
