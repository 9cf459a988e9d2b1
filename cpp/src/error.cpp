#include "mlx5tlp/error.hpp"

#include <cerrno>
#include <cstring>

namespace mlx5tlp {

static std::string compose(const std::string& operation, int err, const std::string& detail) {
  std::string msg = operation + " failed";
  if (err != 0) msg += ": " + std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
  if (!detail.empty()) msg += ": " + detail;
  return msg;
}

Error::Error(ErrorKind kind, std::string operation, int err, const std::string& detail)
    : std::runtime_error(compose(operation, err, detail)),
      kind_(kind),
      operation_(std::move(operation)),
      errno_(err) {}

ErrorKind kind_for_errno(int err, bool on_handle) noexcept {
  switch (err) {
    case EOPNOTSUPP:
    case EPROTONOSUPPORT:
    case ENOSYS:
      return ErrorKind::not_supported;
    case ENODEV:
    case ENXIO:
      return ErrorKind::device_not_found;
    case ENOMEM:
    case ENOSPC:
      return ErrorKind::resource_exhausted;
    case EBADF:
      return ErrorKind::invalid_handle;
    case EINVAL:
    case ENOENT:
      return on_handle ? ErrorKind::invalid_handle : ErrorKind::generic;
    case EREMOTEIO:
      return ErrorKind::devx_command;
    default:
      return ErrorKind::generic;
  }
}

void throw_errno(const std::string& operation, int err, bool on_handle, const std::string& detail) {
  throw Error(kind_for_errno(err, on_handle), operation, err, detail);
}

int errno_or_eio() noexcept { return errno != 0 ? errno : EIO; }

void check_rc(const char* operation, int rc, bool on_handle) {
  if (rc == 0) return;
  throw_errno(operation, rc > 0 ? rc : errno_or_eio(), on_handle);
}

}  // namespace mlx5tlp
