// Unit tests and a decoder fuzz loop for mlx5tlp/tlp.hpp and mlx5tlp/tlp_completion.hpp.
// Returns non-zero on failure. Fuzz inputs sit at the very end of a heap block so that an
// AddressSanitizer build catches any read past the buffer.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "mlx5tlp/tlp.hpp"
#include "mlx5tlp/tlp_completion.hpp"

using namespace mlx5tlp::tlp;

static int g_failures = 0;
static int g_checks = 0;
#define CHECK(cond)                                                         \
  do {                                                                      \
    ++g_checks;                                                             \
    if (!(cond)) {                                                          \
      ++g_failures;                                                         \
      if (g_failures < 50) std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", \
                                        __FILE__, __LINE__, #cond);         \
    }                                                                       \
  } while (0)
#define CHECK_STATUS(expr, want)                                                      \
  do {                                                                                \
    Status got_ = (expr);                                                             \
    ++g_checks;                                                                       \
    if (got_ != (want)) {                                                             \
      ++g_failures;                                                                   \
      std::fprintf(stderr, "%s:%d: %s -> %s, want %s\n", __FILE__, __LINE__, #expr,   \
                   status_name(got_), status_name(want));                             \
    }                                                                                 \
  } while (0)

static std::vector<uint8_t> hex(const char* s) {
  std::vector<uint8_t> out;
  int hi = -1;
  for (; *s != 0; ++s) {
    int v;
    if (*s >= '0' && *s <= '9') v = *s - '0';
    else if (*s >= 'a' && *s <= 'f') v = *s - 'a' + 10;
    else continue;
    if (hi < 0) {
      hi = v;
    } else {
      out.push_back(static_cast<uint8_t>(hi << 4 | v));
      hi = -1;
    }
  }
  return out;
}

// Decodes into a buffer that stays alive until the next dec() (Tlp::data points into it).
static std::vector<uint8_t> g_held;
static Status dec(std::vector<uint8_t> b, Tlp* t) {
  g_held = std::move(b);
  return decode(g_held.data(), g_held.size(), t);
}

static bool same(const Tlp& a, const Tlp& b) {
  return a.kind == b.kind && a.fmt == b.fmt && a.type == b.type && a.tc == b.tc &&
         a.attr == b.attr && a.td == b.td && a.ep == b.ep && a.length == b.length &&
         a.requester_id == b.requester_id && a.completer_id == b.completer_id &&
         a.tag == b.tag && a.first_be == b.first_be && a.last_be == b.last_be &&
         a.address == b.address && a.dest_id == b.dest_id && a.status == b.status &&
         a.bcm == b.bcm && a.byte_count == b.byte_count &&
         a.lower_address == b.lower_address && a.message_code == b.message_code &&
         a.routing == b.routing && a.digest == b.digest && a.data_len == b.data_len &&
         (a.data_len == 0 || std::memcmp(a.data, b.data, a.data_len) == 0);
}

// encode(decode(b)) decodes to the same fields.
static bool reencodes(const Tlp& t) {
  uint8_t out[4096 + 32];
  size_t w = 0;
  if (encode(t, out, sizeof out, &w) != Status::ok) return false;
  if (w != encoded_size(t)) return false;
  Tlp again;
  return decode(out, w, &again) == Status::ok && same(t, again);
}

static void test_vectors() {
  Tlp t;
  // Memory Request 32-bit addressing (§2.2.7): MRd, 1 DW, TC0, req 01:00.0, tag 0x0a,
  // BE 0000/1111, address 0x1000.
  CHECK_STATUS(dec(hex("00000001 01000a0f 00001000"), &t), Status::ok);
  CHECK(t.kind == Kind::MRd && t.length == 1 && t.requester_id == 0x0100 && t.tag == 0x0a);
  CHECK(t.first_be == 0xF && t.last_be == 0 && t.address == 0x1000 && t.fmt == 0);
  CHECK(reencodes(t));
  // Memory Request 64-bit addressing, 10-bit tag 0x2a5 (T9 byte1 bit7, T8 byte1 bit3),
  // TC 5, Attr IDO|RO|NS, Length 0 = 1024 DW, address 0x1_0000_0000.
  CHECK_STATUS(dec(hex("20d43000 beefa5ff 00000001 00000000"), &t), Status::ok);
  CHECK(t.kind == Kind::MRd && t.length == 1024 && t.tag == 0x2a5 && t.tc == 5);
  CHECK(t.attr == (kAttrIDO | kAttrRO | kAttrNS) && t.address == 0x100000000ull);
  CHECK(t.requester_id == 0xbeef && t.first_be == 0xf && t.last_be == 0xf);
  CHECK(reencodes(t));
  // MWr 32-bit with 2 DW payload, TD with digest.
  CHECK_STATUS(dec(hex("40008002 00000fff 00002008 11223344 55667788 deadbeef"), &t), Status::ok);
  CHECK(t.kind == Kind::MWr && t.length == 2 && t.td && t.digest == 0xdeadbeef);
  CHECK(t.data_len == 8 && t.data[0] == 0x11 && t.data[7] == 0x88);
  CHECK(reencodes(t));
  // I/O Request: IORd, address 0x3f8, BE 0001.
  CHECK_STATUS(dec(hex("02000001 00080101 000003f8"), &t), Status::ok);
  CHECK(t.kind == Kind::IORd && t.address == 0x3f8 && t.first_be == 1 && t.tag == 1);
  CHECK(t.requester_id == 0x0008);
  // Configuration Request: CfgRd0 of 02:03.1 register 0x104 (ext reg 1, reg 1).
  CHECK_STATUS(dec(hex("04000001 0010010f 02190104"), &t), Status::ok);
  CHECK(t.kind == Kind::CfgRd0 && t.dest_id == 0x0219 && t.address == 0x104);
  // CfgWr1 with data.
  CHECK_STATUS(dec(hex("45000001 0010020f 0500000c aabbccdd"), &t), Status::ok);
  CHECK(t.kind == Kind::CfgWr1 && t.address == 0xc && t.data_len == 4);
  CHECK(reencodes(t));
  // Completion (§2.2.9): Cpl status UR, byte count 4096 (0), lower address 0x7f... (UR of
  // an MRd), completer 02:00.0, requester 01:00.0, tag 0x10.
  CHECK_STATUS(dec(hex("0a000000 02002000 0100107f"), &t), Status::ok);
  CHECK(t.kind == Kind::Cpl && t.status == 1 && t.byte_count == 4096 && t.lower_address == 0x7f);
  CHECK(t.completer_id == 0x0200 && t.requester_id == 0x0100 && t.tag == 0x10 && t.length == 0);
  CHECK(reencodes(t));
  // CplD 1 DW, byte count 4, CplDLk, CplLk.
  CHECK_STATUS(dec(hex("4a000001 02000004 01001000 01020304"), &t), Status::ok);
  CHECK(t.kind == Kind::CplD && t.byte_count == 4 && t.data_len == 4);
  CHECK_STATUS(dec(hex("4b000001 02000004 01001000 01020304"), &t), Status::ok);
  CHECK(t.kind == Kind::CplDLk);
  CHECK_STATUS(dec(hex("0b000000 02002004 01001000"), &t), Status::ok);
  CHECK(t.kind == Kind::CplLk);
  // Message Request (§2.2.8): Msg routed by ID (r=010), code 0x7e (Vendor_Defined Type 0).
  CHECK_STATUS(dec(hex("32000000 0100007e 02000000 00000000"), &t), Status::ok);
  CHECK(t.kind == Kind::Msg && t.routing == 2 && t.message_code == 0x7e && t.address ==
        0x0200000000000000ull);
  CHECK_STATUS(dec(hex("72000001 0100007f 00000000 00000000 01020304"), &t), Status::ok);
  CHECK(t.kind == Kind::MsgD && t.data_len == 4);
  CHECK(reencodes(t));
}

static void test_validation() {
  Tlp t;
  CHECK_STATUS(dec(hex(""), &t), Status::truncated_header);
  CHECK_STATUS(dec(hex("000000"), &t), Status::truncated_header);
  CHECK_STATUS(dec(hex("00000001 01000a0f 000010"), &t), Status::truncated_header);
  CHECK_STATUS(dec(hex("20000001 01000a0f 00000001 000010"), &t), Status::truncated_header);
  CHECK_STATUS(dec(hex("40000002 00000fff 00002008 11223344"), &t), Status::truncated_payload);
  CHECK_STATUS(dec(hex("40008001 0000000f 00002008 11223344"), &t), Status::truncated_payload);
  CHECK_STATUS(dec(hex("00000001 01000a0f 00001000 00"), &t), Status::payload_too_long);
  CHECK_STATUS(dec(hex("90000000 00000001 01000a0f 00001000"), &t), Status::tlp_prefix);
  CHECK_STATUS(dec(hex("a0000001 01000a0f 00001000"), &t), Status::reserved_fmt);
  CHECK_STATUS(dec(hex("03000001 01000a0f 00001000"), &t), Status::reserved_type);
  CHECK_STATUS(dec(hex("22000001 01000a0f 00001000 00000000"), &t), Status::reserved_type);
  CHECK_STATUS(dec(hex("12000001 01000a0f 00001000"), &t), Status::reserved_type);  // Msg 3DW
  CHECK_STATUS(dec(hex("4c000001 01000a0f 00001000 00000001"), &t), Status::unsupported_type);
  CHECK_STATUS(dec(hex("00010001 01000a0f 00001000"), &t), Status::unsupported_header_bits);
  CHECK_STATUS(dec(hex("00000401 01000a0f 00001000"), &t), Status::unsupported_header_bits);
  CHECK_STATUS(dec(hex("02000002 00080101 000003f8"), &t), Status::io_cfg_length);
  CHECK_STATUS(dec(hex("02100001 00080101 000003f8"), &t), Status::io_cfg_tc);
  CHECK_STATUS(dec(hex("04001001 0010010f 02190104"), &t), Status::io_cfg_attr);
  CHECK_STATUS(dec(hex("04040001 0010010f 02190104"), &t), Status::io_cfg_attr);  // IDO
  CHECK_STATUS(dec(hex("04000001 0010011f 02190104"), &t), Status::io_cfg_last_be);
  CHECK_STATUS(dec(hex("00000001 01000a1f 00001000"), &t), Status::last_be_on_single_dw);
  CHECK_STATUS(dec(hex("00000002 01000a0f 00001000"), &t), Status::last_be_zero);
  CHECK_STATUS(dec(hex("00000002 01000af0 00001000"), &t), Status::first_be_zero);
  CHECK_STATUS(dec(hex("00000002 01000aff 00001ffc"), &t), Status::crosses_4k);
  CHECK_STATUS(dec(hex("00000001 01000a0f 00001ffc"), &t), Status::ok);
  CHECK_STATUS(dec(hex("20000001 01000a0f 00000000 ffff0000"), &t), Status::addr64_below_4g);
  CHECK_STATUS(dec(hex("0a000000 02006004 01001000"), &t), Status::reserved_status);
  CHECK_STATUS(dec(hex("4a000001 02002004 01001000 00000000"), &t),
               Status::error_status_with_data);
  CHECK_STATUS(dec(hex("4a000002 02000004 01001000 00000000 00000000"), &t),
               Status::cpl_length_exceeds_byte_count);
  CHECK_STATUS(dec(hex("4a000002 02001004 01001000 00000000 00000000"), &t), Status::ok);  // BCM

  // Encode-side rules.
  Tlp r;
  r.kind = Kind::MRd;
  r.length = 1;
  r.first_be = 0xF;
  r.address = 0x1000;
  set_format(&r);
  uint8_t out[64];
  size_t w = 0;
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::ok);
  CHECK(w == 12 && out[0] == 0x00);
  r.fmt = 1;  // 4DW below 4 GiB
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::addr64_below_4g);
  r.fmt = 0;
  r.address = 0x100000000ull;
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::address_too_wide);
  set_format(&r);
  CHECK(r.fmt == 1);
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::ok);
  CHECK(w == 16 && out[0] == 0x20);
  CHECK_STATUS(encode(r, out, 15, &w), Status::output_too_small);
  r.address = 0x100000002ull;
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::address_unaligned);
  r.address = 0x1000;
  r.fmt = 0;
  r.tag = 1024;
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::field_out_of_range);
  r.tag = 0;
  r.length = 0;
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::field_out_of_range);
  r.length = 1;
  r.data_len = 4;
  CHECK_STATUS(encode(r, out, sizeof out, &w), Status::payload_length_mismatch);
  for (int i = 0; i < kStatusCount; ++i) {
    CHECK(reason(static_cast<Status>(i)) != nullptr);
    CHECK(std::strcmp(status_name(static_cast<Status>(i)), "unknown") != 0);
  }
}

