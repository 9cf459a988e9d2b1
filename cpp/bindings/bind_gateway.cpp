// Gateway bindings. post() is the per-record hot path: bytes are read without a buffer request
// and the GIL is released only when the call may block. Batches cross as (buffer, offsets),
// built by mlx5tlp.Records; the checks are boundary.hpp's BufferView.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/gateway.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

namespace {

// One record. bytes is immutable and read in place (the hot path: no buffer request); any
// other buffer is checked and pinned by a BufferView. The length is taken once, here.
class Record {
 public:
  explicit Record(const py::handle& obj) {
    if (PyBytes_Check(obj.ptr())) {
      data_ = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(obj.ptr()));
      len_ = size_t(PyBytes_GET_SIZE(obj.ptr()));
      return;
    }
    view_.emplace(obj, "record");
    data_ = view_->data();
    len_ = view_->size();
  }
  const uint8_t* data() const noexcept { return data_; }
  size_t size() const noexcept { return len_; }

 private:
  std::optional<BufferView> view_;
  const uint8_t* data_ = nullptr;
  size_t len_ = 0;
};

// Per-thread scratch for a batch's offsets and lengths: grown, reused, so a steady stream of
// batches allocates nothing; trimmed after an unusually large batch.
struct BatchScratch {
  std::vector<uint32_t> offsets;
  std::vector<uint32_t> lengths;
  static constexpr size_t kKeep = size_t{1} << 16;
  void trim() {
    if (offsets.capacity() > kKeep) std::vector<uint32_t>().swap(offsets);
    if (lengths.capacity() > kKeep) std::vector<uint32_t>().swap(lengths);
  }
};

// Records given as one buffer plus n+1 uint32 offsets (mlx5tlp.Records, the TLP bulk format).
// The offsets are copied and checked under the GIL; the call without the GIL sees only the
// copy, so another thread rewriting the offsets cannot move an access out of bounds. The
// record bytes are read from the pinned buffer (their contents are only carried).
template <typename F>
size_t for_batch(const char* op, const py::handle& data, const py::handle& offsets, F&& fn) {
  const BufferView d(data, "records buffer");
  const BufferView o(offsets, "offsets", Item::u32);
  thread_local BatchScratch scratch;
  struct Trim {
    BatchScratch& s;
    ~Trim() { s.trim(); }
  } trim{scratch};
  std::vector<uint32_t>& off = scratch.offsets;
  o.copy_to(&off);
  if (off.empty())
    throw Error(ErrorKind::invalid_argument, op, EINVAL,
                "offsets must hold n + 1 entries for n records (at least one)");
  const size_t n = off.size() - 1;
  const size_t total = d.size();
  std::vector<uint32_t>& len = scratch.lengths;
  len.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (off[i] > off[i + 1] || off[i + 1] > total)
      throw Error(ErrorKind::invalid_argument, op, EINVAL,
                  "offsets must be non-decreasing and within the " + std::to_string(total) +
                      "-byte buffer (entry " + std::to_string(i + 1) + " is " +
                      std::to_string(off[i + 1]) + ", previous " + std::to_string(off[i]) + ")");
    len[i] = off[i + 1] - off[i];
  }
  if (n == 0) return 0;
  py::gil_scoped_release r;
  return fn(d.data(), off.data(), len.data(), n);
}

// Per-thread scratch of post_completions: the plan and private copies of what both passes
// read without the GIL. Grown and reused; trimmed after an unusually large call.
struct FusedScratch {
  tlp::BulkPlan plan;
  std::vector<uint8_t> reqs, statuses;
  static constexpr size_t kKeep = size_t{1} << 18;
  void trim() {
    if (plan.ends.size() > kKeep + 1) std::vector<uint32_t>().swap(plan.ends);
    if (plan.errors.size() > kKeep) std::vector<uint8_t>().swap(plan.errors);
    if (reqs.capacity() > 12 * kKeep) std::vector<uint8_t>().swap(reqs);
    if (statuses.capacity() > kKeep) std::vector<uint8_t>().swap(statuses);
  }
};

