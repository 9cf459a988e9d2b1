// TLP header codec. Layout references are to the PCIe Base Specification, Chapter 2
// "Transaction Layer Specification", non-Flit Mode headers:
//   §2.2.1 "Common Packet Header Fields" (DW0: Fmt, Type, T9, TC, T8, Attr, LN, TH, TD, EP,
//          Attr, AT, Length), Fmt encodings table, Fmt/Type encodings table.
//   §2.2.5 "First/Last DW Byte Enables Rules".
//   §2.2.6.2 "Transaction Descriptor - Transaction ID Field" (Requester ID, 10-bit Tag).
//   §2.2.7 "Memory, I/O, and Configuration Request Rules" (Request headers: Memory Request
//          32-bit / 64-bit addressing, I/O Request, Configuration Request).
//   §2.2.8 "Message Request Rules" (Message Request header).
//   §2.2.9 "Completion Rules" (Completion header, Completion Status encodings).
#include "mlx5tlp/tlp.hpp"

#include <cstring>

namespace mlx5tlp::tlp {

namespace {

constexpr uint64_t k4G = uint64_t{1} << 32;

inline uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
inline uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}
inline void put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
inline void put32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

bool is_mem_request(Kind k) { return k == Kind::MRd || k == Kind::MRdLk || k == Kind::MWr; }
bool is_io_cfg(Kind k) {
  return k == Kind::IORd || k == Kind::IOWr || k == Kind::CfgRd0 || k == Kind::CfgWr0 ||
         k == Kind::CfgRd1 || k == Kind::CfgWr1;
}
bool is_cfg(Kind k) {
  return k == Kind::CfgRd0 || k == Kind::CfgWr0 || k == Kind::CfgRd1 || k == Kind::CfgWr1;
}
bool is_completion(Kind k) {
  return k == Kind::Cpl || k == Kind::CplD || k == Kind::CplLk || k == Kind::CplDLk;
}
bool is_message(Kind k) { return k == Kind::Msg || k == Kind::MsgD; }
// Kinds whose Length field is reserved (no payload, no requested length).
bool length_reserved(Kind k) { return k == Kind::Cpl || k == Kind::CplLk || k == Kind::Msg; }

// Fmt/Type encodings table (§2.2.1): Fmt[2:0] (0: 3DW no data, 1: 4DW no data, 2: 3DW with
// data, 3: 4DW with data, 4: TLP Prefix) and Type[4:0].
Status classify(uint8_t fmt, uint8_t type, Kind* k) {
  if (fmt == 4) return Status::tlp_prefix;
  if (fmt > 4) return Status::reserved_fmt;
  const bool data = (fmt & 2) != 0;
  const bool wide = (fmt & 1) != 0;
  if ((type & 0x18) == 0x10) {  // 10rrr: Msg (4DW without data) / MsgD (4DW with data)
    if (!wide) return Status::reserved_type;
    *k = data ? Kind::MsgD : Kind::Msg;
    return Status::ok;
  }
  switch (type) {
    case 0x00: *k = data ? Kind::MWr : Kind::MRd; return Status::ok;
    case 0x01:
      if (data) return Status::reserved_type;
      *k = Kind::MRdLk;
      return Status::ok;
    case 0x0C: case 0x0D: case 0x0E:  // FetchAdd, Swap, CAS AtomicOp Requests
      return data ? Status::unsupported_type : Status::reserved_type;
    case 0x1B:  // TCfgRd / TCfgWr (deprecated), DMWr
      return fmt == 1 ? Status::reserved_type : Status::unsupported_type;
    default: break;
  }
  if (wide) return Status::reserved_type;  // the remaining kinds are 3DW only
  switch (type) {
    case 0x02: *k = data ? Kind::IOWr : Kind::IORd; return Status::ok;
    case 0x04: *k = data ? Kind::CfgWr0 : Kind::CfgRd0; return Status::ok;
    case 0x05: *k = data ? Kind::CfgWr1 : Kind::CfgRd1; return Status::ok;
    case 0x0A: *k = data ? Kind::CplD : Kind::Cpl; return Status::ok;
    case 0x0B: *k = data ? Kind::CplDLk : Kind::CplLk; return Status::ok;
    default: return Status::reserved_type;
  }
}

uint8_t type_of(Kind k, uint8_t routing) {
  switch (k) {
    case Kind::MRd: case Kind::MWr: return 0x00;
    case Kind::MRdLk: return 0x01;
    case Kind::IORd: case Kind::IOWr: return 0x02;
    case Kind::CfgRd0: case Kind::CfgWr0: return 0x04;
    case Kind::CfgRd1: case Kind::CfgWr1: return 0x05;
    case Kind::Cpl: case Kind::CplD: return 0x0A;
    case Kind::CplLk: case Kind::CplDLk: return 0x0B;
    case Kind::Msg: case Kind::MsgD: return static_cast<uint8_t>(0x10 | (routing & 7));
  }
  return 0;
}

bool valid_kind(Kind k) { return static_cast<unsigned>(k) < static_cast<unsigned>(kKindCount); }

const char* const kKindNames[kKindCount] = {"MRd",   "MRdLk", "MWr",    "IORd", "IOWr",
                                             "CfgRd0", "CfgWr0", "CfgRd1", "CfgWr1", "Cpl",
                                             "CplD",  "CplLk", "CplDLk", "Msg",  "MsgD"};

struct StatusText {
  const char* name;
  const char* reason;
};
const StatusText kStatusText[kStatusCount] = {
    {"ok", "ok"},
    {"truncated_header", "buffer shorter than the TLP header"},
    {"truncated_payload", "buffer shorter than the payload (and TLP digest) the header announces"},
    {"payload_too_long", "buffer longer than the header, payload and digest the header announces"},
    {"tlp_prefix", "TLP Prefixes (Fmt 100b) are not supported"},
    {"reserved_fmt", "reserved Fmt value (101b..111b)"},
    {"reserved_type", "reserved Fmt/Type combination"},
    {"unsupported_type", "AtomicOp, DMWr and TCfg requests are not supported"},
    {"unsupported_header_bits",
     "TH, LN or AT set: TPH, LN and translated addresses are not supported"},
    {"io_cfg_length", "IO/Configuration Request Length must be 1 DW"},
    {"io_cfg_tc", "IO/Configuration Request TC must be 0"},
    {"io_cfg_attr", "IO/Configuration Request Attr must be 0"},
    {"io_cfg_last_be", "IO/Configuration Request Last DW BE must be 0000b"},
    {"last_be_on_single_dw", "Last DW BE must be 0000b on a 1-DW request"},
    {"last_be_zero", "Last DW BE must not be 0000b on a multi-DW request"},
    {"first_be_zero", "First DW BE must not be 0000b on a multi-DW request"},
    {"crosses_4k", "memory request crosses a 4 KiB boundary"},
    {"addr64_below_4g", "4DW memory request header with an address below 4 GiB"},
    {"reserved_status", "reserved Completion Status value"},
    {"error_status_with_data", "completion with data must have Successful Completion status"},
    {"cpl_length_exceeds_byte_count", "completion payload longer than the remaining byte count"},
    {"field_out_of_range", "a field value does not fit its range"},
    {"address_unaligned", "address bits 1:0 must be 0 (DW address)"},
    {"address_too_wide",
     "address too wide for the header format (3DW: below 4 GiB; Cfg: 0..0xFFC)"},
    {"payload_length_mismatch",
     "data length differs from Length * 4 (or data on a kind without payload)"},
    {"output_too_small", "output buffer too small"},
    {"no_completion", "request gets no completion (posted request or a completion)"},
    {"bad_max_payload", "max_payload must be a power of two in 128..4096"},
    {"bad_rcb", "rcb must be 64 or 128"},
    {"bad_completion_status", "completion status must be SC, UR, CRS or CA"},
    {"crs_not_config", "CRS is only a Configuration Request completion status"},
    {"data_length_mismatch", "completion data must be Length * 4 bytes for an SC read, else empty"},
};

}  // namespace

