#include "mlx5tlp/bars.hpp"

#include "mlx5tlp/capabilities.hpp"  // spec_error, hex

namespace mlx5tlp::pci {

const char* bar_kind_name(BarKind k) noexcept {
  switch (k) {
    case BarKind::mem32: return "mem32";
    case BarKind::mem64: return "mem64";
    case BarKind::io: return "io";
    case BarKind::none: break;
  }
  return "none";
}

const char* decode_name(Decode d) noexcept {
  switch (d) {
    case Decode::hit: return "hit";
    case Decode::disabled: return "disabled";
    case Decode::unclaimed: return "unclaimed";
    case Decode::crosses_end: return "crosses_end";
  }
  return "?";
}

static bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

void compile_bars(const std::vector<BarSpec>& bars, const RomSpec& rom, ConfigTemplate* t,
                  BarTable* out) {
  *out = BarTable{};
  bool taken[kBarCount] = {};
  for (size_t i = 0; i < bars.size(); ++i) {
    const BarSpec& b = bars[i];
    const std::string f = "bars[" + std::to_string(i) + "]";
    if (b.index >= kBarCount) spec_error(f + ".index", std::to_string(b.index) + " is not 0..5");
    const int n = b.kind == BarKind::mem64 ? 2 : 1;
    if (b.kind == BarKind::mem64 && b.index == kBarCount - 1)
      spec_error(f + ".index", "a 64-bit BAR takes two registers; slot 5 has no upper half");
    for (int k = 0; k < n; ++k)
      if (taken[b.index + k])
        spec_error(f + ".index", "register " + std::to_string(b.index + k) +
                                     " is already used by another BAR");
    if (!is_pow2(b.size)) spec_error(f + ".size", std::to_string(b.size) + " is not a power of two");
    uint32_t type = 0;
    switch (b.kind) {
      case BarKind::mem32:
        if (b.size < 128 || b.size > (uint64_t(1) << 31))
          spec_error(f + ".size", std::to_string(b.size) + " is outside [128, 2 GiB] for a 32-bit "
                                                             "memory BAR (PCIe Base §7.5.1.2.1)");
        if (b.prefetchable)
          spec_error(f + ".prefetchable", "a prefetchable BAR of a PCI Express Endpoint must be "
                                          "64-bit (PCIe Base §1.3.2.2)");
        type = 0;
        break;
      case BarKind::mem64:
        if (b.size < 128 || b.size > (uint64_t(1) << 63))
          spec_error(f + ".size", std::to_string(b.size) + " is outside [128, 2^63] for a 64-bit "
                                                             "memory BAR (PCIe Base §7.5.1.2.1)");
        type = 0x4 | (b.prefetchable ? 0x8u : 0);  // bits 2:1 = 10b; bit 3 prefetchable
        break;
      case BarKind::io:
        if (b.size < 16 || b.size > 256)
          spec_error(f + ".size", std::to_string(b.size) + " is outside [16, 256] for an I/O BAR "
                                                             "(PCIe Base §7.5.1.2.1)");
        if (b.prefetchable) spec_error(f + ".prefetchable", "only memory BARs are prefetchable");
        type = 0x1;
        break;
      case BarKind::none:
        spec_error(f + ".kind", "must be mem32, mem64 or io");
    }
    const uint64_t addr_mask = ~(b.size - 1);
    const uint16_t r = uint16_t(reg::kBar0 + 4 * b.index);
    const uint32_t low_ro = b.kind == BarKind::io ? 0x3u : 0xfu;
    t->set(r, 4, type, uint32_t(addr_mask) & ~low_ro);
    if (b.kind == BarKind::mem64) t->set(uint16_t(r + 4), 4, 0, uint32_t(addr_mask >> 32));
    for (int k = 0; k < n; ++k) taken[b.index + k] = true;
    out->kind[b.index] = b.kind;
    out->size[b.index] = b.size;
    out->prefetchable[b.index] = b.prefetchable;
    if (n == 2) out->upper_half[b.index + 1] = true;
  }
  // Unimplemented BARs: hardwired to zero (the template's default), marked used.
  for (int i = 0; i < kBarCount; ++i)
    if (!taken[i]) t->set(uint16_t(reg::kBar0 + 4 * i), 4, 0);

  if (rom.size != 0) {
    if (!is_pow2(rom.size) || rom.size < 2048 || rom.size > (16u << 20))
      spec_error("expansion_rom.size", std::to_string(rom.size) + " is not a power of two in "
                                                                  "[2 KiB, 16 MiB] (PCIe Base §7.5.1.2.4)");
    // Bits 31:11 base address (the implemented ones RW), 0 Enable RW, 10:1 RO 0 here.
    t->set(reg::kExpansionRom, 4, 0, (~(rom.size - 1) & 0xfffff800u) | 1u);
  } else {
    t->set(reg::kExpansionRom, 4, 0);
  }
  out->rom_size = rom.size;
}

uint64_t bar_base(const BarTable& b, const ConfigSpace& cs, int bar) noexcept {
  if (bar == kRomBar) return cs.read32(reg::kExpansionRom) & 0xfffff800u;
  if (bar < 0 || bar >= kBarCount) return 0;
  const uint16_t r = uint16_t(reg::kBar0 + 4 * bar);
  switch (b.kind[bar]) {
    case BarKind::mem32: return cs.read32(r) & ~0xfu;
    case BarKind::mem64: return (cs.read32(r) & ~0xfull) | uint64_t(cs.read32(uint16_t(r + 4))) << 32;
    case BarKind::io: return cs.read32(r) & ~0x3u;
    case BarKind::none: break;
  }
  return 0;
}

// [addr, addr + len) against [base, base + size), without overflow.
static DecodeResult match(uint64_t addr, uint64_t len, uint64_t base, uint64_t size, int bar) {
  DecodeResult r;
  if (addr < base || addr - base >= size) return r;
  r.bar = int8_t(bar);
  r.offset = addr - base;
  r.status = len <= size - r.offset ? Decode::hit : Decode::crosses_end;
  return r;
}

DecodeResult decode_memory(const BarTable& b, const ConfigSpace& cs, uint64_t addr, uint32_t len,
                           bool enabled) noexcept {
  DecodeResult r;
  if (!enabled) {
    r.status = Decode::disabled;
    return r;
  }
  const uint64_t n = len == 0 ? 1 : len;
  for (int i = 0; i < kBarCount; ++i) {
    if (!b.is_memory(i)) continue;
    r = match(addr, n, bar_base(b, cs, i), b.size[i], i);
    if (r.bar >= 0) return r;
  }
  if (b.rom_size != 0 && (cs.read32(reg::kExpansionRom) & 1u) != 0) {
    r = match(addr, n, bar_base(b, cs, kRomBar), b.rom_size, kRomBar);
    if (r.bar >= 0) return r;
  }
  return DecodeResult{};
}

DecodeResult decode_io(const BarTable& b, const ConfigSpace& cs, uint32_t addr, uint32_t len,
                       bool enabled) noexcept {
  DecodeResult r;
  if (!enabled) {
    r.status = Decode::disabled;
    return r;
  }
  const uint64_t n = len == 0 ? 1 : len;
  for (int i = 0; i < kBarCount; ++i) {
    if (b.kind[i] != BarKind::io) continue;
    r = match(addr, n, bar_base(b, cs, i), b.size[i], i);
    if (r.bar >= 0) return r;
  }
  return DecodeResult{};
}

}  // namespace mlx5tlp::pci
