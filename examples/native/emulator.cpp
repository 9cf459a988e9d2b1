// A small native PCIe function emulator on the software device, using the installed mlx5tlp
// C++ core (find_package(mlx5tlp) + mlx5tlp::core); see CMakeLists.txt next to this file.
//
// The device model plays the PCIe host: it sends memory read requests to the emulated function
// on channel 0. The function takes them, decodes them with the TLP codec, builds the completions
// (split at the Read Completion Boundary and Max_Payload_Size) and posts them through a TLP
// response gateway. The host collects and checks every completion; we succeed only if every
// request was retired with no errors. Run with MLX5TLP_SIM_LIB=<path of libmlx5tlp_sim.so>.
#include <chrono>
#include <cstdio>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlx5tlp/context.hpp"
#include "mlx5tlp/gateway.hpp"
#include "mlx5tlp/tlp.hpp"
#include "mlx5tlp/tlp_completion.hpp"
#include "mlx5tlp/var.hpp"

using namespace std::chrono_literals;
namespace tlp = mlx5tlp::tlp;

namespace {

constexpr uint16_t kHostId = 0x0000, kFunctionId = 0x0100;  // requester / completer BDFs

struct Request { uint16_t tag; uint64_t address; uint16_t length; uint8_t first_be, last_be; };
const Request kRequests[] = {
    {1, 0x1000, 1, 0xF, 0x0},           // one DW
    {2, 0x2004, 2, 0xC, 0x3},           // partial byte enables: byte count 4
    {3, 0x3000, 64, 0xF, 0xF},          // 256 bytes: several completions
    {4, 0x100000040ull, 48, 0xF, 0xF},  // 64-bit address (4DW header), not RCB-aligned
};

void require(bool ok, const std::string& what) { if (!ok) throw std::runtime_error(what); }

}  // namespace

int main() {
  try {
    auto ctx = mlx5tlp::Context::open("", mlx5tlp::Backend::sim);  // the first device
    mlx5tlp::TlpCaps caps = ctx->query_tlp_caps();
    require(caps.supported, "device " + ctx->name() + " has no TLP emulation");
    auto var = mlx5tlp::Var::alloc(ctx, /*tlp=*/true);
    auto gw = mlx5tlp::Gateway::open(var, nullptr, mlx5tlp::GatewayOptions{});

    const mlx5tlp::SimSymbols& sim = mlx5tlp::Library::get(mlx5tlp::Backend::sim)->sym().sim;
    std::unique_ptr<m5a_sim_host, m5a_sim_host_close_fn> host(sim.host_open(ctx->name().c_str()),
                                                              sim.host_close);
    require(host != nullptr, "cannot open the device model of " + ctx->name());

    // Host side: encode and send the requests.
    uint8_t buf[16 + 4096];
    for (const Request& r : kRequests) {
      tlp::Tlp t;
      t.kind = tlp::Kind::MRd;
      t.requester_id = kHostId;
      t.tag = r.tag;
      t.address = r.address;
      t.length = r.length;
      t.first_be = r.first_be;
      t.last_be = r.last_be;
      tlp::set_format(&t);
      size_t n = 0;
      tlp::Status s = tlp::encode(t, buf, sizeof buf, &n);
      require(s == tlp::Status::ok, std::string("encode: ") + tlp::reason(s));
      require(sim.host_send(host.get(), 0, buf, n) == 0, "host_send failed");
    }

    // Function side: completions must fit one gateway record (12-byte header + payload).
    tlp::CompletionParams params;
    params.completer_id = kFunctionId;
    params.max_payload = 4096;
    while (params.max_payload > 128 && 12u + params.max_payload > gw->max_record())
      params.max_payload /= 2;
    require(12u + params.max_payload <= gw->max_record(), "gateway records are too small");

    const size_t expected = std::size(kRequests);
    size_t taken = 0, posted = 0;
    std::vector<uint8_t> out(tlp::kMaxCompletions * 16 + 4096), data;
    uint32_t ends[tlp::kMaxCompletions];
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (taken < expected) {
      require(std::chrono::steady_clock::now() < deadline, "requests did not arrive");
      ssize_t n;
      {
        mlx5tlp::Context::Use u(*ctx);
        n = sim.function_poll(u.get(), 0, buf, sizeof buf);
      }
      require(n >= 0, "function_poll failed");
      if (n == 0) continue;
      ++taken;
      tlp::Tlp req;
      tlp::Status s = tlp::decode(buf, size_t(n), &req);
      require(s == tlp::Status::ok, std::string("decode: ") + tlp::reason(s));
      data.resize(tlp::completion_data_bytes(req, params.status));
      for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(req.address + i);  // "memory"
      size_t len = 0, count = 0;
      s = tlp::build_completions(req, data.data(), data.size(), params, out.data(), out.size(),
                                 &len, ends, std::size(ends), &count);
      require(s == tlp::Status::ok, std::string("build_completions: ") + tlp::reason(s));
      for (size_t i = 0; i < count; ++i) {
        const uint32_t start = i == 0 ? 0 : ends[i - 1];
        require(gw->post(out.data() + start, ends[i] - start, mlx5tlp::Deadline::after(1s)), "gateway post timed out");
        ++posted;
      }
    }

    // The host consumes the page (returning credits) while the gateway drains its ring.
    m5a_sim_completion info{};
    auto collect = [&] {
      while (sim.host_poll(host.get(), buf, sizeof buf, &info) > 0) continue;
    };
    while (!gw->flush(mlx5tlp::Deadline::after(1ms))) {
      collect();
      require(std::chrono::steady_clock::now() < deadline, "gateway flush timed out");
    }
    m5a_sim_host_stats st{};
    for (;;) {
      collect();
      require(sim.host_stats(host.get(), &st) == 0, "host_stats failed");
      if (st.completions >= posted || std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(100us);
    }
    gw->close();
    const mlx5tlp::GatewayStats gs = gw->stats();

    const bool ok = st.requests == expected && st.retired == expected && st.outstanding == 0 &&
                    st.errors == 0 && st.unexpected == 0 && st.bad_records == 0 &&
                    st.completions == posted && gs.written == posted && gs.lost == 0;
    std::printf("native emulator: %s: %zu requests, %llu completions, %llu retired, "
                "%llu errors (device %s, page %u, layout %s, max payload %u)\n",
                ok ? "OK" : "FAILED", expected, (unsigned long long)st.completions,
                (unsigned long long)st.retired, (unsigned long long)st.errors,
                ctx->name().c_str(), var->page_id(), gw->layout_name(),
                unsigned(params.max_payload));
    if (!ok && st.last_error[0] != '\0') std::fprintf(stderr, "last error: %s\n", st.last_error);
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "native emulator: FAILED: %s\n", e.what());
    return 1;
  }
}