// (code, requests, completions, errors): code > 0 a tlp::Status failing the whole call, -1
// when requests were refused and skip_bad is false (nothing posted; errors names them all), 0
// when posted (errors: one Status byte per request).
py::tuple post_completions(Gateway& g, const py::object& reqs, const py::object& data,
                           const py::object& statuses, int completer_id, int max_payload,
                           int rcb, int status, const py::object& timeout, bool skip_bad) {
  const auto t = to_deadline(timeout);
  using tlp::Status;
  Status bad = Status::ok;
  if (completer_id < 0 || completer_id > 0xFFFF) bad = Status::field_out_of_range;
  if (max_payload < 0 || max_payload > 0xFFFF) bad = Status::bad_max_payload;
  if (rcb < 0 || rcb > 0xFFFF) bad = Status::bad_rcb;
  if (status < 0 || status > 0xFF) bad = Status::bad_completion_status;
  if (bad != Status::ok) return py::make_tuple(static_cast<int>(bad), 0, 0, py::none());
  tlp::CompletionParams p;
  p.completer_id = static_cast<uint16_t>(completer_id);
  p.max_payload = static_cast<uint16_t>(max_payload);
  p.rcb = static_cast<uint16_t>(rcb);
  p.status = static_cast<uint8_t>(status);

  thread_local FusedScratch sc;
  struct Trim {
    FusedScratch& s;
    ~Trim() { s.trim(); }
  } trim{sc};
  // The plan and the build both parse the requests and statuses without the GIL, so they must
  // see the same bytes (stable_bytes: in place for bytes, else one copy into the thread's
  // scratch); the statuses are copied. The data is read from its pinned buffer (its contents
  // are only carried; its length is fixed while pinned).
  const StableBytes rq = stable_bytes(reqs, "requests", &sc.reqs);
  const uint8_t* const rp = rq.data;
  const size_t rn = rq.size;
  const BufferView d(data, "data");
  const uint8_t* sp = nullptr;
  size_t sn = 0;
  if (!statuses.is_none()) {
    const BufferView sv(statuses, "statuses");
    sv.copy_to(&sc.statuses);
    sp = sc.statuses.data();
    sn = sc.statuses.size();
  }
  tlp::BulkPlan& plan = sc.plan;
  plan.reserve_for(rn);
  Status s;
  {
    py::gil_scoped_release nogil;
    s = tlp::bulk_plan(rp, rn, d.data(), d.size(), sp, sn, p, &plan);
  }
  if (s != Status::ok) return py::make_tuple(static_cast<int>(s), 0, 0, py::none());
  py::bytes errors(reinterpret_cast<const char*>(plan.errors.data()), plan.requests);
  if (plan.bad != 0 && !skip_bad) return py::make_tuple(-1, 0, 0, errors);
  PostedCompletions r;
  {
    py::gil_scoped_release nogil;
    r = g.post_completions(rp, rn, d.data(), d.size(), sp, p, plan, t);
  }
  return py::make_tuple(0, r.requests, r.completions, errors);
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
        const Record v(rec);
        const auto t = to_deadline(timeout);
        if (t.expired()) return g.post(v.data(), v.size(), t);  // never blocks: keep the GIL
        py::gil_scoped_release r;
        return g.post(v.data(), v.size(), t);
      }, py::arg("record"), py::arg("timeout"))
      .def("post_batch", [](Gateway& g, py::handle data, py::handle offsets, const py::object& timeout) {
        const auto t = to_deadline(timeout);
        return for_batch("post batch", data, offsets,
                         [&](const uint8_t* b, const uint32_t* o, const uint32_t* l, size_t n) {
                           return g.post_batch(b, o, l, n, t);
                         });
      }, py::arg("data"), py::arg("offsets"), py::arg("timeout"))
      .def("post_completions", &post_completions, py::arg("requests"), py::arg("data"),
           py::arg("statuses"), py::arg("completer_id"), py::arg("max_payload"), py::arg("rcb"),
           py::arg("status"), py::arg("timeout"), py::arg("skip_bad"))
      .def("write", [](Gateway& g, py::handle rec, const py::object& timeout) {
        const Record v(rec);
        const auto t = to_deadline(timeout);
        py::gil_scoped_release r;
        return g.write(v.data(), v.size(), t);
      }, py::arg("record"), py::arg("timeout"))
      .def("write_batch", [](Gateway& g, py::handle data, py::handle offsets, const py::object& timeout, bool whole) {
        const auto t = to_deadline(timeout);
        return for_batch("write batch", data, offsets,
                         [&](const uint8_t* b, const uint32_t* o, const uint32_t* l, size_t n) {
                           const auto end = uint32_t(n);
                           return whole ? g.write_groups(b, o, l, n, &end, 1, t) : g.write_batch(b, o, l, n, t);
                         });
      }, py::arg("data"), py::arg("offsets"), py::arg("timeout"), py::arg("whole") = false)
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
