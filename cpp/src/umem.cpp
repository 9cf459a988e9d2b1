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
  m5a_mlx5dv_devx_umem* raw;
  {
    Context::Use u(*ctx);
    errno = 0;
    raw = reg_fn(u.get(), addr, size, access);
  }
  if (raw == nullptr) {
    const int err = errno_or_eio();
    throw_errno("mlx5dv_devx_umem_reg", err, false,
                err == ENOMEM ? "pinning " + std::to_string(size) +
                                    " bytes failed: raise RLIMIT_MEMLOCK (ulimit -l)"
                              : std::string());
  }
  std::shared_ptr<Umem> out(new Umem(ctx, raw, false, size));
  ctx->adopt(out);
  return out;
}

std::shared_ptr<Umem> Umem::import(std::shared_ptr<Context> ctx, const uint8_t* raw, size_t len) {
  const Library& lib = ctx->lib();
  auto import_fn = lib.need(lib.sym().mlx5dv_devx_umem_import, "mlx5dv_devx_umem_import");
  const uint32_t want = ctx->export_size(ObjectKind::umem);
  if (len != want)
    throw Error(ErrorKind::export_format, "mlx5dv_devx_umem_import", EINVAL,
                "raw UMEM export is " + std::to_string(len) + " bytes; this rdma-core expects " +
                    std::to_string(want));
  std::vector<uint8_t> copy(raw, raw + len);
  m5a_mlx5dv_devx_umem* u;
  {
    Context::Use use_ctx(*ctx);
    errno = 0;
    u = import_fn(use_ctx.get(), copy.data());
  }
  if (u == nullptr) throw_errno("mlx5dv_devx_umem_import", errno_or_eio(), false);
  std::shared_ptr<Umem> out(new Umem(ctx, u, true, 0));
  ctx->adopt(out);
  return out;
}

std::vector<uint8_t> Umem::export_raw() const {
  const Library& lib = ctx_->lib();
  auto export_fn = lib.need(lib.sym().mlx5dv_devx_umem_export, "mlx5dv_devx_umem_export");
  std::vector<uint8_t> out(ctx_->export_size(ObjectKind::umem), 0);
  auto l = use("mlx5dv_devx_umem_export");
  check_rc("mlx5dv_devx_umem_export", export_fn(raw_, out.data()), true);
  return out;
}

void Umem::release(bool destroy) {
  const Library& lib = ctx_->lib();
  auto unimport_fn = lib.sym().mlx5dv_devx_umem_unimport;
  if (destroy) {
    int rc;
    {
      Context::Use u(*ctx_);
      rc = lib.sym().mlx5dv_devx_umem_dereg(raw_);
    }
    if (rc != 0) {
      // The kernel object is gone (destroyed through another context): libmlx5 kept the
      // struct, so drop it without the kernel, then report.
      if (unimport_fn != nullptr) unimport_fn(raw_);
      raw_ = nullptr;
      live_ = false;
      throw_errno("mlx5dv_devx_umem_dereg", rc > 0 ? rc : errno_or_eio(), true,
                  "UMEM " + std::to_string(umem_id_) + " was already destroyed");
    }
  } else {
    lib.need(unimport_fn, "mlx5dv_devx_umem_unimport")(raw_);
  }
  raw_ = nullptr;
}

}  // namespace mlx5tlp
