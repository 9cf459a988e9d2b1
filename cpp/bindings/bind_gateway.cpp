// Gateway bindings. post() is the per-record hot path: bytes are read without a buffer request
// and the GIL is released only when the call may block.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/gateway.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

namespace {

// A record as (pointer, length) without copying: bytes fast, other buffers through the protocol.
struct RecordView {
  const uint8_t* data = nullptr;
  size_t len = 0;
  py::buffer_info info;  // keeps a non-bytes buffer exported while we read it
};

void view_of(py::handle obj, RecordView* v) {
  if (PyBytes_Check(obj.ptr())) {
    char* p = nullptr;
    Py_ssize_t n = 0;
    PyBytes_AsStringAndSize(obj.ptr(), &p, &n);
    v->data = reinterpret_cast<const uint8_t*>(p);
    v->len = size_t(n);
    return;
  }
  v->info = py::reinterpret_borrow<py::buffer>(obj).request();
  if (v->info.ndim != 1 || v->info.strides[0] != v->info.itemsize)
    throw py::value_error("a record must be a contiguous bytes-like object");
  v->data = static_cast<const uint8_t*>(v->info.ptr);
  v->len = size_t(v->info.size * v->info.itemsize);
}

// Records given as one buffer plus n+1 uint32 offsets (the TLP bulk format).
template <typename F>
size_t for_batch(py::buffer data, py::buffer offsets, F&& fn) {
  py::buffer_info d = data.request();
  py::buffer_info o = offsets.request();
  if (o.itemsize != 4 || o.ndim != 1 || (o.format != "I" && o.format != "L" && o.format != "=I"))
    throw py::value_error("offsets must be a buffer of uint32 (array('I'))");
  const size_t n = o.size > 0 ? size_t(o.size) - 1 : 0;
  const auto* off = static_cast<const uint32_t*>(o.ptr);
  const size_t total = size_t(d.size * d.itemsize);
  for (size_t i = 0; i < n; ++i)
    if (off[i] > off[i + 1] || off[i + 1] > total)
      throw py::value_error("offsets must be non-decreasing and within the buffer");
  // Lengths in fixed chunks on the stack: no allocation per call.
  constexpr size_t kChunk = 256;
  uint32_t lengths[kChunk];
  size_t done = 0;
  while (done < n) {
    const size_t k = std::min(kChunk, n - done);
    for (size_t i = 0; i < k; ++i) lengths[i] = off[done + i + 1] - off[done + i];
    const size_t w = fn(static_cast<const uint8_t*>(d.ptr), off + done, lengths, k);
    done += w;
    if (w < k) break;
  }
  return done;
}

}  // namespace

void bind_gateway(py::module_& m) {
  py::class_<Gateway, std::shared_ptr<Gateway>>(m, "Gateway")
      .def_static("open", [](std::shared_ptr<Var> var, const std::string& layout, bool direct,
                             size_t ring_slots, size_t batch_max, const py::object& drain_timeout) {
        GatewayOptions o;
        o.direct = direct;
        o.ring_slots = ring_slots;
        o.batch_max = batch_max;
        o.drain_timeout = to_duration(drain_timeout, "drain_timeout");
        auto lay = layout.empty() ? nullptr : make_layout(layout);
        py::gil_scoped_release r;
        return Gateway::open(std::move(var), std::move(lay), o);
      }, py::arg("var"), py::arg("layout"), py::arg("direct"), py::arg("ring_slots"),
         py::arg("batch_max"), py::arg("drain_timeout"))
      .def("post", [](Gateway& g, py::handle rec, const py::object& timeout) {
        RecordView v;
        view_of(rec, &v);
        const auto t = to_deadline(timeout);
        if (t.expired()) return g.post(v.data, v.len, t);  // never blocks: keep the GIL
        py::gil_scoped_release r;
        return g.post(v.data, v.len, t);
      }, py::arg("record"), py::arg("timeout"))
      .def("post_batch", [](Gateway& g, py::buffer data, py::buffer offsets, const py::object& timeout) {
        const auto t = to_deadline(timeout);
        return for_batch(data, offsets, [&](const uint8_t* b, const uint32_t* o, const uint32_t* l, size_t n) {
          py::gil_scoped_release r;
          return g.post_batch(b, o, l, n, t);
        });
      }, py::arg("data"), py::arg("offsets"), py::arg("timeout"))
      .def("write", [](Gateway& g, py::handle rec, const py::object& timeout) {
        RecordView v;
        view_of(rec, &v);
        const auto t = to_deadline(timeout);
        py::gil_scoped_release r;
        return g.write(v.data, v.len, t);
      }, py::arg("record"), py::arg("timeout"))
      .def("write_batch", [](Gateway& g, py::buffer data, py::buffer offsets, const py::object& timeout) {
        const auto t = to_deadline(timeout);
        return for_batch(data, offsets, [&](const uint8_t* b, const uint32_t* o, const uint32_t* l, size_t n) {
          py::gil_scoped_release r;
          return g.write_batch(b, o, l, n, t);
        });
      }, py::arg("data"), py::arg("offsets"), py::arg("timeout"))
      .def("flush", [](Gateway& g, const py::object& timeout) {
        const auto t = to_deadline(timeout);
        py::gil_scoped_release r;
        return g.flush(t);
      }, py::arg("timeout"))
      .def("close", [](Gateway& g, const py::object& drain_timeout) {
        // None: the gateway's own drain timeout (a number overrides it, e.g. at exit).
        if (drain_timeout.is_none()) {
          py::gil_scoped_release r;
          g.close();
          return;
        }
        const auto d = to_duration(drain_timeout, "drain_timeout");
        py::gil_scoped_release r;
        g.close(d);
      }, py::arg("drain_timeout") = py::none())
      .def_property_readonly("store_path", [](const Gateway& g) { return std::string(g.store_path()); })
      .def_property_readonly("page_prot", &Gateway::page_prot)
      .def_property_readonly("state", [](const Gateway& g) { return std::string(to_string(g.state())); })
      .def_property_readonly("closed", &Gateway::closed)
      .def_property_readonly("direct", &Gateway::direct)
      .def_property_readonly("max_record", &Gateway::max_record)
      .def_property_readonly("layout", [](const Gateway& g) { return std::string(g.layout_name()); })
      .def_property_readonly("var", &Gateway::var)
      .def("stats", [](const Gateway& g) {
        GatewayStats s = g.stats();
        py::dict d;
        d["posted"] = s.posted;
        d["written"] = s.written;
        d["batches"] = s.batches;
        d["max_batch"] = s.max_batch;
        d["full_waits"] = s.full_waits;
        d["credit_waits"] = s.credit_waits;
        d["lost"] = s.lost;
        d["producer_sleeps"] = s.producer_sleeps;
        d["writer_parks"] = s.writer_parks;
        return d;
      });
}

}  // namespace mlx5tlp::bind
