// mlx5tlp._core.sim: the software device's management API and device model (PCIe host).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sched.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <thread>
#include <vector>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/context.hpp"
#include "mlx5tlp/deadline.hpp"
#include "mlx5tlp/error.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

namespace {

const SimSymbols& sim() { return Library::get(Backend::sim)->sym().sim; }

// The software device's own account of why the call failed (path, field, limit), if any.
std::string sim_reason() {
  if (sim().last_error == nullptr) return {};
  char buf[512];
  sim().last_error(buf, sizeof buf);
  return buf;
}

void check(const char* op, int rc, const std::string& fallback = {}) {
  if (rc == 0) return;
  std::string why = sim_reason();
  throw_errno(op, rc, false, why.empty() ? fallback : why);
}

// Function-side calls on a context: a claim names the context's device.
template <typename F>
F need(const Context& ctx, F f, const char* name) {
  return ctx.lib().need(f, name);
}

// The device model. One per device at a time (the sim refuses a second with EBUSY).
class Host {
 public:
  explicit Host(const std::string& device) {
    errno = 0;
    h_ = sim().host_open(device.c_str());
    if (h_ == nullptr) {
      const int err = errno_or_eio();
      const std::string why = sim_reason();
      throw_errno("open device model", err, false, why.empty() ? "device '" + device + "'" : why);
    }
  }
  ~Host() { close(); }
  Host(const Host&) = delete;
  Host& operator=(const Host&) = delete;

  void close() {
    // A call running without the GIL (poll, load) still uses the model: closing it under that
    // call would free what it is using.
    if (busy_ != 0)
      throw Error(ErrorKind::generic, "close device model", EBUSY,
                  "a poll or load call on it is still running in another thread");
    if (h_ != nullptr) sim().host_close(h_);
    h_ = nullptr;
  }
  m5a_sim_host* get() const {
    if (h_ == nullptr) throw Error(ErrorKind::invalid_handle, "device model", EBADF, "closed");
    return h_;
  }

  // Held (with the GIL) around a call that releases the GIL: close() refuses meanwhile.
  class Busy {
   public:
    explicit Busy(Host& h) : h_(h), raw_(h.get()) { ++h_.busy_; }
    ~Busy() { --h_.busy_; }
    Busy(const Busy&) = delete;
    Busy& operator=(const Busy&) = delete;
    m5a_sim_host* get() const noexcept { return raw_; }

   private:
    Host& h_;
    m5a_sim_host* raw_;
  };

 private:
  m5a_sim_host* h_ = nullptr;
  int busy_ = 0;  // changed with the GIL held only
};

// Waiting for completions when none is there: the writer rings doorbells with no way to wake
// the model, so it polls. Completions usually follow within microseconds, so it spins first
// (~2000 empty polls, tens of µs), then yields the CPU (~200 rounds: another process — often
// the writer — may need it), then sleeps, starting at 1 µs and doubling to at most 200 µs, never
// past the deadline. A completion resets the policy.
class IdleWait {
 public:
  void reset() { n_ = 0; sleep_us_ = 1; }
  void wait(const Deadline& deadline) {
    ++n_;
    if (n_ <= kSpin) {
#if defined(__x86_64__)
      __builtin_ia32_pause();  // a spin-wait hint; no memory effect
#elif defined(__aarch64__)
      asm volatile("yield" ::: "memory");
#endif
      return;
    }
    if (n_ <= kSpin + kYield) {
      sched_yield();
      return;
    }
    auto d = std::chrono::microseconds(sleep_us_);
    const auto left = deadline.remaining();
    if (left < d) d = std::chrono::duration_cast<std::chrono::microseconds>(left);
    // Blocking point: nothing to collect; bounded by the deadline and by 200 µs.
    std::this_thread::sleep_for(d);
    if (sleep_us_ < kMaxSleepUs) sleep_us_ *= 2;
  }

