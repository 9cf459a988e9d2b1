#include "mlx5tlp/sigbus_guard.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <mutex>

namespace mlx5tlp {

namespace {

// Slot states. A slot goes free -> claimed (its registrant fills begin/end/prot) -> active
// (the handler may act on it) -> retiring (the owner waits for handlers inside it) -> free.
enum : uint32_t { kFree = 0, kClaimed = 1, kActive = 2, kRetiring = 3 };
// lost: intact -> replacing (one handler maps the zero pages) -> replaced; or failed (the
// zero pages could not be mapped: the fault is passed on as if unguarded).
enum : uint32_t { kIntact = 0, kReplacing = 1, kReplaced = 2, kFailed = 3 };

struct Slot {
  std::atomic<uint32_t> state{kFree};
  std::atomic<uint32_t> users{0};  // handlers between their state check and their exit
  std::atomic<uint32_t> lost{kIntact};
  std::atomic<int> prot{0};
  std::atomic<uintptr_t> begin{0}, end{0};
};
static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uintptr_t>::is_always_lock_free &&
                  std::atomic<int>::is_always_lock_free,
              "the SIGBUS handler may only use lock-free atomics (async-signal-safe)");

Slot g_slots[SigbusGuard::kSlots];
std::atomic<size_t> g_high{0};  // slots [0, g_high) were ever used: the handler scans only these
std::atomic<size_t> g_registered{0};
std::atomic<uint64_t> g_lost_total{0};

// The SIGBUS disposition before ours: written once, before our handler is installed, and
// never again (a second install would chain to ourselves).
struct sigaction g_previous {};
std::mutex g_install_mu;
bool g_installed = false;

// Another thread of the same fault may be mapping the zero pages right now: wait for it
// (a bounded wait in practice: one mmap call), then let the access retry.
bool replace(Slot& s) noexcept {
  uint32_t expect = kIntact;
  if (s.lost.compare_exchange_strong(expect, kReplacing, std::memory_order_acq_rel)) {
    const uintptr_t b = s.begin.load(std::memory_order_relaxed);
    const uintptr_t e = s.end.load(std::memory_order_relaxed);
    // mmap is a plain system call here; libwayland-server calls it from its SIGBUS handler
    // the same way. MAP_FIXED replaces the file pages atomically: no other thread ever sees
    // the range unmapped.
    void* p = ::mmap(reinterpret_cast<void*>(b), e - b, s.prot.load(std::memory_order_relaxed),
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      s.lost.store(kFailed, std::memory_order_release);
      return false;
    }
    g_lost_total.fetch_add(1, std::memory_order_relaxed);
    s.lost.store(kReplaced, std::memory_order_release);
    return true;
  }
  while ((expect = s.lost.load(std::memory_order_acquire)) == kReplacing) {
  }
  return expect == kReplaced;
}

void chain(int sig, siginfo_t* info, void* uctx) noexcept {
  const struct sigaction& p = g_previous;
  if ((p.sa_flags & SA_SIGINFO) != 0) {
    if (p.sa_sigaction != nullptr) return p.sa_sigaction(sig, info, uctx);
  } else if (p.sa_handler == SIG_IGN) {
    // An ignored SIGBUS that a fault raised cannot be ignored (the kernel forces the
    // default action when it is re-raised); a sent one stays ignored, as before.
    if (info != nullptr && info->si_code <= 0) return;
  } else if (p.sa_handler != SIG_DFL) {
    return p.sa_handler(sig);
  }
  // The default action, as without us: a fault re-executes the access and dies of SIGBUS
  // (with a core dump if enabled); a SIGBUS sent by kill(2) is sent again, delivered as soon
  // as this handler returns (it is blocked while the handler runs).
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(SIGBUS, &dfl, nullptr);
  if (info == nullptr || info->si_code <= 0) ::raise(SIGBUS);
}

void on_sigbus(int sig, siginfo_t* info, void* uctx) {
  const int saved = errno;
  // BUS_ADRERR: "nonexistent physical address" — what an access past the end of a mapped
  // file raises. Other codes (alignment, hardware memory errors) are never ours.
  if (info != nullptr && info->si_code == BUS_ADRERR) {
    const auto a = reinterpret_cast<uintptr_t>(info->si_addr);
    const size_t high = g_high.load(std::memory_order_acquire);
    for (size_t i = 0; i < high; ++i) {
      Slot& s = g_slots[i];
      if (s.state.load(std::memory_order_acquire) != kActive) continue;
      // users before the second look at state, both seq_cst, against the owner's state
      // store before its look at users (reset()): either we see it retiring or it waits.
      s.users.fetch_add(1, std::memory_order_seq_cst);
      const bool hit = s.state.load(std::memory_order_seq_cst) == kActive &&
                       a >= s.begin.load(std::memory_order_relaxed) &&
                       a < s.end.load(std::memory_order_relaxed);
      const bool handled = hit && replace(s);
      s.users.fetch_sub(1, std::memory_order_release);
      if (handled) {
        errno = saved;
        return;  // the faulting access runs again, on zero pages
      }
      if (hit) break;  // ours, but the zero pages could not be mapped: as if unguarded
    }
  }
  chain(sig, info, uctx);
  errno = saved;
}

bool install() noexcept {
  std::lock_guard<std::mutex> g(g_install_mu);
  if (g_installed) return true;
  struct sigaction prev {};
  if (::sigaction(SIGBUS, nullptr, &prev) != 0) return false;
  g_previous = prev;
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sigemptyset(&sa.sa_mask);
  // SA_ONSTACK: run on the thread's alternate signal stack when it has one. Not SA_NODEFER:
  // a second SIGBUS inside the handler would be a bug of the handler; the kernel then kills
  // the process (a blocked synchronous signal), which is the right outcome.
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  if (::sigaction(SIGBUS, &sa, nullptr) != 0) return false;
  g_installed = true;
  return true;
}

}  // namespace

