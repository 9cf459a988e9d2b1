// The software device behaves like the kernel + libmlx5, through the raw C ABI:
// VAR alloc errnos per kernel/firmware variant, the mmap handler's rules, lowest-free handle
// reuse per context (a stale import names a newer object), injected destroy/command failures
// that leave the object alive, and RLIMIT_MEMLOCK on the process's total.
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "sim_util.hpp"

using namespace simtest;

namespace {

uint32_t get_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

uint32_t handle_of(const uint8_t* export_buf) {
  uint32_t h;
  std::memcpy(&h, export_buf, 4);  // every export buffer starts with the kernel handle
  return h;
}

m5a_mlx5dv_var* alloc_var(m5a_ibv_context* c, uint32_t flags, int* err) {
  errno = 0;
  m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, flags);
  *err = v == nullptr ? errno : 0;
  return v;
}

void var_errnos() {
  int err = 0;
  // No VAR support at all: the kernel exposes no VAR object -> EPROTONOSUPPORT for any alloc.
  make_device("novar", config(4, 0, 4, 256, M5A_SIM_DEV_NO_VAR));
  m5a_ibv_context* c = open_raw("novar");
  CHECK(c != nullptr);
  CHECK(alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, &err) == nullptr && err == EPROTONOSUPPORT);
  CHECK(alloc_var(c, 0, &err) == nullptr && err == EPROTONOSUPPORT);
  // Unknown flag bits: libmlx5 refuses them before anything reaches the kernel.
  CHECK(alloc_var(c, 0x6, &err) == nullptr && err == EOPNOTSUPP);
  CHECK(last_error().find("unknown VAR alloc flags") != std::string::npos);
  sym().ibv_close_device(c);

  // A kernel without MLX5_IB_ATTR_VAR_OBJ_ALLOC_FLAGS: the TLP flag is an unknown mandatory
  // attribute (EPROTONOSUPPORT), even without TLP emulation; VirtIO VARs (no flags) work.
  make_device("noattr", config(4, 0, 4, 256, M5A_SIM_DEV_NO_VAR_FLAGS_ATTR));
  make_device("noattr0", config(4, 0, 4, 256, M5A_SIM_DEV_NO_VAR_FLAGS_ATTR, 0));
  for (const char* dev : {"noattr", "noattr0"}) {
    c = open_raw(dev);
    CHECK(alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, &err) == nullptr && err == EPROTONOSUPPORT);
    m5a_mlx5dv_var* v = alloc_var(c, 0, &err);
    CHECK(v != nullptr && v->length == 4096);
    sym().mlx5dv_free_var(v);
    sym().ibv_close_device(c);
  }

  // TLP flag without tlp_device_emulation_manager: EOPNOTSUPP (the kernel's capability check).
  make_device("notlp", config(4, 0, 4, 256, 0, 0));
  c = open_raw("notlp");
  CHECK(alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, &err) == nullptr && err == EOPNOTSUPP);
  sym().ibv_close_device(c);
  // Neither TLP emulation nor VirtIO: var_is_supported() is false -> EPROTONOSUPPORT.
  make_device("nothing", config(4, 0, 0, 256, 0, 0));
  c = open_raw("nothing");
  CHECK(alloc_var(c, 0, &err) == nullptr && err == EPROTONOSUPPORT);
  sym().ibv_close_device(c);

  // Exhaustion: ENOSPC for both regions (alloc_var_entry: find_first_zero_bit -> -ENOSPC).
  make_device("full", config(2, 0, 1));
  c = open_raw("full");
  m5a_mlx5dv_var* a = alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, &err);
  m5a_mlx5dv_var* b = alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, &err);
  CHECK(a != nullptr && b != nullptr);
  CHECK(alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, &err) == nullptr && err == ENOSPC);
  m5a_mlx5dv_var* d = alloc_var(c, 0, &err);
  CHECK(d != nullptr);
  CHECK(alloc_var(c, 0, &err) == nullptr && err == ENOSPC);
  for (m5a_mlx5dv_var* x : {a, b, d}) sym().mlx5dv_free_var(x);
  CHECK(stats("full").gw_pages_free == 2);
  sym().ibv_close_device(c);
}

