// mlx5tlp/handle.hpp — what Var, Umem and DevxObj share: owned vs imported, close exactly once.
//
// An owned object is destroyed by free() (mlx5dv_free_var / _umem_dereg / _obj_destroy); an
// imported one is dropped by unimport() without touching the kernel object. close() does the
// right one. Each releases exactly once; after that every use throws Error(invalid_handle).
// Thread-safety: operations take a shared lock, release takes it exclusively.
#pragma once

#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>

#include "mlx5tlp/context.hpp"
#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

class Handle : public Child {
 public:
  const std::shared_ptr<Context>& context() const noexcept { return ctx_; }
  bool imported() const noexcept { return imported_; }
  bool closed() const override {
    std::shared_lock<std::shared_mutex> l(mu_);
    return !live_;
  }
  // Owned objects only: destroys the kernel object.
  void free();
  // Imported objects only: drops this process's struct; the kernel object stays.
  void unimport();
  // free() or unimport(), whichever applies; idempotent.
  void close() override;

 protected:
  Handle(std::shared_ptr<Context> ctx, bool imported, const char* what)
      : ctx_(std::move(ctx)), imported_(imported), what_(what) {}
  // Called once, under the exclusive lock. `destroy` selects free vs unimport.
  virtual void release(bool destroy) = 0;
  // Shared lock held while using the raw handle; throws when released.
  std::shared_lock<std::shared_mutex> use(const char* operation) const;
  [[noreturn]] void closed_error(const char* operation) const;

  std::shared_ptr<Context> ctx_;
  mutable std::shared_mutex mu_;
  bool live_ = true;
  const bool imported_;
  const char* what_;
};

}  // namespace mlx5tlp
