// mlx5tlp/page_lock.hpp — one committer per TLP gateway page, across processes; and fork().
//
// mlx5 hardware forbids starting a doorbell write while another is in progress on the same page,
// so a page has at most one Gateway in all processes. PageLock is that rule: an OFD write lock
// on a per-page lock file, released when the lock's last fd closes (also when the process dies).
//
// What the lock is keyed by: the page's mmap offset on the device, the value the kernel (or the
// software device) checked when it let us map the page — never the page_id of an export
// envelope, which a CRC-valid forged envelope can change while keeping the mapping of a live page.
// On the software device mmap offsets are device-global (page index x stride), so the key is
// exact. On real hardware the kernel hands out VAR mmap offsets per uverbs context
// (rdma_user_mmap_entry_insert_range on the ucontext's xarray), so two independent contexts
// (not sharing a command fd) may see the same offset for different pages: they then refuse each
// other's second gateway with EBUSY (a false refusal, never a second committer). docs/ring.md.
//
// Lock files: opened O_NOFOLLOW | O_CLOEXEC (a planted symlink is refused), checked with fstat
// (a regular file owned by the user, not group/world-writable), in a directory owned by the user
// and not group/world-writable: the software device's own device directory, or for the rdma
// backend $MLX5TLP_LOCK_DIR if set, else /dev/shm/mlx5tlp-gw-<uid> (created mode 0700; one owned
// by someone else, or a symlink, is refused). Refusals are Error(generic, EPERM) naming the path.
//
// fork(): at-fork handlers are registered when the core is loaded (a static initializer). A
// child closes its copies of every page-lock fd (they share the parent's lock), and
// fork_generation() tells objects made before the fork that they belong to the parent.
//
// Thread-safety: acquire() from any thread; a PageLock is a move-only value with one owner.
#pragma once

#include <cstdint>
#include <string>

#include "mlx5tlp/unique_fd.hpp"

namespace mlx5tlp {

class PageLock {
 public:
  PageLock() noexcept = default;
  ~PageLock() { reset(); }
  PageLock(PageLock&& o) noexcept : fd_(std::move(o.fd_)), path_(std::move(o.path_)) {}
  PageLock& operator=(PageLock&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::move(o.fd_);
      path_ = std::move(o.path_);
    }
    return *this;
  }
  PageLock(const PageLock&) = delete;
  PageLock& operator=(const PageLock&) = delete;

  // Takes the lock file `dir`/`file` (created 0600 if missing). `dir` must already be a safe
  // directory (see check_dir). Throws Error(generic, EBUSY) with `busy_detail` when another
  // open file description holds it; Error(generic, EPERM/ELOOP/...) naming the path for an
  // unsafe file.
  static PageLock acquire(const std::string& dir, const std::string& file,
                          const std::string& busy_detail);
  // Refuses (Error(generic, EPERM), naming the path and why) a `dir` that is not a directory
  // (a symlink included), not owned by the effective user, or group/world-writable; with
  // `create`, makes it (mode 0700) when missing, and then also requires mode 0700 exactly.
  static void check_dir(const std::string& dir, bool create);
  // The rdma backend's lock directory: $MLX5TLP_LOCK_DIR, else /dev/shm/mlx5tlp-gw-<euid>.
  static std::string default_dir(bool* is_default);

  bool held() const noexcept { return fd_.valid(); }
  const std::string& path() const noexcept { return path_; }
  // Releases the lock (closes the fd); the page is free for the next committer.
  void reset() noexcept;
  // In a forked child: the at-fork handler already closed this fd; forget it without closing
  // (the number may be reused by an unrelated fd by now: never a second close).
  void forget_after_fork() noexcept;

 private:
  UniqueFd fd_;
  std::string path_;
};

// fork()s this process descends from since the core was loaded: 0 in the process that loaded
// it, incremented in each child by the at-fork handler (registered at load time).
uint64_t fork_generation() noexcept;

}  // namespace mlx5tlp