void mmap_rules() {
  make_device("mm", config(2, 2));  // 16 KiB gateway pages
  m5a_ibv_context* c = open_raw("mm");
  int err = 0;
  m5a_mlx5dv_var* v = alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, &err);
  CHECK(v != nullptr && v->length == 16384);
  auto try_map = [&](size_t len, int flags, off_t off) {
    errno = 0;
    void* p = ss().mmap(c, len, PROT_READ | PROT_WRITE, flags, off);
    const int e = p == MAP_FAILED ? errno : 0;
    if (p != MAP_FAILED) munmap(p, len);
    return e;
  };
  CHECK(try_map(v->length, MAP_SHARED, v->mmap_off) == 0);
  // The kernel's rdma_user_mmap_entry_get: VM_SHARED only, exactly the entry's pages.
  CHECK(try_map(v->length, MAP_PRIVATE, v->mmap_off) == EINVAL);
  CHECK(last_error().find("MAP_SHARED") != std::string::npos);
  CHECK(try_map(v->length / 2, MAP_SHARED, v->mmap_off) == EINVAL);
  CHECK(try_map(v->length * 2, MAP_SHARED, v->mmap_off) == EINVAL);
  CHECK(try_map(4096, MAP_SHARED, v->mmap_off) == EINVAL);
  CHECK(try_map(0, MAP_SHARED, v->mmap_off) == EINVAL);
  // The VMA is whole pages: a length that rounds up to the entry's is the entry's length.
  CHECK(try_map(v->length - 100, MAP_SHARED, v->mmap_off) == 0);
  // Not the start of a VAR (the kernel matches the entry's first page offset).
  CHECK(try_map(4096, MAP_SHARED, v->mmap_off + 4096) == EINVAL);
  const off_t off = v->mmap_off;
  sym().mlx5dv_free_var(v);
  CHECK(try_map(16384, MAP_SHARED, off) == EINVAL);  // freed: no entry
  sym().ibv_close_device(c);
}