const char* status_name(Status s) noexcept {
  auto i = static_cast<unsigned>(s);
  return i < static_cast<unsigned>(kStatusCount) ? kStatusText[i].name : "unknown";
}

const char* reason(Status s) noexcept {
  auto i = static_cast<unsigned>(s);
  return i < static_cast<unsigned>(kStatusCount) ? kStatusText[i].reason : "unknown status";
}

const char* kind_name(Kind k) noexcept {
  return valid_kind(k) ? kKindNames[static_cast<unsigned>(k)] : nullptr;
}

bool kind_from_name(const char* name, Kind* out) noexcept {
  if (name == nullptr) return false;
  for (int i = 0; i < kKindCount; ++i) {
    if (std::strcmp(name, kKindNames[i]) == 0) {
      *out = static_cast<Kind>(i);
      return true;
    }
  }
  return false;
}

Status kind_of(uint8_t fmt_type, Kind* out) noexcept {
  return classify(static_cast<uint8_t>(fmt_type >> 5), fmt_type & 0x1f, out);
}

bool has_data(Kind k) noexcept {
  switch (k) {
    case Kind::MWr: case Kind::IOWr: case Kind::CfgWr0: case Kind::CfgWr1:
    case Kind::CplD: case Kind::CplDLk: case Kind::MsgD:
      return true;
    default:
      return false;
  }
}

