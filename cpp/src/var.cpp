#include "mlx5tlp/var.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

namespace mlx5tlp {

Mapping::Mapping(std::shared_ptr<Var> var, void* addr, size_t len, SigbusGuard guard) noexcept
    : var_(std::move(var)), addr_(addr), len_(len), guard_(std::move(guard)) {}

Mapping::~Mapping() { reset(); }

Mapping::Mapping(Mapping&& o) noexcept
    : var_(std::move(o.var_)), addr_(o.addr_), len_(o.len_), guard_(std::move(o.guard_)) {
  o.addr_ = nullptr;
  o.len_ = 0;
}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    reset();
    var_ = std::move(o.var_);
    addr_ = o.addr_;
    len_ = o.len_;
    guard_ = std::move(o.guard_);
    o.addr_ = nullptr;
    o.len_ = 0;
  }
  return *this;
}

void Mapping::reset() noexcept {
  guard_.reset();  // before the munmap: the address may be reused at once
  if (addr_ != nullptr) {
    munmap(addr_, len_);
    var_->mappings_.fetch_sub(1, std::memory_order_relaxed);
  }
  addr_ = nullptr;
  len_ = 0;
  var_.reset();
}

MappingHold::MappingHold(std::shared_ptr<Var> var) noexcept : var_(std::move(var)) {}

bool MappingHold::guard(void* addr, size_t len, int prot) {
  if (!var_ || guard_.active() || var_->context()->lib().sym().sim.mmap == nullptr) return false;
  guard_ = SigbusGuard::add(addr, len, prot);
  if (!guard_.active()) {
    const int e = errno_or_eio();
    throw Error(e == ENOSPC ? ErrorKind::resource_exhausted : ErrorKind::generic,
                "map VAR page " + std::to_string(var_->page_id()), e,
                "cannot guard the software device's page against truncation (SIGBUS guard)");
  }
  return true;
}

void MappingHold::release() noexcept {
  guard_.reset();
  if (!var_) return;
  var_->mappings_.fetch_sub(1, std::memory_order_relaxed);
  var_.reset();
}

std::unique_ptr<MappingHold> Var::hold_mapping() {
  auto l = use("map VAR");  // shared: free() (exclusive) sees the count or a closed VAR
  mappings_.fetch_add(1, std::memory_order_relaxed);
  return std::make_unique<MappingHold>(shared_from_this());
}

Var::Var(std::shared_ptr<Context> ctx, m5a_mlx5dv_var* raw, bool imported, bool tlp)
    : Handle(std::move(ctx), imported, tlp ? "TLP gateway VAR" : "VAR"),
      raw_(raw),
      page_id_(raw->page_id),
      length_(raw->length),
      mmap_off_(raw->mmap_off),
      tlp_(tlp) {}

Var::~Var() {
  try {
    close();
  } catch (...) {
    // A destructor never throws; the kernel reclaims what we could not release at ctx close.
  }
}

std::shared_ptr<Var> Var::alloc(std::shared_ptr<Context> ctx, bool tlp) {
  const Library& lib = ctx->lib();
  auto alloc_fn = lib.need(lib.sym().mlx5dv_alloc_var, "mlx5dv_alloc_var");
  if (tlp && !lib.caps().tlp_var) lib.missing("mlx5dv_alloc_var(MLX5DV_VAR_ALLOC_FLAG_TLP)");
  Context::Use u(*ctx);
  errno = 0;
  m5a_mlx5dv_var* raw = alloc_fn(u.get(), tlp ? M5A_MLX5DV_VAR_ALLOC_FLAG_TLP : 0);
  if (raw == nullptr) {
    const int err = errno_or_eio();
    std::string why;
    if (err == EOPNOTSUPP && tlp)
      why = "device '" + ctx->name() + "' has no TLP emulation (tlp_device_emulation_manager is 0)";
    else if (err == EOPNOTSUPP)
      why = "device '" + ctx->name() + "' has no VirtIO VAR pages";
    else if (err == EPROTONOSUPPORT)
      why = "the kernel does not know the VAR alloc flags attribute (needs TLP VAR support)";
    else if (err == ENOMEM)
      why = std::string("every ") + (tlp ? "TLP gateway" : "VirtIO VAR") +
            " page of device '" + ctx->name() + "' is allocated";
    else if (err == EIO && lib.sym().sim.last_error != nullptr) {
      // The software device names the cause (e.g. its files were truncated: docs/sim.md).
      char buf[512] = "";
      lib.sym().sim.last_error(buf, sizeof buf);
      why = buf;
    }
    throw_errno(tlp ? "mlx5dv_alloc_var(MLX5DV_VAR_ALLOC_FLAG_TLP)" : "mlx5dv_alloc_var", err,
                false, why);
  }
  std::shared_ptr<Var> v(new Var(ctx, raw, false, tlp));
  ctx->adopt(v, u);  // under the Use of the allocation: close() cannot miss it
  return v;
}