void handles_lowest_free() {
  make_device("hd", config());
  m5a_ibv_context* c = open_raw("hd");
  void* mem = nullptr;
  CHECK(posix_memalign(&mem, 4096, 8192) == 0);
  // The kernel's idr (xa_alloc on the uverbs file): the lowest free number, from 0, per
  // context, shared by every object type.
  m5a_mlx5dv_devx_umem* u1 = sym().mlx5dv_devx_umem_reg(c, mem, 4096, 1);
  uint8_t in[16] = {0x0a, 0, 0, 0, 0, 0, 0, 0x42};
  uint8_t out[64] = {};
  m5a_mlx5dv_devx_obj* o1 = sym().mlx5dv_devx_obj_create(c, in, sizeof in, out, sizeof out);
  const uint32_t o1_id = get_be32(out + 8);
  uint8_t eu1[8], eo1[32];
  CHECK(sym().mlx5dv_devx_umem_export(u1, eu1) == 0);
  CHECK(sym().mlx5dv_devx_obj_export(o1, eo1) == 0);
  CHECK(handle_of(eu1) == 0 && handle_of(eo1) == 1);
  // Another context has its own numbers.
  m5a_ibv_context* other = open_raw("hd");
  m5a_mlx5dv_devx_umem* uo = sym().mlx5dv_devx_umem_reg(other, mem, 4096, 1);
  uint8_t euo[8];
  sym().mlx5dv_devx_umem_export(uo, euo);
  CHECK(handle_of(euo) == 0);
  CHECK(sym().mlx5dv_devx_umem_dereg(uo) == 0);
  sym().ibv_close_device(other);

  // Free both; the next objects reuse the numbers, with new (device-unique) ids.
  const uint32_t u1_id = u1->umem_id;
  CHECK(sym().mlx5dv_devx_umem_dereg(u1) == 0);
  CHECK(sym().mlx5dv_devx_obj_destroy(o1) == 0);
  in[15] = 0x77;  // the new object's state differs
  m5a_mlx5dv_devx_obj* o2 = sym().mlx5dv_devx_obj_create(c, in, sizeof in, out, sizeof out);
  const uint32_t o2_id = get_be32(out + 8);
  m5a_mlx5dv_devx_umem* u2 = sym().mlx5dv_devx_umem_reg(c, mem, 8192, 1);
  uint8_t eu2[8], eo2[32];
  sym().mlx5dv_devx_umem_export(u2, eu2);
  sym().mlx5dv_devx_obj_export(o2, eo2);
  CHECK(handle_of(eo2) == 0 && handle_of(eu2) == 1);
  CHECK(o2_id != o1_id && u2->umem_id != u1_id);

  // A stale DEVX import (o1's buffer: handle 1) now names u2, a UMEM: the kernel's type check
  // refuses it with EINVAL, not ENOENT.
  m5a_mlx5dv_devx_obj* stale_o = sym().mlx5dv_devx_obj_import(c, eo1);
  // The device's identity check (what the core asks after every import) sees it first.
  CHECK(sym().sim.import_check(c, 3, stale_o) == ESTALE);
  uint8_t q[16] = {0x0a, 0x02};
  CHECK(sym().mlx5dv_devx_obj_query(stale_o, q, sizeof q, out, sizeof out) == EINVAL);
  sym().mlx5dv_devx_obj_unimport(stale_o);
  // A stale UMEM import (u1's buffer: handle 0) names o2 now: EINVAL again...
  m5a_mlx5dv_devx_umem* stale_u = sym().mlx5dv_devx_umem_import(c, eu1);
  CHECK(sym().sim.import_check(c, 2, stale_u) == ESTALE);
  CHECK(sym().mlx5dv_devx_umem_dereg(stale_u) == EINVAL);
  sym().mlx5dv_devx_umem_unimport(stale_u);
  // ...and once o2 is gone and a UMEM takes handle 0, the stale import deregisters that newer,
  // different UMEM, as with the kernel. Only the recorded umem_id tells them apart.
  CHECK(sym().mlx5dv_devx_obj_destroy(o2) == 0);
  m5a_mlx5dv_devx_umem* u3 = sym().mlx5dv_devx_umem_reg(c, mem, 4096, 1);
  uint8_t eu3[8];
  sym().mlx5dv_devx_umem_export(u3, eu3);
  CHECK(handle_of(eu3) == 0 && u3->umem_id != u1_id);
  stale_u = sym().mlx5dv_devx_umem_import(c, eu1);
  CHECK(stale_u->umem_id == u1_id);
  CHECK(sym().sim.import_check(c, 2, stale_u) == ESTALE);  // u3 has another id
  {
    m5a_mlx5dv_devx_umem* live = sym().mlx5dv_devx_umem_import(c, eu3);
    CHECK(sym().sim.import_check(c, 2, live) == 0);
    sym().mlx5dv_devx_umem_unimport(live);
  }
  CHECK(sym().mlx5dv_devx_umem_dereg(stale_u) == 0);  // destroyed u3
  CHECK(sym().mlx5dv_devx_umem_dereg(u3) == ENOENT);
  sym().mlx5dv_devx_umem_unimport(u3);
  CHECK(stats("hd").umems == 1);  // u2 only
  CHECK(sym().mlx5dv_devx_umem_dereg(u2) == 0);
  sym().ibv_close_device(c);
  std::free(mem);
}