size_t record_size(const uint8_t* buf, size_t len) noexcept {
  size_t off = 0;
  while (off + 4 <= len && (buf[off] >> 5) == 4) off += 4;  // TLP Prefixes, one DW each
  if (off + 4 > len) return 0;
  const uint8_t fmt = buf[off] >> 5;
  unsigned raw_len = ((buf[off + 2] & 3u) << 8) | buf[off + 3];
  if (raw_len == 0) raw_len = 1024;
  size_t size = off + header_bytes(buf[off]);
  if ((fmt & 2) != 0) size += raw_len * 4u;  // Fmt "with data"
  if ((buf[off + 2] & 0x80) != 0) size += 4;
  return size;
}

Status validate(const Tlp& t) noexcept {
  const Kind k = t.kind;
  if (is_mem_request(k)) {
    // §2.2.5: Last DW BE 0000b for 1 DW; neither BE 0000b for more than 1 DW.
    if (t.length == 1) {
      if (t.last_be != 0) return Status::last_be_on_single_dw;
    } else {
      if (t.first_be == 0) return Status::first_be_zero;
      if (t.last_be == 0) return Status::last_be_zero;
    }
    // §2.2.7: 64-bit addressing must not be used for addresses below 4 GiB.
    if ((t.fmt & 1) != 0 && t.address < k4G) return Status::addr64_below_4g;
    // §2.2.7: a request must not cross a 4 KiB boundary.
    if ((t.address & 0xFFF) + uint64_t{t.length} * 4 > 4096) return Status::crosses_4k;
  } else if (is_io_cfg(k)) {
    // §2.2.7: IO and Configuration Requests: Length 1, TC0, Attr 0, Last DW BE 0000b.
    if (t.length != 1) return Status::io_cfg_length;
    if (t.tc != 0) return Status::io_cfg_tc;
    if (t.attr != 0) return Status::io_cfg_attr;
    if (t.last_be != 0) return Status::io_cfg_last_be;
  } else if (is_completion(k)) {
    if (t.status == 3 || t.status > 4) return Status::reserved_status;
    if (has_data(k)) {
      if (t.status != 0) return Status::error_status_with_data;
      const unsigned room = ((t.lower_address & 3u) + t.byte_count + 3u) / 4u;
      if (!t.bcm && t.length > room) return Status::cpl_length_exceeds_byte_count;
    }
  }
  return Status::ok;
}

