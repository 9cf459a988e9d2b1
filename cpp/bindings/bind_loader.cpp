#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind.hpp"
#include "mlx5tlp/loader.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

void bind_loader(py::module_& m) {
  m.def("resolve_backend", [](std::optional<std::string> name) {
    return std::string(to_string(resolve_backend(name)));
  }, py::arg("name") = py::none(), "Backend name from the argument, $MLX5TLP_BACKEND or 'rdma'.");

  m.def("library_info", [](const std::string& backend) {
    auto lib = Library::get(parse_backend(backend));
    const Capabilities& c = lib->caps();
    py::dict caps;
    caps["tlp_var"] = c.tlp_var;
    caps["var_export"] = c.var_export;
    caps["devx_obj_export"] = c.devx_obj_export;
    caps["devx_umem_export"] = c.devx_umem_export;
    caps["import_device"] = c.import_device;
    caps["devx"] = c.devx;
    py::dict out;
    out["backend"] = to_string(lib->backend());
    out["libraries"] = lib->paths();
    out["rdma_core_version"] = lib->rdma_core_version().empty()
                                   ? py::object(py::none())
                                   : py::object(py::str(lib->rdma_core_version()));
    out["capabilities"] = caps;
    out["mlx5_load_error"] = lib->mlx5_load_error().empty()
                                 ? py::object(py::none())
                                 : py::object(py::str(lib->mlx5_load_error()));
    int fork = -1;
    if (lib->sym().ibv_is_fork_initialized != nullptr) fork = lib->sym().ibv_is_fork_initialized();
    out["fork_status"] = fork;
    return out;
  }, py::arg("backend"), "Load the backend's library (once) and describe it.");

  m.def("list_devices", [](const std::string& backend) {
    auto lib = Library::get(parse_backend(backend));
    std::vector<DeviceInfo> devs;
    {
      py::gil_scoped_release nogil;  // enumeration reads sysfs / the device directory
      devs = list_devices(*lib);
    }
    py::list out;
    for (const auto& d : devs) out.append(py::make_tuple(d.name, d.node_guid, d.mlx5));
    return out;
  }, py::arg("backend"), "[(name, node_guid, is_mlx5)] for every device of the backend.");

  m.def("format_guid", &format_guid, py::arg("guid"));
  m.def("symbol_version", [](const std::string& f) { return std::string(symbol_version(f.c_str())); },
        py::arg("function"));
}

}  // namespace mlx5tlp::bind
