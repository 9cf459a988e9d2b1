// The software device's shared state: one file per device, mapped MAP_SHARED by every process
// that uses the device. It plays the kernel's and the firmware's part: which contexts are alive,
// which objects exist, who owns which gateway page, and the host's request queues.
//
// Liveness follows the kernel. A context is an open file description (OFD) of the device's
// `bar` file; it holds an OFD write lock on one byte (kLockBase + slot). The lock lives exactly
// as long as some fd refers to that OFD in any process (dup, fork and SCM_RIGHTS share it; a
// SIGKILLed process's fds close), so "no lock held" means "last fd closed": the device then
// reclaims the context's objects, as the kernel does.
#pragma once

#include <fcntl.h>
#include <pthread.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "mlx5tlp/sim_abi.h"

#define M5A_EXPORT extern "C" __attribute__((visibility("default")))

namespace mlx5tlp::sim {

constexpr uint64_t kStateMagic = 0x3154534c54354c4dull;  // "ML5TLST1"
constexpr uint32_t kStateVersion = 1;
constexpr uint32_t kMaxContexts = 64;
constexpr uint32_t kMaxObjects = 1024;
constexpr uint32_t kMaxGwPages = 15;  // tlp_rsp_gw_num_pages is a 4-bit PRM field
constexpr uint32_t kMaxVirtioPages = 256;
constexpr uint32_t kVirtioPageSize = 4096;
constexpr uint32_t kObjDataMax = 256;  // bytes of a DEVX object's last create/modify inbox kept
constexpr uint32_t kChannels = 8;
constexpr uint32_t kRequestSlots = 64;
constexpr uint32_t kRequestMax = 16 + 4096;  // 4DW header + 1024 DW payload
constexpr off_t kLockBase = off_t(1) << 40;  // lock bytes far beyond the bar file's data

enum class ObjKind : uint32_t { none = 0, tlp_var, virtio_var, umem, devx_obj };

struct CtxSlot {
  uint32_t live;  // 1 while an OFD holds the slot's lock byte
  uint32_t gen;   // bumped on every allocation of the slot
};

struct Object {
  ObjKind kind;
  uint32_t ctx_slot;
  uint32_t ctx_gen;
  uint32_t handle;   // "kernel" handle, unique per device
  uint32_t id;       // page_id / umem_id / object_id
  uint32_t type;     // DEVX: general object type or create opcode
  uint64_t aux;      // VAR: mmap_off; UMEM: size
  uint32_t length;   // VAR: page length
  uint32_t data_len; // DEVX: bytes in data
  uint8_t data[kObjDataMax];
};

// One request slot of a host->function channel (a bounded MPMC queue with sequence stamps,
// shared by processes; std::atomic on lock-free types is address-free, so it works in shm).
struct RequestSlot {
  std::atomic<uint64_t> seq;
  uint32_t len;
  uint32_t pad;
  uint8_t data[kRequestMax];
};

struct alignas(64) RequestChannel {
  alignas(64) std::atomic<uint64_t> head;  // next slot producers (the host) claim
  alignas(64) std::atomic<uint64_t> tail;  // next slot consumers (functions) claim
  RequestSlot slots[kRequestSlots];
};

struct DeviceState {
  uint64_t magic;
  uint32_t version;
  uint32_t state_size;
  m5a_sim_device_config cfg;
  pthread_mutex_t mu;  // process-shared, robust: a crashed holder never wedges the device
  uint32_t next_handle;
  uint32_t next_id;
  uint64_t reclaimed;
  uint64_t page_gen;  // allocation counter written into gateway page headers
  CtxSlot ctx[kMaxContexts];
  Object obj[kMaxObjects];
  uint32_t gw_owner[kMaxGwPages];           // object index + 1, 0 = free
  uint32_t virtio_owner[kMaxVirtioPages];  // object index + 1, 0 = free
  RequestChannel chan[kChannels];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");

// ---- gateway page layout of the software device (docs/sim.md) ----
// The page is a ring of fixed-size slots. The writer fills slots, then publishes them by storing
// the new producer count into `doorbell`; the device model consumes and stores `consumer`.
namespace gw {
constexpr uint32_t kMagic = 0x5747354d;  // "M5GW"
constexpr uint32_t kLayoutVersion = 1;
constexpr uint32_t kDoorbell = 0x00;   // u64 records published (the doorbell store)
constexpr uint32_t kMagicOff = 0x08;   // u32
constexpr uint32_t kVersionOff = 0x0c; // u16 layout version, u16 slot size
constexpr uint32_t kSlotCount = 0x10;  // u32
constexpr uint32_t kPageId = 0x14;     // u32
constexpr uint32_t kGeneration = 0x18; // u64
constexpr uint32_t kConsumer = 0x40;   // u64 records consumed (credits come from here)
constexpr uint32_t kSlots = 0x80;      // first slot; each slot: u32 length, u32 0, TLP bytes
constexpr uint32_t kSlotHeader = 8;
}  // namespace gw

// A process's view of one device: the mapped state, the bar file, and a probe fd.
class DeviceMap {
 public:
  // Opens (creating mlx5_sim0 with defaults when asked for and missing). errno-style: throws
  // nothing; returns nullptr and sets errno.
  static std::shared_ptr<DeviceMap> get(const std::string& name);

