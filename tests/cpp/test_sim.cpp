// The software device, driven through the core's loader and RAII types (no Python):
// TLP VAR alloc + mmap, export/import/unimport of all three kinds, free while imported,
// exhaustion, EOPNOTSUPP, capability bits, fork + import_device, SIGKILL reclaim.
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/devx_obj.hpp"
#include "mlx5tlp/umem.hpp"
#include "mlx5tlp/var.hpp"

using namespace mlx5tlp;

namespace {

const Library& sim() { return *Library::get(Backend::sim); }

m5a_sim_device_stats stats(const char* dev) {
  m5a_sim_device_stats s{};
  CHECK(sim().sym().sim.query_device(dev, nullptr, &s) == 0);
  return s;
}

void capabilities_and_exhaustion() {
  auto ctx = Context::open("", Backend::sim);  // first device: the default mlx5_sim0
  CHECK(ctx->name() == "mlx5_sim0");
  CHECK(ctx->node_guid() != 0);
  TlpCaps caps = ctx->query_tlp_caps();
  CHECK(caps.supported);
  CHECK(caps.gw_num_pages == 8);
  CHECK(caps.gw_page_stride == 4096);
  CHECK(caps.gw_bar_offset == 0x200000);

  std::vector<std::shared_ptr<Var>> vars;
  for (uint32_t i = 0; i < caps.gw_num_pages; ++i) vars.push_back(Var::alloc(ctx, true));
  CHECK_THROWS_KIND(Var::alloc(ctx, true), ErrorKind::resource_exhausted, ENOSPC);
  CHECK(stats("mlx5_sim0").gw_pages_free == 0);
  vars.back()->free();
  CHECK(stats("mlx5_sim0").gw_pages_free == 1);
  vars.pop_back();
  auto again = Var::alloc(ctx, true);  // the freed page is back in the pool
  CHECK(again->is_tlp() && again->length() == 4096);
  auto virtio = Var::alloc(ctx, false);
  CHECK(!virtio->is_tlp());
  ctx->close();  // closes (frees) every object still open on it
  CHECK(again->closed() && virtio->closed());
  CHECK(stats("mlx5_sim0").gw_pages_free == 8);
  CHECK_THROWS_KIND(again->export_raw(), ErrorKind::invalid_handle, EBADF);
  CHECK_THROWS_KIND(ctx->cmd_fd(), ErrorKind::invalid_handle, EBADF);
}

void non_tlp_device_and_caps_layout() {
  m5a_sim_device_config cfg{};
  cfg.tlp = 0;
  cfg.gw_pages = 3;
  cfg.gw_log_stride = 1;
  cfg.virtio_pages = 2;
  cfg.gw_slot_size = 256;
  CHECK(sim().sym().sim.create_device("notlp", &cfg) == 0);
  CHECK(sim().sym().sim.create_device("notlp", &cfg) == EEXIST);
  cfg.gw_pages = 16;  // the PRM field is 4 bits
  CHECK(sim().sym().sim.create_device("bad", &cfg) == EINVAL);
  auto ctx = Context::open("notlp", Backend::sim);
  CHECK(!ctx->query_tlp_caps().supported);
  CHECK_THROWS_KIND(Var::alloc(ctx, true), ErrorKind::not_supported, EOPNOTSUPP);
  auto v = Var::alloc(ctx, false);  // VirtIO pages still work
  CHECK(v->length() == 4096);
  // Raw QUERY_HCA_CAP general page: tlp_device_emulation_manager is byte 0x70, bit 7 of the DW.
  std::vector<uint8_t> in(16, 0);
  in[0] = 0x01;  // opcode 0x100
  in[7] = 0x01;  // op_mod: general caps, current
  auto out = ctx->general_cmd(in.data(), in.size(), 0x1010);
  CHECK((out[0x10 + 0x73] & 0x80) == 0);
  // Unknown command: firmware status BAD_OP with a syndrome, EREMOTEIO.
  in[0] = 0x0f;
  try {
    ctx->general_cmd(in.data(), in.size(), 64);
    CHECK(false);
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::devx_command && e.error_number() == EREMOTEIO);
    CHECK(e.fw_status == 0x2 && e.syndrome != 0);
  }
  CHECK_THROWS_KIND(Context::open("nosuch", Backend::sim), ErrorKind::device_not_found, ENODEV);
  // A device with live contexts cannot be removed.
  CHECK(sim().sym().sim.remove_device("notlp") == EBUSY);
  ctx->close();
  CHECK(sim().sym().sim.remove_device("notlp") == 0);
  CHECK_THROWS_KIND(Context::open("notlp", Backend::sim), ErrorKind::device_not_found, ENODEV);