Status decode(const uint8_t* buf, size_t len, Tlp* out) noexcept {
  Tlp& t = *out;
  t = Tlp{};
  if (buf == nullptr || len < 4) return Status::truncated_header;
  t.fmt = buf[0] >> 5;
  t.type = buf[0] & 0x1f;
  Kind k{};
  if (Status s = classify(t.fmt, t.type, &k); s != Status::ok) return s;
  t.kind = k;
  // DW0 (§2.2.1, Common Packet Header Fields):
  //   byte 1: T9[7] TC[6:4] T8[3] Attr[2](IDO)[2] LN[1] TH[0]
  //   byte 2: TD[7] EP[6] Attr[1:0](RO, NS)[5:4] AT[3:2] Length[9:8]   byte 3: Length[7:0]
  const uint8_t b1 = buf[1];
  const uint8_t b2 = buf[2];
  t.tc = (b1 >> 4) & 7;
  t.attr = static_cast<uint8_t>(((b1 >> 2) & 1) << 2 | ((b2 >> 4) & 3));
  t.td = (b2 & 0x80) != 0;
  t.ep = (b2 & 0x40) != 0;
  const unsigned tag_hi = ((b1 >> 7) & 1u) << 9 | ((b1 >> 3) & 1u) << 8;
  unsigned raw_len = ((b2 & 3u) << 8) | buf[3];
  if (raw_len == 0) raw_len = 1024;
  const bool data = has_data(k);
  t.length = length_reserved(k) ? 0 : static_cast<uint16_t>(raw_len);

  const size_t hdr = header_bytes(buf[0]);
  if (len < hdr) return Status::truncated_header;
  const size_t payload = data ? raw_len * 4u : 0;
  const size_t total = hdr + payload + (t.td ? 4 : 0);
  if (len < total) return Status::truncated_payload;
  if (len > total) return Status::payload_too_long;

  if (is_completion(k)) {
    // Completion header (§2.2.9): DW1 Completer ID[31:16] Status[15:13] BCM[12]
    // Byte Count[11:0]; DW2 Requester ID[31:16] Tag[15:8] R[7] Lower Address[6:0].
    t.completer_id = be16(buf + 4);
    t.status = buf[6] >> 5;
    t.bcm = (buf[6] & 0x10) != 0;
    const unsigned bc = ((buf[6] & 0xFu) << 8) | buf[7];
    t.byte_count = static_cast<uint16_t>(bc == 0 ? 4096 : bc);
    t.requester_id = be16(buf + 8);
    t.tag = static_cast<uint16_t>(tag_hi | buf[10]);
    t.lower_address = buf[11] & 0x7F;
  } else {
    // Request headers (§2.2.7, §2.2.8): DW1 Requester ID[31:16] Tag[15:8], then
    // Last DW BE[7:4] First DW BE[3:0] (Message Code[7:0] for messages).
    t.requester_id = be16(buf + 4);
    t.tag = static_cast<uint16_t>(tag_hi | buf[6]);
    if (is_message(k)) {
      t.message_code = buf[7];
      t.routing = t.type & 7;
      t.address = uint64_t{be32(buf + 8)} << 32 | be32(buf + 12);
    } else {
      t.last_be = buf[7] >> 4;
      t.first_be = buf[7] & 0xF;
      if (is_cfg(k)) {
        // Configuration Request DW2: Bus[31:24] Device[23:19] Function[18:16] R[15:12]
        // Extended Register Number[11:8] Register Number[7:2] R[1:0].
        t.dest_id = be16(buf + 8);
        t.address = be32(buf + 8) & 0xFFCu;
      } else if (hdr == 16) {
        // Memory Request 64-bit: DW2 Address[63:32]; DW3 Address[31:2] PH[1:0].
        t.address = uint64_t{be32(buf + 8)} << 32 | (be32(buf + 12) & ~3u);
      } else {
        // Memory Request 32-bit / I/O Request: DW2 Address[31:2] PH[1:0] (R for I/O).
        t.address = be32(buf + 8) & ~3u;
      }
    }
  }
  if (data) {
    t.data = buf + hdr;
    t.data_len = payload;
  }
  if (t.td) t.digest = be32(buf + hdr + payload);
  if ((b1 & 3) != 0 || (b2 & 0x0C) != 0) return Status::unsupported_header_bits;  // LN TH AT
  return validate(t);
}

size_t encoded_size(const Tlp& t) noexcept {
  if (!valid_kind(t.kind)) return 0;
  size_t hdr = 12;
  if (is_message(t.kind) || (is_mem_request(t.kind) && (t.fmt & 1) != 0)) hdr = 16;
  return hdr + (has_data(t.kind) ? t.data_len : 0) + (t.td ? 4 : 0);
}

void set_format(Tlp* t) noexcept {
  if (!valid_kind(t->kind)) return;
  bool wide = is_message(t->kind) || (is_mem_request(t->kind) && t->address >= k4G);
  t->fmt = static_cast<uint8_t>((has_data(t->kind) ? 2 : 0) | (wide ? 1 : 0));
  t->type = type_of(t->kind, t->routing);
}

