// libFuzzer target: the configuration-space model (cpp/src/config_space.cpp, function.cpp).
//
// Input: a spec byte (bit 0 D1, bit 1 D2, bit 2 soft reset on D3hot->D0, bits 3-4 the
// Max_Payload_Size Supported, bit 5 no MSI-X), then 8-byte operations
// <u8 op><u16 offset><u32 value><u8 byte enables> (LE) on a function compiled from the C++
// tests' spec (tests/cpp/function_fixture.hpp):
//   0 config write   1 config read   2/3/4 config write relative to the PCI Express / MSI-X /
//   Power Management capability   5 MSI-X table write   6 snapshot + restore
//   7 restore of a snapshot with one byte changed   8 raise an MSI-X vector
// Properties (PCIe Base 6.x §7.4 register types, §7.5.2.2 PowerState):
//  * a host write changes only enabled bytes; in them read-only bits keep their value, RW bits
//    take the written value (but an unsupported PowerState, which is discarded), RW1C bits
//    only clear where a 1 was written; D3hot -> D0 with soft reset restores every register;
//  * after every operation every read-only / reserved bit holds its compiled value
//    (ConfigSpace::check), a snapshot passes check_state() (what host writes reach can always be
//    handed over), and the completion parameters are valid (MPS a power of two, <= Supported;
//    RCB 64 or 128);
//  * restore() of a damaged snapshot either throws mlx5tlp::Error and changes nothing, or
//    accepts a state that satisfies the same checks.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "function_fixture.hpp"
#include "fuzz_check.hpp"
#include "mlx5tlp/error.hpp"

using namespace mlx5tlp::pci;