  m5a_sim_device_config big{};
  big.tlp = 1;
  big.gw_pages = 15;
  big.gw_log_stride = 2;
  big.gw_bar_offset = 0x123456789000ull;
  big.gw_slot_size = 512;
  CHECK(sim().sym().sim.create_device("big", &big) == 0);
  auto b = Context::open("big", Backend::sim);
  TlpCaps caps = b->query_tlp_caps();
  CHECK(caps.supported && caps.gw_num_pages == 15 && caps.gw_log_stride == 2);
  CHECK(caps.gw_page_stride == 16384 && caps.gw_bar_offset == 0x123456789000ull);
  std::vector<std::shared_ptr<Var>> all;
  for (int i = 0; i < 15; ++i) all.push_back(Var::alloc(b, true));
  CHECK_THROWS_KIND(Var::alloc(b, true), ErrorKind::resource_exhausted, ENOSPC);  // 16th page
}

void var_export_import_in_process() {
  auto owner = Context::open("mlx5_sim0", Backend::sim);
  auto var = Var::alloc(owner, true);
  auto raw = var->export_raw();
  CHECK(raw.size() == owner->export_size(ObjectKind::var));
  CHECK(raw.size() == 24);  // upstream's struct mlx5dv_var_attrs on LP64

  auto peer = Context::import_fd(owner->cmd_fd(), Backend::sim);  // same kernel objects
  CHECK(peer->imported() && peer->name() == "mlx5_sim0");
  auto imp = Var::import(peer, raw.data(), raw.size(), true);
  CHECK(imp->imported() && imp->page_id() == var->page_id());
  CHECK(imp->mmap_off() == var->mmap_off() && imp->length() == var->length());
  // An importer may free (rdma-core: exactly one party frees, it may be an importer); that
  // is checked in tests/test_release_failures.py and test_lifetimes.py. Here the owner frees.
  CHECK_THROWS_KIND(var->unimport(), ErrorKind::invalid_argument, EINVAL);

  {
    Mapping a = var->map(PROT_READ | PROT_WRITE);
    Mapping b = imp->map(PROT_READ | PROT_WRITE);
    std::memcpy(static_cast<uint8_t*>(a.data()) + 2048, "shared", 6);
    CHECK(std::memcmp(static_cast<uint8_t*>(b.data()) + 2048, "shared", 6) == 0);
    CHECK(var->mappings() == 1);
    // No freeing under a live mapping.
    CHECK_THROWS_KIND(var->free(), ErrorKind::invalid_argument, EBUSY);
  }
  // A raw buffer of the wrong size never reaches libmlx5.
  CHECK_THROWS_KIND(Var::import(peer, raw.data(), raw.size() - 1, true), ErrorKind::export_format,
                    EINVAL);
  // Another context that does not share the objects cannot map the page.
  auto other = Context::open("mlx5_sim0", Backend::sim);
  auto foreign = Var::import(other, raw.data(), raw.size(), true);
  CHECK(!foreign->probe());
  foreign->unimport();

  var->free();  // the exporter frees...
  CHECK(!imp->probe());  // ...and the importer's next kernel use fails cleanly
  CHECK_THROWS_KIND(imp->map(PROT_WRITE), ErrorKind::invalid_handle, EINVAL);
  imp->unimport();
  CHECK_THROWS_KIND(imp->unimport(), ErrorKind::invalid_handle, EBADF);
  imp->close();  // idempotent
}

