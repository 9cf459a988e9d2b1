// Opening a device (validated), the device mutex, reclaiming dead contexts, releasing objects,
// the per-process claimer session, and fork handling.
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

std::atomic<uint32_t> g_fork_gen{0};

namespace {

// Leaked on purpose: DeviceMaps may be destroyed by other static destructors at exit.
ForkMutex& reg_mu() {
  static auto* mu = new ForkMutex(true);
  return *mu;
}
std::vector<DeviceMap*>& registry() {
  static auto* v = new std::vector<DeviceMap*>;
  return *v;
}
std::map<std::string, std::weak_ptr<DeviceMap>>& cache() {
  static auto* m = new std::map<std::string, std::weak_ptr<DeviceMap>>;
  return *m;
}

struct flock byte_lock(short type, off_t at) {
  struct flock fl{};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = at;
  fl.l_len = 1;
  return fl;
}

}  // namespace

ForkMutex& registry_mutex() { return reg_mu(); }

ForkMutex& registration_mutex() {
  static auto* mu = new ForkMutex;
  return *mu;
}

namespace {
std::atomic<uint64_t> g_pin_token{0};
constexpr int kMaxChildClosed = 64;
int g_child_closed[kMaxChildClosed];  // -1 = unused; under reg_mu()
bool g_child_closed_init = false;
}  // namespace

void close_in_child(int fd, bool add) {
  std::lock_guard<ForkMutex> g(reg_mu());
  if (!g_child_closed_init) {
    for (int& f : g_child_closed) f = -1;
    g_child_closed_init = true;
  }
  for (int& f : g_child_closed) {
    if (add && f == -1) {
      f = fd;
      return;
    }
    if (!add && f == fd) f = -1;
  }
}

uint64_t pin_token() {
  uint64_t t = g_pin_token.load(std::memory_order_acquire);
  if (t == 0) {
    uint64_t fresh = 0;
    if (getrandom(&fresh, sizeof fresh, 0) != ssize_t(sizeof fresh))
      fresh = uint64_t(getpid()) << 32 ^ uint64_t(time(nullptr));
    fresh |= 1;  // 0 means "not a UMEM"
    // acq_rel: one token per process, whoever sets it first.
    t = g_pin_token.compare_exchange_strong(t, fresh, std::memory_order_acq_rel) ? fresh : t;
  }
  return t;
}

void registry_visit(void (*fn)(DeviceMap&, void*), void* arg) {
  std::lock_guard<ForkMutex> g(reg_mu());
  for (DeviceMap* d : registry()) fn(*d, arg);
}

// At fork, no thread may be inside a device critical section (the child would inherit a locked
// in-process mutex with no thread to unlock it). The child then renews what is tied to an OFD:
// the device mutex's OFD would be shared with the parent (no mutual exclusion between them),
// and an inherited claimer session would outlive the parent.
// Lock order: registration mutex, registry, device mutexes (as every other path takes them).
void fork_prepare() {
  registration_mutex().lock();
  reg_mu().lock();
  for (DeviceMap* d : registry()) d->mu_.lock();
}
void fork_parent() {
  for (DeviceMap* d : registry()) d->mu_.unlock();
  reg_mu().unlock();
  registration_mutex().unlock();
}
void fork_child() {
  g_fork_gen.fetch_add(1, std::memory_order_relaxed);  // only this thread exists now
  g_pin_token.store(0, std::memory_order_relaxed);     // the child pins nothing yet
  if (g_child_closed_init)
    for (int& f : g_child_closed)
      if (f >= 0) {
        close(f);
        f = -1;
      }
  for (DeviceMap* d : registry()) {
    d->session_fd_.reset();
    d->session_key_.store(0, std::memory_order_relaxed);
    for (auto& t : d->last_sweep_ns) t.store(0, std::memory_order_relaxed);
    d->mu_.reset_in_child();
  }
  reg_mu().reset_in_child();
  registration_mutex().reset_in_child();
}

namespace {
__attribute__((constructor)) void install_fork_handlers() {
  pthread_atfork(fork_prepare, fork_parent, fork_child);
}
}  // namespace

DeviceMap::DeviceMap() {
  for (auto& t : last_sweep_ns) t.store(0, std::memory_order_relaxed);
  std::lock_guard<ForkMutex> g(reg_mu());
  registry().push_back(this);
}

DeviceMap::~DeviceMap() {
  {
    std::lock_guard<ForkMutex> g(reg_mu());
    auto& r = registry();
    r.erase(std::remove(r.begin(), r.end(), this), r.end());
  }
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
    d->lock_fork_gen_ = g_fork_gen.load(std::memory_order_relaxed);
    void* p = mmap(nullptr, sizeof(DeviceState), PROT_READ | PROT_WRITE, MAP_SHARED,
                   d->state_fd_.get(), 0);
    if (p == MAP_FAILED) {
      fail(errno, "cannot map '%s/state': %s", path.c_str(), std::strerror(errno));
      return nullptr;
    }
    d->st_ = static_cast<DeviceState*>(p);
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
  std::lock_guard<ForkMutex> guard(reg_mu());
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
  lock_fork_gen_ = g_fork_gen.load(std::memory_order_relaxed);
  return true;
}

