// DEVX objects: create / query / modify / destroy (with injected faults), export/import/unimport,
// and the export sizes.
//
// Injected faults (mlx5tlp_sim_inject_fault) fail the call and leave the object as it was, as a
// kernel or firmware refusal does. For EREMOTEIO on a command with an outbox the outbox carries
// status 0x05 (BAD_RESOURCE_STATE) and syndrome 0x5a5a0000 | the failures still armed.
#include "dv_common.hpp"

using namespace mlx5tlp::sim;

namespace {

constexpr uint8_t kStatusBadResourceState = 0x05;

void write_out_header(void* out, size_t outlen, uint32_t id) {
  std::memset(out, 0, outlen);
  if (outlen >= 12) put_be32(static_cast<uint8_t*>(out) + 8, id);  // obj_id in the out header
}

// Under lock: a pending injected fault of `op`, reported in the outbox. 0 if none.
int injected(DeviceMap& d, FaultOp op, const char* name, void* out, size_t outlen) {
  uint32_t left = 0;
  const int err = d.take_fault(op, &left);
  if (err == 0) return 0;
  if (err == EREMOTEIO && out != nullptr && outlen >= 8) {
    auto* o = static_cast<uint8_t*>(out);
    std::memset(o, 0, outlen);
    o[0] = kStatusBadResourceState;
    put_be32(o + 4, 0x5a5a0000u | (left & 0xffff));
  }
  return fail(err, "injected fault: %s fails (%u more)", name, left);
}

}  // namespace

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
    if (!lock.ok()) {
      err = errno;
    } else if ((err = injected(*c->dev, FaultOp::devx_obj_create, "devx_obj_create", out, outlen)) != 0) {
    } else if (claim_entry(c, &o) < 0) {
      err = fail(ENOMEM, "the object table of device '%s' is full (%u)", c->dev->name().c_str(), kMaxObjects);
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
  if (!lock.ok()) return errno;
  DeviceMap& d = *obj->ctx->dev;
  const int i = d.find(obj->handle, ObjKind::devx_obj, obj->ctx->slot, obj->ctx->gen);
  if (i < 0) return -i;
  if (int err = injected(d, modify ? FaultOp::devx_obj_modify : FaultOp::devx_obj_query,
                         modify ? "devx_obj_modify" : "devx_obj_query", out, outlen))
    return err;
  Object& o = d.st()->obj[i];
  if (modify) {
    o.data_len = uint32_t(inlen < kObjDataMax ? inlen : kObjDataMax);
    std::memcpy(o.data, in, o.data_len);
  }
  write_out_header(out, outlen, o.id);
  if (!modify) {
    // QUERY answers with the object's current context: the last create/modify inbox.
    const size_t n = outlen - 16 < o.data_len ? outlen - 16 : o.data_len;
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
    if (!lock.ok()) return errno;
    DeviceMap& d = *obj->ctx->dev;
    const int i = d.find(obj->handle, ObjKind::devx_obj, obj->ctx->slot, obj->ctx->gen);
    if (i < 0) return -i;  // the struct stays allocated, as upstream
    // rdma-core's destroy has no outbox for the caller: the errno is all it reports.
    if (int err = injected(d, FaultOp::devx_obj_destroy, "devx_obj_destroy", nullptr, 0)) return err;
    d.release(uint32_t(i));
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
