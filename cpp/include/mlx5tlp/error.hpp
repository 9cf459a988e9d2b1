// mlx5tlp/error.hpp — the one error type of the C++ core.
//
// Every failure is an mlx5tlp::Error carrying the failed operation (the rdma-core call or our
// own step), the errno where there is one, and a kind that the Python bindings map onto the
// exception hierarchy in mlx5tlp/errors.py. The check_* helpers normalise libmlx5's three
// conventions: export/destroy return an errno value; import/create return NULL and set errno.
//
// Thread-safety: values; safe to copy between threads.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace mlx5tlp {

enum class ErrorKind : int {
  generic = 0,
  not_supported,       // missing symbol, EOPNOTSUPP, EPROTONOSUPPORT
  library_not_found,   // dlopen of rdma-core / the software device failed
  device_not_found,    // no such device, ENODEV
  resource_exhausted,  // ENOMEM, ENOSPC
  invalid_handle,      // use after close/free; EINVAL/ENOENT/EBADF on a handle
  export_format,       // a bad export envelope (raised by the Python façade)
  devx_command,        // firmware returned a bad status for a DEVX command (EREMOTEIO)
  invalid_argument,    // caller passed a value the core refuses
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string operation, int err, const std::string& detail);

  ErrorKind kind() const noexcept { return kind_; }
  int error_number() const noexcept { return errno_; }
  const std::string& operation() const noexcept { return operation_; }
  // Firmware status / syndrome from a DEVX command outbox (0 when not a DEVX failure).
  uint8_t fw_status = 0;
  uint32_t syndrome = 0;

 private:
  ErrorKind kind_;
  std::string operation_;
  int errno_;
};

// How an errno from `operation` is classified. `on_handle` says the call acted on an existing
// object (so EINVAL/ENOENT mean a bad or destroyed handle rather than a bad argument).
ErrorKind kind_for_errno(int err, bool on_handle) noexcept;

// errno, or EIO when a failing call left errno at 0 (never report "Success" as a failure).
int errno_or_eio() noexcept;

[[noreturn]] void throw_errno(const std::string& operation, int err, bool on_handle,
                              const std::string& detail = {});

// libmlx5 functions that return 0 or an errno value (some return -1 and set errno instead).
void check_rc(const char* operation, int rc, bool on_handle);

// libmlx5 functions that return NULL and set errno.
template <typename T>
T* check_ptr(const char* operation, T* p, bool on_handle) {
  if (p == nullptr) throw_errno(operation, errno_or_eio(), on_handle);
  return p;
}

}  // namespace mlx5tlp
