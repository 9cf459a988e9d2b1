// mlx5tlp/handover_lease.hpp — the handover lease and state header for native processes.
//
// A C++ process takes part in the handover protocol of docs/handover.md through the same two
// shared structures the Python side (mlx5tlp.handover) uses:
//   * the lease file `<control path>.lease` (LeaseRecord): being primary is holding an OFD write
//     lock on its byte 0; the kernel drops it when the holder's last fd of that open file
//     description closes (exit, SIGKILL), so a dead primary never holds the function;
//   * the 64-byte header of the state memfd (StateHeader), followed by the function model's
//     FunctionState (function.hpp: Function(layout, sink, FunctionState*, Adopt::keep)).
// The control-socket messages (HMAC-signed JSON, SCM_RIGHTS) are specified in docs/handover.md.
//
// Header-only, no link dependency. Errors are std::system_error with the errno and a message
// naming the file. Thread-safety: one thread per Lease. Stability: layout version 1; a reader
// refuses any other version (EPROTO), as the Python side does.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <system_error>

#include "mlx5tlp/unique_fd.hpp"

namespace mlx5tlp::handover {

// The lease file's 64 bytes, little-endian (the Python writer packs "<4sHHQIIQQIIQQ").
struct LeaseRecord {
  char magic[4];            // "M5LS"
  uint16_t version;         // 1
  uint16_t size;            // 64
  uint64_t generation;      // incremented by every new primary
  uint32_t pid;             // the primary
  uint32_t successor;       // designated by a planned handover while it lives (0: none)
  uint64_t start_time;      // the primary's start time (clock ticks after boot, /proc stat 22)
  uint64_t heartbeat_ns;    // CLOCK_MONOTONIC, refreshed by the primary
  uint32_t state_version;   // the handover state version the primary serves
  uint32_t reserved0;
  uint64_t digest;          // function spec digest
  uint64_t reserved1;
};
static_assert(sizeof(LeaseRecord) == 64, "lease layout version 1 is 64 bytes");
static_assert(offsetof(LeaseRecord, generation) == 8 && offsetof(LeaseRecord, pid) == 16 &&
                  offsetof(LeaseRecord, start_time) == 24 && offsetof(LeaseRecord, digest) == 48,
              "lease field offsets (docs/handover.md)");

// The first 64 bytes of the state memfd (the Python writer packs "<4sHHQQIIQII16x").
struct StateHeader {
  char magic[4];            // "M5HS"
  uint16_t version;         // handover state version 1
  uint16_t header_size;     // 64
  uint64_t generation;      // of the primary that last wrote it
  uint64_t digest;          // function spec digest
  uint32_t function_state_size;
  uint32_t function_state_version;
  uint64_t served;          // requests answered by all primaries
  uint32_t channels;        // bit mask of request channels served
  uint32_t flags;           // bit 0: paused by a planned handover
  uint32_t completer;       // the engine's captured Completer ID + 1 (0: none yet; §2.2.6.2)
  uint8_t reserved[12];
};
static_assert(sizeof(StateHeader) == 64, "state header version 1 is 64 bytes");
static_assert(offsetof(StateHeader, function_state_size) == 24 &&
                  offsetof(StateHeader, served) == 32 && offsetof(StateHeader, flags) == 44,
              "state header field offsets (docs/handover.md)");

inline constexpr uint16_t kLeaseVersion = 1;
inline constexpr uint16_t kStateVersion = 1;

// Start time of `pid` in clock ticks after boot, 0 if it does not exist.
inline uint64_t pid_start_time(uint32_t pid) noexcept {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return 0;
  char buf[1024];
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');  // the command name may hold spaces and parentheses
  if (p == nullptr) return 0;
  p += 2;
  for (int field = 3; field < 22 && *p != '\0'; ++p)
    if (*p == ' ') ++field;
  return std::strtoull(p, nullptr, 10);
}

class Lease {
 public:
  // Opens (or creates, mode 0600) the lease file; refuses a symlink or a file that is not this
  // user's private regular file (EPERM).
  explicit Lease(std::string path) : path_(std::move(path)) {
    fd_.reset(::open(path_.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (!fd_) fail(errno, "cannot open it");
    struct stat st{};
    if (::fstat(fd_.get(), &st) != 0) fail(errno, "fstat");
    if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 022) != 0)
      fail(EPERM, "it is not a private regular file of this user");
  }

