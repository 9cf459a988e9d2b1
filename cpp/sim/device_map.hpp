// A process's view of one software device: the mapped state and BAR, the device mutex, and the
// "kernel" operations every entry point needs (reclaim, object lookup, page release).
//
// Thread-safety: a DeviceMap is shared by every context of the device in the process; lock()
// serialises threads (an in-process mutex) and processes (an OFD lock on the state file). The
// accessors return process-private copies where the shared bytes could be changed by others.
// Fork: an at-fork handler (device_map.cpp) makes the child take new OFDs for the device mutex
// and drop its inherited claimer sessions, so they die with the parent, not with the child.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>

#include "fork_mutex.hpp"
#include "last_error.hpp"
#include "mlx5tlp/sigbus_guard.hpp"
#include "mlx5tlp/unique_fd.hpp"
#include "state.hpp"

namespace mlx5tlp::sim {

// Bumped in every forked child (pthread_atfork): state tied to an OFD must be renewed.
extern std::atomic<uint32_t> g_fork_gen;

class DeviceMap {
 public:
  // Opens (creating mlx5_sim0 with defaults when asked for and missing): validated, mapped.
  // Returns nullptr with errno set and the reason in last_error() (never throws).
  static std::shared_ptr<DeviceMap> get(const std::string& name);

  DeviceMap();
  ~DeviceMap();
  DeviceMap(const DeviceMap&) = delete;
  DeviceMap& operator=(const DeviceMap&) = delete;

  const std::string& name() const { return name_; }
  const std::string& dir() const { return dir_; }
  int dir_fd() const { return dir_fd_.get(); }
  DeviceState* st() const { return st_; }
  uint8_t* bar() const { return bar_; }
  size_t bar_len() const { return bar_len_; }
  // The configuration as validated at open: geometry is never re-read from the shared file.
  const m5a_sim_device_config& cfg() const { return cfg_; }
  size_t gw_stride() const { return size_t(4096) << cfg_.gw_log_stride; }
  size_t gw_region() const { return gw_stride() * cfg_.gw_pages; }
  uint32_t gw_slot_count() const { return uint32_t((gw_stride() - gw::kSlots) / cfg_.gw_slot_size); }
  uint8_t* gw_page(uint32_t page) const { return bar_ + size_t(page) * gw_stride(); }
  bool same_bar(int fd) const;
  bool same_bar(const struct stat& sb) const { return sb.st_dev == bar_dev_ && sb.st_ino == bar_ino_; }

  // Device mutex. lock() returns false (errno set) only on an unrecoverable error — among
  // them EIO when another process truncated the state or bar file (files_truncated()).
  bool lock();
  void unlock();
  // Is the lock byte `at` of the bar file held by any OFD (other than the probe's)?
  bool lock_held(off_t at) const;
  bool slot_alive(uint32_t slot) const { return lock_held(kCtxLockBase + slot); }
  bool host_attached() const { return lock_held(kHostLock); }
  // Under lock: reclaim every context whose last fd was closed.
  void collect();
  // Under lock: release one object (a VAR's page drains or goes back to the pool scrubbed).
  void release(uint32_t index);
  // Under lock: the gateway page's unconsumed records, or -1 if its indexes are garbage.
  int64_t unconsumed(uint32_t page) const;
  // Under lock: scrub a gateway page and return it to the pool.
  void scrub_gw_page(uint32_t page);
  // Under lock: a live object by handle owned by (slot, gen): its index, or -ENOENT (no such
  // handle), or -EINVAL (the handle is an object of another type), as the kernel's idr lookup.
  int find(uint32_t handle, ObjKind kind, uint32_t slot, uint32_t gen) const;
  // Under lock: a live VAR (TLP or VirtIO) by handle, or by mmap offset. -1 if none.
  int find_var(uint32_t handle, uint32_t slot, uint32_t gen) const;
  int find_var_at(off_t mmap_off, uint32_t slot, uint32_t gen) const;
  // Under lock: a free object entry, or -1.
  int free_entry() const;
  // Under lock: the lowest handle number no live object of (slot, gen) uses.
  uint32_t lowest_free_handle(uint32_t slot, uint32_t gen) const;
  // Under lock: consume one injected fault of `op`: its errno, or 0.
  int take_fault(FaultOp op, uint32_t* left);

  // The calling process's claimer session on this device (channel.cpp): slot and generation.
  // Creates one on first use and after fork. Returns false with errno (and last_error) set.
  bool session(uint32_t* slot, uint32_t* gen);
  // Per-channel time of this process's last sweep for dead claimers (channel.cpp).
  std::atomic<int64_t> last_sweep_ns[kChannels];

