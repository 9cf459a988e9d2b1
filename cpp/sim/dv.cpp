// libmlx5 subset of the software device: VARs, UMEMs, DEVX objects, export/import/unimport.
//
// Userspace structs and export buffers have upstream's layout. As upstream, import only
// rebuilds the userspace struct from the buffer; the "kernel" (the shared state, under the
// device mutex) is consulted by the first call that would reach the kernel.
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "state.hpp"

using namespace mlx5tlp::sim;

namespace {

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

// Claims an object entry for ctx; the caller fills it and sets `kind` last.
int claim(SimContext* c, Object** out) {
  int i = c->dev->free_entry();
  if (i < 0) return -1;
  Object& o = c->dev->st()->obj[i];
  std::memset(&o, 0, sizeof o);
  o.ctx_slot = c->slot;
  o.ctx_gen = c->gen;
  o.handle = c->dev->st()->next_handle++;
  *out = &o;
  return i;
}

void write_out_header(void* out, size_t outlen, uint32_t id) {
  std::memset(out, 0, outlen);
  if (outlen >= 12) put_be32(static_cast<uint8_t*>(out) + 8, id);  // obj_id in the out header
}

}  // namespace

// ---------------------------------------------------------------- VAR
M5A_EXPORT m5a_mlx5dv_var* mlx5dv_alloc_var(m5a_ibv_context* context, uint32_t flags) {
  if (context == nullptr) {
    errno = EINVAL;
    return nullptr;
  }
  if ((flags & ~uint32_t(M5A_MLX5DV_VAR_ALLOC_FLAG_TLP)) != 0) {
    errno = EOPNOTSUPP;  // libmlx5's check_comp_mask on the flags
    return nullptr;
  }
  SimContext* c = sim_ctx(context);
  const bool tlp = flags & M5A_MLX5DV_VAR_ALLOC_FLAG_TLP;
  auto* v = calloc_one<SimVar>();
  if (v == nullptr) return nullptr;
  int err = 0;
  {
    Locked lock(*c->dev);
    DeviceState* st = c->dev->st();
    c->dev->collect();
    const uint32_t pages = tlp ? st->cfg.gw_pages : st->cfg.virtio_pages;
    uint32_t* owner = tlp ? st->gw_owner : st->virtio_owner;
    uint32_t page = pages;
    Object* o = nullptr;
    int idx = -1;
    if (tlp ? st->cfg.tlp == 0 : pages == 0) {
      err = EOPNOTSUPP;  // no tlp_device_emulation_manager / no VirtIO emulation
    } else {
      for (uint32_t p = 0; p < pages && page == pages; ++p)
        if (owner[p] == 0) page = p;
      if (page == pages || (idx = claim(c, &o)) < 0) err = ENOMEM;
    }
    if (err == 0) {
      o->id = page;
      o->length = tlp ? uint32_t(c->dev->gw_stride()) : kVirtioPageSize;
      o->aux = tlp ? uint64_t(page) * c->dev->gw_stride()
                   : c->dev->gw_region() + uint64_t(page) * kVirtioPageSize;
      if (tlp) init_gateway_page(*c->dev, page);
      owner[page] = uint32_t(idx) + 1;
      o->kind = tlp ? ObjKind::tlp_var : ObjKind::virtio_var;
      v->dv.page_id = page;
      v->dv.length = o->length;
      v->dv.mmap_off = off_t(o->aux);
      v->ctx = c;
      v->handle = o->handle;
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
    int i = v->ctx->dev->find_var(v->handle, v->ctx->slot, v->ctx->gen);
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

// The kernel's mmap handler: only a live VAR of this context may be mapped, at most its length.
M5A_EXPORT void* mlx5tlp_sim_mmap(m5a_ibv_context* context, size_t length, int prot, int flags,
                                  off_t offset) {
  SimContext* c = sim_ctx(context);
  int err = 0;
  {
    Locked lock(*c->dev);
    int i = c->dev->find_var_at(offset, c->slot, c->gen);
    if (i < 0 || length == 0 || length > c->dev->st()->obj[i].length) err = EINVAL;
  }
  if (err != 0) {
    errno = err;
    return MAP_FAILED;
  }
  return mmap(nullptr, length, prot, flags, c->ibv.cmd_fd, offset);
}

// ---------------------------------------------------------------- UMEM
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
  // Pinning counts against RLIMIT_MEMLOCK unless the process may lock memory at will.
  struct rlimit rl;
  if (geteuid() != 0 && getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
      size > rl.rlim_cur) {
    errno = ENOMEM;
    return nullptr;
  }
  auto* u = calloc_one<SimUmem>();
  if (u == nullptr) return nullptr;
  int err = 0;
  {
    Locked lock(*c->dev);
    Object* o = nullptr;
    if (claim(c, &o) < 0) {
      err = ENOMEM;
    } else {
      o->id = c->dev->st()->next_id++;
      o->aux = size;
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
    int i = u->ctx->dev->find(u->handle, ObjKind::umem, u->ctx->slot, u->ctx->gen);
    if (i < 0) return ENOENT;  // as upstream, the struct stays allocated on failure
    u->ctx->dev->release(uint32_t(i));
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

// ---------------------------------------------------------------- DEVX objects
M5A_EXPORT m5a_mlx5dv_devx_obj* mlx5dv_devx_obj_create(m5a_ibv_context* context, const void* in,
                                                      size_t inlen, void* out, size_t outlen) {
  if (context == nullptr || in == nullptr || out == nullptr || inlen < 8 || outlen < 16) {
    errno = EINVAL;
    return nullptr;
  }
  SimContext* c = sim_ctx(context);
  if (!c->devx) {
    errno = EOPNOTSUPP;
    return nullptr;
  }
  const auto* inb = static_cast<const uint8_t*>(in);
  const uint16_t opcode = get_be16(inb);
  auto* obj = calloc_one<SimObj>();
  if (obj == nullptr) return nullptr;
  int err = 0;
  {
    Locked lock(*c->dev);
    Object* o = nullptr;
    if (claim(c, &o) < 0) {
      err = ENOMEM;
    } else {
      o->id = c->dev->st()->next_id++;
      // CREATE_GENERAL_OBJECT carries the object type in op_mod; other creates are their opcode.
      o->type = opcode == 0x0a00 ? get_be16(inb + 6) : opcode;
      o->data_len = uint32_t(inlen < kObjDataMax ? inlen : kObjDataMax);
      std::memcpy(o->data, in, o->data_len);
      o->kind = ObjKind::devx_obj;
      *obj = SimObj{c, o->handle, o->type, o->id};
    }
  }
  if (err != 0) {
    std::free(obj);
    errno = err;
    return nullptr;
  }
  write_out_header(out, outlen, obj->id);
  return reinterpret_cast<m5a_mlx5dv_devx_obj*>(obj);
}

static int obj_cmd(m5a_mlx5dv_devx_obj* handle, const void* in, size_t inlen, void* out,
                   size_t outlen, bool modify) {
  auto* obj = reinterpret_cast<SimObj*>(handle);
  if (obj == nullptr || in == nullptr || out == nullptr || inlen < 8 || outlen < 16) return EINVAL;
  Locked lock(*obj->ctx->dev);
  DeviceMap& d = *obj->ctx->dev;
  int i = d.find(obj->handle, ObjKind::devx_obj, obj->ctx->slot, obj->ctx->gen);
  if (i < 0) return ENOENT;
  Object& o = d.st()->obj[i];
  if (modify) {
    o.data_len = uint32_t(inlen < kObjDataMax ? inlen : kObjDataMax);
    std::memcpy(o.data, in, o.data_len);
  }
  write_out_header(out, outlen, o.id);
  if (!modify) {
    // QUERY answers with the object's current context: the last create/modify inbox.
    size_t n = outlen - 16 < o.data_len ? outlen - 16 : o.data_len;
    std::memcpy(static_cast<uint8_t*>(out) + 16, o.data, n);
  }
  return 0;
}

M5A_EXPORT int mlx5dv_devx_obj_query(m5a_mlx5dv_devx_obj* obj, const void* in, size_t inlen,
                                     void* out, size_t outlen) {
  return obj_cmd(obj, in, inlen, out, outlen, false);
}

M5A_EXPORT int mlx5dv_devx_obj_modify(m5a_mlx5dv_devx_obj* obj, const void* in, size_t inlen,
                                      void* out, size_t outlen) {
  return obj_cmd(obj, in, inlen, out, outlen, true);
}

M5A_EXPORT int mlx5dv_devx_obj_destroy(m5a_mlx5dv_devx_obj* handle) {
  auto* obj = reinterpret_cast<SimObj*>(handle);
  {
    Locked lock(*obj->ctx->dev);
    int i = obj->ctx->dev->find(obj->handle, ObjKind::devx_obj, obj->ctx->slot, obj->ctx->gen);
    if (i < 0) return ENOENT;  // the struct stays allocated, as upstream
    obj->ctx->dev->release(uint32_t(i));
  }
  std::free(obj);
  return 0;
}

M5A_EXPORT int mlx5dv_devx_obj_export(m5a_mlx5dv_devx_obj* handle, void* data) {
  auto* obj = reinterpret_cast<SimObj*>(handle);
  ObjAttrs a{};
  a.handle = obj->handle;
  a.type = obj->type;
  a.object_id = obj->id;
  std::memcpy(data, &a, sizeof a);
  return 0;
}

M5A_EXPORT m5a_mlx5dv_devx_obj* mlx5dv_devx_obj_import(m5a_ibv_context* context, void* data) {
  ObjAttrs a;
  std::memcpy(&a, data, sizeof a);
  auto* obj = calloc_one<SimObj>();
  if (obj == nullptr) return nullptr;
  *obj = SimObj{sim_ctx(context), a.handle, a.type, a.object_id};
  return reinterpret_cast<m5a_mlx5dv_devx_obj*>(obj);
}

M5A_EXPORT void mlx5dv_devx_obj_unimport(m5a_mlx5dv_devx_obj* obj) {
  std::free(reinterpret_cast<SimObj*>(obj));
}

M5A_EXPORT void _mlx5dv_get_export_sizes(m5a_mlx5dv_export_sizes* sizes, size_t sizes_len) {
  m5a_mlx5dv_export_sizes s{};
  s.var_attrs_size = sizeof(VarAttrs);
  s.devx_umem_attrs_size = sizeof(UmemAttrs);
  s.devx_obj_attrs_size = sizeof(ObjAttrs);
  // Fill only what the caller's struct has room for (an older, shorter struct stays valid).
  std::memset(sizes, 0, sizes_len);
  std::memcpy(sizes, &s, sizes_len < sizeof s ? sizes_len : sizeof s);
}
