#include "mlx5tlp/loader.hpp"

#include <dlfcn.h>
#include <endian.h>
#include <limits.h>
#include <link.h>
#include <stdlib.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

const char* to_string(Backend b) noexcept { return b == Backend::sim ? "sim" : "rdma"; }

Backend parse_backend(const std::string& name) {
  if (name == "rdma") return Backend::rdma;
  if (name == "sim") return Backend::sim;
  throw Error(ErrorKind::invalid_argument, "select backend", EINVAL,
              "unknown backend '" + name + "' (expected 'rdma' or 'sim')");
}

Backend resolve_backend(const std::optional<std::string>& name) {
  if (name && !name->empty()) return parse_backend(*name);
  const char* env = std::getenv("MLX5TLP_BACKEND");
  if (env != nullptr && *env != '\0') {
    try {
      return parse_backend(env);
    } catch (const Error&) {
      throw Error(ErrorKind::invalid_argument, "select backend", EINVAL,
                  std::string("MLX5TLP_BACKEND='") + env + "' is not 'rdma' or 'sim'");
    }
  }
  return Backend::rdma;
}

namespace {

struct SymbolVersion {
  const char* function;
  const char* node;
  const char* release;  // the rdma-core release that introduced it, where we know it
};

// The version node of each function (rdma-core libibverbs.map / libmlx5.map).
constexpr SymbolVersion kVersions[] = {
    {"ibv_get_device_list", "IBVERBS_1.1", nullptr},
    {"ibv_free_device_list", "IBVERBS_1.1", nullptr},
    {"ibv_get_device_name", "IBVERBS_1.1", nullptr},
    {"ibv_get_device_guid", "IBVERBS_1.1", nullptr},
    {"ibv_open_device", "IBVERBS_1.1", nullptr},
    {"ibv_close_device", "IBVERBS_1.1", nullptr},
    {"ibv_import_device", "IBVERBS_1.10", nullptr},
    {"ibv_is_fork_initialized", "IBVERBS_1.13", nullptr},
    {"mlx5dv_open_device", "MLX5_1.7", nullptr},
    {"mlx5dv_is_supported", "MLX5_1.8", nullptr},
    {"mlx5dv_alloc_var", "MLX5_1.12", nullptr},
    {"mlx5dv_free_var", "MLX5_1.12", nullptr},
    {"mlx5dv_devx_umem_reg", "MLX5_1.7", nullptr},
    {"mlx5dv_devx_umem_dereg", "MLX5_1.7", nullptr},
    {"mlx5dv_devx_obj_create", "MLX5_1.7", nullptr},
    {"mlx5dv_devx_obj_query", "MLX5_1.7", nullptr},
    {"mlx5dv_devx_obj_modify", "MLX5_1.7", nullptr},
    {"mlx5dv_devx_obj_destroy", "MLX5_1.7", nullptr},
    {"mlx5dv_devx_general_cmd", "MLX5_1.7", nullptr},
    {"_mlx5dv_get_export_sizes", "MLX5_1.27", "63"},
    {"mlx5dv_var_export", "MLX5_1.27", "63"},
    {"mlx5dv_var_import", "MLX5_1.27", "63"},
    {"mlx5dv_var_unimport", "MLX5_1.27", "63"},
    {"mlx5dv_devx_umem_export", "MLX5_1.27", "63"},
    {"mlx5dv_devx_umem_import", "MLX5_1.27", "63"},
    {"mlx5dv_devx_umem_unimport", "MLX5_1.27", "63"},
    {"mlx5dv_devx_obj_export", "MLX5_1.27", "63"},
    {"mlx5dv_devx_obj_import", "MLX5_1.27", "63"},
    {"mlx5dv_devx_obj_unimport", "MLX5_1.27", "63"},
    {"mlx5dv_alloc_var(MLX5DV_VAR_ALLOC_FLAG_TLP)", "MLX5_1.27", "63"},
};

const SymbolVersion* find_version(const char* function) noexcept {
  for (const auto& v : kVersions)
    if (std::strcmp(v.function, function) == 0) return &v;
  return nullptr;
}

// Resolve `name@node` from `handle` into `slot`; a missing symbol leaves it null.
template <typename F>
void resolve(void* handle, F& slot, const char* name, const char* node) {
  if (handle == nullptr) return;
  slot = reinterpret_cast<F>(dlvsym(handle, name, node));
}

template <typename F>
void resolve(void* handle, F& slot, const char* name) {
  const SymbolVersion* v = find_version(name);
  resolve(handle, slot, name, v != nullptr ? v->node : "");
}

std::string loaded_path(void* handle) {
  struct link_map* map = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &map) != 0 || map == nullptr || map->l_name == nullptr)
    return {};
  char real[PATH_MAX];
  if (realpath(map->l_name, real) != nullptr) return real;
  return map->l_name;
}

