// The one boundary layer between Python values and the core: every binding converts its
// arguments here, so each check lives in exactly one place.
//   to_deadline(timeout)   None / inf -> never; seconds >= 0 (huge values saturate); NaN and
//                          negative values raise InvalidArgumentError; bool and non-numbers
//                          raise TypeError.
//   to_duration(seconds)   the same rules for a stored duration (e.g. a drain timeout).
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>

#include "mlx5tlp/deadline.hpp"

namespace mlx5tlp::bind {

// The number of seconds in `t`; TypeError naming `what` unless it is an int or a float.
inline double seconds_of(const pybind11::handle& t, const char* what) {
  if (PyBool_Check(t.ptr()) || !(PyFloat_Check(t.ptr()) || PyLong_Check(t.ptr())))
    throw pybind11::type_error(std::string(what) + " must be a number of seconds or None, not " +
                               std::string(pybind11::str(pybind11::type::handle_of(t).attr("__name__"))));
  const double s = PyFloat_Check(t.ptr()) ? PyFloat_AsDouble(t.ptr()) : PyLong_AsDouble(t.ptr());
  if (s == -1.0 && PyErr_Occurred() != nullptr) {
    // An int beyond double range: a huge timeout, which saturates to "no limit".
    PyErr_Clear();
    return PyObject_RichCompareBool(t.ptr(), pybind11::int_(0).ptr(), Py_LT) == 1
               ? -1.0
               : Deadline::kMaxSeconds * 2;
  }
  return s;
}

inline Deadline to_deadline(const pybind11::handle& t, const char* what = "timeout") {
  if (t.is_none()) return Deadline::never();
  return Deadline::in_seconds(seconds_of(t, what), what);
}

inline std::chrono::nanoseconds to_duration(const pybind11::handle& t, const char* what) {
  if (t.is_none()) return std::chrono::nanoseconds::max();
  return Deadline::duration_from_seconds(seconds_of(t, what), what);
}

}  // namespace mlx5tlp::bind
