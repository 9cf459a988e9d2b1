// DEVX UMEMs: registration with the kernel's RLIMIT_MEMLOCK accounting, dereg (with injected
// faults), export/import/unimport.
//
// RLIMIT_MEMLOCK as the kernel applies it (drivers/infiniband/core/umem.c, ib_umem_get): the
// pages a registration spans (from the page holding `addr` to the one holding its last byte)
// are added to the registering process's pinned total (mm->pinned_vm), and the registration
// fails with ENOMEM when that total exceeds RLIMIT_MEMLOCK (soft limit, in pages) unless the
// process is capable(CAP_IPC_LOCK). The pages stay counted against the registering process
// until the UMEM is deregistered, by whichever process does it. The software device pins
// nothing; it counts: a process's total is the sum over the live UMEMs it registered on every
// software device it has open, and "capable" is CAP_IPC_LOCK in the effective set (root has it
// unless it dropped it).
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "dv_common.hpp"

using namespace mlx5tlp::sim;

namespace {

bool capable_ipc_lock() {
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &hdr, data) != 0) return false;
  return (data[CAP_IPC_LOCK / 32].effective >> (CAP_IPC_LOCK % 32)) & 1;
}

// Pages pinned by this process on every software device it has open.
uint64_t pinned_pages(uint64_t token) {
  uint64_t total = 0;
  DeviceMap::for_each([&](DeviceMap& d) {
    Locked lock(d);
    if (!lock.ok()) return;
    for (const Object& o : d.st()->obj)
      if (o.kind == ObjKind::umem && o.pin_token == token) total += o.pin_pages;
  });
  return total;
}

}  // namespace

M5A_EXPORT m5a_mlx5dv_devx_umem* mlx5dv_devx_umem_reg(m5a_ibv_context* context, void* addr,
                                                      size_t size, uint32_t access) {
  if (context == nullptr || addr == nullptr || size == 0 || (access & ~0x7fffu) != 0) {
    errno = EINVAL;
    return nullptr;
  }
  SimContext* c = sim_ctx(context);
  if (!c->devx) {
    errno = EOPNOTSUPP;  // DEVX calls need a context opened with MLX5DV_CONTEXT_FLAGS_DEVX
    return nullptr;
  }
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  const uint64_t first = uint64_t(reinterpret_cast<uintptr_t>(addr)) / page;
  const uint64_t last = (uint64_t(reinterpret_cast<uintptr_t>(addr)) + size - 1) / page;
  const uint64_t npages = last - first + 1;
  const uint64_t token = pin_token();
  // This process's registrations one at a time: its total is computed and extended as one step.
  std::lock_guard<ForkMutex> serial(registration_mutex());
  struct rlimit rl;
  if (!capable_ipc_lock() && getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    const uint64_t limit = uint64_t(rl.rlim_cur) / page;
    const uint64_t pinned = pinned_pages(token);
    if (pinned + npages > limit) {
      fail(ENOMEM, "RLIMIT_MEMLOCK is %llu bytes (%llu pages); this process has %llu pages "
           "registered and this UMEM spans %llu more", (unsigned long long)rl.rlim_cur,
           (unsigned long long)limit, (unsigned long long)pinned, (unsigned long long)npages);
      return nullptr;
    }
  }
  auto* u = calloc_one<SimUmem>();
  if (u == nullptr) return nullptr;
  int err = 0;
  {
    Locked lock(*c->dev);
    Object* o = nullptr;
    if (!lock.ok()) {
      err = errno;
    } else if (claim_entry(c, &o) < 0) {
      err = fail(ENOMEM, "the object table of device '%s' is full (%u)", c->dev->name().c_str(), kMaxObjects);
    } else {
      o->id = c->dev->st()->next_id++;
      o->aux = size;
      o->pin_token = token;
      o->pin_pages = npages;
      o->kind = ObjKind::umem;
      u->dv.umem_id = o->id;
      u->ctx = c;
      u->handle = o->handle;
    }
  }
  if (err != 0) {
    std::free(u);
    errno = err;
    return nullptr;
  }
  return &u->dv;
}

M5A_EXPORT int mlx5dv_devx_umem_dereg(m5a_mlx5dv_devx_umem* umem) {
  auto* u = reinterpret_cast<SimUmem*>(umem);
  {
    Locked lock(*u->ctx->dev);
    if (!lock.ok()) return errno;
    DeviceMap& d = *u->ctx->dev;
    const int i = d.find(u->handle, ObjKind::umem, u->ctx->slot, u->ctx->gen);
    if (i < 0) return -i;  // ENOENT / EINVAL; as upstream, the struct stays allocated on failure
    uint32_t left = 0;
    if (int err = d.take_fault(FaultOp::umem_dereg, &left))
      return fail(err, "injected fault: umem_dereg fails (%u more)", left);  // the UMEM lives on
    d.release(uint32_t(i));
  }
  std::free(u);
  return 0;
}

M5A_EXPORT int mlx5dv_devx_umem_export(m5a_mlx5dv_devx_umem* umem, void* data) {
  auto* u = reinterpret_cast<SimUmem*>(umem);
  UmemAttrs a{u->handle, umem->umem_id};
  std::memcpy(data, &a, sizeof a);
  return 0;
}

M5A_EXPORT m5a_mlx5dv_devx_umem* mlx5dv_devx_umem_import(m5a_ibv_context* context, void* data) {
  UmemAttrs a;
  std::memcpy(&a, data, sizeof a);
  auto* u = calloc_one<SimUmem>();
  if (u == nullptr) return nullptr;
  u->dv.umem_id = a.umem_id;
  u->ctx = sim_ctx(context);
  u->handle = a.handle;
  return &u->dv;
}

M5A_EXPORT void mlx5dv_devx_umem_unimport(m5a_mlx5dv_devx_umem* umem) {
  std::free(reinterpret_cast<SimUmem*>(umem));
}
