#include "mlx5tlp/handle.hpp"

#include <cerrno>

namespace mlx5tlp {

void Handle::closed_error(const char* operation) const {
  throw Error(ErrorKind::invalid_handle, operation, EBADF,
              std::string("this ") + what_ + " was already closed, freed or unimported");
}

std::shared_lock<std::shared_mutex> Handle::use(const char* operation) const {
  std::shared_lock<std::shared_mutex> l(mu_);
  if (!live_) closed_error(operation);
  return l;
}

namespace detail {

void stale_import(ObjectKind kind, const char* function, int err) {
  const char* what = kind == ObjectKind::var ? "VAR" : kind == ObjectKind::umem ? "UMEM" : "DEVX object";
  throw Error(ErrorKind::invalid_handle, function, err,
              err == ESTALE
                  ? std::string("the envelope's handle now names another ") + what +
                        " than the one exported (the kernel reuses the lowest free handle): its "
                        "exporter freed that one; refused before any use"
                  : std::string("no ") + what + " of this context has the envelope's handle: its "
                        "exporter freed it, or this context does not share the exporter's "
                        "objects (import the exporter's command fd with Context.import_fd)");
}

void check_export_size(const Context& ctx, ObjectKind kind, const char* function, size_t len) {
  const uint32_t want = ctx.export_size(kind);
  if (len == want) return;
  const char* what = kind == ObjectKind::var ? "VAR" : kind == ObjectKind::umem ? "UMEM"
                                                                                : "DEVX object";
  throw Error(ErrorKind::export_format, function, EINVAL,
              std::string("raw ") + what + " export is " + std::to_string(len) +
                  " bytes; this rdma-core expects " + std::to_string(want));
}

}  // namespace detail

void Handle::free() {
  std::unique_lock<std::shared_mutex> l(mu_);
  if (!live_) closed_error("free");
  release(true);
  live_ = false;
}

void Handle::unimport() {
  std::unique_lock<std::shared_mutex> l(mu_);
  if (!live_) closed_error("unimport");
  if (!imported_)
    throw Error(ErrorKind::invalid_argument, "unimport", EINVAL,
                std::string("this ") + what_ +
                    " is owned by this process, not imported: call free() or close()");
  release(false);
  live_ = false;
}

void Handle::close() {
  std::unique_lock<std::shared_mutex> l(mu_);
  if (!live_) return;
  release(!imported_);
  live_ = false;
}

}  // namespace mlx5tlp
