// mlx5tlp/spawn.hpp — starting a thread under the one error model.
//
// std::thread reports a failed pthread_create as std::system_error (EAGAIN when RLIMIT_NPROC,
// the kernel's thread limit or the memory for the stack is exhausted). Every thread the core
// starts goes through spawn(), so such a failure is an mlx5tlp::Error naming the operation:
// kind resource_exhausted for EAGAIN/ENOMEM, the errno's kind otherwise.
#pragma once

#include <cerrno>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

template <typename F>
std::thread spawn(const std::string& operation, F&& body) {
  try {
    return std::thread(std::forward<F>(body));
  } catch (const std::system_error& e) {
    const int err = e.code().value() != 0 ? e.code().value() : EAGAIN;
    const ErrorKind kind = err == EAGAIN || err == ENOMEM ? ErrorKind::resource_exhausted
                                                          : kind_for_errno(err, false);
    throw Error(kind, operation, err, "cannot start a thread (process or memory limit reached?)");
  }
}

}  // namespace mlx5tlp
