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

void Handle::free() {
  std::unique_lock<std::shared_mutex> l(mu_);
  if (!live_) closed_error("free");
  if (imported_)
    throw Error(ErrorKind::invalid_argument, "free", EINVAL,
                std::string("this ") + what_ +
                    " was imported: only its exporter frees it; call unimport() or close()");
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
