// mlx5tlp/capabilities.hpp — capability structures compiled into a ConfigTemplate.
//
// Each capability is added by one call that places it (at a declared offset, or the first
// free DW-aligned gap), links it into its list and defines every register with its reset
// value and masks (config_space.hpp). Two lists, as PCIe Base 6.x §7.5.1.1.11 and §7.6 define:
//   * capabilities in PCI-compatible space: Capabilities Pointer at 0x34, each header
//     {ID, Next} at a DW-aligned offset in [0x40, 0x100), Status bit 4 set;
//   * extended capabilities from 0x100: header {ID[15:0], Version[19:16], Next[31:20]}; the
//     first is at 0x100 (a header of zeros there means "none", §7.6.3).
// Built-in structures (section and table of PCIe Base 6.x):
//   PCI Express (ID 10h, §7.5.3, version 2, Endpoint)     Power Management (01h, §7.5.2)
//   MSI-X (11h, §7.7.2)                                   Vendor-Specific (09h, §7.9.4)
//   AER (ext 0001h, §7.8.4, version 2)                    Device Serial Number (ext 0003h, §7.9.3)
//   Vendor-Specific Extended (ext 000Bh, §7.9.5)
// Errors: mlx5tlp::Error kind invalid_argument, errno EINVAL, the message naming the spec
// field at fault (e.g. "... msix.offset: 0x41 is not DW-aligned").
// Thread-safety: the builder is single-threaded compile-time code (it allocates; the run-time
// paths never call it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mlx5tlp/config_space.hpp"

