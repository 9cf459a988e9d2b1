#include "mlx5tlp/devx_obj.hpp"

#include <cerrno>

namespace mlx5tlp {

DevxObj::DevxObj(std::shared_ptr<Context> ctx, m5a_mlx5dv_devx_obj* raw, bool imported)
    : Handle(std::move(ctx), imported, "DEVX object"), raw_(raw) {}

DevxObj::~DevxObj() {
  try {
    close();
  } catch (...) {
    // Never throw from a destructor; the kernel reclaims the object when the context closes.
  }
}

std::shared_ptr<DevxObj> DevxObj::create(std::shared_ptr<Context> ctx, const uint8_t* in,
                                         size_t inlen, size_t outlen, std::vector<uint8_t>* out) {
  const Library& lib = ctx->lib();
  auto create_fn = lib.need(lib.sym().mlx5dv_devx_obj_create, "mlx5dv_devx_obj_create");
  std::vector<uint8_t> buf(outlen, 0);
  Context::Use u(*ctx);
  errno = 0;
  m5a_mlx5dv_devx_obj* raw = create_fn(u.get(), in, inlen, buf.data(), outlen);
  if (raw == nullptr) throw_devx("mlx5dv_devx_obj_create", errno_or_eio(), buf.data(), outlen, false);
  std::shared_ptr<DevxObj> obj(new DevxObj(ctx, raw, false));
  ctx->adopt(obj, u);  // under the Use of the creation: close() cannot miss it
  if (out != nullptr) *out = std::move(buf);
  return obj;
}

std::shared_ptr<DevxObj> DevxObj::import(std::shared_ptr<Context> ctx, const uint8_t* raw,
                                         size_t len) {
  const Library& lib = ctx->lib();
  return detail::import_raw(
      ctx, ObjectKind::devx_obj, "mlx5dv_devx_obj_import",
      lib.need(lib.sym().mlx5dv_devx_obj_import, "mlx5dv_devx_obj_import"), raw, len,
      [&](m5a_mlx5dv_devx_obj* o) { return std::shared_ptr<DevxObj>(new DevxObj(ctx, o, true)); });
}

static std::vector<uint8_t> run(const Library& lib, m5a_mlx5dv_devx_obj_cmd_fn fn,
                                const char* name, m5a_mlx5dv_devx_obj* raw, const uint8_t* in,
                                size_t inlen, size_t outlen) {
  std::vector<uint8_t> out(outlen, 0);
  int rc = lib.need(fn, name)(raw, in, inlen, out.data(), outlen);
  if (rc != 0) throw_devx(name, rc > 0 ? rc : errno_or_eio(), out.data(), outlen, true);
  return out;
}

std::vector<uint8_t> DevxObj::query(const uint8_t* in, size_t inlen, size_t outlen) {
  auto l = use("mlx5dv_devx_obj_query");
  return run(ctx_->lib(), ctx_->lib().sym().mlx5dv_devx_obj_query, "mlx5dv_devx_obj_query", raw_,
             in, inlen, outlen);
}

std::vector<uint8_t> DevxObj::modify(const uint8_t* in, size_t inlen, size_t outlen) {
  auto l = use("mlx5dv_devx_obj_modify");
  return run(ctx_->lib(), ctx_->lib().sym().mlx5dv_devx_obj_modify, "mlx5dv_devx_obj_modify",
             raw_, in, inlen, outlen);
}

std::vector<uint8_t> DevxObj::export_raw() const {
  const Library& lib = ctx_->lib();
  auto export_fn = lib.need(lib.sym().mlx5dv_devx_obj_export, "mlx5dv_devx_obj_export");
  auto l = use("mlx5dv_devx_obj_export");
  return detail::export_raw(*ctx_, ObjectKind::devx_obj, "mlx5dv_devx_obj_export", export_fn,
                            raw_);
}

void DevxObj::release(bool destroy) {
  const Symbols& s = ctx_->lib().sym();
  release_raw(raw_, destroy, s.mlx5dv_devx_obj_destroy, "mlx5dv_devx_obj_destroy",
              s.mlx5dv_devx_obj_unimport, "mlx5dv_devx_obj_unimport",
              "the DEVX object was already destroyed");
}

}  // namespace mlx5tlp
