// mlx5tlp/handle.hpp — what Var, Umem and DevxObj share: owned vs imported, close exactly once.
//
// An owned object is destroyed by free() (mlx5dv_free_var / _umem_dereg / _obj_destroy); an
// imported one is dropped by unimport() without touching the kernel object, or destroyed by
// free() too: upstream lets any one party free (a process taking over from a dead owner frees
// what it inherited); exactly one must. close() is free() for owned objects and unimport() for
// imported ones. A destroy that fails with ENOENT (the kernel object is already gone) releases
// the handle; any other failure (EBUSY, EREMOTEIO, ...) leaves the object alive, usable and
// retryable. Once released, every use throws Error(invalid_handle).
// Thread-safety: operations take a shared lock, release takes it exclusively.
#pragma once

#include <cerrno>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

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
  // Destroys the kernel object (owned or imported: exactly one party frees).
  void free();
  // Imported objects only: drops this process's struct; the kernel object stays.
  void unimport();
  // free() or unimport(), whichever applies; idempotent.
  void close() override;
  std::string describe() const override { return what_; }
  // Imported objects: the backend confirmed at import that the handle names the exported
  // object (the software device's identity check); false where nothing could be asked.
  bool identity_checked() const noexcept { return identity_checked_; }
  void set_identity_checked() noexcept { identity_checked_ = true; }

 protected:
  Handle(std::shared_ptr<Context> ctx, bool imported, const char* what)
      : ctx_(std::move(ctx)), imported_(imported), what_(what) {}
  // Called once, under the exclusive lock. `destroy` selects free vs unimport.
  virtual void release(bool destroy) = 0;
  // Shared lock held while using the raw handle; throws when released.
  std::shared_lock<std::shared_mutex> use(const char* operation) const;
  [[noreturn]] void closed_error(const char* operation) const;

  // The release of a UMEM or DEVX object: `destroy_fn` (free) or `unimport_fn` (unimport).
  // Only ENOENT (the kernel object was destroyed elsewhere) releases the handle after a failed
  // destroy: libmlx5 then leaves its struct allocated, so it is dropped with unimport, and the
  // failure is reported with `gone` as detail. Any other errno (EBUSY: still in use; EREMOTEIO:
  // the firmware refused) leaves the kernel object, the struct and this handle alive: the
  // caller may retry. rdma-core's destroy calls return no outbox, so there is no firmware
  // status or syndrome to report for them.
  template <typename R>
  void release_raw(R*& raw, bool destroy, int (*destroy_fn)(R*), const char* destroy_name,
                   void (*unimport_fn)(R*), const char* unimport_name, const std::string& gone) {
    if (!destroy) {
      ctx_->lib().need(unimport_fn, unimport_name)(raw);
      raw = nullptr;
      return;
    }
    int rc;
    {
      Context::Use u(*ctx_, Context::Use::release);
      errno = 0;
      rc = destroy_fn(raw);
    }
    if (rc == 0) {
      raw = nullptr;
      return;
    }
    const int err = rc > 0 ? rc : errno_or_eio();
    if (err == ENOENT) {
      if (unimport_fn != nullptr) unimport_fn(raw);
      raw = nullptr;
      live_ = false;
      throw_errno(destroy_name, err, true, gone);
    }
    throw Error(kind_for_errno(err, false), destroy_name, err,
                describe() + " is still alive (" +
                    (err == EBUSY     ? std::string("in use")
                     : err == EREMOTEIO ? std::string("the firmware refused the destroy")
                                        : std::string("the destroy failed")) +
                    "): it stays usable; free() or close() it again later");
  }

  std::shared_ptr<Context> ctx_;
  mutable std::shared_mutex mu_;
  bool live_ = true;
  const bool imported_;
  const char* what_;
  bool identity_checked_ = false;  // set once, before the object is shared
};

namespace detail {

// Refuses a raw export buffer whose size is not this rdma-core's export size for `kind`:
// upstream import reads the buffer without a length. Error(export_format), naming `function`.
void check_export_size(const Context& ctx, ObjectKind kind, const char* function, size_t len);

// Why an import was refused by the backend's identity check (ENOENT / ESTALE).
[[noreturn]] void stale_import(ObjectKind kind, const char* function, int err);

// Imports a raw export buffer with `fn` (mlx5dv_*_import), handing rdma-core a private copy of
// exactly the size it reads, wraps the result with `wrap` (raw -> shared_ptr<T>) and adopts it
// on `ctx` under the same Use, so a concurrent close() cannot miss it. Where the backend can
// tell (the software device's import_check), an import whose handle names nothing or another
// object than the one exported (the kernel reuses the lowest free handle) is unimported and
// refused: Error(invalid_handle, ESTALE; ENOENT for a UMEM/DEVX handle that names nothing). Throws on a size mismatch or an import failure.
template <typename Fn, typename Wrap>
auto import_raw(const std::shared_ptr<Context>& ctx, ObjectKind kind, const char* function, Fn fn,
                const uint8_t* raw, size_t len, Wrap wrap) {
  check_export_size(*ctx, kind, function, len);
  std::vector<uint8_t> copy(raw, raw + len);
  decltype(wrap(fn(nullptr, nullptr))) obj;
  int stale = 0;
  {
    Context::Use u(*ctx);
    errno = 0;
    auto* out = fn(u.get(), copy.data());
    if (out == nullptr) throw_errno(function, errno_or_eio(), false);
    obj = wrap(out);
    bool checked = false;
    if (auto check = ctx->lib().sym().sim.import_check) {
      stale = check(u.get(), static_cast<int>(kind), out);
      checked = stale == 0;
    }
    // A VAR whose handle names nothing is left to the mapping probe of the import (the
    // kernel's own answer: EINVAL, also for a context that does not share the objects).
    if (stale == ENOENT && kind == ObjectKind::var) stale = 0;
    if (stale == 0) {
      if (checked) obj->set_identity_checked();
      ctx->adopt(obj, u);
      return obj;
    }
  }
  obj.reset();  // an unimport (no kernel call), outside the Use it takes itself
  stale_import(kind, function, stale);
}

// Exports with `fn` (mlx5dv_*_export) into a buffer of this rdma-core's export size.
template <typename R, typename Fn>
std::vector<uint8_t> export_raw(const Context& ctx, ObjectKind kind, const char* function, Fn fn,
                                R* raw) {
  std::vector<uint8_t> out(ctx.export_size(kind), 0);
  check_rc(function, fn(raw, out.data()), true);
  return out;
}

}  // namespace detail

}  // namespace mlx5tlp
