// _core.function: thin bindings over mlx5tlp/function.hpp (the typed API is the package
// mlx5tlp.function). The spec crosses as the dict of the spec file format (docs/function.md)
// with bytes for vendor data; every integer is range-checked here, so there is one place
// that knows each field's width, and errors name the field (InvalidArgumentError, EINVAL).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/function.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

namespace {

using namespace mlx5tlp::pci;

// ---- spec dict -> FunctionSpec ----

uint64_t as_uint(const py::handle& o, const std::string& field, uint64_t maxv) {
  if (PyBool_Check(o.ptr()) || !PyLong_Check(o.ptr()))
    throw py::type_error(field + " must be an int, not " +
                         std::string(py::str(py::type::handle_of(o).attr("__name__"))));
  const unsigned long long v = PyLong_AsUnsignedLongLong(o.ptr());
  if (PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    spec_error(field, std::string(py::str(o)) + " is not an unsigned 64-bit value");
  }
  if (v > maxv) spec_error(field, std::string(py::str(o)) + " is larger than " + hex(maxv));
  return v;
}

struct Fields {
  py::dict d;
  std::string path;
  bool has(const char* k) const { return d.contains(k) && !d[k].is_none(); }
  uint64_t u(const char* k, uint64_t maxv, uint64_t dflt) const {
    return has(k) ? as_uint(d[k], path + "." + k, maxv) : dflt;
  }
  bool b(const char* k, bool dflt) const {
    if (!has(k)) return dflt;
    if (!PyBool_Check(d[k].ptr())) throw py::type_error(path + "." + k + " must be a bool");
    return d[k].cast<bool>();
  }
  int offset() const { return has("offset") ? int(as_uint(d["offset"], path + ".offset", 0xfff)) : -1; }
  Fields sub(const char* k) const {
    if (!has(k)) return {py::dict(), path.empty() ? k : path + "." + k};
    return {d[k].cast<py::dict>(), path.empty() ? k : path + "." + k};
  }
  py::list list(const char* k) const { return has(k) ? d[k].cast<py::list>() : py::list(); }
};

std::vector<uint8_t> as_bytes(const py::handle& o, const std::string& field) {
  if (!PyBytes_Check(o.ptr())) throw py::type_error(field + " must be bytes");
  const std::string s = o.cast<std::string>();
  return {s.begin(), s.end()};
}

std::vector<ByteRange> ranges(const Fields& f) {
  std::vector<ByteRange> out;
  py::list l = f.list("writable");
  for (size_t i = 0; i < l.size(); ++i) {
    const std::string rf = f.path + ".writable[" + std::to_string(i) + "]";
    auto t = l[i].cast<py::sequence>();
    if (t.size() != 2) throw py::value_error(rf + " must be a (start, length) pair");
    out.push_back({uint16_t(as_uint(t[0], rf + ".start", 0xfff)), uint16_t(as_uint(t[1], rf + ".length", 0xfff))});
  }
  return out;
}

FunctionSpec to_spec(const py::dict& d) {
  const Fields top{d, ""};
  FunctionSpec s;
  const Fields id = top.sub("identity");
  s.identity.vendor_id = uint16_t(id.u("vendor_id", 0xffff, 0));
  s.identity.device_id = uint16_t(id.u("device_id", 0xffff, 0));
  s.identity.subsystem_vendor_id = uint16_t(id.u("subsystem_vendor_id", 0xffff, 0));
  s.identity.subsystem_id = uint16_t(id.u("subsystem_id", 0xffff, 0));
  s.identity.revision = uint8_t(id.u("revision", 0xff, 0));
  s.identity.class_code = uint32_t(id.u("class_code", 0xffffff, 0));
  s.identity.interrupt_pin = uint8_t(id.u("interrupt_pin", 0xff, 0));
  py::list bars = top.list("bars");
  for (size_t i = 0; i < bars.size(); ++i) {
    const Fields b{bars[i].cast<py::dict>(), "bars[" + std::to_string(i) + "]"};
    BarSpec bs;
    bs.index = uint8_t(b.u("index", 0xff, 0));
    const std::string kind = b.has("kind") ? b.d["kind"].cast<std::string>() : "mem32";
    if (kind == "mem32") bs.kind = BarKind::mem32;
    else if (kind == "mem64") bs.kind = BarKind::mem64;
    else if (kind == "io") bs.kind = BarKind::io;
    else spec_error(b.path + ".kind", "'" + kind + "' is not mem32, mem64 or io");
    bs.size = b.u("size", ~uint64_t(0), 0);
    bs.prefetchable = b.b("prefetchable", false);
    s.bars.push_back(bs);
  }
  if (top.has("expansion_rom")) s.expansion_rom.size = uint32_t(top.sub("expansion_rom").u("size", 0xffffffff, 0));
  const Fields x = top.sub("pcie");
  s.pcie.max_payload_supported = uint16_t(x.u("max_payload_supported", 0xffff, 256));
  s.pcie.max_link_speed = uint8_t(x.u("max_link_speed", 0xff, 2));
  s.pcie.max_link_width = uint8_t(x.u("max_link_width", 0xff, 8));
  s.pcie.extended_tag = x.b("extended_tag", true);
  s.pcie.completion_timeout_ranges = uint8_t(x.u("completion_timeout_ranges", 0xff, 0x3));
  s.pcie.completion_timeout_disable = x.b("completion_timeout_disable", true);
  s.pcie.offset = x.offset();
  const Fields p = top.sub("power_management");
  s.power_management.d1 = p.b("d1", false);
  s.power_management.d2 = p.b("d2", false);
  s.power_management.no_soft_reset = p.b("no_soft_reset", true);
  s.power_management.pme_support = uint8_t(p.u("pme_support", 0xff, 0));
  s.power_management.offset = p.offset();
  if (top.has("msix")) {
    const Fields m = top.sub("msix");
    s.msix.vectors = uint16_t(m.u("vectors", 0xffff, 0));
    if (s.msix.vectors == 0) spec_error("msix.vectors", "must be 1 .. 2048 (omit msix for none)");
    s.msix.table_bar = uint8_t(m.u("table_bar", 0xff, 0));
    s.msix.table_offset = uint32_t(m.u("table_offset", 0xffffffff, 0));
    s.msix.pba_bar = uint8_t(m.u("pba_bar", 0xff, 0));
    s.msix.pba_offset = uint32_t(m.u("pba_offset", 0xffffffff, 0));
    s.msix.offset = m.offset();
  }
  if (top.has("aer")) {
    const Fields a = top.sub("aer");
    s.aer = {true, a.b("ecrc_generation", false), a.b("ecrc_check", false), a.offset()};
  }
  if (top.has("serial_number")) {
    const Fields n = top.sub("serial_number");
    s.serial_number = {true, n.u("serial", ~uint64_t(0), 0), n.offset()};
  }
  py::list vc = top.list("vendor_caps");
  for (size_t i = 0; i < vc.size(); ++i) {
    const Fields v{vc[i].cast<py::dict>(), "vendor_caps[" + std::to_string(i) + "]"};
    VendorCapParams c;
    c.data = v.has("data") ? as_bytes(v.d["data"], v.path + ".data") : std::vector<uint8_t>{};
    c.writable = ranges(v);
    c.offset = v.offset();
    s.vendor_caps.push_back(std::move(c));
  }
  py::list ve = top.list("vendor_ext_caps");
  for (size_t i = 0; i < ve.size(); ++i) {
    const Fields v{ve[i].cast<py::dict>(), "vendor_ext_caps[" + std::to_string(i) + "]"};
    VendorExtCapParams c;
    c.vsec_id = uint16_t(v.u("vsec_id", 0xffff, 0));
    c.revision = uint8_t(v.u("revision", 0xff, 0));
    c.data = v.has("data") ? as_bytes(v.d["data"], v.path + ".data") : std::vector<uint8_t>{};
    c.writable = ranges(v);
    c.offset = v.offset();
    s.vendor_ext_caps.push_back(std::move(c));
  }
  return s;
}

// ---- interrupts: recorded for Python (the engine brings its own sink) ----

class RecordingSink final : public InterruptSink {
 public:
  static constexpr size_t kCap = 1u << 16;
  void deliver(uint64_t address, uint32_t data) noexcept override {
    std::lock_guard<std::mutex> g(mu_);  // blocking point: brief, never held while calling out
    if (got_.size() < kCap) got_.emplace_back(address, data);
    else ++dropped_;
  }
  std::vector<std::pair<uint64_t, uint32_t>> take() {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<std::pair<uint64_t, uint32_t>> out;
    out.swap(got_);
    got_.reserve(64);
    return out;
  }
  uint64_t dropped() {
    std::lock_guard<std::mutex> g(mu_);
    return dropped_;
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<uint64_t, uint32_t>> got_;
  uint64_t dropped_ = 0;
};

// A Function with its sink and, when the state lives in a caller buffer, that buffer.
class PyFunction {
 public:
  PyFunction(const py::dict& spec, const py::object& state, bool adopt) {
    layout_ = compile(to_spec(spec));
    if (state.is_none()) {
      f_ = std::make_unique<Function>(layout_, &sink_);
      return;
    }
    view_ = std::make_unique<BufferView>(state, "state", Item::byte, Access::write);
    if (view_->size() != Function::state_size())
      spec_error("state", "buffer of " + std::to_string(view_->size()) + " bytes, need " +
                              std::to_string(Function::state_size()));
    if (reinterpret_cast<uintptr_t>(view_->mutable_data()) % alignof(FunctionState) != 0)
      spec_error("state", "buffer is not " + std::to_string(alignof(FunctionState)) + "-byte aligned");
    f_ = std::make_unique<Function>(layout_, &sink_, reinterpret_cast<FunctionState*>(view_->mutable_data()),
                                    adopt ? Function::Adopt::keep : Function::Adopt::reset);
  }
  PyFunction(const PyFunction&) = delete;
  PyFunction& operator=(const PyFunction&) = delete;