namespace {

struct NullSink : InterruptSink {
  void deliver(uint64_t, uint32_t) noexcept override {}
};

std::vector<uint8_t> snapshot(const Function& f) {
  std::vector<uint8_t> s(Function::state_size());
  f.snapshot(s.data(), s.size());
  return s;
}

void check_invariants(const Function& f) {
  const ConfigTemplate& t = f.layout().config;
  ConfigMismatch m;
  FUZZ_CHECK(ConfigSpace::check(t, f.config().bytes(), &m),
             "read-only byte 0x%03x is %02x, compiled %02x (mask %02x)", m.offset, m.found,
             m.expected, m.checked);
  const std::vector<uint8_t> s = snapshot(f);
  try {
    f.check_state(*reinterpret_cast<const FunctionState*>(s.data()));
  } catch (const mlx5tlp::Error& e) {
    FUZZ_CHECK(false, "a state reached by host writes is refused: %s", e.what());
  }
  const mlx5tlp::tlp::CompletionParams p = f.completion_params(0);
  const unsigned mps = p.max_payload;
  FUZZ_CHECK(mps >= 128 && mps <= f.layout().max_payload_supported && (mps & (mps - 1)) == 0,
             "Max_Payload_Size %u (supported %u)", mps, f.layout().max_payload_supported);
  FUZZ_CHECK(p.rcb == 64 || p.rcb == 128, "RCB %u", p.rcb);
  FUZZ_CHECK(f.power_state() <= 3, "power state %u", f.power_state());
}

void host_write(Function& f, uint16_t off, uint32_t value, uint8_t be) {
  const ConfigTemplate& t = f.layout().config;
  const uint16_t dw = off & 0xffc;
  const uint16_t pmcsr = uint16_t(f.layout().pm + pm::kPmcsr);
  uint8_t before[kConfigSize];
  std::memcpy(before, f.config().bytes(), kConfigSize);
  const unsigned from = f.power_state();
  f.config_write(off, value, be);
  const uint8_t* now = f.config().bytes();
  if (from == pm::kD3hot && f.power_state() == pm::kD0 && !f.layout().no_soft_reset) {
    FUZZ_CHECK(std::memcmp(now, t.init, kConfigSize) == 0, "D3hot->D0 soft reset left state");
    return;
  }
  for (unsigned o = 0; o < kConfigSize; ++o) {
    const bool enabled = o >= dw && o < dw + 4u && (be >> (o - dw) & 1u) != 0;
    if (!enabled) {
      FUZZ_CHECK(now[o] == before[o], "byte 0x%03x changed by a write to DW 0x%03x BE %x", o, dw, be);
      continue;
    }
    const uint8_t v = uint8_t(value >> (8 * (o - dw)));
    const uint8_t wm = t.wmask[o], w1c = t.w1cmask[o], ro = uint8_t(~(wm | w1c));
    FUZZ_CHECK((now[o] & ro) == (before[o] & ro), "read-only bits of 0x%03x changed: %02x -> %02x",
               o, before[o], now[o]);
    FUZZ_CHECK((now[o] & w1c) == (before[o] & w1c & ~v), "RW1C bits of 0x%03x: %02x, wrote %02x -> %02x",
               o, before[o], v, now[o]);
    const bool power_state_byte = o == pmcsr;  // an unsupported state is discarded (§7.5.2.2)
    const uint8_t checked = power_state_byte ? uint8_t(wm & ~pm::kStateMask) : wm;
    FUZZ_CHECK((now[o] & checked) == (v & checked), "RW bits of 0x%03x: wrote %02x, reads %02x", o, v,
               now[o]);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  // Compiled once per spec variant: compile() is not what this target fuzzes.
  static std::shared_ptr<const FunctionLayout> layouts[64];
  const uint8_t v = data[0] & 0x3f;
  if (!layouts[v]) {
    FunctionSpec s = function_fixture::spec();
    s.power_management.d1 = (v & 1) != 0;
    s.power_management.d2 = (v & 2) != 0;
    s.power_management.no_soft_reset = (v & 4) == 0;
    s.pcie.max_payload_supported = uint16_t(128u << ((v >> 3) & 3));
    if ((v & 0x20) != 0) s.msix.vectors = 0;
    layouts[v] = compile(s);  // every variant is valid: a throw is a finding
  }
  const std::shared_ptr<const FunctionLayout>& layout = layouts[v];
  NullSink sink;
  Function f(layout, &sink);
  check_invariants(f);
  for (size_t at = 1; at + 8 <= size; at += 8) {
    const uint8_t op = data[at] % 9;
    uint16_t off;
    uint32_t value;
    std::memcpy(&off, data + at + 1, 2);
    std::memcpy(&value, data + at + 3, 4);
    const uint8_t be = data[at + 7] & 0xf;
    const FunctionLayout& L = *layout;
    switch (op) {
      case 0: host_write(f, off, value, be); break;
      case 1: {
        const uint32_t r = f.config_read(off);
        FUZZ_CHECK(r == load_le(f.config().bytes() + (off & 0xffc), 4), "config_read 0x%03x", off & 0xffc);
        break;
      }
      case 2: host_write(f, uint16_t(L.pcie + (off & 0x3f)), value, be); break;
      case 3: host_write(f, uint16_t(L.msix + (off & 0xf)), value, be); break;
      case 4: host_write(f, uint16_t(L.pm + (off & 0x7)), value, be); break;
      case 5: {
        uint8_t d[4];
        store_le(d, 4, value);
        f.msix_write(L.msix_params.table_bar, uint64_t(L.msix_params.table_offset) + (off & 0x7fff), d, 4,
                     be, 0);
        uint8_t back[4];
        f.msix_read(L.msix_params.table_bar, uint64_t(L.msix_params.table_offset) + (off & 0x7fff), 4, back);
        break;
      }
      case 6: {
        const std::vector<uint8_t> snap = snapshot(f);
        f.restore(snap.data(), snap.size());
        FUZZ_CHECK(snapshot(f) == snap, "restore(snapshot()) changed the state");
        break;
      }
      case 7: {
        std::vector<uint8_t> snap = snapshot(f);
        const std::vector<uint8_t> orig = snap;
        snap[(size_t(off) * 9 + value) % snap.size()] ^= uint8_t(value >> 24 | 1);
        try {
          f.restore(snap.data(), snap.size());
        } catch (const mlx5tlp::Error&) {
          FUZZ_CHECK(snapshot(f) == orig, "a refused restore changed the state");
        }
        break;
      }
      case 8:
        if (L.msix_params.vectors != 0) f.raise_msix(uint16_t(off % L.msix_params.vectors));
        break;
    }
    check_invariants(f);
  }
  return 0;
}
