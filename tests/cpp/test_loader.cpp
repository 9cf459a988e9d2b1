// The loader against the system's rdma-core (where installed), a missing library, and the
// software device. Runs in CI with Debian's rdma-core 44 installed.
#include <dlfcn.h>
#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "check.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/loader.hpp"

using namespace mlx5tlp;

static void real_rdma_core() {
  void* probe = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL);
  if (probe == nullptr) {
    std::printf("no libibverbs.so.1 here: checking the not-found path only\n");
    CHECK_THROWS_KIND(Library::get(Backend::rdma), ErrorKind::library_not_found, 0);
    return;
  }
  auto lib = Library::get(Backend::rdma);
  const Symbols& s = lib->sym();
  CHECK(lib->backend() == Backend::rdma);
  CHECK(!lib->paths().empty());
  CHECK(lib->paths()[0].find("libibverbs.so.1.") != std::string::npos);
  CHECK(s.ibv_get_device_list && s.ibv_free_device_list && s.ibv_open_device &&
        s.ibv_close_device && s.ibv_get_device_name && s.ibv_get_device_guid);
  CHECK(s.sim.mmap == nullptr);  // never resolved from a real rdma-core
  const std::string& v = lib->rdma_core_version();
  std::printf("rdma-core %s at %s\n", v.c_str(), lib->paths()[0].c_str());
  CHECK(!v.empty());
  const int major = std::atoi(v.c_str());
  if (lib->paths().size() > 1) {  // libmlx5 present (ibverbs-providers)
    CHECK(s.mlx5dv_open_device && s.mlx5dv_alloc_var && s.mlx5dv_devx_obj_create);
    CHECK(lib->caps().devx);
    // Export/import arrived in rdma-core 63 under MLX5_1.27: absent before, present after.
    CHECK(lib->caps().var_export == (major >= 63));
    CHECK(lib->caps().devx_umem_export == (major >= 63));
    CHECK(lib->caps().devx_obj_export == (major >= 63));
    CHECK(lib->caps().tlp_var == (major >= 63));
    if (major < 63) {
      CHECK(s.mlx5dv_var_export == nullptr && s.mlx5dv_get_export_sizes == nullptr);
      try {
        lib->need(s.mlx5dv_var_export, "mlx5dv_var_export");
        CHECK(false);
      } catch (const Error& e) {
        CHECK(e.kind() == ErrorKind::not_supported);
        CHECK(std::strstr(e.what(), "rdma-core >= 63") != nullptr);
        CHECK(std::strstr(e.what(), "MLX5_1.27") != nullptr);
      }
    }
  }
  // With no RDMA hardware the list is empty, not an error.
  auto devs = list_devices(*lib);
  std::printf("%zu rdma device(s)\n", devs.size());
  dlclose(probe);
}

static void missing_library() {
  CHECK_THROWS_KIND(Library::open(Backend::rdma, "/nonexistent/libibverbs.so.1", ""),
                    ErrorKind::library_not_found, 0);
  try {
    Library::open(Backend::rdma, "/nonexistent/libibverbs.so.1", "");
  } catch (const Error& e) {
    CHECK(std::strstr(e.what(), "apt-get install libibverbs1") != nullptr);
  }
  // A library that is not a software device is refused as the sim backend.
  if (void* h = dlopen("libc.so.6", RTLD_NOW)) {
    CHECK_THROWS_KIND(Library::open(Backend::sim, "libc.so.6", ""), ErrorKind::library_not_found, 0);
    dlclose(h);
  }
}

static void backend_selection() {
  unsetenv("MLX5TLP_BACKEND");
  CHECK(resolve_backend(std::nullopt) == Backend::rdma);
  setenv("MLX5TLP_BACKEND", "sim", 1);
  CHECK(resolve_backend(std::nullopt) == Backend::sim);
  CHECK(resolve_backend(std::string("rdma")) == Backend::rdma);  // the argument wins
  setenv("MLX5TLP_BACKEND", "bogus", 1);
  CHECK_THROWS_KIND(resolve_backend(std::nullopt), ErrorKind::invalid_argument, EINVAL);
  unsetenv("MLX5TLP_BACKEND");
  CHECK_THROWS_KIND(parse_backend("RDMA"), ErrorKind::invalid_argument, EINVAL);
}

static void sim_library() {
  auto lib = Library::get(Backend::sim);
  CHECK(lib->sym().sim.mmap != nullptr && lib->sym().sim.host_open != nullptr);
  CHECK(lib->caps().var_export && lib->caps().devx_obj_export && lib->caps().devx_umem_export);
  CHECK(lib->caps().tlp_var && lib->caps().import_device && lib->caps().devx);
  CHECK(std::string(symbol_version("mlx5dv_var_export")) == "MLX5_1.27");
  CHECK(std::string(symbol_version("mlx5dv_alloc_var")) == "MLX5_1.12");
  CHECK(format_guid(0x0002c90300317a80ull) == "0002:c903:0031:7a80");
}

int main() {
  char dir[] = "/tmp/mlx5tlp-loader-XXXXXX";
  if (mkdtemp(dir) == nullptr) return 2;
  setenv("MLX5TLP_SIM_DIR", dir, 1);
  real_rdma_core();
  missing_library();
  backend_selection();
  sim_library();
  return mlx5tlp_test::finish("test_loader");
}
