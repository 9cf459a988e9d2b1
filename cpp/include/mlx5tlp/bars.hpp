// mlx5tlp/bars.hpp — Base Address Registers, the Expansion ROM BAR and address decode.
//
// BAR sizing falls out of the masks (PCIe Base 6.x §7.5.1.2.1): the address bits below the
// size are read-only zero and the type bits (3:0 memory, 1:0 I/O) are read-only, so writing
// all-ones reads back the size mask with the type bits; an unimplemented BAR is hardwired 0.
//   memory 32-bit : power of two, 128 bytes (the PCIe minimum, §7.5.1.2.1 "The minimum Memory
//                   Space address range requested by a BAR is 128 bytes") .. 2 GiB
//   memory 64-bit : two registers (the BAR and the next one), 128 bytes .. 2^63; not in slot 5
//   prefetchable  : memory only, and 64-bit only ("For a PCI Express Endpoint, 64-bit
//                   addressing must be supported for all BARs that have the Prefetchable bit
//                   Set", §1.3.2.2)
//   I/O           : power of two, 16 .. 256 bytes (§7.5.1.2.1: "from 16 bytes to 256 Bytes
//                   (I/O Space)"; "must not consume more than 256 bytes per I/O BAR")
//   Expansion ROM : offset 30h, power of two 2 KiB .. 16 MiB (§7.5.1.2.4: address bits 31:11,
//                   "must not be greater than 16 MB"), Enable bit 0 RW.
// Decode: a memory address hits a BAR only while Memory Space Enable is set; the ROM only
// while both Memory Space Enable and Expansion ROM Enable are set (§7.5.1.2.4: "The Memory
// Space Enable bit in the Command register has precedence"); I/O only while I/O Space Enable
// is set. Anything else is the engine's Unsupported Request (§7.5.1.1.3 Table 7-4).
// Thread-safety: BarTable is immutable after compile; decode reads the config bytes and is
// called by the thread that owns the ConfigSpace.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mlx5tlp/config_space.hpp"

namespace mlx5tlp::pci {

inline constexpr int kBarCount = 6;
inline constexpr int kRomBar = 6;  // decode's index for the Expansion ROM

enum class BarKind : uint8_t { none = 0, mem32 = 1, mem64 = 2, io = 3 };
const char* bar_kind_name(BarKind k) noexcept;

struct BarSpec {
  uint8_t index = 0;  // register slot 0..5 (a 64-bit BAR also takes index + 1)
  BarKind kind = BarKind::mem32;
  uint64_t size = 0;
  bool prefetchable = false;
};

struct RomSpec {
  uint32_t size = 0;  // 0: no Expansion ROM (the register is hardwired 0)
};

// What the compiled function decodes, per register slot.
struct BarTable {
  BarKind kind[kBarCount] = {};       // none for unused slots and for the upper half of a pair
  uint64_t size[kBarCount] = {};
  bool prefetchable[kBarCount] = {};
  bool upper_half[kBarCount] = {};    // slot holds bits 63:32 of the BAR below it
  uint32_t rom_size = 0;

  bool is_memory(int i) const noexcept { return kind[i] == BarKind::mem32 || kind[i] == BarKind::mem64; }
};

// Validates `bars` and `rom` and defines their registers in `t`. Errors name the field
// (e.g. "bars[2].size: 100 is not a power of two"): Error kind invalid_argument, EINVAL.
void compile_bars(const std::vector<BarSpec>& bars, const RomSpec& rom, ConfigTemplate* t,
                  BarTable* out);

enum class Decode : uint8_t {
  hit = 0,      // bar/offset valid
  disabled,     // the space's Command enable is clear (or the function is not in D0)
  unclaimed,    // no BAR of this function claims the address
  crosses_end,  // starts in a BAR but runs past its end
};
const char* decode_name(Decode d) noexcept;

struct DecodeResult {
  Decode status = Decode::unclaimed;
  int8_t bar = -1;      // 0..5, or kRomBar
  uint64_t offset = 0;  // from the BAR's base
};

// The base address a BAR (or the ROM, kRomBar) is currently programmed with.
uint64_t bar_base(const BarTable& b, const ConfigSpace& cs, int bar) noexcept;

// Which BAR a memory request [addr, addr + len) hits; `enabled` is the function's effective
// Memory Space Enable. len 0 (a zero-length read) decodes as one byte.
DecodeResult decode_memory(const BarTable& b, const ConfigSpace& cs, uint64_t addr, uint32_t len,
                           bool enabled) noexcept;
// The same for an I/O request (32-bit I/O addresses, §7.5.1.2.1).
DecodeResult decode_io(const BarTable& b, const ConfigSpace& cs, uint32_t addr, uint32_t len,
                       bool enabled) noexcept;

}  // namespace mlx5tlp::pci