static Tlp mem_read(uint64_t addr, uint16_t len, uint8_t fbe, uint8_t lbe) {
  Tlp r;
  r.kind = Kind::MRd;
  r.address = addr;
  r.length = len;
  r.first_be = fbe;
  r.last_be = lbe;
  r.requester_id = 0x0100;
  r.tag = 0x155;
  r.tc = 3;
  r.attr = kAttrRO | kAttrIDO;
  set_format(&r);
  return r;
}

static void test_completions() {
  std::vector<uint8_t> data(4096);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
  Tlp cpl[kMaxCompletions];
  size_t n = 0;
  CompletionParams p;
  p.completer_id = 0x0200;

  // Zero-length read: byte count 1, one 1-DW CplD.
  Tlp z = mem_read(0x1044, 1, 0, 0);
  CHECK_STATUS(plan_completions(z, data.data(), 4, p, cpl, kMaxCompletions, &n), Status::ok);
  CHECK(n == 1 && cpl[0].kind == Kind::CplD && cpl[0].byte_count == 1 && cpl[0].length == 1);
  CHECK(cpl[0].lower_address == 0x44 && cpl[0].tag == 0x155 && cpl[0].tc == 3);
  CHECK(cpl[0].attr == (kAttrRO | kAttrIDO) && cpl[0].requester_id == 0x0100);
  // Byte count table examples (1 DW): 1001 -> 4, 0110 -> 2, 0100 -> 1.
  CHECK(read_byte_count(mem_read(0, 1, 0x9, 0)) == 4);
  CHECK(read_byte_count(mem_read(0, 1, 0x6, 0)) == 2);
  CHECK(read_byte_count(mem_read(0, 1, 0x4, 0)) == 1);
  CHECK(read_byte_count(mem_read(0, 3, 0xc, 0x1)) == 12 - 2 - 3);

  // Invariants over many shapes.
  const uint16_t mps_list[] = {128, 256, 512, 4096};
  const uint16_t rcb_list[] = {64, 128};
  const uint8_t fbes[] = {0xF, 0xE, 0xC, 0x8};
  const uint8_t lbes[] = {0xF, 0x7, 0x3, 0x1};
  for (uint16_t mps : mps_list) {
    for (uint16_t rcb : rcb_list) {
      p.max_payload = mps;
      p.rcb = rcb;
      for (uint64_t off = 0; off < 4096; off += 52) {
        for (uint16_t len = 1; len <= 1024; len = static_cast<uint16_t>(len * 3 + 1)) {
          if (off + len * 4u > 4096) continue;
          for (uint8_t fbe : fbes) {
            for (uint8_t lbe : lbes) {
              Tlp r = mem_read(0x10000 + off, len, fbe, len == 1 ? 0 : lbe);
              CHECK_STATUS(plan_completions(r, data.data(), len * 4u, p, cpl, kMaxCompletions,
                                            &n), Status::ok);
              const uint64_t enabled_end = r.address + first_enabled_offset(r) +
                                           read_byte_count(r);
              uint64_t cur = r.address;
              for (size_t i = 0; i < n; ++i) {
                const Tlp& c = cpl[i];
                CHECK(c.kind == Kind::CplD && c.data_len == c.length * 4u);
                CHECK(c.data_len <= mps);
                CHECK(c.data == data.data() + (cur - r.address));
                const uint64_t first = i == 0 ? r.address + first_enabled_offset(r) : cur;
                CHECK(c.byte_count == enabled_end - first);
                CHECK(c.lower_address == (first & 0x7F));
                cur += c.data_len;
                if (i + 1 < n) CHECK(cur % rcb == 0);
                CHECK(reencodes(c));
              }
              CHECK(cur == r.address + len * 4u);
            }
          }
        }
      }
    }
  }
  p.max_payload = 256;
  p.rcb = 64;

  // Errors, IO/Cfg, writes.
  Tlp r = mem_read(0x1000, 8, 0xF, 0xF);
  p.status = static_cast<uint8_t>(CplStatus::UR);
  CHECK_STATUS(plan_completions(r, nullptr, 0, p, cpl, kMaxCompletions, &n), Status::ok);
  CHECK(n == 1 && cpl[0].kind == Kind::Cpl && cpl[0].byte_count == 32 && cpl[0].status == 1);
  p.status = static_cast<uint8_t>(CplStatus::CRS);
  CHECK_STATUS(plan_completions(r, nullptr, 0, p, cpl, kMaxCompletions, &n),
               Status::crs_not_config);
  p.status = 3;
  CHECK_STATUS(plan_completions(r, nullptr, 0, p, cpl, kMaxCompletions, &n),
               Status::bad_completion_status);
  p.status = 0;
  CHECK_STATUS(plan_completions(r, data.data(), 31, p, cpl, kMaxCompletions, &n),
               Status::data_length_mismatch);
  p.max_payload = 192;
  CHECK_STATUS(plan_completions(r, data.data(), 32, p, cpl, kMaxCompletions, &n),
               Status::bad_max_payload);
  p.max_payload = 256;
  p.rcb = 32;
  CHECK_STATUS(plan_completions(r, data.data(), 32, p, cpl, kMaxCompletions, &n), Status::bad_rcb);
  p.rcb = 64;
  Tlp wr;
  wr.kind = Kind::CfgWr0;
  wr.length = 1;
  wr.first_be = 0xF;
  wr.address = 0x10;
  wr.data = data.data();
  wr.data_len = 4;
  CHECK_STATUS(plan_completions(wr, nullptr, 0, p, cpl, kMaxCompletions, &n), Status::ok);
  CHECK(n == 1 && cpl[0].kind == Kind::Cpl && cpl[0].byte_count == 4 && cpl[0].lower_address == 0);
  p.status = static_cast<uint8_t>(CplStatus::CRS);
  CHECK_STATUS(plan_completions(wr, nullptr, 0, p, cpl, kMaxCompletions, &n), Status::ok);
  p.status = 0;
  wr.kind = Kind::MWr;
  CHECK_STATUS(plan_completions(wr, nullptr, 0, p, cpl, kMaxCompletions, &n),
               Status::no_completion);

  // build_completions writes the same thing encode() would.
  uint8_t out[8192];
  uint32_t ends[kMaxCompletions];
  size_t used = 0;
  Tlp big = mem_read(0x2010, 200, 0xF, 0xF);
  CHECK_STATUS(build_completions(big, data.data(), 800, p, out, sizeof out, &used, ends,
                                 kMaxCompletions, &n), Status::ok);
  CHECK(n == 4 && ends[n - 1] == used && used == 800 + 4 * 12);
  CHECK_STATUS(build_completions(big, data.data(), 800, p, out, 100, &used, ends,
                                 kMaxCompletions, &n), Status::output_too_small);

  // Bulk: MRd, MWr, CfgRd0, bad IORd (length 2), Cpl.
  std::vector<uint8_t> reqs;
  for (const char* h : {"00000004 01000aff 00001000", "40000001 0000000f 00002000 01020304",
                        "04000001 0010010f 02190104", "02000002 00080101 000003f8",
                        "0a000000 02002000 0100107f"}) {
    auto v = hex(h);
    reqs.insert(reqs.end(), v.begin(), v.end());
  }
  BulkSizes sz;
  CHECK_STATUS(bulk_measure(reqs.data(), reqs.size(), p, &sz), Status::ok);
  CHECK(sz.requests == 5);
  BulkStorage store;
  BulkOutput o = store.bind(sz);
  const std::vector<uint32_t>& first = store.request_first;
  const std::vector<uint8_t>& errs = store.errors;
  CHECK_STATUS(bulk_build(reqs.data(), reqs.size(), data.data(), 16 + 4 + 8, nullptr, 0, p, &o),
               Status::ok);
  CHECK(o.completions == 2 && o.bytes == 12 + 16 + 12 + 4);
  CHECK(first[0] == 0 && first[1] == 1 && first[2] == 1 && first[3] == 2 && first[5] == 2);
  CHECK(errs[0] == 0 && errs[1] == 0 && errs[2] == 0);
  CHECK(errs[3] == static_cast<uint8_t>(Status::io_cfg_length));
  CHECK(errs[4] == static_cast<uint8_t>(Status::no_completion));
  CHECK_STATUS(bulk_build(reqs.data(), reqs.size(), data.data(), 27, nullptr, 0, p, &o),
               Status::data_length_mismatch);
  CHECK_STATUS(bulk_measure(reqs.data(), reqs.size() - 1, p, &sz), Status::truncated_header);
}

