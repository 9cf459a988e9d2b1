// mlx5tlp/umem.hpp — a DEVX UMEM (registered user memory), RAII.
//
// reg() registers [addr, addr+size) with mlx5dv_devx_umem_reg; the caller keeps that memory
// valid and unmoved until the Umem is closed (the Python façade holds the buffer for you).
// Note libmlx5 marks the range MADV_DONTFORK rounded out to whole pages: register page-aligned
// memory (see mlx5tlp.alloc_umem_buffer) if the process may fork.
// An imported Umem carries the id, not the memory: the importer does not see the bytes.
// Thread-safety: as Handle.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mlx5tlp/handle.hpp"

namespace mlx5tlp {

class Umem final : public Handle {
 public:
  static std::shared_ptr<Umem> reg(std::shared_ptr<Context> ctx, void* addr, size_t size,
                                   uint32_t access);
  static std::shared_ptr<Umem> import(std::shared_ptr<Context> ctx, const uint8_t* raw,
                                      size_t len);
  ~Umem() override;

  uint32_t umem_id() const noexcept { return umem_id_; }
  std::string describe() const override { return "UMEM " + std::to_string(umem_id_); }
  size_t size() const noexcept { return size_; }  // 0 when imported (not in the export)
  std::vector<uint8_t> export_raw() const;

 private:
  Umem(std::shared_ptr<Context> ctx, m5a_mlx5dv_devx_umem* raw, bool imported, size_t size);
  void release(bool destroy) override;

  m5a_mlx5dv_devx_umem* raw_;
  uint32_t umem_id_;
  size_t size_;
};

}  // namespace mlx5tlp
