// VARs (TLP gateway pages and VirtIO doorbell pages): alloc/free, export/import/unimport, and
// the "kernel" mmap handler. Errnos are the kernel's and libmlx5's (docs/sim.md):
//   unknown flag bits            EOPNOTSUPP  libmlx5 check_comp_mask, before any ioctl
//                                            (rdma-core v63 providers/mlx5/verbs.c)
//   no VAR support (flag NO_VAR) EPROTONOSUPPORT  the kernel exposes no VAR object when
//                                            var_is_supported() is false, and uverbs answers
//                                            an unknown method so (drivers/infiniband/hw/mlx5/main.c)
//   TLP flag, kernel without MLX5_IB_ATTR_VAR_OBJ_ALLOC_FLAGS (flag NO_VAR_FLAGS_ATTR)
//                                EPROTONOSUPPORT  libibverbs marks every attribute mandatory
//                                            (libibverbs/cmd_ioctl.h) and uverbs refuses an
//                                            unknown mandatory attribute so
//   TLP flag without tlp_device_emulation_manager, or no VirtIO pages  EOPNOTSUPP (main.c)
//   every page of the region allocated   ENOSPC  (main.c alloc_var_entry: find_first_zero_bit)
#include <sys/mman.h>
#include <unistd.h>

#include "dv_common.hpp"

using namespace mlx5tlp::sim;

namespace mlx5tlp::sim {

void init_gateway_page(DeviceMap& d, uint32_t page_id) {
  uint8_t* p = d.gw_page(page_id);
  std::memset(p, 0, d.gw_stride());
  const uint32_t slot = d.cfg().gw_slot_size;
  const uint32_t count = d.gw_slot_count();
  const uint32_t ver = gw::kLayoutVersion | (slot << 16);
  std::memcpy(p + gw::kVersionOff, &ver, 4);
  std::memcpy(p + gw::kSlotCount, &count, 4);
  std::memcpy(p + gw::kPageId, &page_id, 4);
  const uint64_t gen = ++d.st()->page_gen;
  std::memcpy(p + gw::kGeneration, &gen, 8);
  GwPage& g = d.st()->gw[page_id];
  g.consumed.store(0, std::memory_order_relaxed);  // relaxed: published by the gen store
  // release: a device model that sees the new generation reloads consumed (0) and the page.
  g.gen.store(gen, std::memory_order_release);
  // Magic last with release: the writer reads the geometry only after seeing it.
  __atomic_store_n(reinterpret_cast<uint32_t*>(p + gw::kMagicOff), gw::kMagic, __ATOMIC_RELEASE);
}

}  // namespace mlx5tlp::sim

namespace {

// Under lock: why no page can be handed out, or 0 with *page set.
int pick_page(DeviceMap& d, bool tlp, uint32_t* page) {
  const m5a_sim_device_config& cfg = d.cfg();
  const bool var_supported = (cfg.flags & M5A_SIM_DEV_NO_VAR) == 0 && (cfg.tlp != 0 || cfg.virtio_pages != 0);
  if (!var_supported)
    return fail(EPROTONOSUPPORT, "device '%s' has no VAR support (the kernel exposes no VAR object)",
                d.name().c_str());
  if (tlp && (cfg.flags & M5A_SIM_DEV_NO_VAR_FLAGS_ATTR) != 0)
    return fail(EPROTONOSUPPORT, "the kernel of device '%s' does not know the VAR alloc flags "
                "attribute (MLX5_IB_ATTR_VAR_OBJ_ALLOC_FLAGS)", d.name().c_str());
  if (tlp && cfg.tlp == 0)
    return fail(EOPNOTSUPP, "device '%s' has no TLP emulation (tlp_device_emulation_manager is 0)",
                d.name().c_str());
  if (!tlp && cfg.virtio_pages == 0)
    return fail(EOPNOTSUPP, "device '%s' has no VirtIO VAR pages", d.name().c_str());
  DeviceState* st = d.st();
  if (tlp) {
    for (int pass = 0; pass < 2; ++pass) {
      for (uint32_t p = 0; p < cfg.gw_pages; ++p)
        if (st->gw[p].owner.load(std::memory_order_relaxed) == 0) {  // relaxed: under the lock
          *page = p;
          return 0;
        }
      // Pages still draining for a device model that is gone: nobody will collect them (a new
      // model would discard them), so they go back to the pool.
      if (pass == 0 && !d.host_attached()) {
        for (uint32_t p = 0; p < cfg.gw_pages; ++p) {
          // relaxed: owners change under the device mutex, which we hold.
          if (st->gw[p].owner.load(std::memory_order_relaxed) != kPageDraining) continue;
          const int64_t n = d.unconsumed(p);
          st->stale_completions += n > 0 ? uint64_t(n) : 0;
          d.scrub_gw_page(p);
        }
      }
    }
    return fail(ENOSPC, "every TLP gateway page of device '%s' is allocated (%u)", d.name().c_str(), cfg.gw_pages);
  }
  for (uint32_t p = 0; p < cfg.virtio_pages; ++p)
    if (st->virtio_owner[p] == 0) {
      *page = p;
      return 0;
    }
  return fail(ENOSPC, "every VirtIO VAR page of device '%s' is allocated (%u)", d.name().c_str(), cfg.virtio_pages);
}

}  // namespace