namespace mlx5tlp::pci {

namespace cap_id {
inline constexpr uint8_t kPowerManagement = 0x01, kVendorSpecific = 0x09, kPciExpress = 0x10;
inline constexpr uint8_t kMsix = 0x11;
}  // namespace cap_id
namespace ext_cap_id {
inline constexpr uint16_t kAer = 0x0001, kSerialNumber = 0x0003, kVendorSpecific = 0x000b;
}  // namespace ext_cap_id

// Register offsets inside the PCI Express Capability (§7.5.3, Figure 7-20).
namespace pcie {
inline constexpr uint16_t kCaps = 0x02, kDevCap = 0x04, kDevCtl = 0x08, kDevSta = 0x0a;
inline constexpr uint16_t kLinkCap = 0x0c, kLinkCtl = 0x10, kLinkSta = 0x12;
inline constexpr uint16_t kDevCap2 = 0x24, kDevCtl2 = 0x28, kLinkCap2 = 0x2c, kLinkCtl2 = 0x30;
inline constexpr uint16_t kSize = 0x3c;  // version 2, through Slot Status 2
inline constexpr uint16_t kDevCtlMpsShift = 5, kDevCtlMrrsShift = 12;
inline constexpr uint16_t kLinkCtlRcb = 1u << 3;
inline constexpr uint16_t kDevCtl2CtdBit = 1u << 4;
// Device Control error reporting enables (§7.5.3.4): Correctable, Non-Fatal, Fatal, UR.
inline constexpr uint16_t kDevCtlCere = 1u << 0, kDevCtlNfere = 1u << 1, kDevCtlFere = 1u << 2;
inline constexpr uint16_t kDevCtlUrre = 1u << 3;
// Device Status error bits (§7.5.3.5): Correctable / Non-Fatal / Fatal / UR Detected (RW1C).
inline constexpr uint16_t kDevStaCed = 1u << 0, kDevStaNfed = 1u << 1, kDevStaFed = 1u << 2;
inline constexpr uint16_t kDevStaUrd = 1u << 3;
}  // namespace pcie
// Power Management (§7.5.2): PMC at +2, PMCSR at +4.
namespace pm {
inline constexpr uint16_t kPmc = 0x02, kPmcsr = 0x04, kSize = 0x08;
inline constexpr uint16_t kStateMask = 0x3, kNoSoftReset = 1u << 3;
inline constexpr uint8_t kD0 = 0, kD1 = 1, kD2 = 2, kD3hot = 3;
}  // namespace pm
// MSI-X capability (§7.7.2.1-7.7.2.4).
namespace msix_cap {
inline constexpr uint16_t kControl = 0x02, kTable = 0x04, kPba = 0x08, kSize = 0x0c;
inline constexpr uint16_t kFunctionMask = 1u << 14, kEnable = 1u << 15;
inline constexpr uint16_t kMaxVectors = 2048;  // Table Size is 11 bits, N-1 encoded
}  // namespace msix_cap
// AER (§7.8.4).
namespace aer {
inline constexpr uint16_t kUncorStatus = 0x04, kUncorMask = 0x08, kUncorSeverity = 0x0c;
inline constexpr uint16_t kCorStatus = 0x10, kCorMask = 0x14, kCapControl = 0x18;
inline constexpr uint16_t kHeaderLog = 0x1c, kSize = 0x38;
// Uncorrectable errors an Endpoint of this model can report (§7.8.4.2): Data Link Protocol
// (4), Poisoned TLP Received (12), Flow Control Protocol (13), Completion Timeout (14),
// Completer Abort (15), Unexpected Completion (16), Receiver Overflow (17), Malformed TLP
// (18), ECRC (19), Unsupported Request (20), Uncorrectable Internal Error (22).
inline constexpr uint32_t kUncorBits = 0x005ff010;
// Default severity (§7.8.4.4): DLP, FCP, Receiver Overflow, Malformed TLP, UIE are Fatal.
inline constexpr uint32_t kUncorSeverityDefault = 0x00462010;
// Correctable errors (§7.8.4.5): Receiver (0), Bad TLP (6), Bad DLLP (7), REPLAY_NUM
// Rollover (8), Replay Timer Timeout (12), Advisory Non-Fatal (13), Corrected Internal (14),
// Header Log Overflow (15).
inline constexpr uint32_t kCorBits = 0x0000f1c1;
inline constexpr uint32_t kCorMaskDefault = 0x00002000;  // Advisory Non-Fatal masked (§7.8.4.6)
// The Uncorrectable Error Status bits of the errors the engine detects as a Completer /
// Receiver (§7.8.4.2), and Advisory Non-Fatal Error Status in the Correctable one (§7.8.4.5).
inline constexpr uint32_t kUncPoisonedTlp = 1u << 12, kUncCompleterAbort = 1u << 15;
inline constexpr uint32_t kUncUnexpectedCompletion = 1u << 16, kUncMalformedTlp = 1u << 18;
inline constexpr uint32_t kUncUnsupportedRequest = 1u << 20;
inline constexpr uint32_t kCorAdvisoryNonFatal = 1u << 13;
inline constexpr uint32_t kFirstErrorPointerMask = 0x1f;  // Capabilities and Control 4:0
}  // namespace aer

// ---- parameters (the capability parts of FunctionSpec; field names = the spec format's) ----

struct PcieParams {
  uint16_t max_payload_supported = 256;  // bytes: 128 .. 4096, power of two (Device Cap 2:0)
  uint8_t max_link_speed = 2;            // 1 = 2.5 GT/s, 2 = 5.0, 3 = 8.0, 4 = 16.0, 5 = 32.0, 6 = 64.0
  uint8_t max_link_width = 8;            // lanes: 1, 2, 4, 8, 12, 16 or 32
  bool extended_tag = true;              // Extended Tag Field Supported (8-bit tags)
  uint8_t completion_timeout_ranges = 0x3;  // Device Cap 2 3:0: bit 0 = range A .. bit 3 = D
  bool completion_timeout_disable = true;   // Completion Timeout Disable Supported
  int offset = -1;                          // -1: first free
};

struct PmParams {
  bool d1 = false, d2 = false;  // D1/D2 support; D0 and D3hot always
  bool no_soft_reset = true;    // D3hot -> D0 keeps the function's state
  uint8_t pme_support = 0;      // PMC 15:11 (bit n: PME from Dn, bit 4: D3cold)
  int offset = -1;
};

struct MsixParams {
  uint16_t vectors = 0;  // 0: no MSI-X capability; else 1 .. 2048
  uint8_t table_bar = 0;
  uint32_t table_offset = 0;  // QW aligned
  uint8_t pba_bar = 0;
  uint32_t pba_offset = 0;    // QW aligned
  int offset = -1;
};

struct AerParams {
  bool present = false;
  bool ecrc_generation = false;  // ECRC Generation Capable (the enable is then RW)
  bool ecrc_check = false;       // ECRC Check Capable
  int offset = -1;
};

struct SerialNumberParams {
  bool present = false;
  uint64_t serial = 0;
  int offset = -1;
};

struct ByteRange {
  uint16_t start = 0;   // relative to the capability's user data
  uint16_t length = 0;
};

struct VendorCapParams {  // ID 09h: {ID, Next, Length} then user data; Length <= 255
  std::vector<uint8_t> data;
  std::vector<ByteRange> writable;  // host-writable ranges of `data`; the rest is RO
  int offset = -1;
};

struct VendorExtCapParams {  // 000Bh: header, {VSEC ID, Rev, Length}, then user data
  uint16_t vsec_id = 0;
  uint8_t revision = 0;  // 4 bits
  std::vector<uint8_t> data;
  std::vector<ByteRange> writable;
  int offset = -1;
};

// [[noreturn]] helper: throws Error(invalid_argument, "compile FunctionSpec", EINVAL,
// field + ": " + what).
[[noreturn]] void spec_error(const std::string& field, const std::string& what);
std::string hex(uint64_t v);

// Places and links capabilities in a template (header already defined at 0x00-0x3f).
class CapabilityBuilder {
 public:
  explicit CapabilityBuilder(ConfigTemplate* t) : t_(t) {}