Status encode(const Tlp& t, uint8_t* out, size_t cap, size_t* written) noexcept {
  *written = 0;
  const Kind k = t.kind;
  if (!valid_kind(k)) return Status::field_out_of_range;
  const bool data = has_data(k);
  // Field widths.
  if (t.tc > 7 || t.attr > 7 || t.tag > 1023 || t.first_be > 15 || t.last_be > 15 ||
      t.routing > 7 || t.lower_address > 127 || t.status > 7)
    return Status::field_out_of_range;
  if (length_reserved(k) ? t.length != 0 : (t.length < 1 || t.length > 1024))
    return Status::field_out_of_range;
  if (is_completion(k) && (t.byte_count < 1 || t.byte_count > 4096))
    return Status::field_out_of_range;
  const bool wide = is_message(k) || (is_mem_request(k) && (t.fmt & 1) != 0);
  if (is_mem_request(k) || is_io_cfg(k)) {
    if ((t.address & 3) != 0) return Status::address_unaligned;
    if (is_cfg(k) ? t.address > 0xFFC : (!wide && t.address >= k4G))
      return Status::address_too_wide;
  }
  if (data ? t.data_len != size_t{t.length} * 4 : t.data_len != 0)
    return Status::payload_length_mismatch;
  if (data && t.data == nullptr) return Status::payload_length_mismatch;
  {
    Tlp probe = t;
    probe.fmt = static_cast<uint8_t>((data ? 2 : 0) | (wide ? 1 : 0));
    if (Status s = validate(probe); s != Status::ok) return s;
  }
  const size_t hdr = wide ? 16 : 12;
  const size_t total = hdr + t.data_len + (t.td ? 4 : 0);
  if (out == nullptr || cap < total) return Status::output_too_small;

  const uint8_t fmt = static_cast<uint8_t>((data ? 2 : 0) | (wide ? 1 : 0));
  const unsigned len_field = t.length & 0x3FFu;  // 1024 DW encodes as 0
  out[0] = static_cast<uint8_t>(fmt << 5 | type_of(k, t.routing));
  out[1] = static_cast<uint8_t>(((t.tag >> 9) & 1) << 7 | t.tc << 4 | ((t.tag >> 8) & 1) << 3 |
                                ((t.attr >> 2) & 1) << 2);
  out[2] = static_cast<uint8_t>((t.td ? 0x80 : 0) | (t.ep ? 0x40 : 0) | (t.attr & 3) << 4 |
                                (len_field >> 8));
  out[3] = static_cast<uint8_t>(len_field);
  if (is_completion(k)) {
    put16(out + 4, t.completer_id);
    out[6] = static_cast<uint8_t>(t.status << 5 | (t.bcm ? 0x10 : 0) | ((t.byte_count >> 8) & 0xF));
    out[7] = static_cast<uint8_t>(t.byte_count);  // 4096 encodes as 0
    put16(out + 8, t.requester_id);
    out[10] = static_cast<uint8_t>(t.tag);
    out[11] = t.lower_address;
  } else {
    put16(out + 4, t.requester_id);
    out[6] = static_cast<uint8_t>(t.tag);
    if (is_message(k)) {
      out[7] = t.message_code;
      put32(out + 8, static_cast<uint32_t>(t.address >> 32));
      put32(out + 12, static_cast<uint32_t>(t.address));
    } else {
      out[7] = static_cast<uint8_t>(t.last_be << 4 | t.first_be);
      if (is_cfg(k)) {
        put16(out + 8, t.dest_id);
        put16(out + 10, static_cast<uint16_t>(t.address));
      } else if (wide) {
        put32(out + 8, static_cast<uint32_t>(t.address >> 32));
        put32(out + 12, static_cast<uint32_t>(t.address));
      } else {
        put32(out + 8, static_cast<uint32_t>(t.address));
      }
    }
  }
  if (t.data_len != 0) std::memcpy(out + hdr, t.data, t.data_len);
  if (t.td) put32(out + hdr + t.data_len, t.digest);
  *written = total;
  return Status::ok;
}

}  // namespace mlx5tlp::tlp