// libibverbs.so.1.14.44.0 -> "44.0": rdma-core names its libraries
// so.<soname major>.<abi minor>.<rdma-core major>.<rdma-core minor>.
std::string version_from_path(const std::string& path) {
  const auto so = path.rfind(".so.");
  if (so == std::string::npos) return {};
  std::vector<std::string> parts;
  std::string cur;
  for (char c : path.substr(so + 4)) {
    if (c == '.') {
      parts.push_back(cur);
      cur.clear();
    } else if (c >= '0' && c <= '9') {
      cur += c;
    } else {
      return {};
    }
  }
  parts.push_back(cur);
  if (parts.size() != 4) return {};
  for (const auto& p : parts)
    if (p.empty()) return {};
  return parts[2] + "." + parts[3];
}

// Directory of the object file that contains this code (the _core module or a native
// caller's program), where the package keeps libmlx5tlp_sim.so.
std::string own_directory() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&own_directory), &info) == 0 || info.dli_fname == nullptr)
    return {};
  std::string p = info.dli_fname;
  auto slash = p.rfind('/');
  return slash == std::string::npos ? std::string() : p.substr(0, slash);
}

void* open_or_throw(const std::string& path, Backend backend) {
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h != nullptr) return h;
  const char* why = dlerror();
  std::string hint = backend == Backend::rdma
                         ? "install rdma-core (Debian/Ubuntu: apt-get install libibverbs1 "
                           "ibverbs-providers), set MLX5TLP_IBVERBS_LIB/MLX5TLP_MLX5_LIB, or use "
                           "the software device with backend='sim'"
                         : "the software device library is built with the package; set "
                           "MLX5TLP_SIM_LIB to its path";
  throw Error(ErrorKind::library_not_found, "load " + path, 0,
              std::string(why != nullptr ? why : "dlopen failed") + "; " + hint);
}

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::string(v) : fallback;
}

}  // namespace

const char* symbol_version(const char* function) noexcept {
  const SymbolVersion* v = find_version(function);
  return v != nullptr ? v->node : "?";
}

void Library::missing(const char* function) const {
  const SymbolVersion* v = find_version(function);
  const bool from_mlx5 = v != nullptr && std::strncmp(v->node, "MLX5_", 5) == 0;
  if (from_mlx5 && !mlx5_error_.empty())
    throw Error(ErrorKind::not_supported, function, EOPNOTSUPP,
                "libmlx5 could not be loaded (" + mlx5_error_ + "), so " + function +
                    " is unavailable; install rdma-core's mlx5 provider (Debian/Ubuntu: "
                    "ibverbs-providers) or set MLX5TLP_MLX5_LIB");
  std::string detail = std::string("the loaded ") +
                       (backend_ == Backend::sim ? "software device" : "rdma-core") +
                       (version_.empty() ? std::string() : " " + version_) + " lacks " +
                       function + "@" + (v != nullptr ? v->node : "?");
  if (v != nullptr && v->release != nullptr)
    detail += "; it needs rdma-core >= " + std::string(v->release);
  throw Error(ErrorKind::not_supported, function, EOPNOTSUPP, detail);
}