  Function& f() { return *f_; }
  const FunctionLayout& layout() const { return *layout_; }
  RecordingSink& sink() { return sink_; }

 private:
  // Destroyed in reverse order: the Function first, then the buffer it points into, then
  // the sink it delivers to.
  RecordingSink sink_;
  std::shared_ptr<const FunctionLayout> layout_;
  std::unique_ptr<BufferView> view_;  // pinned: the Function reads and writes it
  std::unique_ptr<Function> f_;
};

py::bytes raw(const uint8_t* p, size_t n) { return py::bytes(reinterpret_cast<const char*>(p), n); }

uint16_t check_dw(uint32_t off) {
  if (off >= kConfigSize || off % 4 != 0)
    throw Error(ErrorKind::invalid_argument, "config access", EINVAL,
                "offset " + hex(off) + " is not a DW offset below 0x1000");
  return uint16_t(off);
}

}  // namespace

pci::FunctionSpec spec_from_dict(const py::dict& d) { return to_spec(d); }

void bind_function(py::module_& root) {
  py::module_ m = root.def_submodule("function", "PCIe function model (private: use mlx5tlp.function)");
  m.attr("STATE_SIZE") = Function::state_size();
  m.attr("STATE_VERSION") = kFunctionStateVersion;

  py::class_<PyFunction>(m, "Function")
      .def(py::init<const py::dict&, const py::object&, bool>(), py::arg("spec"),
           py::arg("state") = py::none(), py::arg("adopt") = false)
      .def("config_read", [](PyFunction& p, uint32_t off) { return p.f().config_read(check_dw(off)); },
           py::arg("dw_offset"))
      .def("config_write", [](PyFunction& p, uint32_t off, uint32_t value, uint32_t be) {
        if (be > 0xf) throw Error(ErrorKind::invalid_argument, "config write", EINVAL, "byte enables are 4 bits");
        p.f().config_write(check_dw(off), value, uint8_t(be));
      }, py::arg("dw_offset"), py::arg("value"), py::arg("byte_enables"))
      .def("config_bytes", [](PyFunction& p) { return raw(p.f().config().bytes(), kConfigSize); })
      .def("device_write", [](PyFunction& p, uint32_t off, uint32_t width, uint64_t value) {
        if ((width != 1 && width != 2 && width != 4 && width != 8) || !ConfigSpace::in_range(off, width))
          throw Error(ErrorKind::invalid_argument, "device write", EINVAL, "bad offset/width");
        p.f().config().device_write(uint16_t(off), width, value);
      }, py::arg("offset"), py::arg("width"), py::arg("value"))
      .def("template", [](PyFunction& p) {
        const ConfigTemplate& t = p.layout().config;
        return py::make_tuple(raw(t.init, kConfigSize), raw(t.wmask, kConfigSize),
                              raw(t.w1cmask, kConfigSize), raw(t.cmask, kConfigSize));
      }, "(reset image, wmask, w1cmask, cmask), 4096 bytes each")
      .def("layout", [](PyFunction& p) {
        const FunctionLayout& L = p.layout();
        py::dict d;
        d["pcie"] = L.pcie;
        d["power_management"] = L.pm;
        d["msix"] = L.msix;
        d["aer"] = L.aer;
        d["serial_number"] = L.serial_number;
        d["vendor_caps"] = L.vendor_caps;
        d["vendor_ext_caps"] = L.vendor_ext_caps;
        d["digest"] = L.digest;
        return d;
      }, "capability offsets (0: absent) and the spec digest")
      .def_property_readonly("memory_enabled", [](PyFunction& p) { return p.f().memory_enabled(); })
      .def_property_readonly("io_enabled", [](PyFunction& p) { return p.f().io_enabled(); })
      .def_property_readonly("bus_master", [](PyFunction& p) { return p.f().bus_master(); })
      .def_property_readonly("power_state", [](PyFunction& p) { return p.f().power_state(); })
      .def_property_readonly("max_payload_size", [](PyFunction& p) { return p.f().max_payload_size(); })
      .def_property_readonly("max_read_request_size", [](PyFunction& p) { return p.f().max_read_request_size(); })
      .def_property_readonly("read_completion_boundary",
                             [](PyFunction& p) { return p.f().read_completion_boundary(); })
      .def("completion_timeout", [](PyFunction& p) {
        const CompletionTimeout c = p.f().completion_timeout();
        return py::make_tuple(c.disabled, c.min_us, c.max_us);
      }, "(disabled, min_us, max_us)")
      .def("decode_memory", [](PyFunction& p, uint64_t addr, uint32_t len) {
        const DecodeResult r = p.f().decode_memory(addr, len);
        return py::make_tuple(decode_name(r.status), int(r.bar), r.offset);
      }, py::arg("address"), py::arg("length"), "(status, bar, offset); bar 6 = Expansion ROM")
      .def("decode_io", [](PyFunction& p, uint32_t addr, uint32_t len) {
        const DecodeResult r = p.f().decode_io(addr, len);
        return py::make_tuple(decode_name(r.status), int(r.bar), r.offset);
      }, py::arg("address"), py::arg("length"))
      .def("bar_base", [](PyFunction& p, int bar) { return p.f().bar_base(bar); }, py::arg("bar"))
      .def("msix_hit", [](PyFunction& p, int bar, uint64_t off, uint32_t len) {
        static const char* const names[] = {"none", "table", "pba", "straddles"};
        const MsixHit h = p.f().msix_hit(bar, off, len);
        return py::make_tuple(names[int(h.region)], h.offset);
      }, py::arg("bar"), py::arg("offset"), py::arg("length"))
      .def("msix_read", [](PyFunction& p, int bar, uint64_t off, uint32_t len) {
        if (len > 64 * 1024) throw Error(ErrorKind::invalid_argument, "msix read", EINVAL, "length above 64 KiB");
        std::vector<uint8_t> out(len);
        const MsixAccess a = p.f().msix_read(bar, off, len, out.data());
        return py::make_tuple(msix_access_name(a), raw(out.data(), a == MsixAccess::out_of_range ? 0 : len));
      }, py::arg("bar"), py::arg("offset"), py::arg("length"))
      .def("msix_write", [](PyFunction& p, int bar, uint64_t off, py::handle data, uint32_t fbe, uint32_t lbe) {
        const BufferView s(data, "data");
        if (fbe > 0xf || lbe > 0xf) throw Error(ErrorKind::invalid_argument, "msix write", EINVAL, "byte enables are 4 bits");
        return msix_access_name(p.f().msix_write(bar, off, s.data(),
                                                 uint32_t(s.size()), uint8_t(fbe), uint8_t(lbe)));
      }, py::arg("bar"), py::arg("offset"), py::arg("data"), py::arg("first_be"), py::arg("last_be"))
      .def("raise_msix", [](PyFunction& p, uint32_t v) {
        return raise_result_name(v > 0xffff ? RaiseResult::bad_vector : p.f().raise_msix(uint16_t(v)));
      }, py::arg("vector"))
      .def("msix_pending", [](PyFunction& p, uint32_t v) { return v <= 0xffff && p.f().msix_pending(uint16_t(v)); },
           py::arg("vector"))
      .def("clear_msix_pending", [](PyFunction& p, uint32_t v) {
        if (v <= 0xffff) p.f().clear_msix_pending(uint16_t(v));
      }, py::arg("vector"))
      .def("take_interrupts", [](PyFunction& p) { return p.sink().take(); },
           "messages delivered since the last call: [(address, data)]")
      .def_property_readonly("interrupts_dropped", [](PyFunction& p) { return p.sink().dropped(); })
      .def_property_readonly("messages_sent", [](PyFunction& p) { return p.f().msix().messages_sent(); })
      .def("reset", [](PyFunction& p) { p.f().reset(); })
      .def("snapshot", [](PyFunction& p) {
        std::vector<uint8_t> buf(Function::state_size());
        p.f().snapshot(buf.data(), buf.size());
        return raw(buf.data(), buf.size());
      })
      .def("restore", [](PyFunction& p, py::handle b) {
        const BufferView s(b, "snapshot");
        p.f().restore(s.data(), s.size());
      }, py::arg("snapshot"));
}

}  // namespace mlx5tlp::bind
