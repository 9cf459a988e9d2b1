// The software-device scaffolding of bench_gateway: locating the sim library, a private device,
// pre-built records, and timing helpers.
#pragma once

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx5tlp/context.hpp"

namespace mlx5tlp_bench {

using namespace mlx5tlp;
using Clock = std::chrono::steady_clock;
constexpr size_t kRecordBytes = 32;  // a CplD with 5 DW of payload: 12-byte header + 20 bytes
constexpr size_t kRawSlot = 64;         // "raw_tlp:64"
constexpr size_t kBatchRecords = 4096;  // pre-built records, reused round-robin
constexpr size_t kPostBatch = 32;       // records per post_batch() in the loop benchmarks

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

inline bool file_exists(const std::string& p) {
  struct stat st{};
  return ::stat(p.c_str(), &st) == 0;
}

// The installed package keeps the programs in mlx5tlp/bin and the sim library in mlx5tlp/.
inline void locate_sim_library() {
  const char* env = std::getenv("MLX5TLP_SIM_LIB");
  if (env != nullptr && *env != '\0') return;
  char exe[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return;
  exe[n] = '\0';
  std::string dir(exe);
  dir.resize(dir.rfind('/'));
  for (const std::string& cand : {dir + "/libmlx5tlp_sim.so", dir + "/../libmlx5tlp_sim.so"}) {
    if (file_exists(cand)) {
      ::setenv("MLX5TLP_SIM_LIB", cand.c_str(), 1);
      return;
    }
  }
}

// A private software device, removed (with its directory, if we made it) on destruction.
struct SimDevice {
  std::string name, made_dir;
  std::shared_ptr<const Library> lib;

  SimDevice() {
    const char* env = std::getenv("MLX5TLP_SIM_DIR");
    if (env == nullptr || *env == '\0') {
      const char* tmp = std::getenv("TMPDIR");
      std::string tmpl = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") +
                         "/mlx5tlp-bench-XXXXXX";
      std::vector<char> buf(tmpl.begin(), tmpl.end());
      buf.push_back('\0');
      if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
      made_dir = buf.data();
      ::setenv("MLX5TLP_SIM_DIR", made_dir.c_str(), 1);
    }
    lib = Library::get(Backend::sim);
    name = "bench_gw_" + std::to_string(::getpid());
    m5a_sim_device_config cfg{};
    cfg.tlp = 1;
    cfg.gw_pages = 4;
    cfg.gw_log_stride = 4;  // 64 KiB pages: many slots
    cfg.virtio_pages = 0;
    cfg.gw_slot_size = 64;  // sim slots: 8-byte header + a 32-byte record fit
    cfg.gw_bar_offset = 0x200000;
    const int rc = lib->sym().sim.create_device(name.c_str(), &cfg);
    if (rc != 0) throw std::runtime_error("create software device: " + std::string(std::strerror(rc)));
  }
  ~SimDevice() {
    lib->sym().sim.remove_device(name.c_str());
    if (!made_dir.empty()) ::rmdir(made_dir.c_str());
  }
  SimDevice(const SimDevice&) = delete;
  SimDevice& operator=(const SimDevice&) = delete;
};

// Records: buffer + offsets + lengths, all kRecordBytes long, distinct contents.
struct Records {
  std::vector<uint8_t> buf;
  std::vector<uint32_t> off, len;
  explicit Records(size_t n) : buf(n * kRecordBytes), off(n), len(n, uint32_t(kRecordBytes)) {
    for (size_t i = 0; i < n; ++i) {
      off[i] = uint32_t(i * kRecordBytes);
      for (size_t b = 0; b < kRecordBytes; ++b) buf[i * kRecordBytes + b] = uint8_t(i * 7 + b);
    }
  }
};

}  // namespace mlx5tlp_bench
