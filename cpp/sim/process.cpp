// Per-process state of the software device: the registry of DeviceMaps, fork handling, the
// claimer session, the RLIMIT_MEMLOCK identity, and fds a forked child must not keep.
#include <fcntl.h>
#include <pthread.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <vector>

#include "device_map.hpp"

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
  uint64_t t = g_pin_token.load(std::memory_order_acquire);  // acquire: pairs with the CAS
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
    // relaxed: only this thread exists in the child.
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

void register_map(DeviceMap* d, bool add) {
  std::lock_guard<ForkMutex> g(reg_mu());
  auto& r = registry();
  if (add) r.push_back(d);
  else r.erase(std::remove(r.begin(), r.end(), d), r.end());
}

bool DeviceMap::session(uint32_t* slot, uint32_t* gen) {
  auto valid = [&](uint64_t k) {
    // relaxed: the fork generation changes only in a child's single thread.
    return (k >> 63) != 0 && ((k >> 48) & 0x7fff) == (g_fork_gen.load(std::memory_order_relaxed) & 0x7fff);
  };
  // acquire: the slot and generation were stored before the key that publishes them.
  uint64_t k = session_key_.load(std::memory_order_acquire);
  if (!valid(k)) {
    Locked lock(*this);
    if (!lock.ok()) return false;
    k = session_key_.load(std::memory_order_relaxed);  // relaxed: under the device mutex
    if (!valid(k)) {
      // A private OFD of bar: its lock byte lives exactly as long as this process holds it.
      UniqueFd fd(openat(dir_fd_.get(), "bar", O_RDWR | O_NOFOLLOW | O_CLOEXEC));
      if (!fd || !same_bar(fd.get())) {
        fail(errno ? errno : ENODEV, "cannot open a claimer session on '%s/bar'", dir_.c_str());
        return false;
      }
      uint32_t s = 0;
      for (; s < kMaxSessions; ++s) {
        struct flock fl = lock_byte(F_WRLCK, kSessionLockBase + s);
        if (fcntl(fd.get(), F_OFD_SETLK, &fl) == 0) break;  // free: its last holder is gone
      }
      if (s == kMaxSessions) {
        fail(EUSERS, "all %u claimer sessions of device '%s' are held by live processes",
             kMaxSessions, name_.c_str());
        return false;
      }
      // relaxed: under the device mutex, and we hold the session slot's lock byte.
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