 private:
  static constexpr unsigned kSpin = 2000, kYield = 200, kMaxSleepUs = 200;
  unsigned n_ = 0, sleep_us_ = 1;
};

const char* const kLoadErrorNames[M5A_SIM_LOAD_ERR_KINDS] = {
    "data", "byte_count", "lower_address", "tag", "completer", "status", "format", "split",
    "timeout", "record"};

// Host.load: the native load generator. `ops`: (kind, size, align, weight) tuples; `ranges`:
// (address, buffer) pairs whose contents are copied when the run starts. Runs with the GIL
// released (the buffers stay exported, so they cannot be resized meanwhile).
py::dict run_load(Host& h, const std::vector<std::tuple<uint32_t, uint32_t, uint32_t, uint32_t>>& ops,
                  const std::vector<std::pair<uint64_t, py::object>>& ranges, uint32_t window,
                  double rate, uint64_t count, uint64_t duration_ns, uint64_t timeout_ns,
                  uint32_t channels, uint16_t requester_id, int32_t completer_id,
                  uint32_t max_payload, uint32_t rcb, uint64_t seed) {
  m5a_sim_load_spec spec{};
  spec.struct_size = sizeof spec;
  if (ops.size() > M5A_SIM_LOAD_MAX_OPS)
    throw Error(ErrorKind::invalid_argument, "load", EINVAL,
                "at most " + std::to_string(M5A_SIM_LOAD_MAX_OPS) + " ops");
  if (ranges.size() > M5A_SIM_LOAD_MAX_RANGES)
    throw Error(ErrorKind::invalid_argument, "load", EINVAL,
                "at most " + std::to_string(M5A_SIM_LOAD_MAX_RANGES) + " ranges");
  spec.nops = uint32_t(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    auto [kind, size, align, weight] = ops[i];
    spec.ops[i] = m5a_sim_load_op{kind, size, align, weight};
  }
  // Pinned while the run starts (the generator copies them first); only their sizes bound
  // anything, and a pinned buffer cannot be resized.
  std::vector<std::unique_ptr<BufferView>> views;
  std::vector<m5a_sim_load_range> rs;
  for (const auto& [address, buf] : ranges) {
    views.push_back(std::make_unique<BufferView>(buf, "a range's expected contents"));
    const BufferView& v = *views.back();
    rs.push_back(m5a_sim_load_range{address, uint64_t(v.size()), v.data()});
  }
  spec.nranges = uint32_t(rs.size());
  spec.ranges = rs.data();
  spec.window = window;
  spec.rate = rate;
  spec.count = count;
  spec.duration_ns = duration_ns;
  spec.timeout_ns = timeout_ns;
  spec.channels = channels;
  spec.requester_id = requester_id;
  spec.check_completer = completer_id >= 0;
  spec.completer_id = uint16_t(completer_id >= 0 ? completer_id : 0);
  spec.max_payload = max_payload;
  spec.rcb = rcb;
  spec.seed = seed;
  m5a_sim_load_result r{};
  r.struct_size = sizeof r;
  const auto fn = Library::get(Backend::sim)->need(sim().host_load, "mlx5tlp_sim_host_load");
  const Host::Busy busy(h);
  int rc;
  {
    py::gil_scoped_release release;
    rc = fn(busy.get(), &spec, &r);
  }
  check("run load", rc);
  py::dict d;
  d["sent"] = r.sent;
  d["reads"] = r.reads;
  d["writes"] = r.writes;
  d["flush_reads"] = r.flush_reads;
  d["completed"] = r.completed;
  d["completions"] = r.completions;
  d["interrupts"] = r.interrupts;
  d["bytes_read"] = r.bytes_read;
  d["errors"] = r.errors;
  py::dict kinds;
  for (int k = 0; k < M5A_SIM_LOAD_ERR_KINDS; ++k) kinds[kLoadErrorNames[k]] = r.errors_by_kind[k];
  d["errors_by_kind"] = kinds;
  py::list first;
  for (uint32_t i = 0; i < r.nfirst && i < M5A_SIM_LOAD_FIRST_ERRORS; ++i)
    first.append(std::string(r.first_errors[i], strnlen(r.first_errors[i], sizeof r.first_errors[i])));
  d["first_errors"] = first;
  d["late"] = r.late;
  d["elapsed_ns"] = r.elapsed_ns;
  d["cpu_ns"] = r.cpu_ns;
  d["achieved_rps"] = r.achieved_rps;
  d["latency_ns"] = py::make_tuple(r.lat_min_ns, r.lat_p50_ns, r.lat_p90_ns, r.lat_p99_ns,
                                   r.lat_p999_ns, r.lat_max_ns, r.lat_mean_ns);
  d["sched_latency_ns"] = py::make_tuple(r.sched_p50_ns, r.sched_p99_ns, r.sched_p999_ns, r.sched_max_ns);
  return d;
}

py::dict device_config_dict(const m5a_sim_device_config& c) {
  py::dict cfg;
  cfg["tlp"] = bool(c.tlp);
  cfg["gw_pages"] = c.gw_pages;
  cfg["gw_log_stride"] = c.gw_log_stride;
  cfg["virtio_pages"] = c.virtio_pages;
  cfg["slot_size"] = c.gw_slot_size;
  cfg["bar_offset"] = c.gw_bar_offset;
  cfg["node_guid"] = c.node_guid;
  cfg["var_support"] = (c.flags & M5A_SIM_DEV_NO_VAR) == 0;
  cfg["var_flags_attr"] = (c.flags & M5A_SIM_DEV_NO_VAR_FLAGS_ATTR) == 0;
  return cfg;
}

py::dict device_stats_dict(const m5a_sim_device_stats& s) {
  py::dict st;
  st["contexts"] = s.contexts;
  st["tlp_vars"] = s.tlp_vars;
  st["virtio_vars"] = s.virtio_vars;
  st["umems"] = s.umems;
  st["devx_objs"] = s.devx_objs;
  st["gw_pages_free"] = s.gw_pages_free;
  st["gw_pages_draining"] = s.gw_pages_draining;
  st["virtio_pages_free"] = s.virtio_pages_free;
  st["requests_pending"] = s.requests_pending;
  st["requests_claimed"] = s.requests_claimed;
  st["reclaimed"] = s.reclaimed;
  st["host_epoch"] = s.host_epoch;
  st["stale_requests"] = s.stale_requests;
  st["stale_completions"] = s.stale_completions;
  return st;
}

}  // namespace