bool DeviceMap::lock() {
  mu_.lock();  // threads of this process (they share the OFD, which OFD locks do not separate)
  if (lock_fork_gen_ != g_fork_gen.load(std::memory_order_relaxed) && !renew_lock_fd()) {
    mu_.unlock();
    return false;
  }
  struct flock fl = byte_lock(F_WRLCK, kDeviceMutexLock);
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
  return true;
}

void DeviceMap::unlock() {
  struct flock fl = byte_lock(F_UNLCK, kDeviceMutexLock);
  fcntl(state_fd_.get(), F_OFD_SETLK, &fl);
  mu_.unlock();
}

bool DeviceMap::lock_held(off_t at) const {
  struct flock fl = byte_lock(F_WRLCK, at);
  // The probe OFD holds no locks, so any lock on the byte is reported as a conflict.
  if (fcntl(probe_fd_.get(), F_OFD_GETLK, &fl) != 0) return true;  // cannot tell: assume held
  return fl.l_type != F_UNLCK;
}

int64_t DeviceMap::unconsumed(uint32_t page) const {
  if (page >= cfg_.gw_pages) return -1;
  // acquire: the writer's slot stores before its doorbell store are visible.
  const uint64_t produced = __atomic_load_n(reinterpret_cast<uint64_t*>(gw_page(page) + gw::kDoorbell),
                                            __ATOMIC_ACQUIRE);
  const uint64_t consumed = st_->gw[page].consumed.load(std::memory_order_acquire);
  if (produced < consumed || produced - consumed > gw_slot_count()) return -1;
  return int64_t(produced - consumed);
}

void DeviceMap::scrub_gw_page(uint32_t page) {
  if (page >= cfg_.gw_pages) return;
  // Scrub so the next owner (and the device model) never sees stale records.
  std::memset(gw_page(page), 0, gw_stride());
  st_->gw[page].consumed.store(0, std::memory_order_relaxed);
  // release: the scrub happens-before anyone sees the page free (and allocates it).
  st_->gw[page].owner.store(0, std::memory_order_release);
}

void DeviceMap::release(uint32_t index) {
  Object& o = st_->obj[index];
  if (o.kind == ObjKind::tlp_var && o.id < cfg_.gw_pages) {
    // Delivered means delivered: records the device model has not consumed stay for it. The
    // page leaves the pool until the model drained it (a new model attaching discards them).
    if (unconsumed(o.id) > 0 && host_attached())
      st_->gw[o.id].owner.store(kPageDraining, std::memory_order_release);
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

bool DeviceMap::session(uint32_t* slot, uint32_t* gen) {
  auto valid = [&](uint64_t k) {
    return (k >> 63) != 0 && ((k >> 48) & 0x7fff) == (g_fork_gen.load(std::memory_order_relaxed) & 0x7fff);
  };
  // acquire: the slot and generation were stored before the key that publishes them.
  uint64_t k = session_key_.load(std::memory_order_acquire);
  if (!valid(k)) {
    Locked lock(*this);
    if (!lock.ok()) return false;
    k = session_key_.load(std::memory_order_relaxed);
    if (!valid(k)) {
      // A private OFD of bar: its lock byte lives exactly as long as this process holds it.
      UniqueFd fd(openat(dir_fd_.get(), "bar", O_RDWR | O_NOFOLLOW | O_CLOEXEC));
      if (!fd || !same_bar(fd.get())) {
        fail(errno ? errno : ENODEV, "cannot open a claimer session on '%s/bar'", dir_.c_str());
        return false;
      }
      uint32_t s = 0;
      for (; s < kMaxSessions; ++s) {
        struct flock fl = byte_lock(F_WRLCK, kSessionLockBase + s);
        if (fcntl(fd.get(), F_OFD_SETLK, &fl) == 0) break;  // free: its last holder is gone
      }
      if (s == kMaxSessions) {
        fail(EUSERS, "all %u claimer sessions of device '%s' are held by live processes",
             kMaxSessions, name_.c_str());
        return false;
      }
      const uint32_t g = st_->sessions[s].gen.load(std::memory_order_relaxed) + 1;
      st_->sessions[s].gen.store(g, std::memory_order_release);  // release: before any claim
      st_->sessions[s].pid = uint32_t(getpid());
      session_fd_ = std::move(fd);
      k = (uint64_t(1) << 63) | (uint64_t(g_fork_gen.load(std::memory_order_relaxed) & 0x7fff) << 48) |
          (uint64_t(s) << 40) | g;
      session_key_.store(k, std::memory_order_release);  // release: publishes slot and gen
    }
  }
  *slot = uint32_t((k >> 40) & 0xff);
  *gen = uint32_t(k);
  return true;
}

}  // namespace mlx5tlp::sim
