// Device directories, the shared state file, the device mutex, and reclaiming dead contexts.
#include <dirent.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#include "state.hpp"

namespace mlx5tlp::sim {

std::string device_root() {
  const char* env = std::getenv("MLX5TLP_SIM_DIR");
  if (env != nullptr && *env != '\0') return env;
  return "/dev/shm/mlx5tlp-sim-" + std::to_string(getuid());
}

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() >= M5A_SYSFS_NAME_MAX || name[0] == '.') return false;
  for (char c : name)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-')) return false;
  return true;
}

m5a_sim_device_config default_config(const std::string& name) {
  m5a_sim_device_config c{};
  c.tlp = 1;
  c.gw_pages = 8;
  c.gw_log_stride = 0;
  c.virtio_pages = 16;
  c.gw_slot_size = 256;
  c.gw_bar_offset = 0x200000;
  // A stable, locally administered-looking GUID derived from the name (FNV-1a).
  uint64_t h = 1469598103934665603ull;
  for (char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  c.node_guid = (h & 0x0000ffffffffffffull) | 0x5a00000000000000ull;
  return c;
}

int validate_config(const m5a_sim_device_config& c) {
  if (c.tlp > 1) return EINVAL;
  if (c.gw_pages < 1 || c.gw_pages > kMaxGwPages) return EINVAL;
  if (c.gw_log_stride > 4) return EINVAL;
  if (c.virtio_pages > kMaxVirtioPages) return EINVAL;
  uint32_t s = c.gw_slot_size;
  if (s < 64 || s > 1024 || (s & (s - 1)) != 0) return EINVAL;
  if ((size_t(4096) << c.gw_log_stride) < gw::kSlots + 2 * size_t(s)) return EINVAL;
  return 0;
}

static int write_state(const std::string& dir, const m5a_sim_device_config& cfg) {
  int fd = open((dir + "/state").c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return errno;
  int rc = 0;
  void* p = MAP_FAILED;
  if (ftruncate(fd, sizeof(DeviceState)) != 0) {
    rc = errno;
  } else {
    p = mmap(nullptr, sizeof(DeviceState), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) rc = errno;
  }
  if (rc == 0) {
    // The file is zero-filled; construct only what needs more than zeros.
    auto* st = static_cast<DeviceState*>(p);
    st->version = kStateVersion;
    st->state_size = sizeof(DeviceState);
    st->cfg = cfg;
    st->next_handle = 1;
    st->next_id = 0x100;
    for (auto& ch : st->chan) {
      new (&ch.head) std::atomic<uint64_t>(0);
      new (&ch.tail) std::atomic<uint64_t>(0);
      for (uint32_t i = 0; i < kRequestSlots; ++i) new (&ch.slots[i].seq) std::atomic<uint64_t>(i);
    }
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&st->mu, &a);
    pthread_mutexattr_destroy(&a);
    // Magic last: a reader that sees it sees a fully initialised state (the file is only
    // reachable by name after the directory rename below, so this is belt and braces).
    __atomic_store_n(&st->magic, kStateMagic, __ATOMIC_RELEASE);
    munmap(p, sizeof(DeviceState));
  }
  close(fd);
  return rc;
}

static void remove_tree(const std::string& dir) {
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
      unlink((dir + "/" + e->d_name).c_str());
    }
    closedir(d);
  }
  rmdir(dir.c_str());
}

