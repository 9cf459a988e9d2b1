// libibverbs subset of the software device: devices, contexts, import of a context by fd.
#include <dirent.h>
#include <endian.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "device_map.hpp"

using namespace mlx5tlp::sim;

namespace {

// ibv_device structs are interned per process and never freed: a context keeps pointing at
// its device after ibv_free_device_list, as with libibverbs' refcounted devices.
m5a_ibv_device* intern_device(const std::string& name) {
  static auto* devices = new std::map<std::string, std::unique_ptr<m5a_ibv_device>>;
  std::lock_guard<ForkMutex> guard(registry_mutex());  // fork-safe (device_map.cpp)
  auto& slot = (*devices)[name];
  if (!slot) {
    slot = std::make_unique<m5a_ibv_device>();
    slot->node_type = 1;       // IBV_NODE_CA
    slot->transport_type = 0;  // IBV_TRANSPORT_IB
    std::snprintf(slot->name, sizeof slot->name, "%s", name.c_str());
    std::snprintf(slot->dev_name, sizeof slot->dev_name, "uverbs-%s", name.c_str());
    std::snprintf(slot->dev_path, sizeof slot->dev_path, "%s/%s", device_root().c_str(),
                  name.c_str());
    std::snprintf(slot->ibdev_path, sizeof slot->ibdev_path, "%s", slot->dev_path);
  }
  return slot.get();
}

// The devices under the root: directories holding a state file. False (errno, last_error) if
// the root itself is unusable.
bool device_names(std::vector<std::string>* names) {
  mlx5tlp::UniqueFd root = open_root(false);
  if (!root) return errno == ENODEV;  // no directory yet: no devices
  if (DIR* d = fdopendir(root.get())) {
    root.release();  // closedir closes it
    while (dirent* e = readdir(d)) {
      std::string n = e->d_name;
      if (!valid_name(n)) continue;
      struct stat sb;
      const std::string state = n + "/state";
      if (fstatat(dirfd(d), state.c_str(), &sb, AT_SYMLINK_NOFOLLOW) == 0) names->push_back(n);
    }
    closedir(d);
  } else {
    fail(errno, "cannot list '%s': %s", device_root().c_str(), std::strerror(errno));
    return false;
  }
  std::sort(names->begin(), names->end());
  return true;
}

bool take_slot_lock(int fd, uint32_t slot) {
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = kLockBase + slot;
  fl.l_len = 1;
  return fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

// Is the slot's lock byte held by `fd`'s own open file description? A lock held by the same
// OFD never conflicts, so F_OFD_GETLK through `fd` reports it unlocked while the device's probe
// (another OFD) sees it locked.
bool slot_owned_by(const DeviceMap& d, int fd, uint32_t slot) {
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = kLockBase + slot;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return false;
  return fl.l_type == F_UNLCK && d.slot_alive(slot);
}

m5a_ibv_context* make_context(std::shared_ptr<DeviceMap> dev, int fd, uint32_t slot, bool devx) {
  auto* c = static_cast<SimContext*>(std::calloc(1, sizeof(SimContext)));
  if (c == nullptr) {
    errno = ENOMEM;
    return nullptr;
  }
  c->ibv.device = intern_device(dev->name());
  c->ibv.cmd_fd = fd;
  c->ibv.async_fd = -1;
  c->ibv.num_comp_vectors = 1;
  pthread_mutex_init(&c->ibv.mutex, nullptr);
  c->dev = dev.get();
  c->keep = new std::shared_ptr<DeviceMap>(std::move(dev));
  c->slot = slot;
  c->gen = c->dev->st()->ctx[slot].gen;
  c->devx = devx;
  return &c->ibv;
}

m5a_ibv_context* open_context(m5a_ibv_device* device, bool devx) {
  if (device == nullptr) {
    errno = EINVAL;
    return nullptr;
  }
  auto dev = DeviceMap::get(device->name);
  if (!dev) return nullptr;
  // The context's own open file description of bar (its lock byte is the context's life).
  mlx5tlp::UniqueFd fd(openat(dev->dir_fd(), "bar", O_RDWR | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    if (err == EMFILE || err == ENFILE)
      fail(err, "cannot open a context of '%s': too many open files (%s)", dev->name().c_str(),
           err == EMFILE ? "RLIMIT_NOFILE of this process" : "system-wide limit");
    else
      fail(err, "cannot open '%s/bar': %s", dev->dir().c_str(), std::strerror(err));
    return nullptr;
  }
  if (!dev->same_bar(fd.get())) {
    fail(ENODEV, "'%s/bar' was replaced since the device was opened", dev->dir().c_str());
    return nullptr;
  }
  int err = 0;
  uint32_t slot = kMaxContexts;
  {
    Locked lock(*dev);
    if (!lock.ok()) {
      err = fail(errno ? errno : EIO, "cannot lock device '%s'", dev->name().c_str());
    } else {
      dev->collect();
      for (uint32_t s = 0; s < kMaxContexts && slot == kMaxContexts; ++s)
        if (dev->st()->ctx[s].live == 0) slot = s;
      if (slot == kMaxContexts) {
        // the kernel caps open uverbs contexts too
        err = fail(EMFILE, "device '%s' has %u open contexts, the most it allows",
                   dev->name().c_str(), kMaxContexts);
      } else if (!take_slot_lock(fd.get(), slot)) {
        err = errno;
      } else {
        dev->st()->ctx[slot].live = 1;
        ++dev->st()->ctx[slot].gen;
      }
    }
  }
  if (err != 0) {
    errno = err;
    return nullptr;  // fd closes: the slot (if taken) is reclaimed by the next collect()
  }
  m5a_ibv_context* ctx = make_context(std::move(dev), fd.get(), slot, devx);
  if (ctx != nullptr) fd.release();  // the context owns it now; ibv_close_device closes it
  return ctx;
}

}  // namespace

M5A_EXPORT m5a_ibv_device** ibv_get_device_list(int* num_devices) {
  // The default device exists without set-up. If it cannot be made or opened because of the
  // directory or the process (not a damaged device), that is this call's failure, as
  // libibverbs fails when it cannot read sysfs: say why instead of listing nothing.
  if (!DeviceMap::get(M5A_SIM_DEFAULT_DEVICE) && errno != EPROTO && errno != ENODEV) return nullptr;
  std::vector<std::string> names;
  if (!device_names(&names)) return nullptr;
  clear_error();
  auto** list = static_cast<m5a_ibv_device**>(std::calloc(names.size() + 1, sizeof(void*)));
  if (list == nullptr) {
    errno = ENOMEM;
    return nullptr;
  }
  for (size_t i = 0; i < names.size(); ++i) list[i] = intern_device(names[i]);
  if (num_devices != nullptr) *num_devices = int(names.size());
  return list;
}

M5A_EXPORT void ibv_free_device_list(m5a_ibv_device** list) { std::free(list); }

M5A_EXPORT const char* ibv_get_device_name(m5a_ibv_device* device) {
  return device != nullptr ? device->name : nullptr;
}

// __be64 is unsigned long long on LP64 Linux (the type abi_functions.h checks).
M5A_EXPORT unsigned long long ibv_get_device_guid(m5a_ibv_device* device) {
  if (device == nullptr) return 0;
  auto dev = DeviceMap::get(device->name);
  return dev ? htobe64(dev->st()->cfg.node_guid) : 0;
}

M5A_EXPORT m5a_ibv_context* ibv_open_device(m5a_ibv_device* device) {
  return open_context(device, false);
}

M5A_EXPORT m5a_ibv_context* mlx5dv_open_device(m5a_ibv_device* device,
                                               m5a_mlx5dv_context_attr* attr) {
  if (attr != nullptr && ((attr->flags & ~uint32_t(M5A_MLX5DV_CONTEXT_FLAGS_DEVX)) != 0 ||
                          attr->comp_mask != 0)) {
    errno = EOPNOTSUPP;
    return nullptr;
  }
  return open_context(device, attr != nullptr && (attr->flags & M5A_MLX5DV_CONTEXT_FLAGS_DEVX));
}

// bool, as upstream (rdma-core v63 providers/mlx5/mlx5dv.h:
// bool mlx5dv_is_supported(struct ibv_device *device)): a caller reading an int gets garbage.
M5A_EXPORT bool mlx5dv_is_supported(m5a_ibv_device* device) { return device != nullptr; }
static_assert(std::is_same<decltype(&mlx5dv_is_supported), m5a_mlx5dv_is_supported_fn>::value,
              "mlx5dv_is_supported returns bool, as rdma-core declares it");

M5A_EXPORT int ibv_is_fork_initialized(void) {
  // Like a kernel that copies pinned pages on fork (IBV_FORK_UNNEEDED): the software device
  // pins nothing.
  return M5A_IBV_FORK_UNNEEDED;
}

// As libibverbs (v63 libibverbs/device.c, ibv_import_device): once the fd matched a device it
// belongs to the import, which closes it if anything later fails (the provider's
// mlx5_import_context -> verbs_uninit_context closes cmd_fd); on success the new context owns
// it and ibv_close_device closes it. An fd that matches no device is left to the caller, with
// libibverbs' ENODEV (no device list, or no device's cdev is the fd's), so that a caller can
// tell "still yours" (ENODEV) from "matched and closed" (every other errno).
M5A_EXPORT m5a_ibv_context* ibv_import_device(int cmd_fd) {
  std::vector<std::string> names;
  if (!device_names(&names)) {
    errno = ENODEV;
    return nullptr;
  }
  for (const std::string& name : names) {
    auto dev = DeviceMap::get(name);
    if (!dev || !dev->same_bar(cmd_fd)) continue;
    mlx5tlp::UniqueFd owned(cmd_fd);  // matched: ours from here on
    uint32_t slot = kMaxContexts;
    {
      Locked lock(*dev);
      for (uint32_t s = 0; lock.ok() && s < kMaxContexts && slot == kMaxContexts; ++s)
        if (dev->st()->ctx[s].live != 0 && slot_owned_by(*dev, cmd_fd, s)) slot = s;
    }
    if (slot == kMaxContexts) {  // the bar file, but not a context's fd (query_context fails)
      fail(EINVAL, "fd %d is '%s/bar' but not a context's command fd (closed it)", cmd_fd,
           dev->dir().c_str());
      return nullptr;
    }
    m5a_ibv_context* ctx = make_context(std::move(dev), cmd_fd, slot, true);
    if (ctx != nullptr) owned.release();
    return ctx;
  }
  fail(ENODEV, "fd %d is not a software device context's command fd", cmd_fd);
  return nullptr;
}

M5A_EXPORT int ibv_close_device(m5a_ibv_context* context) {
  if (context == nullptr) return EINVAL;
  SimContext* c = sim_ctx(context);
  close(c->ibv.cmd_fd);
  {
    // If that was the last fd of the context anywhere, the device reclaims its objects now.
    Locked lock(*c->dev);
    if (lock.ok()) c->dev->collect();
  }
  pthread_mutex_destroy(&c->ibv.mutex);
  delete c->keep;
  std::free(c);
  return 0;
}
