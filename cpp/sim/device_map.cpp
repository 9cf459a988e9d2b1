// Opening a device (validated), the device mutex, reclaiming dead contexts, releasing objects.
// Per-process state (fork handling, claimer sessions, the registry): process.cpp.
#include "device_map.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <bitset>
#include <cstring>
#include <ctime>
#include <map>
#include <vector>

namespace mlx5tlp::sim {

namespace {

// Leaked on purpose: DeviceMaps may be destroyed by other static destructors at exit.
// Guarded by registry_mutex().
std::map<std::string, std::weak_ptr<DeviceMap>>& cache() {
  static auto* m = new std::map<std::string, std::weak_ptr<DeviceMap>>;
  return *m;
}

}  // namespace

DeviceMap::DeviceMap() {
  for (auto& t : last_sweep_ns) t.store(0, std::memory_order_relaxed);  // before any claim
  register_map(this, true);
}

DeviceMap::~DeviceMap() {
  register_map(this, false);
  st_guard_.reset();  // unregistered before the address can be reused (sigbus_guard.hpp)
  bar_guard_.reset();
  if (bar_ != nullptr) munmap(bar_, bar_len_);
  if (st_ != nullptr) munmap(st_, sizeof(DeviceState));
}

// Builds a DeviceMap from the files of one device directory.
struct DeviceOpener {
  static std::shared_ptr<DeviceMap> open(const std::string& name, const std::string& path,
                                         UniqueFd dir_fd) {
    auto d = std::make_shared<DeviceMap>();
    d->name_ = name;
    d->dir_ = path;
    d->dir_fd_ = std::move(dir_fd);
    struct stat ssb, bsb;
    d->state_fd_ = open_device_file(d->dir_fd_.get(), path, "state", &ssb);
    if (!d->state_fd_) return nullptr;
    if (size_t(ssb.st_size) != sizeof(DeviceState)) {
      fail(EPROTO, "state file '%s/state' is %lld bytes, not %zu: damaged or of another version "
           "(remove the device directory)", path.c_str(), (long long)ssb.st_size, sizeof(DeviceState));
      return nullptr;
    }
    d->state_dev_ = ssb.st_dev;
    d->state_ino_ = ssb.st_ino;
    d->lock_fork_gen_ = g_fork_gen.load(std::memory_order_relaxed);  // relaxed: this thread's
    void* p = mmap(nullptr, sizeof(DeviceState), PROT_READ | PROT_WRITE, MAP_SHARED,
                   d->state_fd_.get(), 0);
    if (p == MAP_FAILED) {
      fail(errno, "cannot map '%s/state': %s", path.c_str(), std::strerror(errno));
      return nullptr;
    }
    d->st_ = static_cast<DeviceState*>(p);
    d->st_guard_ = SigbusGuard::add(p, sizeof(DeviceState), PROT_READ | PROT_WRITE);
    if (!d->st_guard_.active()) {
      fail(errno, "cannot guard '%s/state' against truncation: %s", path.c_str(), std::strerror(errno));
      return nullptr;
    }
    d->probe_fd_ = open_device_file(d->dir_fd_.get(), path, "bar", &bsb);
    if (!d->probe_fd_) return nullptr;
    d->bar_dev_ = bsb.st_dev;
    d->bar_ino_ = bsb.st_ino;
    {
      // Validated under the device mutex, so no legitimate writer is half-way through a change.
      Locked lock(*d);
      if (!lock.ok()) {
        fail(errno, "cannot lock '%s/state': %s", path.c_str(), std::strerror(errno));
        return nullptr;
      }
      if (validate_state(*d->st_, size_t(bsb.st_size), path + "/state") != 0) return nullptr;
      d->cfg_ = d->st_->cfg;
    }
    d->bar_len_ = size_t(bsb.st_size);
    void* b = mmap(nullptr, d->bar_len_, PROT_READ | PROT_WRITE, MAP_SHARED, d->probe_fd_.get(), 0);
    if (b == MAP_FAILED) {
      fail(errno, "cannot map '%s/bar': %s", path.c_str(), std::strerror(errno));
      return nullptr;
    }
    d->bar_ = static_cast<uint8_t*>(b);
    d->bar_guard_ = SigbusGuard::add(b, d->bar_len_, PROT_READ | PROT_WRITE);
    if (!d->bar_guard_.active()) {
      fail(errno, "cannot guard '%s/bar' against truncation: %s", path.c_str(), std::strerror(errno));
      return nullptr;
    }
    return d;
  }
};

std::shared_ptr<DeviceMap> DeviceMap::get(const std::string& name) {
  if (!valid_name(name)) {
    fail(ENODEV, "'%s' is not a software device name", name.c_str());
    return nullptr;
  }
  const std::string root = device_root();
  const std::string path = root + "/" + name;
  std::lock_guard<ForkMutex> guard(registry_mutex());
  auto it = cache().find(path);
  if (it != cache().end()) {
    if (auto d = it->second.lock()) {
      struct stat sb;
      // A removed and re-created device is a new device: drop the stale mapping.
      if (fstatat(AT_FDCWD, (path + "/bar").c_str(), &sb, AT_SYMLINK_NOFOLLOW) == 0 && d->same_bar(sb))
        return d;
    }
  }
  const bool is_default = name == M5A_SIM_DEFAULT_DEVICE;
  UniqueFd root_fd = open_root(is_default);
  if (!root_fd) return nullptr;
  UniqueFd dir_fd = open_device_dir(root_fd.get(), root, name);
  if (!dir_fd && errno == ENODEV && is_default) {
    const int rc = create_device(name, default_config(name));
    if (rc != 0 && rc != EEXIST) return nullptr;
    dir_fd = open_device_dir(root_fd.get(), root, name);
  }
  if (!dir_fd) return nullptr;
  auto d = DeviceOpener::open(name, path, std::move(dir_fd));
  if (d) {
    clear_error();
    cache()[path] = d;
  }
  return d;
}

bool DeviceMap::same_bar(int fd) const {
  struct stat sb;
  return fstat(fd, &sb) == 0 && same_bar(sb);
}

bool DeviceMap::renew_lock_fd() {
  UniqueFd fd(openat(dir_fd_.get(), "state", O_RDWR | O_NOFOLLOW | O_CLOEXEC));
  struct stat sb;
  if (!fd || fstat(fd.get(), &sb) != 0 || sb.st_dev != state_dev_ || sb.st_ino != state_ino_) {
    fail(ENODEV, "device '%s' was removed", name_.c_str());
    return false;
  }
  state_fd_ = std::move(fd);
  lock_fork_gen_ = g_fork_gen.load(std::memory_order_relaxed);  // relaxed: set at fork only
  return true;
}

bool DeviceMap::lock() {
  mu_.lock();  // threads of this process (they share the OFD, which OFD locks do not separate)
  if (lock_fork_gen_ != g_fork_gen.load(std::memory_order_relaxed) && !renew_lock_fd()) {
    mu_.unlock();
    return false;
  }
  struct flock fl = lock_byte(F_WRLCK, kDeviceMutexLock);
  // Blocking point: another process holds the device mutex for one short table update. The
  // kernel drops an OFD lock when its last fd closes, so a killed holder never wedges us.
  while (fcntl(state_fd_.get(), F_OFD_SETLKW, &fl) != 0) {
    if (errno != EINTR) {
      const int err = errno;
      mu_.unlock();
      errno = err;
      return false;
    }
  }
  if (files_truncated()) {
    unlock();
    errno = EIO;
    return false;
  }
  return true;
}

bool DeviceMap::files_truncated() {
  // fstat first: a locked operation then fails before it touches a page past the end; the
  // guard's flag covers a truncation after this check (the access ran on zero pages).
  struct stat ss{}, bs{};
  const bool st_short = st_guard_.lost() || (fstat(state_fd_.get(), &ss) == 0 &&
                                             size_t(ss.st_size) < sizeof(DeviceState));
  const bool bar_short = bar_guard_.lost() || (probe_fd_ && fstat(probe_fd_.get(), &bs) == 0 &&
                                               size_t(bs.st_size) < bar_len_);
  if (!st_short && !bar_short) return false;
  fail(EIO, "software device '%s': its %s file was truncated by another process while mapped "
       "(state %lld of %zu bytes, bar %lld of %zu): its state is lost; remove and re-create "
       "the device", name_.c_str(), st_short ? "state" : "bar", (long long)ss.st_size,
       sizeof(DeviceState), (long long)bs.st_size, bar_len_);
  return true;
}

void DeviceMap::unlock() {
  struct flock fl = lock_byte(F_UNLCK, kDeviceMutexLock);
  fcntl(state_fd_.get(), F_OFD_SETLK, &fl);
  mu_.unlock();
}

bool DeviceMap::lock_held(off_t at) const {
  struct flock fl = lock_byte(F_WRLCK, at);
  // The probe OFD holds no locks, so any lock on the byte is reported as a conflict.
  if (fcntl(probe_fd_.get(), F_OFD_GETLK, &fl) != 0) return true;  // cannot tell: assume held
  return fl.l_type != F_UNLCK;
}

int64_t DeviceMap::unconsumed(uint32_t page) const {
  if (page >= cfg_.gw_pages) return -1;
  // acquire: the writer's slot stores before its doorbell store are visible.
  const uint64_t produced = __atomic_load_n(reinterpret_cast<uint64_t*>(gw_page(page) + gw::kDoorbell),
                                            __ATOMIC_ACQUIRE);
  // acquire: the device model's latest count (it copied those records out before storing it).
  const uint64_t consumed = st_->gw[page].consumed.load(std::memory_order_acquire);
  if (produced < consumed || produced - consumed > gw_slot_count()) return -1;
  return int64_t(produced - consumed);
}

void DeviceMap::scrub_gw_page(uint32_t page) {
  if (page >= cfg_.gw_pages) return;
  // Scrub so the next owner (and the device model) never sees stale records.
  std::memset(gw_page(page), 0, gw_stride());
  st_->gw[page].consumed.store(0, std::memory_order_relaxed);  // relaxed: published by owner
  // release: the scrub happens-before anyone sees the page free (and allocates it).
  st_->gw[page].owner.store(0, std::memory_order_release);
}

void DeviceMap::release(uint32_t index) {
  Object& o = st_->obj[index];
  if (o.kind == ObjKind::tlp_var && o.id < cfg_.gw_pages) {
    // Delivered means delivered: records the device model has not consumed stay for it. The
    // page leaves the pool until the model drained it (a new model attaching discards them).
    if (unconsumed(o.id) > 0 && host_attached())
      st_->gw[o.id].owner.store(kPageDraining, std::memory_order_release);  // release: as alloc
    else
      scrub_gw_page(o.id);
  } else if (o.kind == ObjKind::virtio_var && o.id < cfg_.virtio_pages) {
    std::memset(bar_ + gw_region() + size_t(o.id) * kVirtioPageSize, 0, kVirtioPageSize);
    st_->virtio_owner[o.id] = 0;
  }
  std::memset(&o, 0, sizeof o);
}

void DeviceMap::collect() {
  for (uint32_t s = 0; s < kMaxContexts; ++s) {
    if (st_->ctx[s].live == 0 || slot_alive(s)) continue;
    for (uint32_t i = 0; i < kMaxObjects; ++i) {
      const Object& o = st_->obj[i];
      if (o.kind != ObjKind::none && o.ctx_slot == s && o.ctx_gen == st_->ctx[s].gen) {
        release(i);
        ++st_->reclaimed;
      }
    }
    st_->ctx[s].live = 0;
  }
}

int DeviceMap::find(uint32_t handle, ObjKind kind, uint32_t slot, uint32_t gen) const {
  for (uint32_t i = 0; i < kMaxObjects; ++i) {
    const Object& o = st_->obj[i];
    if (o.kind != ObjKind::none && o.handle == handle && o.ctx_slot == slot && o.ctx_gen == gen)
      return o.kind == kind ? int(i) : -EINVAL;  // rdma_core.c: the idr entry's type must match
  }
  return -ENOENT;
}

int DeviceMap::find_var(uint32_t handle, uint32_t slot, uint32_t gen) const {
  int i = find(handle, ObjKind::tlp_var, slot, gen);
  if (i == -EINVAL) i = find(handle, ObjKind::virtio_var, slot, gen);
  return i >= 0 ? i : -1;
}

int DeviceMap::find_var_at(off_t mmap_off, uint32_t slot, uint32_t gen) const {
  for (uint32_t i = 0; i < kMaxObjects; ++i) {
    const Object& o = st_->obj[i];
    if ((o.kind == ObjKind::tlp_var || o.kind == ObjKind::virtio_var) && o.aux == uint64_t(mmap_off) &&
        o.ctx_slot == slot && o.ctx_gen == gen)
      return int(i);
  }
  return -1;
}

int DeviceMap::free_entry() const {
  for (uint32_t i = 0; i < kMaxObjects; ++i)
    if (st_->obj[i].kind == ObjKind::none) return int(i);
  return -1;
}

uint32_t DeviceMap::lowest_free_handle(uint32_t slot, uint32_t gen) const {
  // The kernel allocates uobject ids with xa_alloc() on the uverbs file's XA_FLAGS_ALLOC xarray
  // (drivers/infiniband/core/rdma_core.c, idr_add_uobj): the lowest free id, from 0. At most
  // kMaxObjects ids are in use, so the answer is at most kMaxObjects.
  std::bitset<kMaxObjects + 1> used;
  for (const Object& o : st_->obj)
    if (o.kind != ObjKind::none && o.ctx_slot == slot && o.ctx_gen == gen && o.handle <= kMaxObjects)
      used.set(o.handle);
  uint32_t h = 0;
  while (used.test(h)) ++h;
  return h;
}

int DeviceMap::take_fault(FaultOp op, uint32_t* left) {
  Fault& f = st_->faults[uint32_t(op)];
  if (f.count == 0) return 0;
  --f.count;
  if (left != nullptr) *left = f.count;
  return int(f.err);
}

}  // namespace mlx5tlp::sim