int create_device(const std::string& name, const m5a_sim_device_config& cfg) {
  if (!valid_name(name)) return EINVAL;
  if (int rc = validate_config(cfg)) return rc;
  std::string root = device_root();
  if (mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) return errno;
  // Build the device under a private name, then rename() it into place: concurrent creators
  // race on the rename, and a reader never sees a half-made device.
  char tmpl[] = "/.tmp-XXXXXX";
  std::string tmp = root + tmpl;
  if (mkdtemp(tmp.data()) == nullptr) return errno;
  int rc = write_state(tmp, cfg);
  if (rc == 0) {
    size_t bar = (size_t(4096) << cfg.gw_log_stride) * cfg.gw_pages +
                 size_t(kVirtioPageSize) * cfg.virtio_pages;
    int fd = open((tmp + "/bar").c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, off_t(bar)) != 0) rc = errno;
    if (fd >= 0) close(fd);
    fd = open((tmp + "/host.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) rc = errno;
    else close(fd);
  }
  if (rc == 0 && rename(tmp.c_str(), (root + "/" + name).c_str()) != 0)
    rc = (errno == ENOTEMPTY || errno == EEXIST) ? EEXIST : errno;
  if (rc != 0) remove_tree(tmp);
  return rc;
}

std::shared_ptr<DeviceMap> DeviceMap::get(const std::string& name) {
  static std::mutex mu;
  static std::map<std::string, std::weak_ptr<DeviceMap>> cache;
  if (!valid_name(name)) {
    errno = ENODEV;
    return nullptr;
  }
  std::string dir = device_root() + "/" + name;
  std::lock_guard<std::mutex> guard(mu);
  auto it = cache.find(dir);
  if (it != cache.end()) {
    if (auto d = it->second.lock()) {
      struct stat sb;
      // A removed and re-created device is a new device: drop the stale mapping.
      if (stat((dir + "/bar").c_str(), &sb) == 0 && sb.st_ino == d->bar_ino_) return d;
    }
  }
  int sfd = open((dir + "/state").c_str(), O_RDWR | O_CLOEXEC);
  if (sfd < 0 && errno == ENOENT && name == M5A_SIM_DEFAULT_DEVICE) {
    int rc = create_device(name, default_config(name));
    if (rc != 0 && rc != EEXIST) {
      errno = rc;
      return nullptr;
    }
    sfd = open((dir + "/state").c_str(), O_RDWR | O_CLOEXEC);
  }
  if (sfd < 0) {
    errno = errno == ENOENT ? ENODEV : errno;
    return nullptr;
  }
  struct stat sb;
  void* p = MAP_FAILED;
  if (fstat(sfd, &sb) == 0 && size_t(sb.st_size) == sizeof(DeviceState))
    p = mmap(nullptr, sizeof(DeviceState), PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
  close(sfd);
  if (p == MAP_FAILED) {
    errno = EPROTO;  // a state file of another layout version: remove the device directory
    return nullptr;
  }
  auto d = std::make_shared<DeviceMap>();
  d->name_ = name;
  d->dir_ = dir;
  d->st_ = static_cast<DeviceState*>(p);
  if (__atomic_load_n(&d->st_->magic, __ATOMIC_ACQUIRE) != kStateMagic ||
      d->st_->version != kStateVersion) {
    errno = EPROTO;
    return nullptr;  // ~DeviceMap unmaps
  }
  d->probe_fd_ = open(d->bar_path().c_str(), O_RDWR | O_CLOEXEC);
  if (d->probe_fd_ < 0 || fstat(d->probe_fd_, &sb) != 0) return nullptr;
  d->bar_dev_ = sb.st_dev;
  d->bar_ino_ = sb.st_ino;
  d->bar_len_ = size_t(sb.st_size);
  void* b = mmap(nullptr, d->bar_len_, PROT_READ | PROT_WRITE, MAP_SHARED, d->probe_fd_, 0);
  if (b == MAP_FAILED) return nullptr;
  d->bar_ = static_cast<uint8_t*>(b);
  cache[dir] = d;
  return d;
}

DeviceMap::~DeviceMap() {
  if (bar_ != nullptr) munmap(bar_, bar_len_);
  if (st_ != nullptr) munmap(st_, sizeof(DeviceState));
  if (probe_fd_ >= 0) close(probe_fd_);
}

bool DeviceMap::same_bar(int fd) const {
  struct stat sb;
  return fstat(fd, &sb) == 0 && sb.st_dev == bar_dev_ && sb.st_ino == bar_ino_;
}

bool DeviceMap::lock() {
  int rc = pthread_mutex_lock(&st_->mu);
  if (rc == EOWNERDEAD) {
    // The holder died mid-operation. Every critical section leaves the tables consistent at
    // each store that matters (entries are claimed by their kind field last), so recover.
    pthread_mutex_consistent(&st_->mu);
    rc = 0;
  }
  return rc == 0;
}

void DeviceMap::unlock() { pthread_mutex_unlock(&st_->mu); }

bool DeviceMap::slot_alive(uint32_t slot) const {
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = kLockBase + slot;
  fl.l_len = 1;
  // The probe OFD holds no locks, so any lock on the byte is reported as a conflict.
  if (fcntl(probe_fd_, F_OFD_GETLK, &fl) != 0) return true;  // cannot tell: keep it
  return fl.l_type != F_UNLCK;
}

void DeviceMap::release(uint32_t index) {
  Object& o = st_->obj[index];
  if (o.kind == ObjKind::tlp_var && o.id < kMaxGwPages) {
    // Scrub the page so the next owner (and the device model) never sees stale records.
    std::memset(bar_ + size_t(o.id) * gw_stride(), 0, gw_stride());
    st_->gw_owner[o.id] = 0;
  } else if (o.kind == ObjKind::virtio_var && o.id < kMaxVirtioPages) {
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
    if (o.kind == kind && o.handle == handle && o.ctx_slot == slot && o.ctx_gen == gen)
      return int(i);
  }
  return -1;
}

int DeviceMap::find_var(uint32_t handle, uint32_t slot, uint32_t gen) const {
  int i = find(handle, ObjKind::tlp_var, slot, gen);
  return i >= 0 ? i : find(handle, ObjKind::virtio_var, slot, gen);
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

void init_gateway_page(DeviceMap& d, uint32_t page_id) {
  uint8_t* p = d.bar() + size_t(page_id) * d.gw_stride();
  std::memset(p, 0, d.gw_stride());
  const uint32_t slot = d.st()->cfg.gw_slot_size;
  const uint32_t count = uint32_t((d.gw_stride() - gw::kSlots) / slot);
  const uint32_t ver = gw::kLayoutVersion | (slot << 16);
  std::memcpy(p + gw::kVersionOff, &ver, 4);
  std::memcpy(p + gw::kSlotCount, &count, 4);
  std::memcpy(p + gw::kPageId, &page_id, 4);
  uint64_t gen = ++d.st()->page_gen;
  std::memcpy(p + gw::kGeneration, &gen, 8);
  // Magic last with release: the device model reads the geometry only after seeing it.
  __atomic_store_n(reinterpret_cast<uint32_t*>(p + gw::kMagicOff), gw::kMagic, __ATOMIC_RELEASE);
}

int DeviceMap::free_entry() const {
  for (uint32_t i = 0; i < kMaxObjects; ++i)
    if (st_->obj[i].kind == ObjKind::none) return int(i);
  return -1;
}

}  // namespace mlx5tlp::sim
