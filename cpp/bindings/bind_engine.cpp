// _core.engine: the native engine (mlx5tlp/engine.hpp), its regions and the sim request
// source. The typed API is mlx5tlp.engine; here every call that may block releases the GIL,
// and the lanes' hooked/callback accesses reach Python through one dispatch callable per
// engine, called once per lane batch with the GIL held (one acquisition per batch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/engine.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/futex.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

namespace {

bool interpreter_finalizing() noexcept {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Calls the façade's dispatch(list of items) with the GIL. Items are tuples
// (region_index, write, offset, length, first_be, last_be, data or None, deferred_id,
//  requester_id, tag, kind); the façade answers through Engine.complete / fail.
class PyHandler final : public BatchHandler {
 public:
  explicit PyHandler(py::object dispatch) : dispatch_(std::move(dispatch)) {}
  ~PyHandler() override {
    py::gil_scoped_acquire g;
    dispatch_ = py::object();
  }
  void run(BatchItem* items, size_t n) noexcept override {
    // Interpreter gone or going: the items stay deferred until expiry or stop (then CA).
    // Taking the GIL once finalization began makes CPython end this thread with
    // pthread_exit, whose forced unwind cannot cross this noexcept function (abort).
    if (!Py_IsInitialized() || interpreter_finalizing()) return;
    py::gil_scoped_acquire g;
    try {
      py::list l(n);
      for (size_t i = 0; i < n; ++i) {
        const BatchItem& it = items[i];
        py::object data = it.write ? py::object(py::bytes(reinterpret_cast<const char*>(it.data), it.len))
                                   : py::object(py::none());
        l[i] = py::make_tuple(it.region_index, it.write, it.offset, it.len, it.first_be, it.last_be, data,
                              it.deferred_id, it.requester_id, it.tag, tlp::kind_name(it.kind));
      }
      dispatch_(l);
    } catch (py::error_already_set& e) {
      // The façade catches the handlers' exceptions; anything left is reported, not raised
      // into a native thread.
      e.discard_as_unraisable("mlx5tlp engine dispatch");
    } catch (...) {
    }
  }

 private:
  py::object dispatch_;
};

// A share of the engine for a call that runs without the GIL (PyEngine::hold()). The engine
// stays alive while one exists; close() sleeps on `count` (a futex word) until the last share
// is dropped, and the share that drops it to 0 wakes it.
class EngineShare {
 public:
  EngineShare(std::shared_ptr<Engine> e, std::atomic<uint32_t>& count) noexcept
      : engine_(std::move(e)), count_(&count) {
    count_->fetch_add(1, std::memory_order_relaxed);  // under the GIL, as close()'s check
  }
  ~EngineShare() {
    if (count_ == nullptr) return;
    // Our reference goes first, so close() destroys the engine on its own thread once woken.
    // The word outlives this: the PyEngine cannot be freed while a call on it is running.
    engine_.reset();
    if (count_->fetch_sub(1, std::memory_order_acq_rel) == 1) futex_wake(*count_);
  }
  EngineShare(EngineShare&& o) noexcept : engine_(std::move(o.engine_)), count_(o.count_) {
    o.count_ = nullptr;
  }
  EngineShare(const EngineShare&) = delete;
  EngineShare& operator=(const EngineShare&) = delete;
  EngineShare& operator=(EngineShare&&) = delete;
  Engine& operator*() const noexcept { return *engine_; }
  Engine* operator->() const noexcept { return engine_.get(); }

 private:
  std::shared_ptr<Engine> engine_;
  std::atomic<uint32_t>* count_;
};

class PyEngine {
 public:
  PyEngine(const py::dict& spec, std::vector<std::shared_ptr<Region>> regions, EngineOptions o,
           py::object dispatch, const py::object& state, bool adopt, const py::object& completer)
      : handler_(std::move(dispatch)) {
    auto layout = pci::compile(spec_from_dict(spec));
    pci::FunctionState* st = take_state(state);
    o.completer_word = take_completer(completer);
    try {
      engine_ = std::make_shared<Engine>(layout, std::move(regions), o, st,
                                         adopt ? pci::Function::Adopt::keep : pci::Function::Adopt::reset);
    } catch (...) {
      release_view();
      throw;
    }
    engine_->set_batch_handler(&handler_);
  }
  ~PyEngine() {
    close();
    release_view();
  }
  PyEngine(const PyEngine&) = delete;
  PyEngine& operator=(const PyEngine&) = delete;
  // For calls that keep the GIL throughout: close() destroys the engine only after it took
  // the GIL back and cleared engine_, so the reference cannot dangle during such a call.
  Engine& e() {
    if (!engine_) throw Error(ErrorKind::invalid_handle, "engine", EBADF, "the device was closed");
    return *engine_;
  }
  // For calls that release the GIL: a share of the engine, taken with the GIL, so a close()
  // from another thread meanwhile cannot free it under the call (it waits for the share).
  EngineShare hold() {
    if (!engine_ || closing_) throw Error(ErrorKind::invalid_handle, "engine", EBADF, "the device was closed");
    return EngineShare(engine_, shares_);
  }
  // f(engine) without the GIL, on a share of the engine taken with it (hold()).
  template <class F>
  auto released(F&& f) {
    const EngineShare en = hold();
    py::gil_scoped_release r;
    return f(*en);
  }
  // Engine::adopt_state with Python buffers (held until close, as the constructor's).
  void adopt_state(const py::object& state, const py::object& completer) {
    const EngineShare share = hold();  // the GIL is released below
    Engine& en = *share;
    if (have_view_ || have_cview_)
      throw Error(ErrorKind::invalid_argument, "adopt state", EINVAL, "the engine already serves from a caller's state");
    if (state.is_none()) throw py::type_error("state must be a writable buffer, not None");
    pci::FunctionState* st = take_state(state);
    std::atomic<uint32_t>* word = nullptr;
    try {
      word = take_completer(completer);
      py::gil_scoped_release r;
      en.adopt_state(st, word);
    } catch (...) {
      release_view();
      throw;
    }
  }
  // Under the GIL. Another thread may be inside a call that released the GIL (hold()):
  // wait_first_answer() is woken by stop(); pause/drain/... hold the engine's control mutex,
  // so stop() runs after them. The engine is destroyed once the last share is dropped — here,
  // before the state buffers are released (a call still running must not see them unmapped).
  // A second close() while one runs returns at once (the first finishes the job).
  void close() {
    if (!engine_ || closing_) return;
    closing_ = true;  // hold() refuses from here: no new GIL-released call starts
    std::shared_ptr<Engine> en = engine_;
    {
      py::gil_scoped_release r;
      // Stop first: a lane in the handler still answers through e() while it finishes.
      en->stop();
    }
    engine_.reset();  // with the GIL: e() callers are not mid-call
    {
      py::gil_scoped_release r;
      // Callers still holding a share are past their blocking point (woken or finished) and
      // only need the GIL to return: sleep without it until the last one wakes us (was a
      // 10 us / 1 ms nap loop, a wake-up each). Bounded: stop() has woken them. A call that
      // still holds its share after kCloseWait (blocked in the kernel, e.g. trace_dump opening
      // a FIFO nobody reads) keeps the engine alive through its share and destroys it when it
      // returns; the state buffers stay exported until then (the destructor releases them),
      // since that call may still touch them.
      const Deadline limit = Deadline::after(kCloseWait);
      for (uint32_t n; (n = shares_.load(std::memory_order_acquire)) != 0;)
        if (!futex_wait(shares_, n, limit)) break;
      en.reset();
    }
    closing_ = false;
    if (shares_.load(std::memory_order_acquire) == 0)
      release_view();  // the state buffer's owner may be closed after this (handover)
  }

 private:
  pci::FunctionState* take_state(const py::object& state) {
    if (state.is_none()) return nullptr;
    if (PyObject_GetBuffer(state.ptr(), &view_, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      throw py::type_error("state must be a writable, contiguous buffer (e.g. an mmap)");
    }
    have_view_ = true;
    if (size_t(view_.len) != pci::Function::state_size() ||
        reinterpret_cast<uintptr_t>(view_.buf) % alignof(pci::FunctionState) != 0) {
      release_view();
      throw Error(ErrorKind::invalid_argument, "create engine", EINVAL,
                  "state: need an 8-byte aligned buffer of " + std::to_string(pci::Function::state_size()) + " bytes");
    }
    return static_cast<pci::FunctionState*>(view_.buf);
  }
  std::atomic<uint32_t>* take_completer(const py::object& completer) {
    if (completer.is_none()) return nullptr;
    if (PyObject_GetBuffer(completer.ptr(), &cview_, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      release_view();
      throw py::type_error("completer must be a writable, contiguous buffer of 4 bytes");
    }
    have_cview_ = true;
    if (cview_.len != 4 || reinterpret_cast<uintptr_t>(cview_.buf) % alignof(std::atomic<uint32_t>) != 0) {
      release_view();
      throw Error(ErrorKind::invalid_argument, "create engine", EINVAL, "completer: need a 4-byte aligned buffer of 4 bytes");
    }
    return static_cast<std::atomic<uint32_t>*>(cview_.buf);
  }
  void release_view() {
    if (have_view_) PyBuffer_Release(&view_);
    have_view_ = false;
    if (have_cview_) PyBuffer_Release(&cview_);
    have_cview_ = false;
  }
  PyHandler handler_;
  Py_buffer view_{};
  bool have_view_ = false;
  Py_buffer cview_{};  // the shared Completer ID word (handover), or none
  bool have_cview_ = false;
  std::shared_ptr<Engine> engine_;
  std::atomic<uint32_t> shares_{0};  // EngineShares alive (a futex word: close() sleeps on it)
  bool closing_ = false;  // under the GIL
  static constexpr std::chrono::seconds kCloseWait{10};
};

uint8_t status_of(const std::string& s) {
  if (s == "UR") return uint8_t(tlp::CplStatus::UR);
  if (s == "CA") return uint8_t(tlp::CplStatus::CA);
  throw py::value_error("status must be 'UR' or 'CA', not '" + s + "'");
}

// A region whose backing file was truncated under it (sigbus_guard.hpp): EIO, an Error.
[[noreturn]] void throw_backing_lost(const Region& r, const char* op) {
  throw Error(ErrorKind::generic, std::string(op) + " region '" + r.name() + "'", EIO,
              "its backing file was truncated by another process while mapped: the bytes are "
              "lost (the mapping now holds zero pages; docs/engine.md \"Shared backing files\")");
}

py::dict stats_dict(const EngineStats& s) {
  py::dict d;
  py::dict kinds;
  for (int k = 0; k < tlp::kKindCount; ++k) kinds[tlp::kind_name(tlp::Kind(k))] = s.requests[size_t(k)];
  d["requests"] = kinds;
  d["batches"] = s.batches;
  d["completions"] = s.completions;
  d["ur"] = s.ur;
  d["ca"] = s.ca;
  d["unsupported_posted"] = s.unsupported_posted;
  d["malformed"] = s.malformed;
  d["poisoned"] = s.poisoned;
  d["unexpected_completions"] = s.unexpected_completions;
  d["messages"] = s.messages;
  d["redelivered"] = s.redelivered;
  d["already_published"] = s.already_published;
  d["partly_published"] = s.partly_published;
  d["stale"] = s.stale;
  d["deferred"] = s.deferred;
  d["deferred_completed"] = s.deferred_completed;
  d["deferred_expired"] = s.deferred_expired;
  d["deferred_outstanding"] = s.deferred_outstanding;
  d["handler_batches"] = s.handler_batches;
  d["interrupts"] = s.interrupts;
  d["config_writes"] = s.config_writes;
  d["err_cor_unsent"] = s.err_cor_unsent;
  d["err_nonfatal_unsent"] = s.err_nonfatal_unsent;
  d["err_fatal_unsent"] = s.err_fatal_unsent;
  d["errors_logged_before"] = s.errors_logged_before;
  d["latency_ns_log2"] = std::vector<uint64_t>(s.latency_ns_log2.begin(), s.latency_ns_log2.end());
  py::list regions;
  for (const RegionCounters& r : s.regions) {
    py::dict x;
    x["reads"] = r.reads;
    x["writes"] = r.writes;
    x["read_bytes"] = r.read_bytes;
    x["write_bytes"] = r.write_bytes;
    x["batched"] = r.batched;
    x["backing_lost"] = r.backing_lost;
    regions.append(x);
  }
  d["regions"] = regions;
  return d;
}

py::tuple trace_tuple(const TraceEntry& t) {
  return py::make_tuple(t.time_ns, t.lane, t.kind, t.status, t.address, t.length_dw, t.requester_id, t.tag,
                        t.first_be, t.last_be, t.completions, int(t.region) - 1, t.latency_ns,
                        py::bytes(reinterpret_cast<const char*>(t.header), 16));
}

// A bounded wait of the engine (pause, drain_deferred, wait_first_answer): the timeout is
// checked and a share of the engine taken (hold(): a close() meanwhile cannot free it) with the
// GIL held — to_deadline raises the project's errors for a bad timeout — and the wait runs
// without it, so that the lanes' Python hooks and handlers can finish meanwhile.
template <auto Wait>
auto deadline_call() {
  return [](PyEngine& p, const py::object& timeout) {
    const Deadline d = to_deadline(timeout);
    return p.released([d](Engine& e) { return (e.*Wait)(d); });
  };
}

}  // namespace

void bind_engine(py::module_& root) {
  py::module_ m = root.def_submodule("engine", "the native engine (private: use mlx5tlp.engine)");
  m.attr("TRACE_MAGIC") = kTraceMagic;
  m.attr("TRACE_VERSION") = kTraceVersion;
  m.attr("TRACE_ENTRY_BYTES") = sizeof(TraceEntry);

  py::class_<Region, std::shared_ptr<Region>>(m, "Region")
      .def_property_readonly("name", &Region::name)
      .def_property_readonly("bar", &Region::bar)
      .def_property_readonly("offset", &Region::offset)
      .def_property_readonly("size", &Region::size)
      .def_property_readonly("kind", [](const Region& r) { return std::string(region_kind_name(r.kind())); })
      .def_property_readonly("backing_lost", &Region::backing_lost);

  py::class_<MemoryRegion, Region, std::shared_ptr<MemoryRegion>>(m, "MemoryRegion")
      .def_static("create", [](const std::string& name, int bar, uint64_t offset, uint64_t size, int fd) {
        std::unique_ptr<MemoryRegion> r = fd < 0 ? MemoryRegion::create_memfd(name, bar, offset, size)
                                                 : MemoryRegion::map_fd(name, bar, offset, size, fd);
        return std::shared_ptr<MemoryRegion>(std::move(r));
      }, py::arg("name"), py::arg("bar"), py::arg("offset"), py::arg("size"), py::arg("fd"))
      .def_property_readonly("fd", &MemoryRegion::fd)
      .def_property_readonly("guarded", &MemoryRegion::guarded)
      .def("read", [](const MemoryRegion& r, uint64_t off, uint64_t n) {
        if (off > r.size() || n > r.size() - off) throw py::value_error("read beyond the region");
        // The copy runs under the SIGBUS guard like the engine's (a truncation mid-copy ends on
        // zero pages); checked after it, so that zeros are never returned as the bytes.
        py::bytes out(reinterpret_cast<const char*>(r.data() + off), n);
        if (r.backing_lost()) throw_backing_lost(r, "read");
        return out;
      }, py::arg("offset"), py::arg("length"))
      .def("write", [](MemoryRegion& r, uint64_t off, const py::bytes& b) {
        const std::string s = b;
        if (off > r.size() || s.size() > r.size() - off) throw py::value_error("write beyond the region");
        std::memcpy(r.data() + off, s.data(), s.size());
        if (r.backing_lost()) throw_backing_lost(r, "write");
      }, py::arg("offset"), py::arg("data"));

  py::class_<RegisterRegion, Region, std::shared_ptr<RegisterRegion>>(m, "RegisterRegion")
      .def(py::init([](const std::string& name, int bar, uint64_t offset, uint64_t size, const py::list& regs, int fd) {
        std::vector<RegisterSpec> v;
        for (size_t i = 0; i < regs.size(); ++i) {
          auto t = regs[i].cast<py::tuple>();
          if (t.size() != 8) throw py::value_error("register tuples are (name, offset, width, reset, access, read_hook, write_hook, reserved)");
          RegisterSpec r;
          r.name = t[0].cast<std::string>();
          r.offset = t[1].cast<uint32_t>();
          r.width = uint8_t(t[2].cast<uint32_t>());
          r.reset = t[3].cast<uint64_t>();
          const std::string a = t[4].cast<std::string>();
          if (a == "ro") r.access = RegAccess::ro;
          else if (a == "rw") r.access = RegAccess::rw;
          else if (a == "rw1c") r.access = RegAccess::rw1c;
          else if (a == "wo") r.access = RegAccess::wo;
          else throw Error(ErrorKind::invalid_argument, "define region", EINVAL,
                           "region '" + name + "': registers[" + std::to_string(i) + "].access: '" + a + "' is not ro, rw, rw1c or wo");
          r.read_hook = t[5].cast<bool>();
          r.write_hook = t[6].cast<bool>();
          r.reserved = t[7].cast<uint64_t>();
          v.push_back(std::move(r));
        }
        return std::make_shared<RegisterRegion>(name, bar, offset, size, std::move(v), fd);
      }), py::arg("name"), py::arg("bar"), py::arg("offset"), py::arg("size"), py::arg("registers"), py::arg("fd") = -1)
      .def_property_readonly("fd", &RegisterRegion::fd)
      .def("find", [](const RegisterRegion& r, uint64_t off) { return r.find(off); }, py::arg("offset"))
      .def("value", [](const RegisterRegion& r, size_t i) {
        const uint64_t v = r.value(i);
        if (r.backing_lost()) throw_backing_lost(r, "read");
        return v;
      }, py::arg("index"))
      .def("set_value", [](RegisterRegion& r, size_t i, uint64_t v) {
        r.set_value(i, v);
        if (r.backing_lost()) throw_backing_lost(r, "write");
      }, py::arg("index"), py::arg("value"))
      .def("reset", &RegisterRegion::reset)
      .def("names", [](const RegisterRegion& r) {
        std::vector<std::tuple<std::string, uint32_t, uint32_t>> out;
        for (const auto& x : r.registers()) out.emplace_back(x.name, x.offset, x.width);
        return out;
      }, "(name, offset, width) in offset order");

  py::class_<CallbackRegion, Region, std::shared_ptr<CallbackRegion>>(m, "CallbackRegion")
      .def(py::init([](const std::string& name, int bar, uint64_t offset, uint64_t size, uint32_t deadline_us) {
        return std::make_shared<CallbackRegion>(name, bar, offset, size, deadline_us);
      }), py::arg("name"), py::arg("bar"), py::arg("offset"), py::arg("size"), py::arg("deadline_us"))
      .def_property_readonly("deadline_us", &CallbackRegion::deadline_us);

  py::class_<PyEngine>(m, "Engine")
      .def(py::init([](const py::dict& spec, std::vector<std::shared_ptr<Region>> regions, size_t batch,
                       size_t deferred_max, size_t trace_entries, py::object dispatch, const py::object& state, bool adopt,
                       const py::object& completer) {
        EngineOptions o;
        o.batch = batch;
        o.deferred_max = deferred_max;
        o.trace_entries = trace_entries;
        return std::make_unique<PyEngine>(spec, std::move(regions), o, std::move(dispatch), state, adopt, completer);
      }), py::arg("spec"), py::arg("regions"), py::arg("batch"), py::arg("deferred_max"), py::arg("trace_entries"),
         py::arg("dispatch"), py::arg("state"), py::arg("adopt"), py::arg("completer") = py::none())
      .def("add_sim_lane", [](PyEngine& p, std::shared_ptr<Var> var, uint32_t channels, double spin_us, bool attach) {
        const EngineShare en = p.hold();
        Engine& e = *en;
        auto ctx = var->context();
        py::gil_scoped_release r;
        auto src = std::make_unique<SimRequestSource>(ctx, channels, 64,
                                                      std::chrono::nanoseconds(int64_t(spin_us * 1000)));
        if (!attach) return e.add_detached_lane(std::move(var), std::move(src));
        GatewayOptions go;
        go.direct = true;
        auto gw = Gateway::open(var, nullptr, go);
        e.add_lane(std::move(gw), std::move(src));
      }, py::arg("var"), py::arg("channels"), py::arg("spin_us"), py::arg("attach") = true)
      .def("adopt_state", &PyEngine::adopt_state, py::arg("state"), py::arg("completer"))
      .def("attach_gateways", [](PyEngine& p) { p.released([](Engine& e) { e.attach_gateways(); }); })
      .def("start", [](PyEngine& p) { p.e().start(); })
      .def("pause", deadline_call<&Engine::pause>(), py::arg("timeout"))
      .def("resume", [](PyEngine& p) { p.e().resume(); })
      .def("drain_deferred", deadline_call<&Engine::drain_deferred>(), py::arg("timeout"))
      .def_property_readonly("first_answer_ns", [](PyEngine& p) { return p.e().first_answer_ns(); })
      .def_property_readonly("answered", [](PyEngine& p) { return p.e().answered(); })
      .def("wait_first_answer", deadline_call<&Engine::wait_first_answer>(), py::arg("timeout"))
      .def("set_lean", [](PyEngine& p, bool on) { p.e().set_lean(on); }, py::arg("on"))
      .def("stop", [](PyEngine& p) { p.released([](Engine& e) { e.stop(); }); })
      .def("close", &PyEngine::close)
      .def("release_gateways", [](PyEngine& p) { p.released([](Engine& e) { e.release_gateways(std::chrono::seconds(1)); }); })
      .def("reattach_gateways", [](PyEngine& p) { p.released([](Engine& e) { e.reattach_gateways(); }); })
      .def_property_readonly("state", [](PyEngine& p) { return std::string(p.e().state()); })
      .def_property_readonly("lanes", [](PyEngine& p) { return p.e().lanes(); })
      .def_property_readonly("completer_id", [](PyEngine& p) { return p.e().completer_id(); })
      .def("stats", [](PyEngine& p) { return stats_dict(p.e().stats()); })
      .def("complete", [](PyEngine& p, uint64_t id, const py::bytes& data) {
        const std::string s = data;
        return p.e().complete_deferred(id, reinterpret_cast<const uint8_t*>(s.data()), s.size());
      }, py::arg("id"), py::arg("data"))
      .def("fail", [](PyEngine& p, uint64_t id, const std::string& status) {
        return p.e().fail_deferred(id, status_of(status));
      }, py::arg("id"), py::arg("status"))
      .def("trace_dump", [](PyEngine& p, const std::string& path) {
        return p.released([&path](Engine& e) { return e.trace_dump(path); });
      }, py::arg("path"))
      .def("config_read", [](PyEngine& p, uint32_t off) {
        if (off > 0xffff) throw Error(ErrorKind::invalid_argument, "config read", EINVAL, "offset above 0xffff");
        return p.e().config_read(uint16_t(off));
      }, py::arg("dw_offset"))
      .def("config_write", [](PyEngine& p, uint32_t off, uint32_t v, uint32_t be) {
        if (off > 0xffff || be > 0xf) throw Error(ErrorKind::invalid_argument, "config write", EINVAL, "bad offset or byte enables");
        p.e().config_write(uint16_t(off), v, uint8_t(be));
      }, py::arg("dw_offset"), py::arg("value"), py::arg("byte_enables"))
      .def("config_bytes", [](PyEngine& p) {
        const std::vector<uint8_t> b = p.e().config_bytes();
        return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
      })
      .def("raise_msix", [](PyEngine& p, uint32_t v) {
        return std::string(pci::raise_result_name(v > 0xffff ? pci::RaiseResult::bad_vector : p.e().raise_msix(uint16_t(v))));
      }, py::arg("vector"))
      .def("msix_pending", [](PyEngine& p, uint32_t v) { return v <= 0xffff && p.e().msix_pending(uint16_t(v)); },
           py::arg("vector"));

  m.def("read_trace", [](const std::string& path) {
    std::vector<TraceEntry> v;
    {
      py::gil_scoped_release r;
      v = read_trace(path);
    }
    py::list out;
    for (const TraceEntry& t : v) out.append(trace_tuple(t));
    return out;
  }, py::arg("path"), "(time_ns, lane, kind, status, address, length_dw, requester_id, tag, first_be, last_be, "
                      "completions, region, latency_ns, header)");
}

}  // namespace mlx5tlp::bind