  // Every DeviceMap of the process (at-fork handling and RLIMIT_MEMLOCK accounting).
  template <typename F>
  static void for_each(F&& f);

 private:
  friend struct DeviceOpener;
  friend void fork_prepare();
  friend void fork_parent();
  friend void fork_child();

  bool renew_lock_fd();
  // Whether the state or bar file is shorter than its mapping (another process truncated it:
  // the SIGBUS guard replaced the mapping with zero pages, or would at the next access).
  // Sets last_error (EIO) naming the file and both sizes.
  bool files_truncated();

  std::string name_, dir_;
  UniqueFd dir_fd_;
  UniqueFd state_fd_;  // the device mutex's OFD (renewed after fork)
  UniqueFd probe_fd_;  // an OFD of bar that holds no lock: probes others' lock bytes
  UniqueFd session_fd_;
  uint32_t lock_fork_gen_ = 0;
  // valid bit 63 | fork generation (15 bits) << 48 | session slot << 40 | session generation
  std::atomic<uint64_t> session_key_{0};
  ForkMutex mu_;
  DeviceState* st_ = nullptr;
  uint8_t* bar_ = nullptr;
  size_t bar_len_ = 0;
  // The files are in a directory of this user's: any process of the user can truncate them
  // (docs/sim.md "Devices and their files"). Reset before the munmaps (~DeviceMap).
  SigbusGuard st_guard_, bar_guard_;
  m5a_sim_device_config cfg_{};
  dev_t bar_dev_ = 0, state_dev_ = 0;
  ino_t bar_ino_ = 0, state_ino_ = 0;
};

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

// ---- device directories (dirs.cpp) ----
// The directory holding the devices: $MLX5TLP_SIM_DIR or /dev/shm/mlx5tlp-sim-<euid>.
std::string device_root();
// Opens the root (creating it 0700 when missing and `create`), refusing one that is not a
// directory, is owned by another user or is group/world-writable. Invalid fd + last_error.
UniqueFd open_root(bool create);
// Opens a device's directory under the root with the same checks.
UniqueFd open_device_dir(int root_fd, const std::string& root, const std::string& name);
// Opens a device file: O_NOFOLLOW|O_CLOEXEC, then fstat: a regular file owned by the user,
// not group/world-writable, one link. Invalid fd + last_error.
UniqueFd open_device_file(int dir_fd, const std::string& dir, const char* file, struct stat* sb);
// Creates a device directory atomically (temporary directory + rename). Returns 0 or errno.
int create_device(const std::string& name, const m5a_sim_device_config& cfg);
m5a_sim_device_config default_config(const std::string& name);
// 0 or EINVAL with the reason in last_error().
int validate_config(const m5a_sim_device_config& cfg);
bool valid_name(const std::string& name);
size_t bar_size(const m5a_sim_device_config& cfg);

// ---- validation of a mapped state (validate.cpp) ----
// 0, or EPROTO with last_error() naming the file and the field.
int validate_state(const DeviceState& st, size_t bar_len, const std::string& path);

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

// Gateway page header, written when a TLP VAR is allocated (under lock).
void init_gateway_page(DeviceMap& d, uint32_t page_id);

// ---- registry (device_map.cpp) ----
// Guards the registry and the device cache (recursive: a DeviceMap may die inside get()).
ForkMutex& registry_mutex();
// Serialises this process's UMEM registrations (RLIMIT_MEMLOCK accounting, dv_umem.cpp).
ForkMutex& registration_mutex();
// This process's identity in the RLIMIT_MEMLOCK accounting (renewed in a forked child). Never 0.
uint64_t pin_token();
// Adds / removes a DeviceMap of this process (its constructor and destructor).
void register_map(DeviceMap* d, bool add);
// One byte of a file, for OFD locks.
inline struct flock lock_byte(short type, off_t at) {
  struct flock fl{};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = at;
  fl.l_len = 1;
  return fl;
}
// fds whose lock bytes stand for this process (a device model's): a forked child closes its
// copies at once, so the lock dies with this process, not with a child that outlives it.
void close_in_child(int fd, bool add);
void registry_visit(void (*fn)(DeviceMap&, void*), void* arg);

template <typename F>
void DeviceMap::for_each(F&& f) {
  registry_visit([](DeviceMap& d, void* a) { (*static_cast<F*>(a))(d); }, &f);
}

}  // namespace mlx5tlp::sim
