#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/context.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

py::bytes to_bytes(const std::vector<uint8_t>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

void bind_context(py::module_& m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  py::class_<Context, std::shared_ptr<Context>>(m, "Context")
      .def_static("open", [](const std::string& name, const std::string& backend) {
        Backend b = parse_backend(backend);
        py::gil_scoped_release r;
        return Context::open(name, b);
      }, py::arg("name"), py::arg("backend"))
      .def_static("import_fd", [](int fd, const std::string& backend) {
        Backend b = parse_backend(backend);
        py::gil_scoped_release r;
        return Context::import_fd(fd, b);
      }, py::arg("fd"), py::arg("backend"))
      .def("close", &Context::close, nogil())
      .def_property_readonly("closed", &Context::closed)
      .def_property_readonly("name", &Context::name)
      .def_property_readonly("node_guid", &Context::node_guid)
      .def_property_readonly("backend", [](const Context& c) { return to_string(c.backend()); })
      .def_property_readonly("imported", &Context::imported)
      .def_property_readonly("cmd_fd", &Context::cmd_fd)
      .def_property_readonly("rdma_core_version",
                             [](const Context& c) { return c.lib().rdma_core_version(); })
      .def("open_children", &Context::open_children)
      .def("query_tlp_caps", [](Context& c) {
        TlpCaps caps;
        {
          py::gil_scoped_release r;
          caps = c.query_tlp_caps();
        }
        return py::make_tuple(caps.supported, caps.gw_num_pages, caps.gw_page_stride,
                              caps.gw_bar_offset, caps.gw_log_stride);
      })
      .def("general_cmd", [](Context& c, py::handle in, size_t outlen) {
        const std::vector<uint8_t> s = copy_bytes(in, "cmd_in");
        std::vector<uint8_t> out;
        {
          py::gil_scoped_release r;
          out = c.general_cmd(s.data(), s.size(), outlen);
        }
        return to_bytes(out);
      }, py::arg("cmd_in"), py::arg("out_len"))
      .def("export_size", [](const Context& c, uint32_t kind) {
        if (kind < 1 || kind > 3) throw py::value_error("kind must be 1 (VAR), 2 (UMEM) or 3 (DEVX)");
        return c.export_size(static_cast<ObjectKind>(kind));
      }, py::arg("kind"));
}

}  // namespace mlx5tlp::bind
