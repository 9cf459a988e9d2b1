// mlx5tlp/config_space.hpp — a PCIe function's 4096-byte configuration space.
//
// The model is QEMU's PCI core (hw/pci/pci.c): the bytes themselves plus parallel per-byte
// masks compiled once from the declarative spec (function_spec.hpp), so that ONE generic write
// routine applies every register's semantics and no register needs its own `if`:
//   wmask    1 = the host may write the bit (RW)
//   w1cmask  1 = writing 1 clears the bit, writing 0 leaves it (RW1C)
//   cmask    1 = the bit is fixed by the spec (RO, HwInit, reserved): a restored snapshot must
//              hold exactly the compiled value there (handover refuses anything else)
//   used     1 = the byte belongs to the header or to a capability (overlap checks)
// Bits in none of wmask/w1cmask are read-only for the host. Reserved bits (RsvdP, RsvdZ) are
// read-only zero on the device side: PCIe Base 6.x §7.4 "Configuration Register Types" has
// software preserve RsvdP bits, the device returns 0 and ignores writes to them.
//
// State: the bytes live in caller memory (ConfigSpace is a view), so that they can sit in
// shared memory and be snapshotted as bytes; the template is immutable and shared.
// Thread-safety: ConfigTemplate is immutable after compile (share it freely). A ConfigSpace
// is used by one thread at a time (the engine thread serving configuration requests); it
// takes no locks and never allocates.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlx5tlp::pci {

inline constexpr uint32_t kConfigSize = 4096;   // PCIe extended configuration space
inline constexpr uint32_t kLegacyConfigSize = 256;
inline constexpr uint32_t kExtCapStart = 0x100;

// Type-0 header registers (PCIe Base 6.x §7.5.1.1 and §7.5.1.2).
namespace reg {
inline constexpr uint16_t kVendorId = 0x00, kDeviceId = 0x02, kCommand = 0x04, kStatus = 0x06;
inline constexpr uint16_t kRevision = 0x08, kProgIf = 0x09, kSubClass = 0x0a, kBaseClass = 0x0b;
inline constexpr uint16_t kCacheLineSize = 0x0c, kLatencyTimer = 0x0d, kHeaderType = 0x0e;
inline constexpr uint16_t kBist = 0x0f, kBar0 = 0x10, kCardbusCis = 0x28;
inline constexpr uint16_t kSubsystemVendorId = 0x2c, kSubsystemId = 0x2e, kExpansionRom = 0x30;
inline constexpr uint16_t kCapPtr = 0x34, kInterruptLine = 0x3c, kInterruptPin = 0x3d;
inline constexpr uint16_t kMinGnt = 0x3e, kMaxLat = 0x3f, kHeaderEnd = 0x40;
}  // namespace reg

// Command register bits (§7.5.1.1.3, Table 7-4).
namespace command {
inline constexpr uint16_t kIoSpace = 1u << 0, kMemorySpace = 1u << 1, kBusMaster = 1u << 2;
inline constexpr uint16_t kParityErrorResponse = 1u << 6, kSerrEnable = 1u << 8;
inline constexpr uint16_t kInterruptDisable = 1u << 10;
}  // namespace command

// Status register bits (§7.5.1.1.4, Table 7-5).
namespace status {
inline constexpr uint16_t kInterruptStatus = 1u << 3, kCapabilitiesList = 1u << 4;
inline constexpr uint16_t kMasterDataParityError = 1u << 8, kSignaledTargetAbort = 1u << 11;
inline constexpr uint16_t kReceivedTargetAbort = 1u << 12, kReceivedMasterAbort = 1u << 13;
inline constexpr uint16_t kSignaledSystemError = 1u << 14, kDetectedParityError = 1u << 15;
inline constexpr uint16_t kRw1cBits = kMasterDataParityError | kSignaledTargetAbort |
                                      kReceivedTargetAbort | kReceivedMasterAbort |
                                      kSignaledSystemError | kDetectedParityError;
}  // namespace status

// The compiled description of a function's configuration space: reset image and masks.
// Built once (function_spec.cpp, capabilities.cpp), then read-only. 5 x 4 KiB, no pointers.
struct ConfigTemplate {
  uint8_t init[kConfigSize];
  uint8_t wmask[kConfigSize];
  uint8_t w1cmask[kConfigSize];
  uint8_t cmask[kConfigSize];
  uint8_t used[kConfigSize];

