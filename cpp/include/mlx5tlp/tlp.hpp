// mlx5tlp/tlp.hpp — PCIe Transaction Layer Packet header codec (non-Flit Mode).
//
// Decodes and encodes the TLPs a userspace PCIe device emulation sees: memory, IO and
// configuration requests, completions, and (enough to identify them) messages. Headers are in
// wire order: big-endian DWs, byte 0 of DW0 first. All field layouts follow the PCIe Base
// Specification, Chapter 2 "Transaction Layer Specification" (§2.2 "Transaction Layer
// Protocol - Packet Definition"); the individual layouts are cited next to the code that
// reads them in tlp.cpp.
//
// Nothing here allocates or throws: every function returns a Status, and reason() describes
// it. decode() never reads outside [buf, buf + len).
//
// Thread-safety: pure functions over caller-owned memory; safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlx5tlp::tlp {

// What a TLP is. The numeric values are stable (they cross the Python binding).
enum class Kind : uint8_t {
  MRd = 0,      // Memory Read Request
  MRdLk = 1,    // Memory Read Request-Locked (legacy)
  MWr = 2,      // Memory Write Request
  IORd = 3,     // I/O Read Request
  IOWr = 4,     // I/O Write Request
  CfgRd0 = 5,   // Configuration Read Type 0
  CfgWr0 = 6,   // Configuration Write Type 0
  CfgRd1 = 7,   // Configuration Read Type 1
  CfgWr1 = 8,   // Configuration Write Type 1
  Cpl = 9,      // Completion without Data
  CplD = 10,    // Completion with Data
  CplLk = 11,   // Completion for Locked Memory Read without Data
  CplDLk = 12,  // Completion for Locked Memory Read with Data
  Msg = 13,     // Message Request
  MsgD = 14,    // Message Request with Data
};
inline constexpr int kKindCount = 15;

// Completion Status field (PCIe Base §2.2.9 "Completion Rules", Completion Status encodings).
enum class CplStatus : uint8_t { SC = 0, UR = 1, CRS = 2, CA = 4 };

// Outcome of every codec and completion-builder call. Values are stable (Python sees them).
enum class Status : uint8_t {
  ok = 0,
  // -- structure (decode) --
  truncated_header,           // buffer shorter than the header the Fmt field announces
  truncated_payload,          // buffer shorter than header + payload (+ 4-byte digest if TD)
  payload_too_long,           // buffer longer than header + payload (+ digest)
  tlp_prefix,                 // Fmt 100b: TLP Prefixes are not supported
  reserved_fmt,               // Fmt 101b..111b
  reserved_type,              // Fmt/Type combination the specification does not define
  unsupported_type,           // defined but not handled: AtomicOps, DMWr, deprecated TCfg*
  unsupported_header_bits,    // TH, LN or AT set (TPH, LN, address translation unsupported)
  // -- field rules (decode and encode) --
  io_cfg_length,              // IO / Configuration Request Length must be 1 DW
  io_cfg_tc,                  // IO / Configuration Request TC must be 0
  io_cfg_attr,                // IO / Configuration Request Attr must be 0
  io_cfg_last_be,             // IO / Configuration Request Last DW BE must be 0000b
  last_be_on_single_dw,       // 1-DW request with Last DW BE != 0000b
  last_be_zero,               // multi-DW request with Last DW BE == 0000b
  first_be_zero,              // multi-DW request with First DW BE == 0000b
  crosses_4k,                 // memory request crossing a 4 KiB boundary
  addr64_below_4g,            // 4DW memory request header with an address below 4 GiB
  reserved_status,            // Completion Status 3, 5, 6 or 7
  error_status_with_data,     // CplD/CplDLk with a status other than SC
  cpl_length_exceeds_byte_count,  // CplD payload longer than the bytes that remain
  // -- encode only --
  field_out_of_range,         // a field does not fit its wire width / allowed range
  address_unaligned,          // address has bits 1:0 set (addresses are DW addresses)
  address_too_wide,           // >= 4 GiB address in a 3DW header (or IO / Cfg register)
  payload_length_mismatch,    // data_len != length * 4 for a kind with data, or != 0 without
  output_too_small,           // output buffer (or offsets array) too small
  // -- completion builder --
  no_completion,              // posted request (MWr, Msg, MsgD) or a completion: nothing to send
  bad_max_payload,            // max_payload not a power of two in 128..4096
  bad_rcb,                    // rcb not 64 or 128
  bad_completion_status,      // status not SC, UR, CRS or CA
  crs_not_config,             // CRS is only a Configuration Request completion status
  data_length_mismatch,       // data for the completion(s) is not the request's length * 4
};
inline constexpr int kStatusCount = static_cast<int>(Status::data_length_mismatch) + 1;