static void check_decoded(const uint8_t* b, size_t len, std::vector<uint8_t>& scratch) {
  Tlp t;
  Status s = decode(b, len, &t);
  CHECK(static_cast<int>(s) < kStatusCount);
  if (s != Status::ok) return;
  CHECK(record_size(b, len) == len);
  CHECK(reencodes(t));
  // Drive the completion builder with whatever decoded.
  CompletionParams p;
  Tlp cpl[kMaxCompletions];
  size_t n = 0;
  const size_t need = completion_data_bytes(t, 0);
  if (scratch.size() < need) scratch.resize(need);
  Status c = plan_completions(t, scratch.data(), need, p, cpl, kMaxCompletions, &n);
  if (c == Status::ok) {
    for (size_t i = 0; i < n; ++i) CHECK(reencodes(cpl[i]));
  }
}

static void fuzz(size_t iterations) {
  constexpr size_t kCap = 64;
  std::unique_ptr<uint8_t[]> arena(new uint8_t[kCap]);
  std::mt19937_64 rng(0x7e57);
  std::vector<uint8_t> scratch(4096);
  const uint8_t valid_b0[] = {0x00, 0x20, 0x40, 0x60, 0x01, 0x21, 0x02, 0x42, 0x04, 0x44,
                              0x05, 0x45, 0x0a, 0x4a, 0x0b, 0x4b, 0x30, 0x72, 0x4c, 0x9b};
  size_t ok = 0;
  for (size_t it = 0; it < iterations; ++it) {
    const size_t len = rng() % (kCap + 1);
    uint8_t* b = arena.get() + (kCap - len);  // ends exactly at the end of the heap block
    for (size_t i = 0; i < len; i += 8) {
      uint64_t r = rng();
      for (size_t j = i; j < len && j < i + 8; ++j, r >>= 8) b[j] = static_cast<uint8_t>(r);
    }
    if (len >= 4) {
      const uint64_t r = rng();
      if ((r & 1) != 0) b[0] = valid_b0[(r >> 8) % sizeof valid_b0];
      if ((r & 6) != 0) {
        b[1] &= 0xFC;  // clear LN/TH, AT most of the time
        b[2] &= 0xF3;
      }
      if ((r & 0x18) != 0) {  // make Length consistent with the buffer often
        const size_t hdr = header_bytes(b[0]) + ((b[2] & 0x80) ? 4 : 0);
        const size_t dws = len > hdr ? (len - hdr) / 4 : 1;
        b[2] = static_cast<uint8_t>(b[2] & 0xFC);
        b[3] = static_cast<uint8_t>(dws == 0 ? 1 : dws);
      }
    }
    check_decoded(b, len, scratch);
    Tlp t;
    if (decode(b, len, &t) == Status::ok) ++ok;
    (void)record_size(b, len);
  }
  // Mutations of valid TLPs: bit flips, truncation.
  std::vector<std::vector<uint8_t>> seeds = {
      hex("00000001 01000a0f 00001000"), hex("20dc3000 beefa5ff 00000001 00000000"),
      hex("40008002 00000fff 00002008 11223344 55667788 deadbeef"),
      hex("02000001 00080101 000003f8"), hex("45000001 0010020f 0500000c aabbccdd"),
      hex("0a000000 02002000 0100107f"), hex("4a000001 02000004 01001000 01020304"),
      hex("72000001 0100007f 00000000 00000000 01020304")};
  for (size_t it = 0; it < iterations / 4; ++it) {
    const auto& s = seeds[it % seeds.size()];
    uint8_t tmp[kCap];
    std::memcpy(tmp, s.data(), s.size());
    const uint64_t r = rng();
    tmp[(r >> 8) % s.size()] ^= static_cast<uint8_t>(1u << ((r >> 16) & 7));
    if ((r & 1) != 0) tmp[(r >> 24) % s.size()] ^= static_cast<uint8_t>(1u << ((r >> 32) & 7));
    size_t len = s.size();
    if ((r & 6) == 6) len = (r >> 40) % (s.size() + 1);
    uint8_t* b = arena.get() + (kCap - len);
    std::memcpy(b, tmp, len);
    check_decoded(b, len, scratch);
  }
  std::printf("fuzz: %zu random buffers (%zu decoded ok), %zu mutations\n", iterations, ok,
              iterations / 4);
}