  // Everything read-only zero and checked on restore; nothing used.
  ConfigTemplate() noexcept;

  // Define `width` (1, 2, 4 or 8) little-endian bytes at `offset`: reset value, writable bits
  // and write-1-to-clear bits. Bits in neither mask are read-only (and checked on restore);
  // `wm & w1c` must be 0. Marks the bytes used. Does not check overlap (see claim()).
  void set(uint16_t offset, unsigned width, uint64_t value, uint64_t wm = 0,
           uint64_t w1c = 0) noexcept;
  // Read-only bits the device itself changes at run time (e.g. a header log): not checked on
  // restore.
  void set_volatile(uint16_t offset, unsigned width, uint64_t bits) noexcept;
  // Whether [offset, offset + len) is free; marks it used when it is.
  bool claim(uint16_t offset, uint32_t len) noexcept;
  bool is_free(uint16_t offset, uint32_t len) const noexcept;

  uint64_t get_init(uint16_t offset, unsigned width) const noexcept;
  // FNV-1a 64 over the image and all masks: two templates with the same digest give every
  // register the same semantics (the "masks version" carried by a snapshot).
  uint64_t digest() const noexcept;
};

// Little-endian helpers over raw bytes (configuration space is little-endian, §7.2).
inline uint64_t load_le(const uint8_t* p, unsigned width) noexcept {
  uint64_t v = 0;
  for (unsigned i = 0; i < width; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}
inline void store_le(uint8_t* p, unsigned width, uint64_t v) noexcept {
  for (unsigned i = 0; i < width; ++i) p[i] = uint8_t(v >> (8 * i));
}

// Where a snapshot differs from what the template allows (restore checks).
struct ConfigMismatch {
  uint16_t offset = 0;  // first offending byte
  uint8_t expected = 0;  // the template's value of the checked bits
  uint8_t found = 0;     // the snapshot's value of the checked bits
  uint8_t checked = 0;   // cmask of that byte
};

// The bytes of one function's configuration space, interpreted through a template.
class ConfigSpace {
 public:
  // `bytes` (kConfigSize bytes, caller-owned, e.g. in shared memory) must outlive the view.
  ConfigSpace(const ConfigTemplate* t, uint8_t* bytes) noexcept : t_(t), b_(bytes) {}

  // Conventional reset: every byte to its compiled reset value.
  void reset() noexcept;

  // Reads are a copy. `offset + n` must be <= kConfigSize (callers check; see in_range()).
  uint32_t read32(uint16_t dw_offset) const noexcept { return uint32_t(load_le(b_ + dw_offset, 4)); }
  uint64_t read(uint16_t offset, unsigned width) const noexcept { return load_le(b_ + offset, width); }
  const uint8_t* bytes() const noexcept { return b_; }

  // The one write routine of a Configuration Write Request: one DW at `dw_offset` (a multiple
  // of 4 below kConfigSize), byte i of `value` written where bit i of `byte_enables` (First DW
  // BE, PCIe Base §2.2.7) is set. For each enabled byte:
  //   new = (old & ~wmask) | (value & wmask);  new &= ~(value & w1cmask)
  // Returns a 4-bit mask of the bytes whose value changed. Never fails: out-of-range offsets
  // are the caller's to refuse (in_range()).
  uint8_t write(uint16_t dw_offset, uint32_t value, uint8_t byte_enables) noexcept;

  // Device-side updates (the function's own logic, not the host): bypass the masks.
  void device_write(uint16_t offset, unsigned width, uint64_t value) noexcept {
    store_le(b_ + offset, width, value);
  }
  void device_set_bits(uint16_t offset, unsigned width, uint64_t bits) noexcept {
    device_write(offset, width, read(offset, width) | bits);
  }

  // Whether `bytes` (kConfigSize) holds the template's value in every checked bit; the first
  // offending byte in *where otherwise. (QEMU's get_pci_config_device check.)
  static bool check(const ConfigTemplate& t, const uint8_t* bytes, ConfigMismatch* where) noexcept;

  static constexpr bool in_range(uint32_t offset, uint32_t len) noexcept {
    return len <= kConfigSize && offset <= kConfigSize - len;
  }

  const ConfigTemplate& config_template() const noexcept { return *t_; }

 private:
  const ConfigTemplate* t_;
  uint8_t* b_;
};

}  // namespace mlx5tlp::pci
