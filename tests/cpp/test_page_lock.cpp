// One committer per page (mlx5tlp::PageLock) and fork(): the lock is keyed by the page's mmap
// offset, so an import whose page_id was changed (a forged export buffer with the same mmap_off)
// cannot open a second writer; lock files are refused behind a planted symlink, and lock
// directories owned by another user, group/world-writable, or symlinked are refused; at-fork
// handlers are registered at load time. Forks, so not run under TSan.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/gateway.hpp"
#include "mlx5tlp/page_lock.hpp"
#include "mlx5tlp/var.hpp"

using namespace mlx5tlp;

namespace {

constexpr const char* kDev = "pglock";
const SimSymbols& simsym() { return Library::get(Backend::sim)->sym().sim; }

// Runs child() in a forked process; its return value is the exit code.
template <class F>
int in_child(F&& child) {
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) _exit(child());
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

// Issue 10 C4: the at-fork handlers exist before the first gateway (registered when the core
// is loaded, not lazily): a child forked before any gateway was opened knows it is a child.
void fork_handlers_registered_at_load() {
  CHECK(fork_generation() == 0);
  CHECK(in_child([] { return fork_generation() == 1 ? 0 : 1; }) == 0);
  CHECK(in_child([] { return in_child([] { return fork_generation() == 2 ? 0 : 1; }); }) == 0);
}

// Issue 10 D6: the raw VAR export is {u32 handle, u32 page_id, u32 length, pad, off_t mmap_off}
// (the sim's and rdma-core's layout). A buffer with a different page_id but the same mmap_off
// is refused at import by the software device's identity check (ESTALE); rdma-core would import
// it (upstream import validates nothing), which is why the page lock is keyed by the verified
// mapping offset: a genuine import of the same page, whatever it says, gets no second lock.
void forged_page_id_gets_no_second_writer() {
  auto ctx = Context::open(kDev, Backend::sim);
  auto var = Var::alloc(ctx, true);
  auto gw = Gateway::open(var, nullptr, {});
  auto raw = var->export_raw();
  CHECK(raw.size() == 24);
  uint32_t page_id = 0;
  std::memcpy(&page_id, raw.data() + 4, 4);
  CHECK(page_id == var->page_id());
  auto forged = raw;
  const uint32_t other_page = page_id + 1;
  std::memcpy(forged.data() + 4, &other_page, 4);
  auto peer = Context::import_fd(ctx->cmd_fd(), Backend::sim);
  CHECK_THROWS_KIND(Var::import(peer, forged.data(), forged.size(), true), ErrorKind::invalid_handle,
                    ESTALE);
  auto imp = Var::import(peer, raw.data(), raw.size(), true);
  CHECK(imp->mmap_off() == var->mmap_off());
  CHECK_THROWS_ERRNO(Gateway::open(imp, nullptr, {}), EBUSY);
  CHECK(imp->mappings() == 0);  // the refused open unmapped again
  gw->close();
  auto again = Gateway::open(imp, nullptr, {});  // released: now it may (the page is live)
  again->close();
  imp->unimport();
  peer->close();
  var->free();
  ctx->close();
}

std::string device_dir() {
  char root[4096];
  CHECK(simsym().device_dir(root, sizeof root) == 0);
  return std::string(root) + "/" + kDev;
}

// A symlink planted where the page-lock file goes is refused (O_NOFOLLOW), and its target is
// left untouched.
void planted_symlink_refused(const std::string& scratch) {
  auto ctx = Context::open(kDev, Backend::sim);
  auto var = Var::alloc(ctx, true);
  char off[32];
  std::snprintf(off, sizeof off, "%llx", static_cast<unsigned long long>(var->mmap_off()));
  const std::string lock = device_dir() + "/gw-off" + off + ".lock";
  const std::string target = scratch + "/victim";
  FILE* f = std::fopen(target.c_str(), "w");
  CHECK(f != nullptr);
  if (f != nullptr) {
    std::fputs("precious", f);
    std::fclose(f);
  }
  ::unlink(lock.c_str());
  CHECK(::symlink(target.c_str(), lock.c_str()) == 0);
  CHECK_THROWS_ERRNO(Gateway::open(var, nullptr, {}), ELOOP);
  struct stat st{};
  CHECK(::stat(target.c_str(), &st) == 0 && st.st_size == 8);
  CHECK(var->mappings() == 0);
  ::unlink(lock.c_str());
  Gateway::open(var, nullptr, {})->close();  // a regular file again: fine
  var->free();
  ctx->close();
}

void lock_directories(const std::string& scratch) {
  // Created private (0700) when missing; accepted then.
  const std::string fresh = scratch + "/locks";
  PageLock::check_dir(fresh, true);
  struct stat st{};
  CHECK(::lstat(fresh.c_str(), &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & 0777) == 0700);
  {
    PageLock a = PageLock::acquire(fresh, "x.lock", "busy");
    CHECK(a.held());
    CHECK_THROWS_ERRNO(PageLock::acquire(fresh, "x.lock", "busy"), EBUSY);
  }
  PageLock::acquire(fresh, "x.lock", "busy").reset();  // released with its owner
  // Group/world-writable, or (for the one we create) not 0700: refused.
  CHECK(::chmod(fresh.c_str(), 0777) == 0);
  CHECK_THROWS_ERRNO(PageLock::check_dir(fresh, false), EPERM);
  CHECK(::chmod(fresh.c_str(), 0750) == 0);
  PageLock::check_dir(fresh, false);  // not writable by others: acceptable when given
  CHECK_THROWS_ERRNO(PageLock::check_dir(fresh, true), EPERM);
  CHECK(::chmod(fresh.c_str(), 0700) == 0);
  // A symlink to a good directory is refused.
  const std::string link = scratch + "/link";
  CHECK(::symlink(fresh.c_str(), link.c_str()) == 0);
  CHECK_THROWS_ERRNO(PageLock::check_dir(link, true), EPERM);
  // A lock file owned by someone else, or group-writable, is refused.
  if (geteuid() == 0) {
    const std::string foreign = fresh + "/foreign.lock";
    FILE* f = std::fopen(foreign.c_str(), "w");
    CHECK(f != nullptr);
    if (f != nullptr) std::fclose(f);
    CHECK(::chown(foreign.c_str(), 65534, 65534) == 0);
    CHECK_THROWS_ERRNO(PageLock::acquire(fresh, "foreign.lock", "busy"), EPERM);
  }
  const std::string shared = fresh + "/shared.lock";
  FILE* f = std::fopen(shared.c_str(), "w");
  if (f != nullptr) std::fclose(f);
  CHECK(::chmod(shared.c_str(), 0666) == 0);
  CHECK_THROWS_ERRNO(PageLock::acquire(fresh, "shared.lock", "busy"), EPERM);
  // A directory pre-created by ANOTHER user (as the default /dev/shm/mlx5tlp-gw-<uid> could be):
  // a forked child switches to uid 65534 and creates it; we refuse it.
  if (geteuid() != 0) {
    std::printf("test_page_lock: SKIPPED the second-uid case: needs root (to setuid)\n");
    return;
  }
  const std::string planted = scratch + "/mlx5tlp-gw-planted";
  CHECK(::chmod(scratch.c_str(), 0777) == 0);
  CHECK(in_child([&] {
          if (setgid(65534) != 0 || setuid(65534) != 0) return 1;
          return ::mkdir(planted.c_str(), 0700) == 0 ? 0 : 2;
        }) == 0);
  CHECK(::lstat(planted.c_str(), &st) == 0 && st.st_uid == 65534);
  CHECK_THROWS_ERRNO(PageLock::check_dir(planted, true), EPERM);
  CHECK_THROWS_ERRNO(PageLock::check_dir(planted, false), EPERM);
  CHECK(::chmod(scratch.c_str(), 0700) == 0);
}

}  // namespace

int main() {
  fork_handlers_registered_at_load();  // first: before any gateway exists
  char dir[] = "/tmp/mlx5tlp-pglock-XXXXXX";
  char scratch[] = "/tmp/mlx5tlp-pglock-scratch-XXXXXX";
  if (mkdtemp(dir) == nullptr || mkdtemp(scratch) == nullptr) return 2;
  setenv("MLX5TLP_SIM_DIR", dir, 1);
  try {
    m5a_sim_device_config cfg{};
    cfg.tlp = 1;
    cfg.gw_pages = 4;
    cfg.virtio_pages = 0;
    cfg.gw_slot_size = 256;
    CHECK(simsym().create_device(kDev, &cfg) == 0);
    forged_page_id_gets_no_second_writer();
    planted_symlink_refused(scratch);
    lock_directories(scratch);
    CHECK(simsym().remove_device(kDev) == 0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  for (const char* d : {dir, scratch}) {
    std::string cmd = std::string("rm -rf ") + d;
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", d);
  }
  return mlx5tlp_test::finish("test_page_lock");
}
