// mlx5tlp/context.hpp — a device context (ibv_context opened with DEVX), RAII.
//
// Ownership: a Context owns its ibv_context and, through it, the command fd (cmd_fd);
// ibv_close_device closes that fd. Objects created on a context (Var, Umem, DevxObj) hold a
// shared_ptr to it, so the ibv_context outlives every object that refers to it. close() closes
// every object still open on the context first (owned ones are freed, imported ones
// unimported), then the context; it is idempotent. When some object cannot be released
// (a destroy failing with EBUSY, EREMOTEIO, ...) close() throws an Error naming each one and
// leaves them, and the context, open: release them (or call close() again) later.
// Thread-safety: all methods may be called from any thread; close() waits for calls in flight
// and later calls throw Error(invalid_handle).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "mlx5tlp/loader.hpp"

namespace mlx5tlp {

// The device's TLP emulation capabilities (QUERY_HCA_CAP).
struct TlpCaps {
  bool supported = false;       // general cap tlp_device_emulation_manager
  uint32_t gw_num_pages = 0;    // tlp_rsp_gw_num_pages
  uint32_t gw_log_stride = 0;   // log_tlp_rsp_gw_page_stride
  uint64_t gw_page_stride = 0;  // bytes: 4096 << log stride
  uint64_t gw_bar_offset = 0;   // tlp_rsp_gw_pages_bar_offset
};

enum class ObjectKind : uint32_t { var = 1, umem = 2, devx_obj = 3 };

// Something a Context closes when it is closed.
class Child {
 public:
  virtual ~Child() = default;
  virtual void close() = 0;
  virtual bool closed() const = 0;
  // What it is, for errors that name it ("UMEM 3", "TLP gateway VAR page 2").
  virtual std::string describe() const { return "object"; }
};

class Context : public std::enable_shared_from_this<Context> {
 public:
  // Opens `name` (the first mlx5 device when empty) with MLX5DV_CONTEXT_FLAGS_DEVX.
  // Throws DeviceNotFound (naming the devices there are), NotSupported, LibraryNotFound.
  static std::shared_ptr<Context> open(const std::string& name, Backend backend);
  // A second context on the same kernel objects from a command fd (ibv_import_device). The fd
  // is dup()ed first: the caller keeps ownership of `fd`.
  static std::shared_ptr<Context> import_fd(int fd, Backend backend);

  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  void close();
  bool closed() const;
  const std::string& name() const noexcept { return name_; }
  uint64_t node_guid() const noexcept { return guid_; }
  Backend backend() const noexcept { return lib_->backend(); }
  bool imported() const noexcept { return imported_; }
  const Library& lib() const noexcept { return *lib_; }
  int cmd_fd() const;

  TlpCaps query_tlp_caps();
  // mlx5dv_devx_general_cmd; a bad firmware status throws Error(devx_command).
  std::vector<uint8_t> general_cmd(const uint8_t* in, size_t inlen, size_t outlen);
  // _mlx5dv_get_export_sizes for one kind (NotSupported before rdma-core 63).
  uint32_t export_size(ObjectKind kind) const;

  // Used by the object types: the raw context under a shared lock. Throws Error(invalid_handle)
  // when the context is closed, or is closing (except for `release`: close() releasing its
  // children). close() waits for every Use in flight before it takes its snapshot of children.
  class Use {
   public:
    enum Purpose { use, release };
    explicit Use(const Context& c, Purpose purpose = use);
    m5a_ibv_context* get() const noexcept { return raw_; }

   private:
    std::shared_lock<std::shared_mutex> lock_;
    m5a_ibv_context* raw_;
  };
  // Registers a new object for close(). The caller holds the Use under which it created the
  // object, so a close() cannot take its snapshot in between (C4: no child adopted after it).
  void adopt(const std::shared_ptr<Child>& child, const Use& creating);
  size_t open_children();

 private:
  Context(std::shared_ptr<const Library> lib, m5a_ibv_context* raw, bool imported);

  std::shared_ptr<const Library> lib_;
  mutable std::shared_mutex mu_;
  m5a_ibv_context* raw_;  // null once closed
  bool closing_ = false;  // under mu_: close() is releasing the children
  std::mutex close_mu_;   // one close() at a time
  bool imported_;
  std::string name_;
  uint64_t guid_ = 0;
  std::mutex children_mu_;
  std::vector<std::weak_ptr<Child>> children_;
};

// Throws Error(devx_command) with the outbox's status and syndrome when rc is EREMOTEIO,
// else the errno-mapped error. `out` is the command outbox (at least 8 bytes) or null.
[[noreturn]] void throw_devx(const char* operation, int err, const uint8_t* out, size_t outlen,
                             bool on_handle);

}  // namespace mlx5tlp