std::shared_ptr<const Library> Library::open(Backend backend, const std::string& ibverbs_path,
                                             const std::string& mlx5_path) {
  void* verbs = open_or_throw(ibverbs_path, backend);
  void* mlx5 = verbs;
  std::string mlx5_error;
  if (!mlx5_path.empty() && mlx5_path != ibverbs_path) {
    // libmlx5 is optional for listing devices: without it, DV calls report NotSupported
    // with dlopen's reason (a missing provider package, a broken install), not a version.
    mlx5 = dlopen(mlx5_path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (mlx5 == nullptr) {
      const char* why = dlerror();
      mlx5_error = mlx5_path + ": " + (why != nullptr ? why : "dlopen failed");
    }
  }

  auto lib = std::make_shared<Library>();
  lib->backend_ = backend;
  lib->paths_.push_back(loaded_path(verbs));
  if (mlx5 != nullptr && mlx5 != verbs) lib->paths_.push_back(loaded_path(mlx5));
  lib->version_ = version_from_path(lib->paths_.front());
  lib->mlx5_error_ = std::move(mlx5_error);

  Symbols& s = lib->sym_;
  resolve(verbs, s.ibv_get_device_list, "ibv_get_device_list");
  resolve(verbs, s.ibv_free_device_list, "ibv_free_device_list");
  resolve(verbs, s.ibv_get_device_name, "ibv_get_device_name");
  resolve(verbs, s.ibv_get_device_guid, "ibv_get_device_guid");
  resolve(verbs, s.ibv_open_device, "ibv_open_device");
  resolve(verbs, s.ibv_close_device, "ibv_close_device");
  resolve(verbs, s.ibv_import_device, "ibv_import_device");
  resolve(verbs, s.ibv_is_fork_initialized, "ibv_is_fork_initialized");
  resolve(mlx5, s.mlx5dv_open_device, "mlx5dv_open_device");
  resolve(mlx5, s.mlx5dv_is_supported, "mlx5dv_is_supported");
  resolve(mlx5, s.mlx5dv_alloc_var, "mlx5dv_alloc_var");
  resolve(mlx5, s.mlx5dv_free_var, "mlx5dv_free_var");
  resolve(mlx5, s.mlx5dv_devx_umem_reg, "mlx5dv_devx_umem_reg");
  resolve(mlx5, s.mlx5dv_devx_umem_dereg, "mlx5dv_devx_umem_dereg");
  resolve(mlx5, s.mlx5dv_devx_obj_create, "mlx5dv_devx_obj_create");
  resolve(mlx5, s.mlx5dv_devx_obj_query, "mlx5dv_devx_obj_query");
  resolve(mlx5, s.mlx5dv_devx_obj_modify, "mlx5dv_devx_obj_modify");
  resolve(mlx5, s.mlx5dv_devx_obj_destroy, "mlx5dv_devx_obj_destroy");
  resolve(mlx5, s.mlx5dv_devx_general_cmd, "mlx5dv_devx_general_cmd");
  resolve(mlx5, s.mlx5dv_get_export_sizes, "_mlx5dv_get_export_sizes");
  resolve(mlx5, s.mlx5dv_var_export, "mlx5dv_var_export");
  resolve(mlx5, s.mlx5dv_var_import, "mlx5dv_var_import");
  resolve(mlx5, s.mlx5dv_var_unimport, "mlx5dv_var_unimport");
  resolve(mlx5, s.mlx5dv_devx_umem_export, "mlx5dv_devx_umem_export");
  resolve(mlx5, s.mlx5dv_devx_umem_import, "mlx5dv_devx_umem_import");
  resolve(mlx5, s.mlx5dv_devx_umem_unimport, "mlx5dv_devx_umem_unimport");
  resolve(mlx5, s.mlx5dv_devx_obj_export, "mlx5dv_devx_obj_export");
  resolve(mlx5, s.mlx5dv_devx_obj_import, "mlx5dv_devx_obj_import");
  resolve(mlx5, s.mlx5dv_devx_obj_unimport, "mlx5dv_devx_obj_unimport");

  if (backend == Backend::sim) {
    const char* node = M5A_SIM_VERSION_NODE;
    resolve(verbs, s.sim.mmap, "mlx5tlp_sim_mmap", node);
    resolve(verbs, s.sim.create_device, "mlx5tlp_sim_create_device", node);
    resolve(verbs, s.sim.remove_device, "mlx5tlp_sim_remove_device", node);
    resolve(verbs, s.sim.query_device, "mlx5tlp_sim_query_device", node);
    resolve(verbs, s.sim.device_dir, "mlx5tlp_sim_device_dir", node);
    resolve(verbs, s.sim.host_open, "mlx5tlp_sim_host_open", node);
    resolve(verbs, s.sim.host_close, "mlx5tlp_sim_host_close", node);
    resolve(verbs, s.sim.host_send, "mlx5tlp_sim_host_send", node);
    resolve(verbs, s.sim.host_poll, "mlx5tlp_sim_host_poll", node);
    resolve(verbs, s.sim.host_stats, "mlx5tlp_sim_host_stats", node);
    resolve(verbs, s.sim.host_load, "mlx5tlp_sim_host_load", node);
    resolve(verbs, s.sim.function_poll, "mlx5tlp_sim_function_poll", node);
    resolve(verbs, s.sim.inject_fault, "mlx5tlp_sim_inject_fault", node);
    resolve(verbs, s.sim.reset_device, "mlx5tlp_sim_reset_device", node);
    resolve(verbs, s.sim.function_claim, "mlx5tlp_sim_function_claim", node);
    resolve(verbs, s.sim.function_recover, "mlx5tlp_sim_function_recover", node);
    resolve(verbs, s.sim.function_mark, "mlx5tlp_sim_function_mark", node);
    resolve(verbs, s.sim.function_mark_progress, "mlx5tlp_sim_function_mark_progress",
            M5A_SIM_VERSION_NODE_1_1);
    resolve(verbs, s.sim.function_retire, "mlx5tlp_sim_function_retire", node);
    resolve(verbs, s.sim.function_note_logged, "mlx5tlp_sim_function_note_logged",
            M5A_SIM_VERSION_NODE_1_2);
    resolve(verbs, s.sim.import_check, "mlx5tlp_sim_import_check", node);
    resolve(verbs, s.sim.last_error, "mlx5tlp_sim_last_error", node);
    resolve(verbs, s.sim.function_wait, "mlx5tlp_sim_function_wait", node);
    resolve(verbs, s.sim.function_wake, "mlx5tlp_sim_function_wake", node);
    if (s.sim.mmap == nullptr)
      throw Error(ErrorKind::library_not_found, "load " + ibverbs_path, 0,
                  "not an mlx5tlp software device (no mlx5tlp_sim_mmap@" M5A_SIM_VERSION_NODE ")");
    lib->version_ = "63.0";  // the rdma-core ABI level the software device implements
  }

  Capabilities& c = lib->caps_;
  c.import_device = s.ibv_import_device != nullptr;
  c.devx = s.mlx5dv_open_device != nullptr && s.mlx5dv_devx_obj_create != nullptr &&
           s.mlx5dv_devx_umem_reg != nullptr && s.mlx5dv_devx_general_cmd != nullptr;
  c.var_export = s.mlx5dv_var_export && s.mlx5dv_var_import && s.mlx5dv_var_unimport &&
                 s.mlx5dv_get_export_sizes;
  c.devx_umem_export = s.mlx5dv_devx_umem_export && s.mlx5dv_devx_umem_import &&
                       s.mlx5dv_devx_umem_unimport && s.mlx5dv_get_export_sizes;
  c.devx_obj_export = s.mlx5dv_devx_obj_export && s.mlx5dv_devx_obj_import &&
                      s.mlx5dv_devx_obj_unimport && s.mlx5dv_get_export_sizes;
  // The TLP flag has no symbol of its own: it arrived in the same release (rdma-core 63) as
  // the MLX5_1.27 export family, so that node's presence is how we know the flag is accepted.
  c.tlp_var = s.mlx5dv_alloc_var != nullptr && s.mlx5dv_get_export_sizes != nullptr;
  return lib;
}

std::shared_ptr<const Library> Library::get(Backend backend) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const Library>> cache;

  std::string verbs, mlx5;
  if (backend == Backend::rdma) {
    verbs = env_or("MLX5TLP_IBVERBS_LIB", "libibverbs.so.1");
    mlx5 = env_or("MLX5TLP_MLX5_LIB", "libmlx5.so.1");
  } else {
    std::string dir = own_directory();
    verbs = env_or("MLX5TLP_SIM_LIB",
                   dir.empty() ? std::string("libmlx5tlp_sim.so") : dir + "/libmlx5tlp_sim.so");
  }
  std::string key = std::string(to_string(backend)) + "\n" + verbs + "\n" + mlx5;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto lib = open(backend, verbs, mlx5);
  cache.emplace(key, lib);
  return lib;
}

