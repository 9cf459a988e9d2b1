// mlx5tlp/loader.hpp — finds rdma-core (or the software device) at run time.
//
// The core never links rdma-core. A Library dlopen()s libibverbs.so.1 + libmlx5.so.1 (backend
// "rdma") or libmlx5tlp_sim.so (backend "sim", which exports the same functions under the same
// symbol-version nodes) and resolves every function the project uses into one table, with
// dlvsym() and the version node so a same-named symbol of another version is never picked up.
// Symbols newer than what a system has are left null and show up as capability flags;
// require() turns a null entry into a NotSupported error that names what is missing.
//
// Ownership: libraries are loaded once per (backend, paths) and never unloaded (rdma-core
// providers do not support dlclose, and handles keep function pointers). Library::get()
// returns a shared_ptr that every Context keeps.
// Thread-safety: get()/open() are safe from any thread; a Library is immutable once built.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mlx5tlp/abi.h"
#include "mlx5tlp/sim_abi.h"

namespace mlx5tlp {

enum class Backend { rdma, sim };

const char* to_string(Backend b) noexcept;
// "rdma" or "sim"; throws Error(invalid_argument) naming the bad value otherwise.
Backend parse_backend(const std::string& name);
// The argument if given, else $MLX5TLP_BACKEND, else rdma.
Backend resolve_backend(const std::optional<std::string>& name);

// One function table. Entries are null when the loaded library lacks the symbol.
struct Symbols {
  // libibverbs, IBVERBS_1.1
  m5a_ibv_get_device_list_fn ibv_get_device_list = nullptr;
  m5a_ibv_free_device_list_fn ibv_free_device_list = nullptr;
  m5a_ibv_get_device_name_fn ibv_get_device_name = nullptr;
  m5a_ibv_get_device_guid_fn ibv_get_device_guid = nullptr;
  m5a_ibv_open_device_fn ibv_open_device = nullptr;
  m5a_ibv_close_device_fn ibv_close_device = nullptr;
  // IBVERBS_1.10 / 1.13
  m5a_ibv_import_device_fn ibv_import_device = nullptr;
  m5a_ibv_is_fork_initialized_fn ibv_is_fork_initialized = nullptr;
  // libmlx5, MLX5_1.7 / 1.8 / 1.12
  m5a_mlx5dv_open_device_fn mlx5dv_open_device = nullptr;
  m5a_mlx5dv_is_supported_fn mlx5dv_is_supported = nullptr;
  m5a_mlx5dv_alloc_var_fn mlx5dv_alloc_var = nullptr;
  m5a_mlx5dv_free_var_fn mlx5dv_free_var = nullptr;
  m5a_mlx5dv_devx_umem_reg_fn mlx5dv_devx_umem_reg = nullptr;
  m5a_mlx5dv_devx_umem_dereg_fn mlx5dv_devx_umem_dereg = nullptr;
  m5a_mlx5dv_devx_obj_create_fn mlx5dv_devx_obj_create = nullptr;
  m5a_mlx5dv_devx_obj_cmd_fn mlx5dv_devx_obj_query = nullptr;
  m5a_mlx5dv_devx_obj_cmd_fn mlx5dv_devx_obj_modify = nullptr;
  m5a_mlx5dv_devx_obj_destroy_fn mlx5dv_devx_obj_destroy = nullptr;
  m5a_mlx5dv_devx_general_cmd_fn mlx5dv_devx_general_cmd = nullptr;
  // libmlx5, MLX5_1.27 (rdma-core >= 63)
  m5a_mlx5dv_get_export_sizes_fn mlx5dv_get_export_sizes = nullptr;  // _mlx5dv_get_export_sizes
  m5a_mlx5dv_var_export_fn mlx5dv_var_export = nullptr;
  m5a_mlx5dv_var_import_fn mlx5dv_var_import = nullptr;
  m5a_mlx5dv_var_unimport_fn mlx5dv_var_unimport = nullptr;
  m5a_mlx5dv_devx_umem_export_fn mlx5dv_devx_umem_export = nullptr;
  m5a_mlx5dv_devx_umem_import_fn mlx5dv_devx_umem_import = nullptr;
  m5a_mlx5dv_devx_umem_unimport_fn mlx5dv_devx_umem_unimport = nullptr;
  m5a_mlx5dv_devx_obj_export_fn mlx5dv_devx_obj_export = nullptr;
  m5a_mlx5dv_devx_obj_import_fn mlx5dv_devx_obj_import = nullptr;
  m5a_mlx5dv_devx_obj_unimport_fn mlx5dv_devx_obj_unimport = nullptr;
  // Software device only (version nodes MLX5TLP_SIM_1.0 and 1.1); see sim_abi.h.
  SimSymbols sim;
};

struct Capabilities {
  bool tlp_var = false;           // MLX5DV_VAR_ALLOC_FLAG_TLP understood (rdma-core >= 63)
  bool var_export = false;        // mlx5dv_var_export/_import/_unimport
  bool devx_obj_export = false;   // mlx5dv_devx_obj_export/_import/_unimport
  bool devx_umem_export = false;  // mlx5dv_devx_umem_export/_import/_unimport
  bool import_device = false;     // ibv_import_device
  bool devx = false;              // mlx5dv_open_device + DEVX object/UMEM calls
};

class Library {
 public:
  // The library for `backend`, loaded on first use from the default locations or from
  // $MLX5TLP_IBVERBS_LIB / $MLX5TLP_MLX5_LIB (rdma) or $MLX5TLP_SIM_LIB (sim).
  // Throws Error(library_not_found) with the dlopen reason and an install hint.
  static std::shared_ptr<const Library> get(Backend backend);
  // Explicit paths (tests, embedders). `mlx5_path` may be empty for the sim (one library).
  static std::shared_ptr<const Library> open(Backend backend, const std::string& ibverbs_path,
                                             const std::string& mlx5_path);