  // The current record, or nullopt for a lease nobody ever held (empty or all zeros); EPROTO
  // if damaged — a truncated record too: read as "never held" it would restart the
  // generation, which fences stale handover messages (lease.py does the same).
  std::optional<LeaseRecord> read() const {
    LeaseRecord r{};
    const ssize_t n = ::pread(fd_.get(), &r, sizeof r, 0);
    if (n < 0) fail(errno, "read");
    static const LeaseRecord zero{};
    if (n == 0 || (n == static_cast<ssize_t>(sizeof r) && std::memcmp(&r, &zero, sizeof r) == 0))
      return std::nullopt;
    if (n < static_cast<ssize_t>(sizeof r)) fail(EPROTO, "damaged: a truncated record");
    if (std::memcmp(r.magic, "M5LS", 4) != 0 || r.version != kLeaseVersion || r.size != 64)
      fail(EPROTO, "damaged or of another layout version");
    return r;
  }

  // Become primary if nobody is (and no living designated successor is waiting): returns the
  // new generation, or 0 when another process holds the lease.
  uint64_t try_acquire(uint32_t state_version, uint64_t digest) {
    if (held_) return generation_;
    if (!lock(F_WRLCK)) return 0;
    std::optional<LeaseRecord> old;
    try {
      old = read();
    } catch (...) {
      lock(F_UNLCK);  // a damaged file: give the lock back before reporting it
      throw;
    }
    const uint32_t me = static_cast<uint32_t>(::getpid());
    if (old && old->successor != 0 && old->successor != me && pid_start_time(old->successor)) {
      lock(F_UNLCK);
      return 0;
    }
    LeaseRecord r{};
    std::memcpy(r.magic, "M5LS", 4);
    r.version = kLeaseVersion;
    r.size = 64;
    r.generation = (old ? old->generation : 0) + 1;
    r.pid = me;
    r.start_time = pid_start_time(me);
    r.heartbeat_ns = now_ns();
    r.state_version = state_version;
    r.digest = digest;
    write(r);
    held_ = true;
    generation_ = r.generation;
    return generation_;
  }

  // Stop being primary; with `successor`, only that process may take the lease while it lives.
  void release(uint32_t successor = 0) {
    if (!held_) return;
    auto r = read();
    if (!r || r->pid != static_cast<uint32_t>(::getpid()))
      fail(EPROTO, "rewritten by another process while held");
    r->successor = successor;
    write(*r);
    lock(F_UNLCK);
    held_ = false;
  }

  bool held() const noexcept { return held_; }
  uint64_t generation() const noexcept { return generation_; }

 private:
  static uint64_t now_ns() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
  }
  bool lock(short type) {
    struct flock fl{};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 1;  // byte 0: l_pid must be 0 for OFD locks
    if (::fcntl(fd_.get(), F_OFD_SETLK, &fl) == 0) return true;
    if (errno == EAGAIN || errno == EACCES) return false;
    fail(errno, "lock");
  }
  void write(const LeaseRecord& r) {
    if (::pwrite(fd_.get(), &r, sizeof r, 0) != static_cast<ssize_t>(sizeof r)) fail(errno, "write");
  }
  [[noreturn]] void fail(int err, const char* what) const {
    throw std::system_error(err, std::generic_category(), "lease file '" + path_ + "': " + what);
  }

  std::string path_;
  UniqueFd fd_;
  bool held_ = false;
  uint64_t generation_ = 0;
};

}  // namespace mlx5tlp::handover
