// Maps mlx5tlp::Error onto the Python hierarchy defined in mlx5tlp/errors.py, so there is one
// hierarchy, owned by the façade, with errno, operation, status and syndrome attached.
#include <pybind11/pybind11.h>

#include "bind.hpp"
#include "mlx5tlp/error.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

static const char* class_for(ErrorKind k) {
  switch (k) {
    case ErrorKind::not_supported: return "NotSupportedError";
    case ErrorKind::library_not_found: return "LibraryNotFoundError";
    case ErrorKind::device_not_found: return "DeviceNotFoundError";
    case ErrorKind::resource_exhausted: return "ResourceExhaustedError";
    case ErrorKind::invalid_handle: return "InvalidHandleError";
    case ErrorKind::export_format: return "ExportFormatError";
    case ErrorKind::devx_command: return "DevxCommandError";
    case ErrorKind::invalid_argument: return "InvalidArgumentError";
    case ErrorKind::generic: break;
  }
  return "Error";
}

void bind_errors(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::module_ errors = py::module_::import("mlx5tlp.errors");
      py::object cls = errors.attr(class_for(e.kind()));
      py::object err_no = e.error_number() != 0 ? py::object(py::int_(e.error_number()))
                                                : py::object(py::none());
      py::object exc = cls(err_no, py::str(e.what()), py::str(e.operation()));
      if (e.kind() == ErrorKind::devx_command) {
        exc.attr("status") = py::int_(e.fw_status);
        exc.attr("syndrome") = py::int_(e.syndrome);
      }
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });
  m.def("_raise_for_test", [](int kind, int err, const std::string& op) {
    throw Error(static_cast<ErrorKind>(kind), op, err, "raised by a test");
  }, "Raise a core error of the given kind (tests of the error mapping).");
}

}  // namespace mlx5tlp::bind
