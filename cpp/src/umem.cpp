#include "mlx5tlp/umem.hpp"

#include <cerrno>

namespace mlx5tlp {

Umem::Umem(std::shared_ptr<Context> ctx, m5a_mlx5dv_devx_umem* raw, bool imported, size_t size)
    : Handle(std::move(ctx), imported, "UMEM"), raw_(raw), umem_id_(raw->umem_id), size_(size) {}

Umem::~Umem() {
  try {
    close();
  } catch (...) {
    // Never throw from a destructor; the kernel reclaims the UMEM when the context closes.
  }
}

std::shared_ptr<Umem> Umem::reg(std::shared_ptr<Context> ctx, void* addr, size_t size,
                                uint32_t access) {
  const Library& lib = ctx->lib();
  auto reg_fn = lib.need(lib.sym().mlx5dv_devx_umem_reg, "mlx5dv_devx_umem_reg");
  Context::Use u(*ctx);
  errno = 0;
  m5a_mlx5dv_devx_umem* raw = reg_fn(u.get(), addr, size, access);
  if (raw == nullptr) {
    const int err = errno_or_eio();
    throw_errno("mlx5dv_devx_umem_reg", err, false,
                err == ENOMEM ? "pinning " + std::to_string(size) +
                                    " bytes failed: raise RLIMIT_MEMLOCK (ulimit -l)"
                              : std::string());
  }
  std::shared_ptr<Umem> out(new Umem(ctx, raw, false, size));
  ctx->adopt(out, u);  // under the Use of the registration: close() cannot miss it
  return out;
}

std::shared_ptr<Umem> Umem::import(std::shared_ptr<Context> ctx, const uint8_t* raw, size_t len) {
  const Library& lib = ctx->lib();
  return detail::import_raw(
      ctx, ObjectKind::umem, "mlx5dv_devx_umem_import",
      lib.need(lib.sym().mlx5dv_devx_umem_import, "mlx5dv_devx_umem_import"), raw, len,
      [&](m5a_mlx5dv_devx_umem* u) { return std::shared_ptr<Umem>(new Umem(ctx, u, true, 0)); });
}

std::vector<uint8_t> Umem::export_raw() const {
  const Library& lib = ctx_->lib();
  auto export_fn = lib.need(lib.sym().mlx5dv_devx_umem_export, "mlx5dv_devx_umem_export");
  auto l = use("mlx5dv_devx_umem_export");
  return detail::export_raw(*ctx_, ObjectKind::umem, "mlx5dv_devx_umem_export", export_fn, raw_);
}

void Umem::release(bool destroy) {
  const Symbols& s = ctx_->lib().sym();
  release_raw(raw_, destroy, s.mlx5dv_devx_umem_dereg, "mlx5dv_devx_umem_dereg",
              s.mlx5dv_devx_umem_unimport, "mlx5dv_devx_umem_unimport",
              "UMEM " + std::to_string(umem_id_) + " was already destroyed");
}

}  // namespace mlx5tlp
