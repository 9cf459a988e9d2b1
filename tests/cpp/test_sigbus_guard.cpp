// The SIGBUS guard (sigbus_guard.hpp) on its own: a MAP_SHARED file truncated under a guarded
// range turns into zero pages while several threads fault on it at once (mmap(2): an access
// past the end of the file raises SIGBUS, BUS_ADRERR); the table is bounded (ENOSPC, no
// exception); and a fault outside every range — never registered, or unregistered — or a
// SIGBUS sent with kill(2) still ends the process with SIGBUS.
// Not in the ThreadSanitizer run (tests/test_native.py): TSan models the handler's MAP_FIXED
// mmap as a plain write of the range, so a thread that reads a page after another thread's
// handler replaced it — without faulting itself — is reported as a race; the kernel swaps the
// page-table entries atomically, and no byte is written by mmap that a reader could tear.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/sigbus_guard.hpp"

namespace {

using mlx5tlp::SigbusGuard;

const size_t kPage = size_t(::sysconf(_SC_PAGESIZE));
constexpr int kRW = PROT_READ | PROT_WRITE;

// A file of `pages` pages of 0xab, mapped MAP_SHARED; unlinked at once (the fd keeps it).
struct MappedFile {
  int fd = -1;
  uint8_t* p = nullptr;
  size_t len = 0;
  explicit MappedFile(size_t pages) : len(pages * kPage) {
    char path[] = "/tmp/mlx5tlp-sigbus-XXXXXX";
    fd = ::mkstemp(path);
    if (fd < 0) std::abort();
    ::unlink(path);
    std::vector<uint8_t> bytes(len, 0xab);
    if (::pwrite(fd, bytes.data(), len, 0) != ssize_t(len)) std::abort();
    void* m = ::mmap(nullptr, len, kRW, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) std::abort();
    p = static_cast<uint8_t*>(m);
  }
  ~MappedFile() {
    ::munmap(p, len);
    ::close(fd);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
};

uint8_t load(const uint8_t* p) { return *static_cast<const volatile uint8_t*>(p); }

// Runs f in a forked child; returns its wait status.
int in_child(const std::function<void()>& f) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    f();
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

bool died_of_sigbus(int status) { return WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS; }

// First, in children, with the default disposition before the guard (as a plain process has;
// a sanitizer's own SIGBUS handler is taken away so that "as before" means SIG_DFL).
void faults_outside_the_ranges_still_kill() {
  const auto install_from_default = [] {
    ::signal(SIGBUS, SIG_DFL);
    static MappedFile guarded(1);
    static SigbusGuard g = SigbusGuard::add(guarded.p, guarded.len, kRW);
    if (!g.active()) ::_exit(3);
  };
  // Never registered.
  CHECK(died_of_sigbus(in_child([&] {
    install_from_default();
    MappedFile other(2);
    if (::ftruncate(other.fd, 0) != 0) ::_exit(4);
    (void)load(other.p + kPage);
    ::_exit(5);  // survived: the guard swallowed a fault that was not its own
  })));
  // Registered, then unregistered: the handler must not touch it any more.
  CHECK(died_of_sigbus(in_child([&] {
    install_from_default();
    MappedFile other(2);
    {
      SigbusGuard g = SigbusGuard::add(other.p, other.len, kRW);
      if (!g.active()) ::_exit(3);
    }
    if (::ftruncate(other.fd, 0) != 0) ::_exit(4);
    (void)load(other.p);
    ::_exit(5);
  })));
  // Sent, not a fault (si_code SI_USER): the default action, as without the guard.
  CHECK(died_of_sigbus(in_child([&] {
    install_from_default();
    ::kill(::getpid(), SIGBUS);
    ::_exit(5);
  })));
}

void a_truncated_range_turns_into_zero_pages() {
  MappedFile f(4);
  SigbusGuard g = SigbusGuard::add(f.p, f.len, kRW);
  CHECK(g.active() && !g.lost());
  CHECK(load(f.p + 3 * kPage) == 0xab);
  const uint64_t before = SigbusGuard::lost_total();
  CHECK(::ftruncate(f.fd, off_t(kPage)) == 0);  // pages 1..3 are past the end now
  // Four threads fault at once on the pages past the end: each one's access is retried on
  // zero pages, and the range is replaced once.
  std::atomic<int> zeros{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      uint8_t* at = f.p + size_t(1 + t % 3) * kPage + size_t(t);
      if (load(at) == 0) ++zeros;
      at[64] = 1;  // writes land too (in private pages: the file is not written)
    });
  for (auto& t : ts) t.join();
  CHECK(zeros.load() == 4);
  CHECK(g.lost());
  CHECK(SigbusGuard::lost_total() == before + 1);
  CHECK(load(f.p) == 0);  // the whole range was replaced, the page still in the file too
  CHECK(load(f.p + kPage + 64) == 1);
  uint8_t byte = 0;
  CHECK(::pread(f.fd, &byte, 1, 0) == 1 && byte == 0xab);  // the file kept its first page
}

void the_table_is_bounded() {
  const size_t used = SigbusGuard::registered();
  void* m = ::mmap(nullptr, kPage, kRW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(m != MAP_FAILED);
  std::vector<SigbusGuard> all;
  for (size_t i = used; i < SigbusGuard::kSlots; ++i) {
    all.push_back(SigbusGuard::add(m, kPage, kRW));
    CHECK(all.back().active());
  }
  CHECK(SigbusGuard::registered() == SigbusGuard::kSlots);
  errno = 0;
  SigbusGuard extra = SigbusGuard::add(m, kPage, kRW);
  CHECK(!extra.active() && errno == ENOSPC);
  all.pop_back();
  CHECK(SigbusGuard::add(m, kPage, kRW).active());  // a freed slot is reused
  all.clear();
  CHECK(SigbusGuard::registered() == used);
  ::munmap(m, kPage);
}

}  // namespace

int main() {
  faults_outside_the_ranges_still_kill();
  a_truncated_range_turns_into_zero_pages();
  the_table_is_bounded();
  return mlx5tlp_test::finish("test_sigbus_guard");
}
