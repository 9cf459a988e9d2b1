// mlx5tlp/devx_obj.hpp — a DEVX object created from a raw PRM command mailbox, RAII.
//
// create() runs mlx5dv_devx_obj_create(in, out); query()/modify() run the matching commands on
// the object. A bad firmware status throws Error(devx_command) with status and syndrome.
// Thread-safety: as Handle.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "mlx5tlp/handle.hpp"

struct m5a_mlx5dv_devx_obj;

namespace mlx5tlp {

class DevxObj final : public Handle {
 public:
  static std::shared_ptr<DevxObj> create(std::shared_ptr<Context> ctx, const uint8_t* in,
                                         size_t inlen, size_t outlen, std::vector<uint8_t>* out);
  static std::shared_ptr<DevxObj> import(std::shared_ptr<Context> ctx, const uint8_t* raw,
                                         size_t len);
  ~DevxObj() override;

  std::vector<uint8_t> query(const uint8_t* in, size_t inlen, size_t outlen);
  std::vector<uint8_t> modify(const uint8_t* in, size_t inlen, size_t outlen);
  std::vector<uint8_t> export_raw() const;

 private:
  DevxObj(std::shared_ptr<Context> ctx, m5a_mlx5dv_devx_obj* raw, bool imported);
  void release(bool destroy) override;

  m5a_mlx5dv_devx_obj* raw_;
};

}  // namespace mlx5tlp
