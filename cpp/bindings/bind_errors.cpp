// One error model at the Python boundary: every C++ exception that leaves a binding becomes a
// class of the hierarchy defined in mlx5tlp/errors.py (errno, operation, status and syndrome
// attached), and nothing reaches Python as RuntimeError or pybind11's "unknown exception".
//
// The translator is module-local (py::register_local_exception_translator): it sees only the
// exceptions of our own bindings, so it neither changes nor depends on what other pybind11
// modules in the process do with std::exception.
#include <cxxabi.h>
#include <pybind11/pybind11.h>

#include <cerrno>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>

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

static void set_python_error(const Error& e) {
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

// Standard exceptions that a binding or the core let through (allocation, thread creation,
// the standard library's argument checks), as the Error the core would have thrown.
static Error from_std(const std::exception& e, ErrorKind kind, int err) {
  return Error(kind, "mlx5tlp call", err, e.what());
}

static void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const Error& e) {
    set_python_error(e);
  } catch (const py::error_already_set&) {
    throw;  // a Python exception already: pybind11 restores it
  } catch (const py::cast_error& e) {
    // A Python value that does not convert to the C++ type: a wrong argument type.
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const py::reference_cast_error& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const py::builtin_exception&) {
    throw;  // py::type_error, py::value_error, ...: raised on purpose, translated by pybind11
  } catch (const std::bad_alloc&) {
    set_python_error(Error(ErrorKind::resource_exhausted, "allocate memory", ENOMEM,
                           "the process is out of memory (std::bad_alloc)"));
  } catch (const std::system_error& e) {
    const int err = e.code().category() == std::generic_category() ||
                            e.code().category() == std::system_category()
                        ? e.code().value()
                        : EIO;
    const ErrorKind kind = err == EAGAIN || err == ENOMEM ? ErrorKind::resource_exhausted
                                                          : kind_for_errno(err, false);
    set_python_error(from_std(e, kind, err));
  } catch (const std::invalid_argument& e) {
    set_python_error(from_std(e, ErrorKind::invalid_argument, EINVAL));
  } catch (const std::domain_error& e) {
    set_python_error(from_std(e, ErrorKind::invalid_argument, EINVAL));
  } catch (const std::length_error& e) {
    set_python_error(from_std(e, ErrorKind::invalid_argument, EINVAL));
  } catch (const std::out_of_range& e) {
    set_python_error(from_std(e, ErrorKind::invalid_argument, ERANGE));
  } catch (const std::exception& e) {
    set_python_error(from_std(e, ErrorKind::generic, EIO));
  } catch (abi::__forced_unwind&) {
    throw;  // thread cancellation must keep unwinding
  } catch (...) {
    set_python_error(Error(ErrorKind::generic, "mlx5tlp call", EIO,
                           "an exception of an unknown C++ type"));
  }
}

// What _throw_for_test throws, by name (tests of the translation of every exception family).
[[noreturn]] static void throw_named(const std::string& what) {
  if (what == "bad_alloc") throw std::bad_alloc();
  if (what == "system_error")
    throw std::system_error(EAGAIN, std::generic_category(), "thread creation");
  if (what == "system_error_eperm") throw std::system_error(EPERM, std::system_category(), "x");
  if (what == "invalid_argument") throw std::invalid_argument("bad value");
  if (what == "length_error") throw std::length_error("too long");
  if (what == "out_of_range") throw std::out_of_range("index");
  if (what == "runtime_error") throw std::runtime_error("something failed");
  if (what == "cast_error") throw py::cast_error("cannot convert");
  if (what == "type_error") throw py::type_error("x must be an int");
  if (what == "unknown") throw 42;
  throw py::value_error("unknown test exception '" + what + "'");
}

void bind_errors(py::module_& m) {
  py::register_local_exception_translator(translate);
  m.def("_raise_for_test", [](int kind, int err, const std::string& op) {
    throw Error(static_cast<ErrorKind>(kind), op, err, "raised by a test");
  }, "Raise a core error of the given kind (tests of the error mapping).");
  m.def("_throw_for_test", &throw_named, py::arg("what"),
        "Throw a C++ exception of the named family (tests of the one error model).");
}

}  // namespace mlx5tlp::bind
