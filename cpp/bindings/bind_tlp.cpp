// _core.tlp: thin bindings over mlx5tlp/tlp.hpp and mlx5tlp/tlp_completion.hpp. The typed
// API is python/mlx5tlp/tlp.py. A TLP crosses as a flat tuple of fields (order: kFieldNames);
// every call returns a Status code first so that Python raises mlx5tlp.tlp.TlpError itself.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/tlp.hpp"
#include "mlx5tlp/tlp_completion.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

namespace {

using tlp::Status;
using tlp::Tlp;

const char* const kFieldNames[] = {
    "kind",   "fmt",          "type",        "tc",         "attr",     "td",
    "ep",     "length",       "requester_id", "completer_id", "tag",    "first_be",
    "last_be", "address",     "dest_id",     "status",     "bcm",      "byte_count",
    "lower_address", "message_code", "routing", "digest",  "data"};
constexpr size_t kFields = sizeof(kFieldNames) / sizeof(kFieldNames[0]);

py::tuple to_tuple(const Tlp& t) {
  return py::make_tuple(
      static_cast<int>(t.kind), t.fmt, t.type, t.tc, t.attr, t.td, t.ep, t.length,
      t.requester_id, t.completer_id, t.tag, t.first_be, t.last_be, t.address, t.dest_id,
      t.status, t.bcm, t.byte_count, t.lower_address, t.message_code, t.routing, t.digest,
      py::bytes(reinterpret_cast<const char*>(t.data), t.data == nullptr ? 0 : t.data_len));
}

// Field i of a tuple as an unsigned value <= maxv; false when not an int or out of range.
bool field(const py::tuple& f, size_t i, uint64_t maxv, uint64_t* out) {
  const unsigned long long v = PyLong_AsUnsignedLongLong(f[i].ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    return false;
  }
  if (v > maxv) return false;
  *out = v;
  return true;
}

// Fill `t` from a field tuple; `data` must stay alive while `t` is used.
Status from_tuple(const py::tuple& f, const BufferView& data, Tlp* t) {
  if (f.size() != kFields) throw py::value_error("TLP field tuple has the wrong size");
  uint64_t v[kFields - 1] = {};
  const uint64_t maxv[kFields - 1] = {
      tlp::kKindCount - 1, 0xFF, 0xFF, 0xFF, 0xFF, 1, 1, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF,
      0xFF, 0xFF, UINT64_MAX, 0xFFFF, 0xFF, 1, 0xFFFF, 0xFF, 0xFF, 0xFF, 0xFFFFFFFF};
  for (size_t i = 0; i + 1 < kFields; ++i)
    if (!field(f, i, maxv[i], &v[i])) return Status::field_out_of_range;
  t->kind = static_cast<tlp::Kind>(v[0]);
  t->fmt = static_cast<uint8_t>(v[1]);
  t->type = static_cast<uint8_t>(v[2]);
  t->tc = static_cast<uint8_t>(v[3]);
  t->attr = static_cast<uint8_t>(v[4]);
  t->td = v[5] != 0;
  t->ep = v[6] != 0;
  t->length = static_cast<uint16_t>(v[7]);
  t->requester_id = static_cast<uint16_t>(v[8]);
  t->completer_id = static_cast<uint16_t>(v[9]);
  t->tag = static_cast<uint16_t>(v[10]);
  t->first_be = static_cast<uint8_t>(v[11]);
  t->last_be = static_cast<uint8_t>(v[12]);
  t->address = v[13];
  t->dest_id = static_cast<uint16_t>(v[14]);
  t->status = static_cast<uint8_t>(v[15]);
  t->bcm = v[16] != 0;
  t->byte_count = static_cast<uint16_t>(v[17]);
  t->lower_address = static_cast<uint8_t>(v[18]);
  t->message_code = static_cast<uint8_t>(v[19]);
  t->routing = static_cast<uint8_t>(v[20]);
  t->digest = static_cast<uint32_t>(v[21]);
  t->data = data.data();
  t->data_len = data.size();
  return Status::ok;
}

tlp::CompletionParams params(int completer_id, int max_payload, int rcb, int status,
                             Status* bad) {
  tlp::CompletionParams p;
  *bad = Status::ok;
  if (completer_id < 0 || completer_id > 0xFFFF) *bad = Status::field_out_of_range;
  if (max_payload < 0 || max_payload > 0xFFFF) *bad = Status::bad_max_payload;
  if (rcb < 0 || rcb > 0xFFFF) *bad = Status::bad_rcb;
  if (status < 0 || status > 0xFF) *bad = Status::bad_completion_status;
  p.completer_id = static_cast<uint16_t>(completer_id);
  p.max_payload = static_cast<uint16_t>(max_payload);
  p.rcb = static_cast<uint16_t>(rcb);
  p.status = static_cast<uint8_t>(status);
  return p;
}

py::bytes new_bytes(size_t n) {
  PyObject* b = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
  if (b == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::bytes>(b);
}

char* bytes_data(py::bytes& b) { return PyBytes_AS_STRING(b.ptr()); }

}  // namespace

void bind_tlp(py::module_& m) {
  py::module_ t = m.def_submodule("tlp", "PCIe TLP codec (private: use mlx5tlp.tlp)");

  py::list fields;
  for (const char* n : kFieldNames) fields.append(n);
  t.attr("FIELDS") = py::tuple(fields);
  py::list kinds;
  for (int i = 0; i < tlp::kKindCount; ++i) kinds.append(tlp::kind_name(static_cast<tlp::Kind>(i)));
  t.attr("KINDS") = py::tuple(kinds);
  py::list names;
  py::list reasons;
  for (int i = 0; i < tlp::kStatusCount; ++i) {
    names.append(tlp::status_name(static_cast<Status>(i)));
    reasons.append(tlp::reason(static_cast<Status>(i)));
  }
  t.attr("STATUS_NAMES") = py::tuple(names);
  t.attr("REASONS") = py::tuple(reasons);
  t.attr("MAX_COMPLETIONS") = tlp::kMaxCompletions;

  t.def("decode", [](const py::object& buf) -> py::tuple {
    const BufferView v(buf, "buf");
    Tlp x;
    Status s = tlp::decode(v.data(), v.size(), &x);
    if (s != Status::ok) return py::make_tuple(static_cast<int>(s), py::none());
    return py::make_tuple(0, to_tuple(x));
  }, py::arg("buf"), "(status, fields | None) for exactly one TLP in buf.");

  t.def("encode", [](const py::tuple& f, bool auto_format) -> py::tuple {
    const BufferView data(f[kFields - 1], "data");
    Tlp x;
    Status s = from_tuple(f, data, &x);
    if (s == Status::ok && auto_format) tlp::set_format(&x);
    if (s != Status::ok) return py::make_tuple(static_cast<int>(s), py::none());
    const size_t n = tlp::encoded_size(x);
    py::bytes out = new_bytes(n);
    size_t w = 0;
    s = tlp::encode(x, reinterpret_cast<uint8_t*>(bytes_data(out)), n, &w);
    if (s != Status::ok) return py::make_tuple(static_cast<int>(s), py::none());
    return py::make_tuple(0, out);
  }, py::arg("fields"), py::arg("auto_format"),
     "(status, bytes | None); auto_format picks Fmt/Type from kind and address.");

  t.def("completions", [](const py::tuple& f, const py::object& data, int completer_id,
                          int max_payload, int rcb, int status) -> py::tuple {
    const BufferView payload(f[kFields - 1], "request data");
    const BufferView d(data, "data");
    Tlp req;
    Status s = Status::ok;
    tlp::CompletionParams p = params(completer_id, max_payload, rcb, status, &s);
    if (s == Status::ok) s = from_tuple(f, payload, &req);
    if (s != Status::ok) return py::make_tuple(static_cast<int>(s), py::none());
    Tlp out[tlp::kMaxCompletions];
    size_t n = 0;
    s = tlp::plan_completions(req, d.data(), d.size(), p, out, tlp::kMaxCompletions, &n);
    if (s != Status::ok) return py::make_tuple(static_cast<int>(s), py::none());
    py::list l;
    for (size_t i = 0; i < n; ++i) l.append(to_tuple(out[i]));
    return py::make_tuple(0, l);
  }, py::arg("request"), py::arg("data"), py::arg("completer_id"), py::arg("max_payload"),
     py::arg("rcb"), py::arg("status"), "(status, [fields] | None): completions for a request.");

  t.def("build_bulk", [](const py::object& reqs, const py::object& data,
                         const py::object& statuses, int completer_id, int max_payload, int rcb,
                         int status) -> py::tuple {
    // The requests size the outputs (bulk_measure) and are parsed again to fill them
    // (bulk_build), without the GIL: both passes must see the same bytes (stable_bytes).
    std::vector<uint8_t> reqs_copy;
    const StableBytes rq = stable_bytes(reqs, "requests", &reqs_copy);
    const uint8_t* const rp = rq.data;
    const size_t rn = rq.size;
    // data and statuses are only read (bounded by the lengths taken here), from pinned buffers.
    const BufferView d(data, "data");
    std::optional<BufferView> st;
    if (!statuses.is_none()) st.emplace(statuses, "statuses");
    Status s = Status::ok;
    tlp::CompletionParams p = params(completer_id, max_payload, rcb, status, &s);
    auto fail = [](Status e) {
      return py::make_tuple(static_cast<int>(e), py::none(), py::none(), py::none(), py::none());
    };
    if (s != Status::ok) return fail(s);
    tlp::BulkSizes sz;
    {
      py::gil_scoped_release nogil;
      s = tlp::bulk_measure(rp, rn, p, &sz);
    }
    if (s != Status::ok) return fail(s);
    py::bytes buf = new_bytes(sz.max_bytes);
    py::bytes offsets = new_bytes((sz.max_completions + 1) * sizeof(uint32_t));
    py::bytes first = new_bytes((sz.requests + 1) * sizeof(uint32_t));
    py::bytes errors = new_bytes(sz.requests);
    tlp::BulkOutput o;
    o.buf = reinterpret_cast<uint8_t*>(bytes_data(buf));
    o.buf_cap = sz.max_bytes;
    o.offsets = reinterpret_cast<uint32_t*>(bytes_data(offsets));
    o.offsets_cap = sz.max_completions + 1;
    o.request_first = reinterpret_cast<uint32_t*>(bytes_data(first));
    o.errors = reinterpret_cast<uint8_t*>(bytes_data(errors));
    o.requests_cap = sz.requests;
    {
      // The new bytes objects are not visible to any other thread yet.
      py::gil_scoped_release nogil;
      s = tlp::bulk_build(rp, rn, d.data(), d.size(), st ? st->data() : nullptr,
                          st ? st->size() : 0, p, &o);
    }
    if (s != Status::ok) return fail(s);
    PyObject* raw = buf.release().ptr();
    if (_PyBytes_Resize(&raw, static_cast<Py_ssize_t>(o.bytes)) != 0) throw py::error_already_set();
    py::bytes shrunk = py::reinterpret_steal<py::bytes>(raw);
    PyObject* raw_off = offsets.release().ptr();
    const auto off_bytes = static_cast<Py_ssize_t>((o.completions + 1) * sizeof(uint32_t));
    if (_PyBytes_Resize(&raw_off, off_bytes) != 0) throw py::error_already_set();
    py::bytes off_shrunk = py::reinterpret_steal<py::bytes>(raw_off);
    return py::make_tuple(0, shrunk, off_shrunk, first, errors);
  }, py::arg("requests"), py::arg("data"), py::arg("statuses"), py::arg("completer_id"),
     py::arg("max_payload"), py::arg("rcb"), py::arg("status"),
     "(status, buffer, offsets u32, request_first u32, errors u8) for concatenated requests.");
}

}  // namespace mlx5tlp::bind