  ~DeviceMap();
  DeviceMap(const DeviceMap&) = delete;
  DeviceMap& operator=(const DeviceMap&) = delete;

  const std::string& name() const { return name_; }
  const std::string& dir() const { return dir_; }
  std::string bar_path() const { return dir_ + "/bar"; }
  DeviceState* st() const { return st_; }
  uint8_t* bar() const { return bar_; }
  size_t gw_stride() const { return size_t(4096) << st_->cfg.gw_log_stride; }
  size_t gw_region() const { return gw_stride() * st_->cfg.gw_pages; }
  bool same_bar(int fd) const;

  // Device mutex (robust). lock() returns false only on an unrecoverable error.
  bool lock();
  void unlock();
  // Under lock: is a live slot still held by some OFD?
  bool slot_alive(uint32_t slot) const;
  // Under lock: reclaim every context whose last fd was closed.
  void collect();
  // Under lock: release one object (page back to the pool, entry cleared).
  void release(uint32_t index);
  // Under lock: find a live object by handle owned by (slot, gen). -1 if none.
  int find(uint32_t handle, ObjKind kind, uint32_t slot, uint32_t gen) const;
  // Under lock: a live VAR (TLP or VirtIO) by handle, or by mmap offset. -1 if none.
  int find_var(uint32_t handle, uint32_t slot, uint32_t gen) const;
  int find_var_at(off_t mmap_off, uint32_t slot, uint32_t gen) const;
  // Under lock: a free object entry, or -1.
  int free_entry() const;

  DeviceMap() = default;

 private:
  std::string name_, dir_;
  DeviceState* st_ = nullptr;
  uint8_t* bar_ = nullptr;
  size_t bar_len_ = 0;
  int probe_fd_ = -1;
  dev_t bar_dev_ = 0;
  ino_t bar_ino_ = 0;
};

// Directory holding the devices: $MLX5TLP_SIM_DIR or /dev/shm/mlx5tlp-sim-<uid>.
std::string device_root();
// Creates a device directory atomically (tmp dir + rename). Returns 0 or errno.
int create_device(const std::string& name, const m5a_sim_device_config& cfg);
m5a_sim_device_config default_config(const std::string& name);
int validate_config(const m5a_sim_device_config& cfg);
bool valid_name(const std::string& name);

// RAII for the device mutex.
class Locked {
 public:
  explicit Locked(DeviceMap& d) : d_(d), ok_(d.lock()) {}
  ~Locked() {
    if (ok_) d_.unlock();
  }
  bool ok() const { return ok_; }
  Locked(const Locked&) = delete;
  Locked& operator=(const Locked&) = delete;

 private:
  DeviceMap& d_;
  bool ok_;
};

// A context as the software device hands it out: the public ibv_context first, so the pointer
// the caller holds is the pointer to this struct (rdma-core providers use container_of alike).
struct SimContext {
  m5a_ibv_context ibv;
  DeviceMap* dev;
  std::shared_ptr<DeviceMap>* keep;  // owning reference, released by ibv_close_device
  uint32_t slot;
  uint32_t gen;
  bool devx;
};
static_assert(std::is_standard_layout<SimContext>::value, "ibv must be at offset 0");
inline SimContext* sim_ctx(m5a_ibv_context* c) { return reinterpret_cast<SimContext*>(c); }

// Gateway page header, written when a TLP VAR is allocated.
void init_gateway_page(DeviceMap& d, uint32_t page_id);

// Big-endian helpers for PRM mailboxes and TLP headers.
inline uint32_t get_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}
inline uint16_t get_be16(const uint8_t* p) { return uint16_t((p[0] << 8) | p[1]); }
inline void put_be32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}
inline void put_be64(uint8_t* p, uint64_t v) {
  put_be32(p, uint32_t(v >> 32));
  put_be32(p + 4, uint32_t(v));
}

}  // namespace mlx5tlp::sim
