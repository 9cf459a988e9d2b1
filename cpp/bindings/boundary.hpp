// The one boundary layer between Python values and the core: every binding converts its
// arguments here, so each check lives in exactly one place.
//   to_deadline(timeout)   None / inf -> never; seconds >= 0 (huge values saturate); NaN and
//                          negative values raise InvalidArgumentError; bool and non-numbers
//                          raise TypeError.
//   to_duration(seconds)   the same rules for a stored duration (e.g. a drain timeout).
//   BufferView(obj, what)  a checked, pinned view of a buffer argument (see below).
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

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

// ---- buffers ----
// Every buffer argument crosses as a BufferView: one checked, RAII view of a Python object's
// buffer. The checks (each error names the argument):
//   - not a buffer-protocol object                          -> TypeError
//   - not C-contiguous (memoryview[::2], [::-1], a column)  -> TypeError
//   - wrong item: Item::byte needs 1-byte items (bytes, bytearray, memoryview of 'B'/'b'/'c');
//     Item::u32 needs native unsigned 32-bit items ('I', array('I'))              -> TypeError
//   - Access::write on a read-only buffer (bytes, a read-only memoryview)        -> TypeError
// Lengths are the caller's to bound (InvalidArgumentError, a ValueError, for a bad value).
// While the view lives the buffer is exported, so its exporter cannot free or resize it (a
// bytearray refuses to resize with BufferError): the memory stays valid, but another thread
// may still change its CONTENTS. Hence the rule for code that releases the GIL: anything that
// bounds an access (a length, an offset, a count, a header that sizes an output) is copied
// (snapshot()/copy_to()) before the GIL is released and only the copy is used; bytes that are
// merely carried (a record's payload) may be read from the pinned buffer.
enum class Item { byte, u32 };
enum class Access { read, write };

class BufferView {
 public:
  BufferView(const pybind11::handle& obj, const char* what, Item item = Item::byte,
             Access access = Access::read)
      : what_(what) {
    const int flags = PyBUF_STRIDES | PyBUF_FORMAT | (access == Access::write ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) refuse(obj, access);
    held_ = true;
    // From here the destructor releases the export, also when a check below throws.
    if (PyBuffer_IsContiguous(&view_, 'C') == 0)
      throw pybind11::type_error(std::string(what_) +
                                 " must be a C-contiguous buffer, not a strided view (e.g. "
                                 "memoryview[::2] or [::-1]): pass bytes(view) or a copy");
    if (!item_ok(item))
      throw pybind11::type_error(std::string(what_) + " must be a buffer of " + item_name(item) +
                                 ", not of items '" + (view_.format ? view_.format : "B") +
                                 "' (" + std::to_string(view_.itemsize) + " bytes each)");
  }
  ~BufferView() {
    if (held_) PyBuffer_Release(&view_);
  }
  // Not movable: a Py_buffer's shape may point into the struct itself (PyBuffer_FillInfo).
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;

  const uint8_t* data() const noexcept { return static_cast<const uint8_t*>(view_.buf); }
  uint8_t* mutable_data() const noexcept { return static_cast<uint8_t*>(view_.buf); }
  size_t size() const noexcept { return static_cast<size_t>(view_.len); }  // in bytes
  size_t count() const noexcept { return size() / static_cast<size_t>(view_.itemsize); }
  const char* what() const noexcept { return what_; }
  // The u32 items (Item::u32 views only).
  const uint32_t* u32() const noexcept { return static_cast<const uint32_t*>(view_.buf); }

  // A private copy of the bytes, for data that is checked and then used without the GIL.
  std::vector<uint8_t> snapshot() const { return std::vector<uint8_t>(data(), data() + size()); }
  // Copies all items into `out` (resized to count(); reuse it to stay allocation-free).
  template <typename T>
  void copy_to(std::vector<T>* out) const {
    out->resize(size() / sizeof(T));
    if (!out->empty()) std::memcpy(out->data(), data(), out->size() * sizeof(T));
  }

 private:
  [[noreturn]] void refuse(const pybind11::handle& obj, Access access) const {
    const pybind11::error_already_set cause;  // fetches (and clears) the exporter's error
    const std::string type = pybind11::str(pybind11::type::handle_of(obj).attr("__name__"));
    if (!PyObject_CheckBuffer(obj.ptr()))
      throw pybind11::type_error(std::string(what_) + " must be a bytes-like object, not " + type);
    if (access == Access::write) {
      Py_buffer ro{};
      if (PyObject_GetBuffer(obj.ptr(), &ro, PyBUF_SIMPLE) == 0) {
        PyBuffer_Release(&ro);
        throw pybind11::type_error(std::string(what_) + " must be a writable buffer (bytearray, " +
                                   "mmap, ...), not a read-only " + type);
      }
      PyErr_Clear();
    }
    // E.g. a released memoryview, or an exporter that cannot describe its layout.
    throw pybind11::type_error(std::string(what_) + ": " + type + " gave no usable buffer (" +
                               cause.what() + ")");
  }

  bool item_ok(Item item) const noexcept {
    std::string f = view_.format ? view_.format : "B";
    if (!f.empty() && (f[0] == '@' || f[0] == '=' || f[0] == native_order())) f.erase(0, 1);
    if (item == Item::byte) return view_.itemsize == 1 && (f == "B" || f == "b" || f == "c");
    return view_.itemsize == 4 && (f == "I" || (sizeof(unsigned long) == 4 && f == "L"));
  }
  static char native_order() noexcept {
    const uint16_t probe = 1;
    uint8_t first = 0;
    std::memcpy(&first, &probe, 1);
    return first == 1 ? '<' : '>';
  }
  static const char* item_name(Item item) noexcept {
    return item == Item::byte ? "bytes (bytes, bytearray, memoryview of 'B')"
                              : "native unsigned 32-bit integers (array('I'))";
  }

  Py_buffer view_{};
  bool held_ = false;
  const char* what_;
};

// A private copy of a byte-buffer argument (bytes, bytearray, memoryview, ...), for input that
// is used after the GIL is released (commands, export blobs, snapshots).
inline std::vector<uint8_t> copy_bytes(const pybind11::handle& obj, const char* what) {
  return BufferView(obj, what).snapshot();
}

// Input that several passes parse without the GIL (a plan, then a build), which must all see
// the same bytes: a bytes object is immutable, so it is read in place (no copy on the hot path);
// any other buffer (bytearray, memoryview) may change under another thread, so it is copied
// once into *scratch and only the copy is parsed. Reuse *scratch across calls to stay
// allocation-free. The span is valid while `obj` (bytes) or *scratch lives and is not changed.
struct StableBytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
};
inline StableBytes stable_bytes(const pybind11::handle& obj, const char* what,
                                std::vector<uint8_t>* scratch) {
  if (PyBytes_Check(obj.ptr()))
    return {reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(obj.ptr())),
            static_cast<size_t>(PyBytes_GET_SIZE(obj.ptr()))};
  BufferView(obj, what).copy_to(scratch);
  return {scratch->data(), scratch->size()};
}

}  // namespace mlx5tlp::bind
