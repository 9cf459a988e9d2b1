// mlx5tlp_sim_import_check (sim_abi.h): the identity an imported struct records, against the
// live "kernel" object its handle names now. rdma-core's imports rebuild the userspace struct
// from the export buffer and ask the kernel nothing; the kernel hands out the lowest free handle
// of the context (idr), so a stale buffer's handle may already name a newer object.
#include "dv_common.hpp"

using namespace mlx5tlp::sim;

namespace {

// The object table entry of `handle` in ctx, any kind; -1 if none.
int entry_of(const DeviceMap& d, const SimContext* c, uint32_t handle) {
  for (uint32_t i = 0; i < kMaxObjects; ++i) {
    const Object& o = d.st()->obj[i];
    if (o.kind != ObjKind::none && o.handle == handle && o.ctx_slot == c->slot && o.ctx_gen == c->gen)
      return int(i);
  }
  return -1;
}

}  // namespace

M5A_EXPORT int mlx5tlp_sim_import_check(m5a_ibv_context* context, int kind, const void* imported) {
  if (context == nullptr || imported == nullptr || kind < 1 || kind > 3) return EINVAL;
  SimContext* c = sim_ctx(context);
  Locked lock(*c->dev);
  if (!lock.ok()) return errno;
  const DeviceMap& d = *c->dev;
  uint32_t handle = 0;
  switch (kind) {
    case 1: handle = static_cast<const SimVar*>(imported)->handle; break;
    case 2: handle = static_cast<const SimUmem*>(imported)->handle; break;
    default: handle = static_cast<const SimObj*>(imported)->handle; break;
  }
  const int i = entry_of(d, c, handle);
  if (i < 0) {
    // A VAR whose page is live at the recorded offset but under another handle: a forged or
    // rewritten buffer (a genuine stale one names a freed page, which the mapping refuses).
    if (kind == 1 && d.find_var_at(static_cast<const SimVar*>(imported)->dv.mmap_off, c->slot, c->gen) >= 0)
      return ESTALE;
    return ENOENT;
  }
  const Object& o = d.st()->obj[i];
  bool same = false;
  if (kind == 1) {
    const auto* v = static_cast<const SimVar*>(imported);
    same = (o.kind == ObjKind::tlp_var || o.kind == ObjKind::virtio_var) && o.id == v->dv.page_id &&
           o.length == v->dv.length && o.aux == uint64_t(v->dv.mmap_off);
  } else if (kind == 2) {
    same = o.kind == ObjKind::umem && o.id == static_cast<const SimUmem*>(imported)->dv.umem_id;
  } else {
    const auto* obj = static_cast<const SimObj*>(imported);
    same = o.kind == ObjKind::devx_obj && o.id == obj->id && o.type == obj->type;
  }
  return same ? 0 : ESTALE;
}
