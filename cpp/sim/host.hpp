// The device model's private state (host.cpp) and the one way records leave a gateway page
// (host_take), shared by the per-record poll and the native load generator (host_load.cpp).
#pragma once

#include <cstdint>
#include <memory>

#include "device_map.hpp"
#include "host_check.hpp"
#include "mlx5tlp/unique_fd.hpp"
#include "state.hpp"

struct m5a_sim_host {
  std::shared_ptr<mlx5tlp::sim::DeviceMap> dev;
  mlx5tlp::UniqueFd lock_fd;  // our OFD of bar: holds the host lock byte
  uint32_t next_page = 0;
  uint64_t gen[mlx5tlp::sim::kMaxGwPages] = {};       // allocation generation our consumed[] belongs to
  uint64_t consumed[mlx5tlp::sim::kMaxGwPages] = {};  // records consumed (private: the page's copy is hostile)
  uint64_t bad_doorbell[mlx5tlp::sim::kMaxGwPages];  // the last backward doorbell counted, per page (~0: none)

  m5a_sim_host() {
    for (auto& b : bad_doorbell) b = ~uint64_t(0);
  }
  mlx5tlp::sim::Checker check;

  ~m5a_sim_host() {
    if (lock_fd) mlx5tlp::sim::close_in_child(lock_fd.get(), false);
  }
};

namespace mlx5tlp::sim {

// A record copied out of a gateway page: `len` bytes of TLP at `data` (a private copy).
struct TakenRecord {
  uint32_t page;
  uint32_t len;
  uint64_t seq;
  const uint8_t* data;
};

// Copies up to `max` records of the next page (round robin) that has any into `buf` (`max`
// slots of the device's slot size), with every bound of mlx5tlp_sim_host_poll, and gives their
// credits back to the writer once for the batch. Returns how many (0: no page had one). Bad
// records and doorbells are counted in h.check.stats (bad_records, last_error) and in *bad.
uint32_t host_take(m5a_sim_host& h, uint8_t* buf, uint32_t max, TakenRecord* out, uint64_t* bad);

}  // namespace mlx5tlp::sim