M5A_EXPORT m5a_mlx5dv_var* mlx5dv_alloc_var(m5a_ibv_context* context, uint32_t flags) {
  if (context == nullptr) {
    errno = EINVAL;
    return nullptr;
  }
  if ((flags & ~uint32_t(M5A_MLX5DV_VAR_ALLOC_FLAG_TLP)) != 0) {
    fail(EOPNOTSUPP, "unknown VAR alloc flags 0x%x", flags);  // libmlx5's check_comp_mask
    return nullptr;
  }
  SimContext* c = sim_ctx(context);
  const bool tlp = flags & M5A_MLX5DV_VAR_ALLOC_FLAG_TLP;
  auto* v = calloc_one<SimVar>();
  if (v == nullptr) return nullptr;
  int err = 0;
  {
    Locked lock(*c->dev);
    if (!lock.ok()) {
      err = errno;
    } else {
      DeviceMap& d = *c->dev;
      d.collect();
      uint32_t page = 0;
      Object* o = nullptr;
      int idx = -1;
      err = pick_page(d, tlp, &page);
      if (err == 0 && (idx = claim_entry(c, &o)) < 0)
        err = fail(ENOMEM, "the object table of device '%s' is full (%u)", d.name().c_str(), kMaxObjects);
      if (err == 0) {
        o->id = page;
        o->length = tlp ? uint32_t(d.gw_stride()) : kVirtioPageSize;
        o->aux = tlp ? uint64_t(page) * d.gw_stride() : d.gw_region() + uint64_t(page) * kVirtioPageSize;
        if (tlp) {
          init_gateway_page(d, page);
          // release: the device model polls a page once it sees an owner, header written.
          d.st()->gw[page].owner.store(uint32_t(idx) + 1, std::memory_order_release);
        } else {
          d.st()->virtio_owner[page] = uint32_t(idx) + 1;
        }
        o->kind = tlp ? ObjKind::tlp_var : ObjKind::virtio_var;
        v->dv.page_id = page;
        v->dv.length = o->length;
        v->dv.mmap_off = off_t(o->aux);
        v->ctx = c;
        v->handle = o->handle;
      }
    }
  }
  if (err != 0) {
    std::free(v);
    errno = err;
    return nullptr;
  }
  return &v->dv;
}

M5A_EXPORT void mlx5dv_free_var(m5a_mlx5dv_var* var) {
  if (var == nullptr) return;
  auto* v = reinterpret_cast<SimVar*>(var);
  {
    Locked lock(*v->ctx->dev);
    const int i = lock.ok() ? v->ctx->dev->find_var(v->handle, v->ctx->slot, v->ctx->gen) : -1;
    if (i >= 0) v->ctx->dev->release(uint32_t(i));
    else errno = ENOENT;  // upstream asserts here; the struct is freed either way
  }
  std::free(v);
}

M5A_EXPORT int mlx5dv_var_export(m5a_mlx5dv_var* var, void* data) {
  auto* v = reinterpret_cast<SimVar*>(var);
  VarAttrs a{};
  a.handle = v->handle;
  a.page_id = var->page_id;
  a.length = var->length;
  a.mmap_off = var->mmap_off;
  std::memcpy(data, &a, sizeof a);
  return 0;
}

M5A_EXPORT m5a_mlx5dv_var* mlx5dv_var_import(m5a_ibv_context* context, void* data) {
  VarAttrs a;
  std::memcpy(&a, data, sizeof a);
  auto* v = calloc_one<SimVar>();
  if (v == nullptr) return nullptr;
  v->dv.page_id = a.page_id;
  v->dv.length = a.length;
  v->dv.mmap_off = a.mmap_off;
  v->ctx = sim_ctx(context);
  v->handle = a.handle;
  return &v->dv;
}

M5A_EXPORT void mlx5dv_var_unimport(m5a_mlx5dv_var* var) { std::free(reinterpret_cast<SimVar*>(var)); }

// The kernel's mmap handler (drivers/infiniband/core/ib_core_uverbs.c rdma_user_mmap_entry_get):
// only a VM_SHARED mapping of a live VAR of this context, starting at its offset and exactly as
// long as its entry (in whole pages, as the VMA is), else EINVAL. The kernel maps TLP pages
// pgprot_noncached; a file mapping cannot be (docs/sim.md).
M5A_EXPORT void* mlx5tlp_sim_mmap(m5a_ibv_context* context, size_t length, int prot, int flags,
                                  off_t offset) {
  if (context == nullptr) {
    errno = EINVAL;
    return MAP_FAILED;
  }
  SimContext* c = sim_ctx(context);
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  int err = 0;
  {
    Locked lock(*c->dev);
    const int i = lock.ok() ? c->dev->find_var_at(offset, c->slot, c->gen) : -1;
    const int type = flags & MAP_TYPE;
    if (i < 0)
      err = fail(EINVAL, "offset 0x%llx is not a live VAR of this context", (unsigned long long)offset);
    else if (type != MAP_SHARED && type != MAP_SHARED_VALIDATE)
      err = fail(EINVAL, "a VAR page must be mapped MAP_SHARED");
    else if (length == 0 || (length + page - 1) / page * page != c->dev->st()->obj[i].length)
      err = fail(EINVAL, "a VAR page is mapped whole: length %zu, not %u", length, c->dev->st()->obj[i].length);
  }
  if (err != 0) {
    errno = err;
    return MAP_FAILED;
  }
  return mmap(nullptr, length, prot, flags, c->ibv.cmd_fd, offset);
}
