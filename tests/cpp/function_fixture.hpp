// Shared by the function-model C++ tests: a recording InterruptSink, the spec every test
// starts from, and config accessors of 1/2/4 bytes (a host's view through CfgRd/CfgWr).
#pragma once

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "mlx5tlp/function.hpp"

namespace function_fixture {

using namespace mlx5tlp::pci;

struct Sink : InterruptSink {
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint32_t>> got;
  void deliver(uint64_t a, uint32_t d) noexcept override {
    std::lock_guard<std::mutex> g(mu);
    got.emplace_back(a, d);
  }
  size_t size() {
    std::lock_guard<std::mutex> g(mu);
    return got.size();
  }
};

inline FunctionSpec spec() {
  FunctionSpec s;
  s.identity = {0x15b3, 0x1234, 0x15b3, 0x0042, 0x07, 0x020000, 1};
  s.bars = {{0, BarKind::mem64, 1u << 20, true}, {2, BarKind::mem32, 16384, false},
            {3, BarKind::io, 256, false}};
  s.expansion_rom.size = 65536;
  s.pcie.max_payload_supported = 512;
  s.msix = {64, 2, 0x0, 2, 0x2000, -1};
  s.aer.present = true;
  s.serial_number = {true, 0x0011223344556677ull, -1};
  VendorCapParams v;
  v.data = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  v.writable = {{4, 4}};
  s.vendor_caps.push_back(v);
  VendorExtCapParams e;
  e.vsec_id = 0x1234;
  e.revision = 2;
  e.data = {0xaa, 0xbb, 0xcc, 0xdd};
  e.writable = {{0, 2}};
  s.vendor_ext_caps.push_back(e);
  return s;
}

inline uint32_t rd(const Function& f, uint16_t off, unsigned width) {
  const uint32_t dw = f.config_read(uint16_t(off & ~3u));
  return width == 4 ? dw : (dw >> (8 * (off & 3u))) & ((1u << (8 * width)) - 1);
}
inline void wr(Function& f, uint16_t off, unsigned width, uint32_t v) {
  const uint8_t be = uint8_t(((1u << width) - 1) << (off & 3u));
  f.config_write(uint16_t(off & ~3u), v << (8 * (off & 3u)), be);
}
inline uint16_t find_cap(const Function& f, uint8_t id) {
  for (uint16_t p = uint16_t(rd(f, reg::kCapPtr, 1)), n = 0; p != 0 && n < 48; ++n) {
    if (rd(f, p, 1) == id) return p;
    p = uint16_t(rd(f, uint16_t(p + 1), 1));
  }
  return 0;
}

}  // namespace function_fixture