std::string format_guid(uint64_t guid) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%04x:%04x:%04x:%04x", unsigned((guid >> 48) & 0xffff),
                unsigned((guid >> 32) & 0xffff), unsigned((guid >> 16) & 0xffff),
                unsigned(guid & 0xffff));
  return buf;
}

std::vector<DeviceInfo> list_devices(const Library& lib) {
  const Symbols& s = lib.sym();
  auto get_list = lib.need(s.ibv_get_device_list, "ibv_get_device_list");
  int n = 0;
  errno = 0;
  m5a_ibv_device** list = get_list(&n);
  if (list == nullptr) {
    // libibverbs returns NULL with ENOSYS when the kernel has no RDMA support at all: that is
    // "no devices", not a failure.
    if (errno == ENOSYS || errno == 0) return {};
    const int err = errno_or_eio();
    // The software device says which path or limit is the cause (mlx5tlp_sim_last_error).
    char why[512] = "";
    if (s.sim.last_error != nullptr) s.sim.last_error(why, sizeof why);
    throw_errno("ibv_get_device_list", err, false, why);
  }
  std::vector<DeviceInfo> out;
  for (int i = 0; i < n; ++i) {
    DeviceInfo d;
    const char* name = s.ibv_get_device_name(list[i]);
    d.name = name != nullptr ? name : "";
    d.node_guid = be64toh(s.ibv_get_device_guid(list[i]));  // __be64 -> host
    d.mlx5 = s.mlx5dv_is_supported != nullptr && s.mlx5dv_is_supported(list[i]);
    out.push_back(std::move(d));
  }
  s.ibv_free_device_list(list);
  return out;
}

}  // namespace mlx5tlp