SigbusGuard SigbusGuard::add(void* base, size_t len, int prot) noexcept {
  SigbusGuard out;
  if (!install()) return out;  // errno from sigaction
  const auto page = size_t(::sysconf(_SC_PAGESIZE));
  const auto b = reinterpret_cast<uintptr_t>(base);
  const uintptr_t e = b + (len + page - 1) / page * page;
  for (size_t i = 0; i < kSlots; ++i) {
    uint32_t expect = kFree;
    if (!g_slots[i].state.compare_exchange_strong(expect, kClaimed, std::memory_order_acq_rel)) continue;
    Slot& s = g_slots[i];
    s.begin.store(b, std::memory_order_relaxed);
    s.end.store(e, std::memory_order_relaxed);
    s.prot.store(prot, std::memory_order_relaxed);
    s.lost.store(kIntact, std::memory_order_relaxed);
    size_t high = g_high.load(std::memory_order_relaxed);
    while (high < i + 1 && !g_high.compare_exchange_weak(high, i + 1, std::memory_order_acq_rel)) {
    }
    s.state.store(kActive, std::memory_order_seq_cst);  // publishes begin/end/prot
    g_registered.fetch_add(1, std::memory_order_relaxed);
    out.slot_ = int(i);
    return out;
  }
  errno = ENOSPC;
  return out;
}

SigbusGuard& SigbusGuard::operator=(SigbusGuard&& o) noexcept {
  if (this != &o) {
    reset();
    slot_ = o.slot_;
    o.slot_ = -1;
  }
  return *this;
}

bool SigbusGuard::lost() const noexcept {
  return slot_ >= 0 && g_slots[slot_].lost.load(std::memory_order_acquire) == kReplaced;
}

void SigbusGuard::reset() noexcept {
  if (slot_ < 0) return;
  Slot& s = g_slots[slot_];
  s.state.store(kRetiring, std::memory_order_seq_cst);
  // A handler that saw the slot active may be mapping zero pages over the range: the owner
  // must not munmap (and the address must not be reused) before it has left.
  while (s.users.load(std::memory_order_seq_cst) != 0) {
  }
  s.begin.store(0, std::memory_order_relaxed);
  s.end.store(0, std::memory_order_relaxed);
  s.state.store(kFree, std::memory_order_release);
  g_registered.fetch_sub(1, std::memory_order_relaxed);
  slot_ = -1;
}

size_t SigbusGuard::registered() noexcept { return g_registered.load(std::memory_order_relaxed); }

uint64_t SigbusGuard::lost_total() noexcept { return g_lost_total.load(std::memory_order_relaxed); }

}  // namespace mlx5tlp
