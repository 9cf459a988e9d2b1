// mlx5tlp._core.sim: the software device's management API and device model (PCIe host).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <chrono>
#include <thread>
#include <vector>

#include "bind.hpp"
#include "mlx5tlp/context.hpp"
#include "mlx5tlp/error.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

namespace {

const SimSymbols& sim() { return Library::get(Backend::sim)->sym().sim; }

void check(const char* op, int rc, const std::string& detail = {}) {
  if (rc != 0) throw_errno(op, rc, false, detail);
}

// The device model. One per device at a time (the sim refuses a second with EBUSY).
class Host {
 public:
  explicit Host(const std::string& device) {
    errno = 0;
    h_ = sim().host_open(device.c_str());
    if (h_ == nullptr) {
      int err = errno_or_eio();
      throw_errno("open device model", err, false,
                  err == EBUSY ? "another device model is attached to '" + device + "'"
                               : "device '" + device + "'");
    }
  }
  ~Host() { close(); }
  Host(const Host&) = delete;
  Host& operator=(const Host&) = delete;

  void close() {
    if (h_ != nullptr) sim().host_close(h_);
    h_ = nullptr;
  }
  m5a_sim_host* get() const {
    if (h_ == nullptr) throw Error(ErrorKind::invalid_handle, "device model", EBADF, "closed");
    return h_;
  }

 private:
  m5a_sim_host* h_ = nullptr;
};

}  // namespace

void bind_sim(py::module_& root) {
  py::module_ m = root.def_submodule("sim", "software device management and device model");

  m.def("create_device", [](const std::string& name, bool tlp, uint32_t gw_pages,
                            uint32_t gw_log_stride, uint32_t virtio_pages, uint32_t slot_size,
                            uint64_t bar_offset, uint64_t node_guid) {
    m5a_sim_device_config c{};
    c.tlp = tlp;
    c.gw_pages = gw_pages;
    c.gw_log_stride = gw_log_stride;
    c.virtio_pages = virtio_pages;
    c.gw_slot_size = slot_size;
    c.gw_bar_offset = bar_offset;
    c.node_guid = node_guid;
    int rc = sim().create_device(name.c_str(), &c);
    check("create software device", rc, rc == EEXIST ? "'" + name + "' already exists" : name);
  });
  m.def("remove_device", [](const std::string& name) {
    int rc = sim().remove_device(name.c_str());
    check("remove software device", rc,
          rc == EBUSY ? "'" + name + "' still has open contexts or a device model" : name);
  });
  m.def("query_device", [](const std::string& name) {
    m5a_sim_device_config c{};
    m5a_sim_device_stats s{};
    check("query software device", sim().query_device(name.c_str(), &c, &s), name);
    py::dict cfg, st;
    cfg["tlp"] = bool(c.tlp);
    cfg["gw_pages"] = c.gw_pages;
    cfg["gw_log_stride"] = c.gw_log_stride;
    cfg["virtio_pages"] = c.virtio_pages;
    cfg["slot_size"] = c.gw_slot_size;
    cfg["bar_offset"] = c.gw_bar_offset;
    cfg["node_guid"] = c.node_guid;
    st["contexts"] = s.contexts;
    st["tlp_vars"] = s.tlp_vars;
    st["virtio_vars"] = s.virtio_vars;
    st["umems"] = s.umems;
    st["devx_objs"] = s.devx_objs;
    st["gw_pages_free"] = s.gw_pages_free;
    st["virtio_pages_free"] = s.virtio_pages_free;
    st["requests_pending"] = s.requests_pending;
    st["reclaimed"] = s.reclaimed;
    return py::make_tuple(cfg, st);
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
      n = ctx->lib().need(ctx->lib().sym().sim.function_poll, "mlx5tlp_sim_function_poll")(
          u.get(), channel, buf.data(), buf.size());
    }
    if (n < 0) throw_errno("take request", int(-n), false);
    if (n == 0) return py::none();
    return py::bytes(reinterpret_cast<const char*>(buf.data()), size_t(n));
  }, py::arg("ctx"), py::arg("channel"));

  py::class_<Host>(m, "Host")
      .def(py::init<const std::string&>(), py::arg("device"))
      .def("close", &Host::close)
      .def("send", [](Host& h, py::bytes tlp, uint32_t channel) {
        std::string s = tlp;
        int rc = sim().host_send(h.get(), channel, s.data(), s.size());
        if (rc == EAGAIN) return false;  // the channel is full: back-pressure to the caller
        check("send request", rc, "channel " + std::to_string(channel));
        return true;
      }, py::arg("tlp"), py::arg("channel"))
      .def("poll", [](Host& h, size_t max, double timeout) {
        // Collects up to `max` completions, waiting up to `timeout` seconds for the first one.
        py::list out;
        std::vector<std::tuple<uint32_t, uint64_t, std::string>> got;
        {
          py::gil_scoped_release r;
          auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
          std::vector<uint8_t> buf(16 + 4096);
          unsigned idle = 0;
          while (got.size() < max) {
            m5a_sim_completion info{};
            ssize_t n = sim().host_poll(h.get(), buf.data(), buf.size(), &info);
            if (n < 0) throw_errno("collect completion", int(-n), false);
            if (n > 0) {
              got.emplace_back(info.page_id, info.sequence,
                               std::string(reinterpret_cast<char*>(buf.data()), size_t(n)));
              idle = 0;
              continue;
            }
            if (!got.empty() || std::chrono::steady_clock::now() >= deadline) break;
            // Spin briefly, then back off: completions usually follow within microseconds.
            if (++idle > 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
          }
        }
        for (auto& [page, seq, data] : got) out.append(py::make_tuple(page, seq, py::bytes(data)));
        return out;
      }, py::arg("max"), py::arg("timeout"))
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
        return d;
      });
}

}  // namespace mlx5tlp::bind
