// Shared by the libmlx5 entry points of the software device (dv_var.cpp, dv_umem.cpp,
// dv_obj.cpp): the userspace structs handed out and the object-table helpers.
//
// Userspace structs and export buffers have upstream's layout. As upstream, import only
// rebuilds the userspace struct from the buffer; the "kernel" (the shared state, under the
// device mutex) is consulted by the first call that would reach the kernel. Handles are the
// kernel's: the lowest free number of the context, so a stale import may name a newer object.
#pragma once

#include <cstdlib>
#include <cstring>

#include "device_map.hpp"

namespace mlx5tlp::sim {

struct SimVar {
  m5a_mlx5dv_var dv;  // first: the pointer handed out
  SimContext* ctx;
  uint32_t handle;
};
struct SimUmem {
  m5a_mlx5dv_devx_umem dv;
  SimContext* ctx;
  uint32_t handle;
};
struct SimObj {
  SimContext* ctx;
  uint32_t handle;
  uint32_t type;
  uint32_t id;
};

// Export buffers: the same fields, order and size as rdma-core's (providers/mlx5/mlx5.h).
struct VarAttrs {
  uint32_t handle, page_id, length;
  off_t mmap_off;
};
struct UmemAttrs {
  uint32_t handle, umem_id;
};
struct ObjAttrs {
  uint32_t handle, type, object_id;
  uint64_t rx_icm_addr;
  uint8_t log_obj_range;
};

template <typename T>
T* calloc_one() {
  auto* p = static_cast<T*>(std::calloc(1, sizeof(T)));
  if (p == nullptr) errno = ENOMEM;
  return p;
}

// Under lock: claims an object entry for ctx with the context's lowest free handle; the
// caller fills it and sets `kind` last. -1 if the table is full.
inline int claim_entry(SimContext* c, Object** out) {
  const int i = c->dev->free_entry();
  if (i < 0) return -1;
  Object& o = c->dev->st()->obj[i];
  std::memset(&o, 0, sizeof o);
  o.ctx_slot = c->slot;
  o.ctx_gen = c->gen;
  o.handle = c->dev->lowest_free_handle(c->slot, c->gen);
  *out = &o;
  return i;
}

}  // namespace mlx5tlp::sim
