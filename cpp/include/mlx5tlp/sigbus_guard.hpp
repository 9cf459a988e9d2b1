// mlx5tlp/sigbus_guard.hpp — survive the truncation of a file that is mapped MAP_SHARED.
//
// A MAP_SHARED mapping of a file faults with SIGBUS (si_code BUS_ADRERR) on any page that lies
// past the end of the file (mmap(2), "SIGBUS"). The engine maps files it does not control
// (a spec's `shared` file, an application's fd): any process of the same user can ftruncate
// one while the engine's lanes read and write it, and SIGBUS would kill the whole emulator.
//
// Prior art: Wayland's libwayland-server (wl_shm_buffer_begin_access / its SIGBUS handler)
// keeps the client pools being accessed in a list; when a SIGBUS hits inside one it maps
// anonymous zero pages MAP_FIXED over the pool, flags the client as broken, and returns so
// that the faulting access is retried and succeeds. This module does the same, natively:
//
//   * A process-wide table of guarded ranges, fixed size (kSlots), registered and
//     unregistered with atomics only: the SIGBUS handler reads it without locks or
//     allocation (async-signal-safe: it calls only mmap, sigaction and tgkill).
//   * The handler is installed once, at the first registration, with SA_SIGINFO | SA_ONSTACK
//     (SA_ONSTACK: a thread with an alternate signal stack — Python's faulthandler sets one —
//     runs it there, so a fault near the end of a thread's stack can still be handled).
//   * A hit (si_code BUS_ADRERR, si_addr inside a registered range): the WHOLE range is
//     replaced by MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS zero pages of the same protection,
//     its `lost` flag is set, and the handler returns: the access is retried on zeros. The
//     owner of the range reports the loss (MemoryRegion::backing_lost; docs/engine.md).
//   * Anything else — another address, another si_code, a SIGBUS sent with kill(2) — goes to
//     the handler that was installed before ours (chained), or, if that was SIG_DFL/SIG_IGN,
//     is re-raised with the default action: a real bug still ends the process with SIGBUS.
//
// Ownership: a SigbusGuard (RAII, movable) holds one slot; its destructor unregisters the
// range, waiting for a handler that is inside that slot, so the owner may munmap right after.
// Destroy it BEFORE munmap: an unregistered range is never touched by the handler.
// Thread-safety: add/remove from any thread, concurrently with faults on any thread.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlx5tlp {

class SigbusGuard {
 public:
  static constexpr size_t kSlots = 1024;  // ranges guarded at once in a process

  SigbusGuard() noexcept = default;
  // Guards [base, base + len) (an mmap result and its length; rounded up to whole pages),
  // mapped with `prot`. On failure an inactive guard with errno set: ENOSPC when all kSlots
  // are taken, sigaction's errno if the handler cannot be installed. No exceptions and no
  // dependency on the core's errors, so that the software device (which does not link the
  // core) guards its own files with the same code (its own copy, its own table and handler,
  // chained like any other).
  static SigbusGuard add(void* base, size_t len, int prot) noexcept;
  ~SigbusGuard() { reset(); }
  SigbusGuard(SigbusGuard&& o) noexcept : slot_(o.slot_) { o.slot_ = -1; }
  SigbusGuard& operator=(SigbusGuard&& o) noexcept;
  SigbusGuard(const SigbusGuard&) = delete;
  SigbusGuard& operator=(const SigbusGuard&) = delete;

  // Whether a SIGBUS hit the range: its bytes are now private zero pages, the file is gone.
  bool lost() const noexcept;
  bool active() const noexcept { return slot_ >= 0; }
  void reset() noexcept;  // unregister (idempotent)

  // Process-wide: ranges registered now, and ranges lost since the process started.
  static size_t registered() noexcept;
  static uint64_t lost_total() noexcept;

 private:
  int slot_ = -1;
};

}  // namespace mlx5tlp
