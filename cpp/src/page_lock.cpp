#include "mlx5tlp/page_lock.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

namespace {

// ---- fork: a child never uses its parent's gateways, and drops its copies of their locks ----
std::atomic<uint64_t> g_fork_gen{0};
std::mutex g_fds_mu;
std::set<int>* g_fds = nullptr;  // page-lock fds held by this process; lives for the process

void atfork_prepare() { g_fds_mu.lock(); }
void atfork_parent() { g_fds_mu.unlock(); }
void atfork_child() {
  // relaxed: the child is single-threaded here.
  g_fork_gen.fetch_add(1, std::memory_order_relaxed);
  // The inherited fds share the parent's lock (same open file description): closing our copies
  // keeps a long-lived child from holding the parent's page once the parent lets it go. The
  // PageLock objects of the child then forget these numbers (forget_after_fork), never
  // closing them a second time.
  for (int fd : *g_fds) ::close(fd);
  g_fds->clear();
  g_fds_mu.unlock();
}

// Registered when the core is loaded, before any thread of the library exists: a gateway can
// never be opened before its process's fork handlers are in place.
const bool g_atfork_registered = [] {
  g_fds = new std::set<int>();
  return pthread_atfork(atfork_prepare, atfork_parent, atfork_child) == 0;
}();

void track(int fd, bool add) {
  std::lock_guard<std::mutex> l(g_fds_mu);
  if (add) g_fds->insert(fd);
  else g_fds->erase(fd);
}

[[noreturn]] void refuse(const std::string& what, const std::string& path, int err,
                         const std::string& why) {
  throw Error(ErrorKind::generic, what, err, "refusing " + path + ": " + why);
}

}  // namespace

uint64_t fork_generation() noexcept {
  // relaxed: only the forking thread changes it, before any thread of the child runs.
  return g_fork_gen.load(std::memory_order_relaxed);
}

std::string PageLock::default_dir(bool* is_default) {
  const char* env = std::getenv("MLX5TLP_LOCK_DIR");
  *is_default = env == nullptr || *env == '\0';
  if (!*is_default) return env;
  return "/dev/shm/mlx5tlp-gw-" + std::to_string(geteuid());
}

void PageLock::check_dir(const std::string& dir, bool create) {
  const char* what = "gateway page-lock directory";
  struct stat st{};
  if (::lstat(dir.c_str(), &st) != 0) {
    const int err = errno;
    if (err != ENOENT || !create) refuse(what, dir, err, std::strerror(err));
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
      refuse(what, dir, errno, std::string("cannot create it: ") + std::strerror(errno));
    if (::lstat(dir.c_str(), &st) != 0) refuse(what, dir, errno, std::strerror(errno));
  }
  if (S_ISLNK(st.st_mode)) refuse(what, dir, EPERM, "it is a symbolic link");
  if (!S_ISDIR(st.st_mode)) refuse(what, dir, ENOTDIR, "it is not a directory");
  if (st.st_uid != geteuid())
    refuse(what, dir, EPERM,
           "it is owned by uid " + std::to_string(st.st_uid) + ", not by this user (uid " +
               std::to_string(geteuid()) + "); another user could take or fake page locks");
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 || (create && (st.st_mode & 077) != 0)) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", unsigned(st.st_mode & 07777));
    refuse(what, dir, EPERM,
           std::string("its mode is ") + mode + "; it must be private to this user (0700)");
  }
}

PageLock PageLock::acquire(const std::string& dir, const std::string& file,
                           const std::string& busy_detail) {
  const std::string path = dir + "/" + file;
  const char* what = "gateway page lock";
  // O_NOFOLLOW: a symlink planted at the path is refused (ELOOP), never followed.
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600));
  if (!fd) {
    const int err = errno;
    refuse(what, path, err, err == ELOOP ? "it is a symbolic link" : std::strerror(err));
  }
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) refuse(what, path, errno, std::strerror(errno));
  if (!S_ISREG(st.st_mode)) refuse(what, path, EPERM, "it is not a regular file");
  if (st.st_uid != geteuid())
    refuse(what, path, EPERM,
           "it is owned by uid " + std::to_string(st.st_uid) + ", not by this user");
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0)
    refuse(what, path, EPERM, "it is group- or world-writable");
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_len = 1;
  // An OFD lock: owned by this open file description (not the process), so two gateways of one
  // process conflict too, and it is released when the last fd of the description closes.
  if (::fcntl(fd.get(), F_OFD_SETLK, &fl) != 0) {
    const int err = errno;
    if (err == EAGAIN || err == EACCES) throw Error(ErrorKind::generic, "open gateway", EBUSY, busy_detail);
    refuse(what, path, err, std::string("cannot lock it: ") + std::strerror(err));
  }
  track(fd.get(), true);
  PageLock lock;
  lock.fd_ = std::move(fd);
  lock.path_ = path;
  return lock;
}

void PageLock::reset() noexcept {
  if (!fd_) return;
  track(fd_.get(), false);
  fd_.reset();  // releases the page to the next committer
}

void PageLock::forget_after_fork() noexcept {
  // Not tracked any more (the child's set was cleared), and already closed by atfork_child.
  static_cast<void>(fd_.release());
}

}  // namespace mlx5tlp