void umem_and_devx_export_import() {
  auto owner = Context::open("mlx5_sim0", Backend::sim);
  auto peer = Context::import_fd(owner->cmd_fd(), Backend::sim);
  long page = sysconf(_SC_PAGESIZE);
  void* mem = nullptr;
  CHECK(posix_memalign(&mem, size_t(page), size_t(page)) == 0);
  auto umem = Umem::reg(owner, mem, size_t(page), M5A_IBV_ACCESS_LOCAL_WRITE);
  auto ur = umem->export_raw();
  CHECK(ur.size() == 8);
  auto uimp = Umem::import(peer, ur.data(), ur.size());
  CHECK(uimp->umem_id() == umem->umem_id());

  std::vector<uint8_t> in(64, 0), out;
  in[0] = 0x0a;  // CREATE_GENERAL_OBJECT
  in[7] = 0x42;  // object type
  in[20] = 0x77;
  auto obj = DevxObj::create(owner, in.data(), in.size(), 16, &out);
  CHECK(out.size() == 16 && out[0] == 0);
  auto raw = obj->export_raw();
  CHECK(raw.size() == 32);
  auto oimp = DevxObj::import(peer, raw.data(), raw.size());
  std::vector<uint8_t> q(16, 0);
  auto qo = oimp->query(q.data(), q.size(), 128);
  CHECK(qo[16 + 20] == 0x77);  // the importer sees the object's state
  in[20] = 0x99;
  obj->modify(in.data(), in.size(), 16);
  CHECK(oimp->query(q.data(), q.size(), 128)[16 + 20] == 0x99);

  obj->free();
  CHECK_THROWS_KIND(oimp->query(q.data(), q.size(), 128), ErrorKind::invalid_handle, ENOENT);
  // An import of the destroyed object is refused at once: the device's identity check finds
  // nothing under its handle (import_raw, mlx5tlp_sim_import_check).
  CHECK_THROWS_KIND(DevxObj::import(owner, raw.data(), raw.size()), ErrorKind::invalid_handle,
                    ENOENT);
  oimp->unimport();  // unimport never reaches the kernel: always fine

  umem->free();
  uimp->close();  // unimport: no kernel call, so no error even though the UMEM is gone
  CHECK(uimp->closed());
  std::free(mem);
  CHECK_THROWS_KIND(Umem::reg(owner, nullptr, 0, 0), ErrorKind::generic, EINVAL);
}

void fork_and_import_device() {
  auto owner = Context::open("mlx5_sim0", Backend::sim);
  auto var = Var::alloc(owner, true);
  auto raw = var->export_raw();
  const int fd = owner->cmd_fd();
  pid_t pid = fork();
  if (pid == 0) {
    // The child inherited the fd: a second context on the same objects.
    int rc = 1;
    try {
      auto peer = Context::import_fd(fd, Backend::sim);
      auto imp = Var::import(peer, raw.data(), raw.size(), true);
      Mapping m = imp->map(PROT_WRITE);
      std::memcpy(static_cast<uint8_t*>(m.data()) + 100, "from child", 10);
      rc = 0;
    } catch (...) {
      rc = 3;
    }
    _exit(rc);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  Mapping m = var->map(PROT_READ | PROT_WRITE);
  CHECK(std::memcmp(static_cast<uint8_t*>(m.data()) + 100, "from child", 10) == 0);
  // The child's exit closed only its fds: the context and the VAR live on.
  CHECK(var->probe());
}

void sigkill_reclaims() {
  const uint32_t before = stats("mlx5_sim0").gw_pages_free;
  int ready[2];
  CHECK(pipe(ready) == 0);
  pid_t pid = fork();
  if (pid == 0) {
    auto ctx = Context::open("mlx5_sim0", Backend::sim);
    auto a = Var::alloc(ctx, true);
    auto b = Var::alloc(ctx, true);
    char c = 'x';
    if (write(ready[1], &c, 1) != 1) _exit(4);
    for (;;) pause();
  }
  char c;
  CHECK(read(ready[0], &c, 1) == 1);
  CHECK(stats("mlx5_sim0").gw_pages_free == before - 2);
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  m5a_sim_device_stats s = stats("mlx5_sim0");  // the query reclaims dead contexts
  CHECK(s.gw_pages_free == before);
  CHECK(s.reclaimed >= 2);
  close(ready[0]);
  close(ready[1]);
}

}  // namespace

int main() {
  char dir[] = "/tmp/mlx5tlp-sim-test-XXXXXX";
  if (mkdtemp(dir) == nullptr) return 2;
  setenv("MLX5TLP_SIM_DIR", dir, 1);
  try {
    capabilities_and_exhaustion();
    non_tlp_device_and_caps_layout();
    var_export_import_in_process();
    umem_and_devx_export_import();
    fork_and_import_device();
    sigkill_reclaims();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  std::string cmd = std::string("rm -rf ") + dir;
  if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", dir);
  return mlx5tlp_test::finish("test_sim");
}