  // Generic: a structure of `len` bytes with header {id, next}; returns its offset. `field`
  // names the spec entry for errors. The caller defines the body registers.
  uint16_t add(uint8_t id, uint32_t len, int offset, const std::string& field);
  uint16_t add_extended(uint16_t id, uint8_t version, uint32_t len, int offset,
                        const std::string& field);

  uint16_t add_pcie(const PcieParams& p, const std::string& field);
  uint16_t add_power_management(const PmParams& p, const std::string& field);
  // The BIRs, offsets and vector count are validated by the caller (they depend on the BARs).
  uint16_t add_msix(const MsixParams& p, const std::string& field);
  uint16_t add_aer(const AerParams& p, const std::string& field);
  uint16_t add_serial_number(const SerialNumberParams& p, const std::string& field);
  uint16_t add_vendor(const VendorCapParams& p, const std::string& field);
  uint16_t add_vendor_extended(const VendorExtCapParams& p, const std::string& field);

  // Links both lists in ascending offset order (Capabilities Pointer = the lowest standard
  // capability; the extended list must then start at 0x100). Call once, after every add.
  void finish();

 private:
  uint16_t place(uint32_t lo, uint32_t hi, uint32_t len, int offset, const std::string& field,
                 const char* space);
  void define_user_bytes(uint16_t at, const std::vector<uint8_t>& data,
                         const std::vector<ByteRange>& writable, const std::string& field);

  ConfigTemplate* t_;
  std::vector<uint16_t> std_;  // offsets of the standard capabilities placed so far
  std::vector<uint16_t> ext_;  // ... extended capabilities
};

// Max_Payload_Size field encoding (§7.5.3.3/7.5.3.4): 128 << code.
inline uint16_t payload_bytes(unsigned code) noexcept { return uint16_t(128u << (code > 5 ? 5 : code)); }

}  // namespace mlx5tlp::pci