void bind_sim(py::module_& root) {
  py::module_ m = root.def_submodule("sim", "software device management and device model");

  m.def("create_device", [](const std::string& name, bool tlp, uint32_t gw_pages,
                            uint32_t gw_log_stride, uint32_t virtio_pages, uint32_t slot_size,
                            uint64_t bar_offset, uint64_t node_guid, uint32_t flags) {
    m5a_sim_device_config c{};
    c.tlp = tlp;
    c.gw_pages = gw_pages;
    c.gw_log_stride = gw_log_stride;
    c.virtio_pages = virtio_pages;
    c.gw_slot_size = slot_size;
    c.gw_bar_offset = bar_offset;
    c.node_guid = node_guid;
    c.flags = flags;
    check("create software device", sim().create_device(name.c_str(), &c), name);
  });
  m.def("remove_device", [](const std::string& name) {
    check("remove software device", sim().remove_device(name.c_str()), name);
  });
  m.def("query_device", [](const std::string& name) {
    m5a_sim_device_config c{};
    m5a_sim_device_stats s{};
    check("query software device", sim().query_device(name.c_str(), &c, &s), name);
    return py::make_tuple(device_config_dict(c), device_stats_dict(s));
  });
  m.def("reset_device", [](const std::string& name) {
    m5a_sim_reset_result r{};
    const auto fn = Library::get(Backend::sim)->need(sim().reset_device, "mlx5tlp_sim_reset_device");
    check("reset software device", fn(name.c_str(), &r), name);
    py::dict d;
    d["requests"] = r.requests;
    d["claims"] = r.claims;
    d["completions"] = r.completions;
    d["pages"] = r.pages;
    d["faults"] = r.faults;
    d["objects"] = r.objects;
    return d;
  });
  m.def("inject_fault", [](const std::string& device, const std::string& op, int err, uint32_t count) {
    const auto fn = Library::get(Backend::sim)->need(sim().inject_fault, "mlx5tlp_sim_inject_fault");
    check("inject fault", fn(device.c_str(), op.c_str(), err, count), device);
  });
  m.def("device_dir", []() {
    char buf[4096];
    check("software device directory", sim().device_dir(buf, sizeof buf));
    return std::string(buf);
  });
  m.def("function_poll", [](std::shared_ptr<Context> ctx, uint32_t channel) -> py::object {
    std::vector<uint8_t> buf(16 + 4096);
    ssize_t n;
    {
      py::gil_scoped_release r;
      Context::Use u(*ctx);
      n = need(*ctx, ctx->lib().sym().sim.function_poll, "mlx5tlp_sim_function_poll")(
          u.get(), channel, buf.data(), buf.size());
    }
    if (n < 0) check("take request", int(-n));
    if (n == 0) return py::none();
    return py::bytes(reinterpret_cast<const char*>(buf.data()), size_t(n));
  }, py::arg("ctx"), py::arg("channel"));
  // (claim id, flags, request bytes, mark page id, mark seq, progress), or None when nothing is there.
  auto claim_like = [](std::shared_ptr<Context> ctx, uint32_t channel, bool recover) -> py::object {
    std::vector<uint8_t> buf(16 + 4096);
    m5a_sim_claim_info info{};
    ssize_t n;
    {
      py::gil_scoped_release r;
      Context::Use u(*ctx);
      const auto& s = ctx->lib().sym().sim;
      n = recover ? need(*ctx, s.function_recover, "mlx5tlp_sim_function_recover")(
                        u.get(), channel, buf.data(), buf.size(), &info)
                  : need(*ctx, s.function_claim, "mlx5tlp_sim_function_claim")(
                        u.get(), channel, buf.data(), buf.size(), &info);
    }
    if (n < 0) check(recover ? "recover request" : "claim request", int(-n));
    if (n == 0) return py::none();
    return py::make_tuple(info.claim, info.flags,
                          py::bytes(reinterpret_cast<const char*>(buf.data()), size_t(n)),
                          info.page_id, info.seq, info.progress);
  };
  m.def("function_claim", [claim_like](std::shared_ptr<Context> ctx, uint32_t channel) {
    return claim_like(std::move(ctx), channel, false);
  }, py::arg("ctx"), py::arg("channel"));
  m.def("function_recover", [claim_like](std::shared_ptr<Context> ctx, uint32_t channel) {
    return claim_like(std::move(ctx), channel, true);
  }, py::arg("ctx"), py::arg("channel"));
  m.def("function_mark", [](std::shared_ptr<Context> ctx, uint32_t channel, uint64_t claim,
                            uint32_t page_id, uint64_t seq, uint32_t before, uint32_t after) {
    Context::Use u(*ctx);
    check("mark request answered",
          need(*ctx, ctx->lib().sym().sim.function_mark_progress,
               "mlx5tlp_sim_function_mark_progress@" M5A_SIM_VERSION_NODE_1_1)(
              u.get(), channel, claim, page_id, seq, before, after));
  }, py::arg("ctx"), py::arg("channel"), py::arg("claim"), py::arg("page_id"), py::arg("seq"),
     py::arg("before") = 0, py::arg("after") = M5A_SIM_PROGRESS_ALL);
  m.def("function_retire", [](std::shared_ptr<Context> ctx, uint32_t channel, uint64_t claim) {
    Context::Use u(*ctx);
    check("retire request",
          need(*ctx, ctx->lib().sym().sim.function_retire, "mlx5tlp_sim_function_retire")(
              u.get(), channel, claim));
  }, py::arg("ctx"), py::arg("channel"), py::arg("claim"));

  py::class_<Host>(m, "Host")
      .def(py::init<const std::string&>(), py::arg("device"))
      .def("close", &Host::close)
      .def("send", [](Host& h, py::handle tlp, uint32_t channel) {
        const BufferView s(tlp, "tlp");  // read once, with the GIL held: pinned, not copied
        int rc = sim().host_send(h.get(), channel, s.data(), s.size());
        if (rc == EAGAIN) return false;  // the channel is full: back-pressure to the caller
        check("send request", rc, "channel " + std::to_string(channel));
        return true;
      }, py::arg("tlp"), py::arg("channel"))
      .def("poll", [](Host& h, size_t max, double timeout) {
        // Collects up to `max` completions, waiting up to `timeout` seconds for the first one.
        const Deadline deadline = Deadline::in_seconds(timeout);
        const Host::Busy busy(h);
        m5a_sim_host* raw = busy.get();
        py::list out;
        std::vector<std::tuple<uint32_t, uint64_t, std::string>> got;
        int err = 0;
        {
          py::gil_scoped_release r;
          std::vector<uint8_t> buf(16 + 4096);
          IdleWait idle;
          while (got.size() < max) {
            m5a_sim_completion info{};
            const ssize_t n = sim().host_poll(raw, buf.data(), buf.size(), &info);
            if (n < 0) {
              err = int(-n);
              break;
            }
            if (n > 0) {
              got.emplace_back(info.page_id, info.sequence,
                               std::string(reinterpret_cast<char*>(buf.data()), size_t(n)));
              idle.reset();
              continue;
            }
            if (!got.empty() || deadline.expired()) break;
            idle.wait(deadline);
          }
        }
        if (err != 0) throw_errno("collect completion", err, false);
        for (auto& [page, seq, data] : got) out.append(py::make_tuple(page, seq, py::bytes(data)));
        return out;
      }, py::arg("max"), py::arg("timeout"))
      .def("load", &run_load, py::arg("ops"), py::arg("ranges"), py::arg("window"),
           py::arg("rate"), py::arg("count"), py::arg("duration_ns"), py::arg("timeout_ns"),
           py::arg("channels"), py::arg("requester_id"), py::arg("completer_id"),
           py::arg("max_payload"), py::arg("rcb"), py::arg("seed"))
      .def("stats", [](Host& h) {
        m5a_sim_host_stats s{};
        check("device model stats", sim().host_stats(h.get(), &s));
        py::dict d;
        d["requests"] = s.requests;
        d["completions"] = s.completions;
        d["retired"] = s.retired;
        d["outstanding"] = s.outstanding;
        d["errors"] = s.errors;
        d["unexpected"] = s.unexpected;
        d["bad_records"] = s.bad_records;
        d["status_ur"] = s.status_ur;
        d["status_ca"] = s.status_ca;
        d["status_crs"] = s.status_crs;
        d["last_error"] = std::string(s.last_error);
        d["epoch"] = s.epoch;
        d["stale_requests"] = s.stale_requests;
        d["stale_completions"] = s.stale_completions;
        d["interrupts"] = s.interrupts;
        return d;
      });
}

}  // namespace mlx5tlp::bind