// Short identifier (the enumerator's name) and human-readable reason for a Status.
const char* status_name(Status s) noexcept;
const char* reason(Status s) noexcept;
// "MRd", "CplD", ...; nullptr for an out-of-range value.
const char* kind_name(Kind k) noexcept;
// Parse a kind name; false when unknown.
bool kind_from_name(const char* name, Kind* out) noexcept;

// Attribute bits as stored in Tlp::attr (PCIe Base §2.2.6.3 "Attributes"):
inline constexpr uint8_t kAttrNS = 0x1;   // No Snoop            (Attr[0], DW0 byte 2 bit 4)
inline constexpr uint8_t kAttrRO = 0x2;   // Relaxed Ordering    (Attr[1], DW0 byte 2 bit 5)
inline constexpr uint8_t kAttrIDO = 0x4;  // ID-Based Ordering   (Attr[2], DW0 byte 1 bit 2)

// One decoded (or to-be-encoded) TLP. Fields that a kind does not have stay 0.
struct Tlp {
  Kind kind = Kind::MRd;
  uint8_t fmt = 0;      // wire Fmt[2:0]; encode() only uses bit 0 (4DW) of memory requests
  uint8_t type = 0;     // wire Type[4:0]; ignored by encode() (derived from kind/routing)
  uint8_t tc = 0;       // Traffic Class, 0..7
  uint8_t attr = 0;     // kAttrNS | kAttrRO | kAttrIDO
  bool td = false;      // TLP Digest (ECRC) present: 4 bytes after the payload
  bool ep = false;      // poisoned
  uint16_t length = 0;  // payload / requested length in DWs, 1..1024; 0 for Cpl, CplLk, Msg
  uint16_t requester_id = 0;
  uint16_t completer_id = 0;   // completions
  uint16_t tag = 0;            // 10 bits (T9, T8 and the 8-bit Tag field)
  uint8_t first_be = 0;        // requests (not Msg)
  uint8_t last_be = 0;
  uint64_t address = 0;  // memory / IO: DW-aligned byte address; Cfg: register byte address
                         // (Extended Register Number << 8 | Register Number << 2);
                         // Msg/MsgD: header DW2 << 32 | DW3, raw
  uint16_t dest_id = 0;        // Cfg: Bus[15:8] Device[7:3] Function[2:0]
  uint8_t status = 0;          // completions: CplStatus value
  bool bcm = false;            // completions: Byte Count Modified
  uint16_t byte_count = 0;     // completions: 1..4096
  uint8_t lower_address = 0;   // completions: 7 bits
  uint8_t message_code = 0;    // Msg/MsgD
  uint8_t routing = 0;         // Msg/MsgD: r[2:0] from the Type field
  uint32_t digest = 0;         // ECRC as carried when td (not computed or checked)
  const uint8_t* data = nullptr;  // payload (points into the decoded buffer), data_len bytes
  size_t data_len = 0;
};

// True for the kinds that carry a payload (CplD, CplDLk, MWr, IOWr, CfgWr*, MsgD).
bool has_data(Kind k) noexcept;
// Header bytes (12 or 16, from Fmt bit 0) for a TLP whose DW0 byte 0 is `fmt_type`.
inline constexpr size_t header_bytes(uint8_t fmt_type) noexcept {
  return (fmt_type & 0x20) != 0 ? 16 : 12;
}

// Kind from DW0 byte 0 (Fmt[7:5] Type[4:0]); a failure Status for prefixes, reserved and
// unsupported encodings.
Status kind_of(uint8_t fmt_type, Kind* out) noexcept;

// Decode exactly one TLP occupying all of buf[0, len). On failure `out` holds whatever fields
// were recognised before the failure (kind is valid from Status::unsupported_header_bits on).
Status decode(const uint8_t* buf, size_t len, Tlp* out) noexcept;

// Size in bytes of the TLP starting at buf (header + payload + digest; TLP prefixes are
// included), from DW0 alone; 0 when fewer than 4 bytes (or only prefixes) are available.
size_t record_size(const uint8_t* buf, size_t len) noexcept;

// The field rules decode() applies after parsing (also used by encode()).
Status validate(const Tlp& t) noexcept;

// Bytes encode() will write (0 when the kind is out of range).
size_t encoded_size(const Tlp& t) noexcept;

// Encode `t` (header, payload from t.data, digest if t.td) into out[0, cap). Memory requests
// use a 4DW header when bit 0 of t.fmt is set (refused for an address below 4 GiB) and a 3DW
// header otherwise (refused for an address at or above 4 GiB); see set_format().
Status encode(const Tlp& t, uint8_t* out, size_t cap, size_t* written) noexcept;

// Set t.fmt / t.type from t.kind, t.routing and t.address: memory requests get a 3DW header
// below 4 GiB and a 4DW header otherwise.
void set_format(Tlp* t) noexcept;

}  // namespace mlx5tlp::tlp