void injected_faults() {
  make_device("flt", config());
  m5a_ibv_context* c = open_raw("flt");
  uint8_t in[16] = {0x0a, 0, 0, 0, 0, 0, 0, 0x42};
  uint8_t out[64] = {};
  m5a_mlx5dv_devx_obj* o = sym().mlx5dv_devx_obj_create(c, in, sizeof in, out, sizeof out);
  CHECK(o != nullptr);
  CHECK(ss().inject_fault("flt", "no_such_op", EBUSY, 1) == EINVAL);
  CHECK(ss().inject_fault("flt", "devx_obj_destroy", 0, 1) == EINVAL);
  // Injected by another process: the state lives in the device file.
  pid_t pid = fork();
  if (pid == 0) _exit(ss().inject_fault("flt", "devx_obj_destroy", EBUSY, 2) == 0 ? 0 : 1);
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  uint8_t q[16] = {0x0a, 0x02};
  CHECK(sym().mlx5dv_devx_obj_destroy(o) == EBUSY);
  CHECK(last_error().find("devx_obj_destroy") != std::string::npos);
  CHECK(sym().mlx5dv_devx_obj_query(o, q, sizeof q, out, sizeof out) == 0);  // still alive
  CHECK(sym().mlx5dv_devx_obj_destroy(o) == EBUSY);
  CHECK(stats("flt").devx_objs == 1);

  // EREMOTEIO on a command with an outbox: status BAD_RESOURCE_STATE, syndrome 0x5a5a0000|left.
  CHECK(ss().inject_fault("flt", "devx_obj_query", EREMOTEIO, 2) == 0);
  CHECK(sym().mlx5dv_devx_obj_query(o, q, sizeof q, out, sizeof out) == EREMOTEIO);
  CHECK(out[0] == 0x05 && get_be32(out + 4) == 0x5a5a0001u);
  CHECK(sym().mlx5dv_devx_obj_query(o, q, sizeof q, out, sizeof out) == EREMOTEIO);
  CHECK(get_be32(out + 4) == 0x5a5a0000u);
  CHECK(sym().mlx5dv_devx_obj_query(o, q, sizeof q, out, sizeof out) == 0 && out[0] == 0);
  CHECK(ss().inject_fault("flt", "devx_obj_modify", EREMOTEIO, 1) == 0);
  in[15] = 0x99;
  CHECK(sym().mlx5dv_devx_obj_modify(o, in, sizeof in, out, sizeof out) == EREMOTEIO);
  CHECK(sym().mlx5dv_devx_obj_query(o, q, sizeof q, out, sizeof out) == 0);
  CHECK(out[16 + 15] == 0);  // the failed modify changed nothing
  CHECK(ss().inject_fault("flt", "devx_obj_create", EREMOTEIO, 1) == 0);
  errno = 0;
  CHECK(sym().mlx5dv_devx_obj_create(c, in, sizeof in, out, sizeof out) == nullptr);
  CHECK(errno == EREMOTEIO && out[0] == 0x05);
  CHECK(stats("flt").devx_objs == 1);  // nothing created
  CHECK(sym().mlx5dv_devx_obj_destroy(o) == 0);

  void* mem = nullptr;
  CHECK(posix_memalign(&mem, 4096, 4096) == 0);
  m5a_mlx5dv_devx_umem* u = sym().mlx5dv_devx_umem_reg(c, mem, 4096, 1);
  CHECK(ss().inject_fault("flt", "umem_dereg", EBUSY, 5) == 0);
  CHECK(sym().mlx5dv_devx_umem_dereg(u) == EBUSY);
  CHECK(stats("flt").umems == 1);
  CHECK(ss().inject_fault("flt", "umem_dereg", EBUSY, 0) == 0);  // count 0 clears it
  CHECK(sym().mlx5dv_devx_umem_dereg(u) == 0);
  CHECK(ss().inject_fault("flt", "umem_dereg", EBUSY, 3) == 0);
  sym().ibv_close_device(c);
  m5a_sim_reset_result r{};
  CHECK(ss().reset_device("flt", &r) == 0);
  CHECK(r.faults == 1);
  std::free(mem);
}

