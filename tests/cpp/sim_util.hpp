// Helpers for the software-device tests that talk to libmlx5tlp_sim.so through the raw C ABI
// (resolved by the core's loader): raw contexts, devices, gateway-page writes in the sim layout
// (docs/sim.md), config-read requests and their completions, and a scratch device directory.
#pragma once

#include <fcntl.h>
#include <ftw.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/loader.hpp"

namespace simtest {

inline const mlx5tlp::Library& lib() { return *mlx5tlp::Library::get(mlx5tlp::Backend::sim); }
inline const mlx5tlp::Symbols& sym() { return lib().sym(); }
inline const mlx5tlp::SimSymbols& ss() { return sym().sim; }

inline std::string last_error() {
  char buf[512] = "";
  if (ss().last_error != nullptr) ss().last_error(buf, sizeof buf);
  return buf;
}

inline m5a_sim_device_config config(uint32_t gw_pages = 4, uint32_t log_stride = 0, uint32_t virtio = 4,
                                    uint32_t slot = 256, uint32_t flags = 0, uint32_t tlp = 1) {
  m5a_sim_device_config c{};
  c.tlp = tlp;
  c.gw_pages = gw_pages;
  c.gw_log_stride = log_stride;
  c.virtio_pages = virtio;
  c.gw_slot_size = slot;
  c.flags = flags;
  c.gw_bar_offset = 0x200000;
  return c;
}

inline void make_device(const char* name, const m5a_sim_device_config& c) {
  const int rc = ss().create_device(name, &c);
  CHECK(rc == 0);
  if (rc != 0) std::fprintf(stderr, "create %s: %d %s\n", name, rc, last_error().c_str());
}

// A raw DEVX context on `name` (nullptr, errno set, on failure).
inline m5a_ibv_context* open_raw(const char* name) {
  int n = 0;
  m5a_ibv_device** list = sym().ibv_get_device_list(&n);
  if (list == nullptr) return nullptr;
  m5a_ibv_context* c = nullptr;
  errno = ENODEV;
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(sym().ibv_get_device_name(list[i]), name) != 0) continue;
    m5a_mlx5dv_context_attr attr{};
    attr.flags = M5A_MLX5DV_CONTEXT_FLAGS_DEVX;
    c = sym().mlx5dv_open_device(list[i], &attr);
  }
  const int err = errno;
  sym().ibv_free_device_list(list);
  errno = err;
  return c;
}

inline m5a_sim_device_stats stats(const char* name) {
  m5a_sim_device_stats s{};
  CHECK(ss().query_device(name, nullptr, &s) == 0);
  return s;
}

// ---- the sim gateway page layout (docs/sim.md) ----
constexpr size_t kDoorbell = 0x00, kSlotCount = 0x10, kConsumer = 0x40, kWriterWaiting = 0x48,
                 kSlots = 0x80;

inline void* map_page(m5a_ibv_context* ctx, m5a_mlx5dv_var* v) {
  void* p = ss().mmap(ctx, v->length, PROT_READ | PROT_WRITE, MAP_SHARED, v->mmap_off);
  CHECK(p != MAP_FAILED);
  return p;
}

inline uint64_t load64(const void* page, size_t off) {
  return __atomic_load_n(reinterpret_cast<const uint64_t*>(static_cast<const uint8_t*>(page) + off),
                         __ATOMIC_ACQUIRE);
}

// Writes `rec` into the next slot (after the doorbell count) without publishing it.
inline uint64_t write_slot(void* page, uint32_t slot_size, const std::vector<uint8_t>& rec) {
  auto* p = static_cast<uint8_t*>(page);
  const uint64_t produced = load64(page, kDoorbell);
  uint32_t count;
  std::memcpy(&count, p + kSlotCount, 4);
  uint8_t* slot = p + kSlots + size_t(produced % count) * slot_size;
  const uint32_t hdr[2] = {uint32_t(rec.size()), 0};
  std::memcpy(slot, hdr, 8);
  std::memcpy(slot + 8, rec.data(), rec.size());
  return produced + 1;
}

// The doorbell: publish everything up to `produced`.
inline void ring(void* page, uint64_t produced) {
  __atomic_store_n(reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(page) + kDoorbell), produced,
                   __ATOMIC_RELEASE);
}

// Configuration Read Type 0 from requester `rid` with `tag` (a non-posted request).
inline std::vector<uint8_t> cfgrd0(uint16_t rid, uint8_t tag) {
  return {0x04, 0x00, 0x00, 0x01, uint8_t(rid >> 8), uint8_t(rid), tag, 0x0f, 0x01, 0x00, 0x00, 0x10};
}

// Its successful completion with data (CplD, byte count 4, lower address 0).
inline std::vector<uint8_t> cpld_for(const uint8_t* req) {
  return {0x4a, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x04, req[4], req[5], req[6], 0x00,
          0x11, 0x22, 0x33, 0x44};
}

inline int rm_entry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }
inline void rmtree(const std::string& dir) { nftw(dir.c_str(), rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

// A scratch MLX5TLP_SIM_DIR for the whole test program, removed at exit.
class ScratchDir {
 public:
  ScratchDir() {
    char tmpl[] = "/tmp/mlx5tlp-simtest-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) std::abort();
    path_ = tmpl;
    setenv("MLX5TLP_SIM_DIR", path_.c_str(), 1);
  }
  ~ScratchDir() { rmtree(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace simtest
