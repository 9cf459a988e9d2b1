// The engine through its C++ API on the software device: a memory region read back through
// MRd TLPs (completions split per MPS/RCB, checked by the sim host model), posted writes, UR
// for an unclaimed address, a deferred read answered from another thread, and stop while
// idle (the lane blocks in the source's futex and wakes for the stop).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/context.hpp"
#include "mlx5tlp/engine.hpp"
#include "mlx5tlp/function_spec.hpp"
#include "mlx5tlp/tlp.hpp"
#include "mlx5tlp/var.hpp"
#include "sim_util.hpp"

using namespace mlx5tlp;

namespace {

constexpr uint64_t kBar0 = 0xF0000000;

std::vector<uint8_t> encode(tlp::Tlp t) {
  tlp::set_format(&t);
  std::vector<uint8_t> out(tlp::encoded_size(t));
  size_t n = 0;
  CHECK(tlp::encode(t, out.data(), out.size(), &n) == tlp::Status::ok);
  out.resize(n);
  return out;
}

std::vector<uint8_t> cfg_write(uint16_t reg, uint32_t value, uint16_t tag) {
  tlp::Tlp t;
  t.kind = tlp::Kind::CfgWr0;
  t.length = 1;
  t.first_be = 0xf;
  t.dest_id = 0x0100;
  t.address = reg;
  t.tag = tag;
  uint8_t d[4] = {uint8_t(value), uint8_t(value >> 8), uint8_t(value >> 16), uint8_t(value >> 24)};
  t.data = d;
  t.data_len = 4;
  return encode(t);
}

std::vector<uint8_t> mem_read(uint64_t addr, uint16_t dws, uint16_t tag) {
  tlp::Tlp t;
  t.kind = tlp::Kind::MRd;
  t.length = dws;
  t.first_be = 0xf;
  t.last_be = dws == 1 ? 0 : 0xf;
  t.address = addr;
  t.tag = tag;
  return encode(t);
}

struct HostModel {
  m5a_sim_host* h;
  explicit HostModel(const char* dev) : h(simtest::ss().host_open(dev)) { CHECK(h != nullptr); }
  ~HostModel() { simtest::ss().host_close(h); }
  void send(const std::vector<uint8_t>& t) { CHECK(simtest::ss().host_send(h, 0, t.data(), t.size()) == 0); }
  // Completions until `bytes` of read data or `n` records arrived (5 s at most).
  std::vector<tlp::Tlp> collect(size_t n, std::vector<std::vector<uint8_t>>* keep) {
    std::vector<tlp::Tlp> out;
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (out.size() < n && std::chrono::steady_clock::now() < end) {
      std::vector<uint8_t> buf(8192);
      m5a_sim_completion info{};
      const ssize_t len = simtest::ss().host_poll(h, buf.data(), buf.size(), &info);
      if (len <= 0) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        continue;
      }
      buf.resize(size_t(len));
      keep->push_back(std::move(buf));
      tlp::Tlp t;
      CHECK(tlp::decode(keep->back().data(), keep->back().size(), &t) == tlp::Status::ok);
      out.push_back(t);
    }
    CHECK(out.size() == n);
    return out;
  }
  m5a_sim_host_stats stats() {
    m5a_sim_host_stats s{};
    simtest::ss().host_stats(h, &s);
    return s;
  }
};

class Deferrer final : public BatchHandler {
 public:
  std::atomic<uint64_t> id{0};
  void run(BatchItem* items, size_t n) noexcept override {
    for (size_t i = 0; i < n; ++i)
      if (!items[i].write) id.store(items[i].deferred_id);
  }
};

void test_engine_serves(const char* dev) {
  auto ctx = Context::open(dev, Backend::sim);
  pci::FunctionSpec spec;
  spec.identity.vendor_id = 0x15b3;
  spec.identity.device_id = 0x1234;
  spec.bars.push_back({0, pci::BarKind::mem32, 1 << 16, false});
  auto layout = pci::compile(spec);
  std::shared_ptr<MemoryRegion> mem = MemoryRegion::create_memfd("mem", 0, 0, 0x2000);
  for (size_t i = 0; i < 0x2000; ++i) mem->data()[i] = uint8_t(i * 13 + 1);
  auto cb = std::make_shared<CallbackRegion>("cb", 0, 0x4000, 0x1000, 2000000);
  Deferrer handler;
  EngineOptions o;
  o.trace_entries = 8;
  Engine e(layout, {mem, cb}, o);
  e.set_batch_handler(&handler);
  GatewayOptions go;
  go.direct = true;
  auto var = Var::alloc(ctx, true);
  e.add_lane(Gateway::open(var, nullptr, go), std::make_unique<SimRequestSource>(ctx, 0xff));
  e.start();
  HostModel host(dev);
  std::vector<std::vector<uint8_t>> keep;
  host.send(cfg_write(0x10, uint32_t(kBar0), 1));
  host.send(cfg_write(0x04, 0x2, 2));
  host.collect(2, &keep);
  // A 4 KiB read: 32 completions of 128 bytes (MPS 128 at reset), byte counts down to 128.
  host.send(mem_read(kBar0 + 0x1000, 1024, 3));
  auto cpls = host.collect(32, &keep);
  size_t off = 0;
  for (const auto& c : cpls) {
    CHECK(c.tag == 3 && c.status == 0 && c.data_len == 128);
    CHECK(c.byte_count == 4096 - off);
    CHECK(std::memcmp(c.data, mem->data() + 0x1000 + off, c.data_len) == 0);
    off += c.data_len;
  }
  CHECK(off == 4096);
  // Unclaimed: UR.
  host.send(mem_read(kBar0 + 0x8000, 1, 4));
  auto ur = host.collect(1, &keep);
  CHECK(ur[0].status == uint8_t(tlp::CplStatus::UR));
  // Deferred read, answered from another thread.
  host.send(mem_read(kBar0 + 0x4000, 2, 5));
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (handler.id.load() == 0 && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(handler.id.load() != 0);
  const uint8_t answer[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  std::thread t([&] { CHECK(e.complete_deferred(handler.id.load(), answer, 8) == 0); });
  t.join();
  auto d = host.collect(1, &keep);
  CHECK(d[0].tag == 5 && d[0].data_len == 8 && std::memcmp(d[0].data, answer, 8) == 0);
  CHECK(e.complete_deferred(handler.id.load(), answer, 8) == ENOENT);
  const m5a_sim_host_stats hs = host.stats();
  CHECK(hs.errors == 0);
  CHECK(hs.outstanding == 0);
  const EngineStats st = e.stats();
  CHECK(st.requests[size_t(tlp::Kind::MRd)] == 3);
  CHECK(st.ur == 1 && st.deferred == 1 && st.deferred_completed == 1);
  CHECK(st.regions[0].read_bytes == 4096);
  // Idle: the lane blocks; stop wakes it at once.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto t0 = std::chrono::steady_clock::now();
  e.stop();
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(500));
  CHECK(std::strcmp(e.state(), "stopped") == 0);
}

}  // namespace

int main() {
  simtest::ScratchDir dir;
  simtest::make_device("eng0", simtest::config());
  test_engine_serves("eng0");
  simtest::ss().remove_device("eng0");
  return mlx5tlp_test::finish("test_engine");
}