// Random request streams through bulk_measure / bulk_build (exact-size heap copies).
static void fuzz_bulk(size_t iterations) {
  std::mt19937_64 rng(0xb01c);
  const uint8_t b0s[] = {0x00, 0x20, 0x40, 0x04, 0x44, 0x02, 0x0a, 0x30, 0x90, 0x01};
  size_t built = 0;
  for (size_t it = 0; it < iterations; ++it) {
    std::vector<uint8_t> stream;
    const size_t records = rng() % 6;
    for (size_t r = 0; r < records; ++r) {
      uint8_t rec[32];
      for (auto& b : rec) b = static_cast<uint8_t>(rng());
      rec[0] = b0s[rng() % sizeof b0s];
      rec[1] &= 0xFC;
      rec[2] &= 0x73;  // no TD, no AT
      rec[3] = static_cast<uint8_t>(rng() % 3);
      const size_t n = std::min<size_t>(record_size(rec, sizeof rec), sizeof rec);
      stream.insert(stream.end(), rec, rec + (rng() % 16 == 0 ? n / 2 : n));
    }
    std::unique_ptr<uint8_t[]> reqs(new uint8_t[stream.size() + 1]);
    std::memcpy(reqs.get(), stream.data(), stream.size());
    CompletionParams p;
    BulkSizes sz;
    if (bulk_measure(reqs.get(), stream.size(), p, &sz) != Status::ok) continue;
    // Usually the exact share (SC reads: Length * 4 each), sometimes a random length.
    size_t data_len = 0;
    for (size_t off = 0; off < stream.size(); off += record_size(reqs.get() + off,
                                                                 stream.size() - off)) {
      const uint8_t* h = reqs.get() + off;
      while ((h[0] >> 5) == 4) h += 4;
      Kind k{};
      if (kind_of(h[0], &k) == Status::ok && !has_data(k) && k != Kind::Cpl &&
          k != Kind::CplLk && k != Kind::Msg) {
        const unsigned raw = ((h[2] & 3u) << 8) | h[3];
        data_len += (raw == 0 ? 1024u : raw) * 4u;
      }
    }
    if (rng() % 8 == 0) data_len = rng() % 24;
    std::unique_ptr<uint8_t[]> data(new uint8_t[data_len + 1]);
    BulkStorage store;  // fresh and exactly sized each time: ASan catches any overrun
    BulkOutput o = store.bind(sz);
    Status s = bulk_build(reqs.get(), stream.size(), data.get(), data_len, nullptr, 0, p, &o);
    CHECK(s == Status::ok || s == Status::data_length_mismatch);
    if (s != Status::ok) continue;
    ++built;
    CHECK(o.bytes <= sz.max_bytes && o.completions <= sz.max_completions);
    const std::vector<uint32_t>& offs = store.offsets;
    CHECK(store.request_first[sz.requests] == o.completions && offs[o.completions] == o.bytes);
    for (size_t k = 0; k < o.completions; ++k) {
      Tlp c;
      CHECK_STATUS(decode(store.buf.data() + offs[k], offs[k + 1] - offs[k], &c), Status::ok);
    }
  }
  std::printf("bulk fuzz: %zu streams, %zu built\n", iterations, built);
}

int main(int argc, char** argv) {
  size_t iterations = 2000000;
  if (argc > 1) iterations = std::strtoull(argv[1], nullptr, 10);
  const auto t0 = std::chrono::steady_clock::now();
  test_vectors();
  test_validation();
  test_completions();
  fuzz(iterations);
  fuzz_bulk(iterations / 10);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("test_tlp: %d checks, %d failures, %.2f s\n", g_checks, g_failures, secs);
  return g_failures == 0 ? 0 : 1;
}
