// The native load generator's pieces (host_load.cpp runs them): the validated job, the request
// builder and the per-read bookkeeping that every completion is checked against.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx5tlp/sim_abi.h"

namespace mlx5tlp::sim {

constexpr uint32_t kLoadBlock = 256;  // write-vs-outstanding-read tracking granule (bytes)

struct LoadRange {
  uint64_t address = 0, size = 0;
  std::vector<uint8_t> image;      // private copy of the expected contents, our writes applied
  std::vector<uint16_t> readers;   // outstanding reads per kLoadBlock bytes
};

// A validated m5a_sim_load_spec: every field checked, defaults applied, the images copied.
struct LoadJob {
  m5a_sim_load_spec spec{};
  std::vector<LoadRange> ranges;
  uint32_t weight_total = 0;
  bool has_writes = false;
};

// Checks `in` (EINVAL + last_error naming the field) and copies the ranges (ENOMEM). 0 or errno.
int load_job_init(const m5a_sim_load_spec& in, LoadJob& job);

// One request about to be sent.
struct LoadOp {
  uint32_t kind = 0, size = 0, range = 0;
  uint64_t address = 0;
};

// Encodes a Memory Read/Write Request header (3DW below 4 GiB, else 4DW) for [address,
// address + size) with the byte enables it needs; writes take `size` bytes of payload from
// `data`. Returns the TLP length.
size_t encode_request(uint8_t* out, const LoadOp& op, uint16_t requester_id, uint32_t tag,
                      const uint8_t* data);

// xorshift64*: cheap, deterministic per seed.
struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  uint64_t below(uint64_t n) { return n <= 1 ? 0 : next() % n; }
};

// A random op of the mix (address chosen in a random range, aligned, not crossing 4 KiB).
LoadOp pick_op(const LoadJob& job, Rng& rng);

}  // namespace mlx5tlp::sim
