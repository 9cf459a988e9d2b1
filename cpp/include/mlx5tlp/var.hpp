// mlx5tlp/var.hpp — a VAR page (TLP response gateway or VirtIO doorbell), RAII.
//
// alloc() calls mlx5dv_alloc_var (with MLX5DV_VAR_ALLOC_FLAG_TLP for a gateway page) and owns
// the result; import() rebuilds one from a raw rdma-core export buffer and only unimports it.
// map() maps the page (mmap on cmd_fd at mmap_off) into a Mapping that keeps the Var alive;
// hold_mapping() counts a mapping made elsewhere (Python's mmap). free() refuses (EBUSY) while
// any of either exists, so no mapping made through the API ever outlives the page it maps.
// Thread-safety: as Handle.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mlx5tlp/handle.hpp"
#include "mlx5tlp/sigbus_guard.hpp"

namespace mlx5tlp {

class Var;

// A mapping of a VAR page; munmap()s on destruction. Move-only.
class Mapping {
 public:
  Mapping() = default;
  Mapping(std::shared_ptr<Var> var, void* addr, size_t len, SigbusGuard guard = {}) noexcept;
  ~Mapping();
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  void* data() const noexcept { return addr_; }
  size_t size() const noexcept { return len_; }
  const std::shared_ptr<Var>& var() const noexcept { return var_; }
  void reset() noexcept;
  // The software device's page is its bar file: truncated by another process, the mapping
  // turns into zero pages (sigbus_guard.hpp) and this is true; writes then reach nobody.
  bool lost() const noexcept { return guard_.lost(); }

 private:
  std::shared_ptr<Var> var_;
  void* addr_ = nullptr;
  size_t len_ = 0;
  SigbusGuard guard_;  // the software device only; reset before the munmap
};

// A mapping of the page made outside the core (the Python façade's Var.mmap()): counted like a
// Mapping, so free() refuses while it is alive. release() (or destruction) uncounts it once.
class MappingHold {
 public:
  explicit MappingHold(std::shared_ptr<Var> var) noexcept;
  ~MappingHold() { release(); }
  MappingHold(const MappingHold&) = delete;
  MappingHold& operator=(const MappingHold&) = delete;
  void release() noexcept;
  bool released() const noexcept { return !var_; }
  // The software device's page is its bar file (see Mapping::lost): guard the outside mapping
  // [addr, addr + len) too. No-op (false) on hardware. Throws Error(ENOSPC) on a full table.
  bool guard(void* addr, size_t len, int prot);
  // Unregister the guard: call BEFORE the outside mapping is unmapped (release() does too).
  void unguard() noexcept { guard_.reset(); }
  bool lost() const noexcept { return guard_.lost(); }

 private:
  std::shared_ptr<Var> var_;
  SigbusGuard guard_;
};

class Var final : public Handle, public std::enable_shared_from_this<Var> {
 public:
  static std::shared_ptr<Var> alloc(std::shared_ptr<Context> ctx, bool tlp);
  // `raw` must be exactly ctx->export_size(ObjectKind::var) bytes; `tlp` is what the exporter
  // said the page is (the raw buffer does not carry it).
  static std::shared_ptr<Var> import(std::shared_ptr<Context> ctx, const uint8_t* raw,
                                     size_t len, bool tlp);
  ~Var() override;

  uint32_t page_id() const noexcept { return page_id_; }
  uint32_t length() const noexcept { return length_; }
  off_t mmap_off() const noexcept { return mmap_off_; }
  bool is_tlp() const noexcept { return tlp_; }

  std::vector<uint8_t> export_raw() const;
  // Maps `length()` bytes with `prot` (PROT_WRITE for a gateway). The kernel (or the software
  // device) refuses a freed VAR's offset: Error(invalid_handle).
  Mapping map(int prot);
  // Would the kernel map this VAR now? Maps and unmaps once; false for a freed VAR.
  bool probe();
  int mappings() const noexcept { return mappings_.load(std::memory_order_relaxed); }
  // Counts a mapping made outside the core until the hold is released; throws when the VAR
  // is closed (so a hold never outlives the page it guards).
  std::unique_ptr<MappingHold> hold_mapping();
  std::string describe() const override {
    return std::string(what_) + " page " + std::to_string(page_id_);
  }

 private:
  friend class Mapping;
  friend class MappingHold;
  Var(std::shared_ptr<Context> ctx, m5a_mlx5dv_var* raw, bool imported, bool tlp);
  void release(bool destroy) override;
  void* map_raw(int prot);

  m5a_mlx5dv_var* raw_;
  uint32_t page_id_, length_;
  off_t mmap_off_;
  bool tlp_;
  std::atomic<int> mappings_{0};
};

}  // namespace mlx5tlp