// libibverbs' ibv_import_device owns the fd once it matched a device (closing it on a later
// failure); an fd that matches no device stays the caller's.
void import_device_fd_ownership() {
  make_device("imp", config());
  const std::string bar = std::string(getenv("MLX5TLP_SIM_DIR")) + "/imp/bar";
  const int not_ctx = open(bar.c_str(), O_RDWR | O_CLOEXEC);  // the device's file, no context
  CHECK(not_ctx >= 0);
  errno = 0;
  CHECK(sym().ibv_import_device(not_ctx) == nullptr && errno == EINVAL);
  CHECK(fcntl(not_ctx, F_GETFD) == -1 && errno == EBADF);  // closed by the import, once
  const int other = open("/dev/null", O_RDONLY | O_CLOEXEC);
  CHECK(sym().ibv_import_device(other) == nullptr && errno == ENODEV);  // as libibverbs
  CHECK(fcntl(other, F_GETFD) != -1);  // not ours: left open
  close(other);
  m5a_ibv_context* c = open_raw("imp");
  const int dup_fd = fcntl(c->cmd_fd, F_DUPFD_CLOEXEC, 0);
  m5a_ibv_context* imp = sym().ibv_import_device(dup_fd);
  CHECK(imp != nullptr && imp->cmd_fd == dup_fd);
  sym().ibv_close_device(imp);
  CHECK(fcntl(dup_fd, F_GETFD) == -1);  // the imported context owned it
  sym().ibv_close_device(c);
}

bool drop_ipc_lock() {
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &hdr, data) != 0) return false;
  data[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
  return syscall(SYS_capset, &hdr, data) == 0;
}

// In a child: RLIMIT_MEMLOCK of 3 pages, CAP_IPC_LOCK dropped from the effective set.
int memlock_child() {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  struct rlimit rl{3 * page, 3 * page};
  if (setrlimit(RLIMIT_MEMLOCK, &rl) != 0 || !drop_ipc_lock()) return 10;
  m5a_ibv_context* c = open_raw("ml");
  if (c == nullptr) return 11;
  void* mem = nullptr;
  if (posix_memalign(&mem, page, 8 * page) != 0) return 12;
  auto* base = static_cast<uint8_t*>(mem);
  // Each registration alone is under the limit; the total is what counts.
  m5a_mlx5dv_devx_umem* a = sym().mlx5dv_devx_umem_reg(c, base, page, 1);
  m5a_mlx5dv_devx_umem* b = sym().mlx5dv_devx_umem_reg(c, base + page, page, 1);
  if (a == nullptr || b == nullptr) return 13;
  // 2 bytes across a page boundary pin 2 pages: 4 > 3.
  errno = 0;
  if (sym().mlx5dv_devx_umem_reg(c, base + 4 * page - 1, 2, 1) != nullptr || errno != ENOMEM) return 14;
  if (last_error().find("RLIMIT_MEMLOCK") == std::string::npos) return 15;
  m5a_mlx5dv_devx_umem* d = sym().mlx5dv_devx_umem_reg(c, base + 4 * page, page, 1);  // 3 pages
  if (d == nullptr) return 16;
  // The total spans devices too.
  m5a_ibv_context* c2 = open_raw("ml2");
  if (c2 == nullptr || sym().mlx5dv_devx_umem_reg(c2, base, 1, 1) != nullptr) return 17;
  // Deregistering gives the pages back.
  if (sym().mlx5dv_devx_umem_dereg(a) != 0) return 18;
  if (sym().mlx5dv_devx_umem_reg(c2, base, 1, 1) == nullptr) return 19;
  return 0;
}

void memlock_total() {
  make_device("ml", config());
  make_device("ml2", config());
  pid_t pid = fork();
  if (pid == 0) _exit(memlock_child());
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    std::fprintf(stderr, "memlock child: status %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  // With CAP_IPC_LOCK (or an infinite limit) nothing is counted against the limit.
  m5a_ibv_context* c = open_raw("ml");
  void* mem = nullptr;
  CHECK(posix_memalign(&mem, 4096, 4096) == 0);
  m5a_mlx5dv_devx_umem* u = sym().mlx5dv_devx_umem_reg(c, mem, 4096, 1);
  CHECK(u != nullptr);
  CHECK(sym().mlx5dv_devx_umem_dereg(u) == 0);
  sym().ibv_close_device(c);
  std::free(mem);
}

}  // namespace

int main() {
  ScratchDir dir;
  try {
    var_errnos();
    mmap_rules();
    handles_lowest_free();
    injected_faults();
    memlock_total();
    import_device_fd_ownership();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  return mlx5tlp_test::finish("test_sim_kernel");
}
