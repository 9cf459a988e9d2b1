// mlx5tlp/unique_fd.hpp — the one owning file-descriptor type.
//
// Every fd the core (and the software device) opens is held by a UniqueFd from the moment it
// exists until it is closed or explicitly handed to its next owner with release() (for
// example to ibv_import_device, which owns the fd it is given). Error paths therefore never
// close an fd twice and never leak one. Header-only and dependency-free so that the software
// device library, which does not link the core, uses the same type.
//
// Thread-safety: a value type; one owner at a time.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace mlx5tlp {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  explicit operator bool() const noexcept { return valid(); }
  // Gives the fd to its next owner; this object no longer closes it.
  int release() noexcept {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  // Closes the held fd (if any) and takes `fd`. errno is preserved: reset() runs on error
  // paths between a failing call and the code that reports its errno.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0 && fd_ != fd) {
      const int saved = errno;
      // Linux releases the descriptor even when close() fails with EINTR: never retry.
      ::close(fd_);
      errno = saved;
    }
    fd_ = fd;
  }
  // A close-on-exec duplicate of `fd` (invalid, errno set, on failure).
  static UniqueFd dup_of(int fd) noexcept { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

 private:
  int fd_ = -1;
};

}  // namespace mlx5tlp