  Backend backend() const noexcept { return backend_; }
  const std::vector<std::string>& paths() const noexcept { return paths_; }
  // e.g. "44.0" from libibverbs.so.1.14.44.0; empty when the file name does not say.
  const std::string& rdma_core_version() const noexcept { return version_; }
  // Why libmlx5 could not be loaded ("<path>: <dlerror text>"), empty when it was (or when
  // one library serves both, as the software device does). libibverbs alone still lists
  // devices; every DV call then fails with NotSupported carrying this text.
  const std::string& mlx5_load_error() const noexcept { return mlx5_error_; }
  const Symbols& sym() const noexcept { return sym_; }
  const Capabilities& caps() const noexcept { return caps_; }

  // Throws Error(not_supported) naming `function`, its symbol version and `why` when null.
  template <typename F>
  F need(F fn, const char* function) const {
    if (fn == nullptr) missing(function);
    return fn;
  }
  [[noreturn]] void missing(const char* function) const;

  Library(const Library&) = delete;
  Library& operator=(const Library&) = delete;
  Library() = default;  // only through get()/open()

 private:
  Backend backend_ = Backend::rdma;
  std::vector<std::string> paths_;
  std::string version_;
  std::string mlx5_error_;
  Symbols sym_;
  Capabilities caps_;
};

// A device as listed by ibv_get_device_list.
struct DeviceInfo {
  std::string name;
  uint64_t node_guid = 0;  // host order
  bool mlx5 = false;       // mlx5dv_is_supported
};

std::vector<DeviceInfo> list_devices(const Library& lib);

// "0002:c903:0031:7a80", the way ibv_devinfo prints a node GUID.
std::string format_guid(uint64_t guid);

// The version node and the rdma-core release a function needs, for messages.
const char* symbol_version(const char* function) noexcept;

}  // namespace mlx5tlp
