// Device directories and files: where they live, who may own them, how they are created.
//
// The device files are input from other processes and other users. The root directory must be
// ours and not group/world-writable (the default one, which we create, exactly 0700): a
// directory another user made or can write could hold planted files. Every file is opened
// O_NOFOLLOW|O_CLOEXEC relative to its directory's fd and checked with fstat (a regular file
// of ours, one link), so a planted symlink is refused instead of followed. Files are allocated
// with posix_fallocate: a full filesystem fails at creation with ENOSPC, never with SIGBUS on
// a later store into the mapping.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <new>

#include "device_map.hpp"

namespace mlx5tlp::sim {

namespace {

const char* env_root() {
  const char* env = std::getenv("MLX5TLP_SIM_DIR");
  return (env != nullptr && *env != '\0') ? env : nullptr;
}

// What kind of directory it is, for messages.
const char* root_label() { return env_root() != nullptr ? " (MLX5TLP_SIM_DIR)" : ""; }

bool private_enough(const struct stat& sb, bool exact_0700, const std::string& path,
                    const char* what) {
  if (sb.st_uid != geteuid()) {
    fail(EACCES, "%s '%s' is owned by uid %u, not by this user (uid %u): refusing to use it",
         what, path.c_str(), unsigned(sb.st_uid), unsigned(geteuid()));
    return false;
  }
  const unsigned mode = unsigned(sb.st_mode & 07777);
  if ((mode & 022) != 0 || (exact_0700 && (mode & 077) != 0)) {
    fail(EACCES, "%s '%s' has mode 0%o: it must not be %s (chmod 700 it, or remove it)", what,
         path.c_str(), mode, exact_0700 ? "accessible to group or others" : "group/world-writable");
    return false;
  }
  return true;
}

int random_suffix(char* out, size_t len) {
  static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  unsigned char r[16];
  if (getrandom(r, sizeof r, 0) != ssize_t(sizeof r)) {
    const uint64_t t = uint64_t(getpid()) * 0x9e3779b97f4a7c15ull ^ uint64_t(clock());
    std::memcpy(r, &t, 8);
    std::memcpy(r + 8, &t, 8);
  }
  for (size_t i = 0; i + 1 < len && i < sizeof r; ++i) out[i] = digits[r[i] % 36];
  out[len - 1] = '\0';
  return 0;
}

void remove_tree_at(int root_fd, const char* name) {
  int fd = openat(root_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd >= 0) {
    if (DIR* d = fdopendir(fd)) {
      while (dirent* e = readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0)
          unlinkat(dirfd(d), e->d_name, 0);
      closedir(d);  // closes fd
    } else {
      close(fd);
    }
  }
  unlinkat(root_fd, name, AT_REMOVEDIR);
}

// Creates `file` in the (new, private) directory and reserves `size` bytes for it.
int create_file(int dir_fd, const std::string& dir, const char* file, size_t size, UniqueFd* out) {
  UniqueFd fd(openat(dir_fd, file, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd) return fail(errno, "cannot create '%s/%s': %s", dir.c_str(), file, std::strerror(errno));
  if (size != 0) {
    // posix_fallocate returns the error (it does not set errno).
    if (int rc = posix_fallocate(fd.get(), 0, off_t(size))) {
      if (rc == ENOSPC)
        return fail(rc, "the software device directory '%s' is full: '%s' needs %zu bytes",
                    dir.c_str(), file, size);
      return fail(rc, "cannot allocate %zu bytes for '%s/%s': %s", size, dir.c_str(), file,
                  std::strerror(rc));
    }
  }
  if (out != nullptr) *out = std::move(fd);
  return 0;
}

int write_state(int dir_fd, const std::string& dir, const m5a_sim_device_config& cfg) {
  UniqueFd fd;
  if (int rc = create_file(dir_fd, dir, "state", sizeof(DeviceState), &fd)) return rc;
  void* p = mmap(nullptr, sizeof(DeviceState), PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return fail(errno, "cannot map '%s/state': %s", dir.c_str(), std::strerror(errno));
  // The file is zero-filled: construct only what needs more than zeros.
  auto* st = static_cast<DeviceState*>(p);
  st->version = kStateVersion;
  st->state_size = sizeof(DeviceState);
  st->cfg = cfg;
  st->next_id = 0x100;
  for (auto& g : st->gw) {
    new (&g.owner) std::atomic<uint32_t>(0);
    new (&g.gen) std::atomic<uint64_t>(0);
    new (&g.consumed) std::atomic<uint64_t>(0);
  }
  for (auto& s : st->sessions) new (&s.gen) std::atomic<uint32_t>(0);
  for (auto& ch : st->chan) {
    new (&ch.head) std::atomic<uint64_t>(0);
    new (&ch.tail) std::atomic<uint64_t>(0);
    for (uint32_t i = 0; i < kRequestSlots; ++i) new (&ch.word[i]) std::atomic<uint64_t>(i);  // FREE(i)
  }
  // Magic last: a reader that sees it sees a fully initialised state (the file is reachable by
  // name only after the directory rename, so this is belt and braces).
  __atomic_store_n(&st->magic, kStateMagic, __ATOMIC_RELEASE);
  munmap(p, sizeof(DeviceState));
  return 0;
}

}  // namespace

std::string device_root() {
  if (const char* env = env_root()) return env;
  return "/dev/shm/mlx5tlp-sim-" + std::to_string(geteuid());
}

UniqueFd open_root(bool create) {
  const std::string root = device_root();
  const bool is_default = env_root() == nullptr;
  if (create && mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) {
    const int err = errno;
    if (err == ENOENT)
      fail(err, "cannot create the software device directory '%s'%s: its parent does not exist",
           root.c_str(), root_label());
    else if (err == EACCES || err == EROFS || err == EPERM)
      fail(err, "cannot create the software device directory '%s'%s: the parent is not writable (%s)",
           root.c_str(), root_label(), std::strerror(err));
    else
      fail(err, "cannot create the software device directory '%s'%s: %s", root.c_str(),
           root_label(), std::strerror(err));
    return UniqueFd();
  }
  // The default directory is ours by name only: never follow a symlink planted in its place.
  UniqueFd fd(open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | (is_default ? O_NOFOLLOW : 0)));
  if (!fd) {
    const int err = errno;
    if (err == ENOTDIR || err == ELOOP)
      fail(ENOTDIR, "the software device directory '%s'%s is not a directory%s", root.c_str(),
           root_label(), err == ELOOP ? " (a symbolic link)" : "");
    else if (err == ENOENT)
      fail(ENODEV, "the software device directory '%s'%s does not exist", root.c_str(), root_label());
    else if (err == EMFILE || err == ENFILE)
      fail(err, "cannot open the software device directory '%s': too many open files", root.c_str());
    else
      fail(err, "cannot open the software device directory '%s'%s: %s", root.c_str(),
           root_label(), std::strerror(err));
    return UniqueFd();
  }
  struct stat sb;
  if (fstat(fd.get(), &sb) != 0) {
    fail(errno, "cannot stat '%s': %s", root.c_str(), std::strerror(errno));
    return UniqueFd();
  }
  if (!private_enough(sb, is_default, root, "the software device directory")) return UniqueFd();
  return fd;
}

UniqueFd open_device_dir(int root_fd, const std::string& root, const std::string& name) {
  const std::string path = root + "/" + name;
  UniqueFd fd(openat(root_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    if (err == ENOENT)
      fail(ENODEV, "no software device '%s' (no directory '%s')", name.c_str(), path.c_str());
    else if (err == ENOTDIR || err == ELOOP)
      fail(EACCES, "'%s' is not a device directory (a file or a symbolic link): refusing it", path.c_str());
    else
      fail(err, "cannot open '%s': %s", path.c_str(), std::strerror(err));
    return UniqueFd();
  }
  struct stat sb;
  if (fstat(fd.get(), &sb) != 0) {
    fail(errno, "cannot stat '%s': %s", path.c_str(), std::strerror(errno));
    return UniqueFd();
  }
  if (!private_enough(sb, false, path, "the device directory")) return UniqueFd();
  return fd;
}

UniqueFd open_device_file(int dir_fd, const std::string& dir, const char* file, struct stat* sb) {
  UniqueFd fd(openat(dir_fd, file, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY));
  if (!fd) {
    const int err = errno;
    if (err == ELOOP)
      fail(EACCES, "'%s/%s' is a symbolic link: refusing to follow it", dir.c_str(), file);
    else if (err == ENOENT)
      fail(ENODEV, "'%s/%s' is missing: not a complete software device", dir.c_str(), file);
    else
      fail(err, "cannot open '%s/%s': %s", dir.c_str(), file, std::strerror(err));
    return UniqueFd();
  }
  if (fstat(fd.get(), sb) != 0) {
    fail(errno, "cannot stat '%s/%s': %s", dir.c_str(), file, std::strerror(errno));
    return UniqueFd();
  }
  if (!S_ISREG(sb->st_mode)) {
    fail(EACCES, "'%s/%s' is not a regular file: refusing it", dir.c_str(), file);
    return UniqueFd();
  }
  if (sb->st_nlink != 1) {
    fail(EACCES, "'%s/%s' has %u hard links: refusing it", dir.c_str(), file, unsigned(sb->st_nlink));
    return UniqueFd();
  }
  if (!private_enough(*sb, false, dir + "/" + file, "the device file")) return UniqueFd();
  return fd;
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
  if (c.tlp > 1) return fail(EINVAL, "tlp must be 0 or 1, not %u", c.tlp);
  if (c.gw_pages < 1 || c.gw_pages > kMaxGwPages)
    return fail(EINVAL, "gw_pages must be 1..%u, not %u", kMaxGwPages, c.gw_pages);
  if (c.gw_log_stride > 4) return fail(EINVAL, "gw_log_stride must be 0..4, not %u", c.gw_log_stride);
  if (c.virtio_pages > kMaxVirtioPages)
    return fail(EINVAL, "virtio_pages must be 0..%u, not %u", kMaxVirtioPages, c.virtio_pages);
  const uint32_t s = c.gw_slot_size;
  if (s < 64 || s > 1024 || (s & (s - 1)) != 0)
    return fail(EINVAL, "slot_size must be a power of two in 64..1024, not %u", s);
  if ((size_t(4096) << c.gw_log_stride) < gw::kSlots + 2 * size_t(s))
    return fail(EINVAL, "a %u-byte slot leaves fewer than 2 slots in a %zu-byte page", s,
                size_t(4096) << c.gw_log_stride);
  if ((c.flags & ~kKnownDeviceFlags) != 0) return fail(EINVAL, "unknown device flags 0x%x", c.flags);
  return 0;
}

size_t bar_size(const m5a_sim_device_config& cfg) {
  return (size_t(4096) << cfg.gw_log_stride) * cfg.gw_pages +
         size_t(kVirtioPageSize) * cfg.virtio_pages;
}

int create_device(const std::string& name, const m5a_sim_device_config& cfg) {
  if (!valid_name(name))
    return fail(EINVAL, "'%s' is not a device name (letters, digits, '_' and '-', at most %d)",
                name.c_str(), M5A_SYSFS_NAME_MAX - 1);
  if (int rc = validate_config(cfg)) return rc;
  UniqueFd root_fd = open_root(true);
  if (!root_fd) return errno;
  const std::string root = device_root();
  // Build the device under a private name, then rename() it into place: concurrent creators
  // race on the rename, and a reader never sees a half-made device.
  char tmp[24] = ".tmp-";
  random_suffix(tmp + 5, sizeof tmp - 5);
  if (mkdirat(root_fd.get(), tmp, 0700) != 0) {
    const int err = errno;
    if (err == ENOSPC)
      return fail(err, "the software device directory '%s' is full", root.c_str());
    return fail(err, "cannot create device '%s' in '%s'%s: %s", name.c_str(), root.c_str(),
                root_label(), std::strerror(err));
  }
  const std::string tmp_path = root + "/" + tmp;
  int rc = 0;
  {
    UniqueFd dir_fd(openat(root_fd.get(), tmp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!dir_fd) rc = fail(errno, "cannot open '%s': %s", tmp_path.c_str(), std::strerror(errno));
    if (rc == 0) rc = write_state(dir_fd.get(), tmp_path, cfg);
    if (rc == 0) rc = create_file(dir_fd.get(), tmp_path, "bar", bar_size(cfg), nullptr);
  }
  if (rc == 0 && renameat(root_fd.get(), tmp, root_fd.get(), name.c_str()) != 0) {
    rc = errno;
    if (rc == ENOTEMPTY || rc == EEXIST) rc = fail(EEXIST, "device '%s' already exists", name.c_str());
    else fail(rc, "cannot create device '%s': %s", name.c_str(), std::strerror(rc));
  }
  if (rc != 0) {
    const int saved = errno;
    remove_tree_at(root_fd.get(), tmp);
    errno = saved;
  }
  return rc;
}

}  // namespace mlx5tlp::sim