std::shared_ptr<Var> Var::import(std::shared_ptr<Context> ctx, const uint8_t* raw, size_t len,
                                 bool tlp) {
  const Library& lib = ctx->lib();
  auto unimport = lib.need(lib.sym().mlx5dv_var_unimport, "mlx5dv_var_unimport");
  return detail::import_raw(
      ctx, ObjectKind::var, "mlx5dv_var_import",
      lib.need(lib.sym().mlx5dv_var_import, "mlx5dv_var_import"), raw, len,
      [&](m5a_mlx5dv_var* v) {
        // The kernel maps a VAR in whole pages (a VMA is page-granular): another length came
        // from a rewritten buffer and would map a range other than the page's entry.
        const long page = sysconf(_SC_PAGESIZE);
        if (v->length == 0 || (page > 0 && v->length % uint32_t(page) != 0)) {
          const uint32_t bad = v->length;
          unimport(v);
          throw Error(ErrorKind::export_format, "mlx5dv_var_import", EINVAL,
                      "VAR length " + std::to_string(bad) + " is not a whole number of " +
                          std::to_string(page) + "-byte pages (a rewritten export buffer)");
        }
        return std::shared_ptr<Var>(new Var(ctx, v, true, tlp));
      });
}

std::vector<uint8_t> Var::export_raw() const {
  const Library& lib = ctx_->lib();
  auto export_fn = lib.need(lib.sym().mlx5dv_var_export, "mlx5dv_var_export");
  auto l = use("mlx5dv_var_export");
  return detail::export_raw(*ctx_, ObjectKind::var, "mlx5dv_var_export", export_fn, raw_);
}

void* Var::map_raw(int prot) {
  Context::Use u(*ctx_);
  const Library& lib = ctx_->lib();
  // The software device's mmap entry plays the kernel's mmap handler (which checks that the
  // offset is a live VAR of this context); with rdma-core the kernel does that check itself.
  void* p = lib.sym().sim.mmap != nullptr
                ? lib.sym().sim.mmap(u.get(), length_, prot, MAP_SHARED, mmap_off_)
                : ::mmap(nullptr, length_, prot, MAP_SHARED, u.get()->cmd_fd, mmap_off_);
  if (p == MAP_FAILED) {
    const int e = errno_or_eio();
    // Only EINVAL means the kernel's mmap handler found no live VAR at this offset; ENOMEM is
    // the address space (RLIMIT_AS, vm.max_map_count), EACCES/EPERM the protection.
    throw_errno("mmap(cmd_fd, VAR page " + std::to_string(page_id_) + ")", e, true,
                e == EINVAL ? "the kernel refused the VAR's offset: it was freed, or belongs to "
                              "another context"
                            : "");
  }
  return p;
}

Mapping Var::map(int prot) {
  auto l = use("map VAR");
  void* p = map_raw(prot);
  SigbusGuard guard;
  if (ctx_->lib().sym().sim.mmap != nullptr) {
    // The software device's cmd_fd is its bar file, which any process of the user can
    // truncate (docs/sim.md): the page is guarded. Hardware pages are device memory.
    guard = SigbusGuard::add(p, length_, prot);
    if (!guard.active()) {
      const int e = errno_or_eio();
      munmap(p, length_);
      throw Error(e == ENOSPC ? ErrorKind::resource_exhausted : ErrorKind::generic,
                  "map VAR page " + std::to_string(page_id_), e,
                  "cannot guard the software device's page against truncation (SIGBUS guard)");
    }
  }
  mappings_.fetch_add(1, std::memory_order_relaxed);
  return Mapping(shared_from_this(), p, length_, std::move(guard));
}

bool Var::probe() {
  auto l = use("probe VAR");
  try {
    munmap(map_raw(PROT_WRITE), length_);
    return true;
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::invalid_handle) return false;
    throw;
  }
}

void Var::release(bool destroy) {
  const Library& lib = ctx_->lib();
  if (destroy) {
    if (mappings_.load(std::memory_order_relaxed) > 0)
      throw Error(ErrorKind::invalid_argument, "mlx5dv_free_var", EBUSY,
                  "VAR page " + std::to_string(page_id_) + " is still mapped (" +
                      std::to_string(mappings_.load()) +
                      " mapping(s) or gateway(s) made through mlx5tlp): close them first");
    Context::Use u(*ctx_, Context::Use::release);
    lib.sym().mlx5dv_free_var(raw_);
  } else {
    lib.need(lib.sym().mlx5dv_var_unimport, "mlx5dv_var_unimport")(raw_);
  }
  raw_ = nullptr;
}

}  // namespace mlx5tlp
