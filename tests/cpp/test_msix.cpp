// MSI-X (PCIe Base 6.x §6.1.4.5 masking and pending bits, §7.7.2 structures and access
// rules) and function state snapshots (the handover contract of docs/function.md).
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "check.hpp"
#include "function_fixture.hpp"

using namespace function_fixture;
using mlx5tlp::ErrorKind;

namespace {

// Enable MSI-X with the table in BAR2 and entries k -> (0xfee00000 + 4k, 0x100 + k).
void program_msix(Function& f, uint16_t vectors) {
  for (uint16_t k = 0; k < vectors; ++k) {
    const uint32_t e[3] = {0xfee00000u + 4u * k, 0, 0x100u + k};
    CHECK(f.msix_write(2, 16u * k, reinterpret_cast<const uint8_t*>(e), 8, 0xf, 0xf) == MsixAccess::ok);
    CHECK(f.msix_write(2, 16u * k + 8, reinterpret_cast<const uint8_t*>(e + 2), 4, 0xf, 0) == MsixAccess::ok);
  }
  wr(f, reg::kCommand, 2, command::kMemorySpace | command::kBusMaster);
}

void test_msix_masking() {
  Sink sink;
  Function f(compile(spec()), &sink);
  const uint16_t m = find_cap(f, cap_id::kMsix);
  CHECK(rd(f, uint16_t(m + msix_cap::kControl), 2) == 63);  // §7.7.2.2 Table Size N-1
  CHECK(rd(f, uint16_t(m + msix_cap::kTable), 4) == 2 && rd(f, uint16_t(m + msix_cap::kPba), 4) == 0x2002);
  program_msix(f, 64);
  // §7.7.2.2: MSI-X Enable clear -> prohibited from using MSI-X: nothing, not even pending.
  CHECK(f.raise_msix(3) == RaiseResult::disabled && !f.msix_pending(3));
  wr(f, uint16_t(m + msix_cap::kControl), 2, msix_cap::kEnable);
  // §7.7.2.8: Mask Bit default 1b -> pending (§6.1.4.5), no message.
  CHECK(f.raise_msix(3) == RaiseResult::pending && f.msix_pending(3) && sink.size() == 0);
  uint8_t pba[8];
  CHECK(f.msix_read(2, 0x2000, 8, pba) == MsixAccess::ok && pba[0] == 0x08);  // §7.7.2.9
  // Unmasking sends the message and clears the pending bit.
  const uint32_t unmask = 0;
  CHECK(f.msix_write(2, 16 * 3 + 12, reinterpret_cast<const uint8_t*>(&unmask), 4, 0xf, 0) == MsixAccess::ok);
  CHECK(sink.size() == 1 && sink.got[0] == std::make_pair(uint64_t(0xfee0000c), uint32_t(0x103)));
  CHECK(!f.msix_pending(3));
  CHECK(f.raise_msix(3) == RaiseResult::sent && sink.size() == 2);
  // Function Mask masks every vector; clearing it sends what is pending.
  wr(f, uint16_t(m + msix_cap::kControl), 2, msix_cap::kEnable | msix_cap::kFunctionMask);
  CHECK(f.raise_msix(3) == RaiseResult::pending && sink.size() == 2);
  wr(f, uint16_t(m + msix_cap::kControl), 2, msix_cap::kEnable);
  CHECK(sink.size() == 3 && !f.msix_pending(3));
  // §6.1.4.5: a pending bit cleared by the function (condition gone) sends nothing later.
  CHECK(f.raise_msix(7) == RaiseResult::pending);
  f.clear_msix_pending(7);
  const uint32_t unmask7 = 0;
  f.msix_write(2, 16 * 7 + 12, reinterpret_cast<const uint8_t*>(&unmask7), 4, 0xf, 0);
  CHECK(sink.size() == 3);
  // Bus Master Enable clear: no Memory Write may be sent; held pending until it is set.
  wr(f, reg::kCommand, 2, command::kMemorySpace);
  CHECK(f.raise_msix(3) == RaiseResult::pending);
  wr(f, reg::kCommand, 2, command::kMemorySpace | command::kBusMaster);
  CHECK(sink.size() == 4 && !f.msix_pending(3));
  CHECK(f.raise_msix(64) == RaiseResult::bad_vector);
}

void test_msix_access_rules() {
  Function f(compile(spec()), nullptr);
  // §7.7.2: aligned full DW or QW only; anything else is undefined and ignored here.
  const uint8_t ones[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  CHECK(f.msix_write(2, 16, ones, 4, 0x3, 0) == MsixAccess::undefined_size);
  CHECK(f.msix_write(2, 20, ones, 8, 0xf, 0xf) == MsixAccess::undefined_size);  // QW not QW-aligned
  uint8_t out[8] = {};
  f.msix_read(2, 16, 4, out);
  CHECK(out[0] == 0 && out[3] == 0);
  // Message Address bits 1:0 and Vector Control bits 31:1 are reserved: read 0.
  CHECK(f.msix_write(2, 16, ones, 8, 0xf, 0xf) == MsixAccess::ok);
  CHECK(f.msix_write(2, 28, ones, 4, 0xf, 0) == MsixAccess::ok);
  CHECK(f.msix_read(2, 16, 8, out) == MsixAccess::ok);
  CHECK(out[0] == 0xfc && out[4] == 0xff);
  CHECK(f.msix_read(2, 28, 4, out) == MsixAccess::ok && out[0] == 1 && out[1] == 0 && out[3] == 0);
  // PBA is read-only; a table/PBA straddling access is refused.
  CHECK(f.msix_write(2, 0x2000, ones, 8, 0xf, 0xf) == MsixAccess::read_only);
  CHECK(f.msix_hit(2, 64 * 16 - 4, 8).region == MsixRegion::straddles);
  CHECK(f.msix_hit(0, 0, 4).region == MsixRegion::none);
  CHECK(f.msix_hit(2, 0x2000, 8).region == MsixRegion::pba);
}

// A raise racing the unmask that ends a masked period (§6.1.4.5): whichever wins, the
// message is sent exactly once and nothing stays pending; no later unmask rescues a lost one.
void test_msix_exactly_once_concurrent() {
  Sink sink;
  Function f(compile(spec()), &sink);
  const uint16_t m = find_cap(f, cap_id::kMsix);
  program_msix(f, 64);
  for (uint16_t k = 0; k < 64; ++k) {
    const uint32_t z = 0;
    f.msix_write(2, 16u * k + 12, reinterpret_cast<const uint8_t*>(&z), 4, 0xf, 0);
  }
  constexpr int kRounds = 20000;
  std::atomic<int> go{-1}, done{-1};  // seq_cst: a round's start and end handshake
  std::thread t([&] {
    for (int r = 0; r < kRounds; ++r) {
      while (go.load() != r) {
      }
      f.raise_msix(uint16_t(r % 64));
      done.store(r);
    }
  });
  int bad = 0;
  for (int r = 0; r < kRounds; ++r) {
    wr(f, uint16_t(m + msix_cap::kControl), 2, msix_cap::kEnable | msix_cap::kFunctionMask);
    const size_t before = sink.size();
    go.store(r);
    wr(f, uint16_t(m + msix_cap::kControl), 2, msix_cap::kEnable);  // races the raise
    while (done.load() != r) {
    }
    if (sink.size() != before + 1 || f.msix_pending(uint16_t(r % 64))) ++bad;
  }
  t.join();
  CHECK(bad == 0);
  if (bad != 0) std::fprintf(stderr, "%d of %d rounds lost or duplicated a message\n", bad, kRounds);
}

void test_snapshot_restore() {
  auto layout = compile(spec());
  Function f(layout, nullptr);
  program_msix(f, 64);
  wr(f, 0x18, 4, 0xe0004000);
  f.raise_msix(5);  // MSI-X disabled: nothing; then pending under Function Mask
  const uint16_t m = find_cap(f, cap_id::kMsix);
  wr(f, uint16_t(m + msix_cap::kControl), 2, msix_cap::kEnable | msix_cap::kFunctionMask);
  f.raise_msix(5);
  std::vector<uint8_t> snap(Function::state_size());
  f.snapshot(snap.data(), snap.size());
  // A successor in caller memory (as in shared memory) continues from the same state.
  auto mem = std::make_unique<FunctionState>();
  std::memcpy(mem.get(), snap.data(), snap.size());
  Function g(layout, nullptr, mem.get(), Function::Adopt::keep);
  CHECK(rd(g, 0x18, 4) == 0xe0004000 && g.msix_pending(5));
  // cmask: a read-only bit changed in the snapshot is refused, naming the byte.
  std::vector<uint8_t> bad = snap;
  bad[offsetof(FunctionState, config) + reg::kDeviceId] ^= 1;
  CHECK_THROWS_KIND(g.restore(bad.data(), bad.size()), ErrorKind::invalid_argument, EINVAL);
  CHECK(rd(g, reg::kDeviceId, 2) == 0x1234);  // unchanged
  bad = snap;
  reinterpret_cast<FunctionState*>(bad.data())->header.version = 2;
  CHECK_THROWS_KIND(g.restore(bad.data(), bad.size()), ErrorKind::invalid_argument, EPROTO);
  FunctionSpec other = spec();
  other.identity.device_id = 0x4321;
  Function h(compile(other), nullptr);
  CHECK_THROWS_KIND(h.restore(snap.data(), snap.size()), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(h.restore(snap.data(), snap.size() - 1), ErrorKind::invalid_argument, EINVAL);
  bad = snap;
  reinterpret_cast<FunctionState*>(bad.data())->msix.table[4 * 70] = 5;  // beyond the table
  CHECK_THROWS_KIND(g.restore(bad.data(), bad.size()), ErrorKind::invalid_argument, EINVAL);
  g.restore(snap.data(), snap.size());
  CHECK(g.msix_pending(5));
}

}  // namespace

int main() {
  test_msix_masking();
  test_msix_access_rules();
  test_msix_exactly_once_concurrent();
  test_snapshot_restore();
  return mlx5tlp_test::finish("test_msix");
}
