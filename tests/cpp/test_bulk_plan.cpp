// tlp::bulk_plan / bulk_emit_request (the fused completion path) and bulk_build, checked
// against an oracle written here from the PCIe Base Specification 6.x, not from the code:
//
// * §2.2.9 Completion Rules and Figure 2-39 (Completion header): Fmt/Type CplD 010b/01010b,
//   Cpl 000b/01010b (Lk: Type 01011b); TC, Attr and the Tag (T9/T8 in DW0) copied from the
//   request; DW1 Completer ID, Completion Status [15:13], BCM, Byte Count [11:0]; DW2 Requester
//   ID, Tag[7:0], Lower Address [6:0]. I/O and Configuration completions: Byte Count 4, Lower
//   Address 0.
// * §2.3.1.1 Data Return for Read Requests: Byte Count is the bytes still to be returned,
//   counted from the first enabled byte (the byte enables table: a 1-DW read spans its first to
//   last enabled byte, a zero-length read — 1 DW, First DW BE 0000b — counts 1); Lower Address
//   is the low 7 bits of the completion's first byte; a read may be split into several
//   completions, each but the last ending on a Read Completion Boundary, none with a payload
//   above Max_Payload_Size. Policy under test (docs/tlp.md): as few completions as those rules
//   allow — each ends at the last RCB boundary that keeps it within Max_Payload_Size.
// * §2.2.4.1 / §2.2.5 / §2.2.7 field rules the requests here break on purpose (one each).
//
// Requests are assembled by hand from the header figures (Figure 2-13 / 2-14 DW0, Figure 2-15
// memory request header, Figure 2-20 configuration request header), and the expected
// completions are built by hand the same way, byte by byte.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/tlp.hpp"
#include "mlx5tlp/tlp_completion.hpp"

using namespace mlx5tlp::tlp;
using Bytes = std::vector<uint8_t>;

namespace {

void put32(Bytes& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(uint8_t(v >> s));
}

// One request of the stream and what the oracle says about it.
struct Req {
  Bytes rec;                   // the TLP bytes
  uint8_t status = 0;          // the completion status asked for (statuses[])
  size_t share = 0;            // bytes of `data` it takes
  Status want = Status::ok;    // errors[i]
  std::vector<Bytes> cpls;     // expected completions, byte for byte
};

struct Fields {  // what a completion copies from its request (§2.2.9)
  uint16_t rid = 0;
  uint16_t tag = 0;  // 10 bits
  uint8_t tc = 0;
  uint8_t attr = 0;  // 3 bits: [2] IDO, [1] RO, [0] NS
};

// DW0 byte 1 / byte 2 fields shared by requests and completions (Figure 2-13): T9 TC T8 Attr2
// LN TH | TD EP Attr[1:0] AT Length[9:8].
uint32_t dw0(uint8_t fmt_type, const Fields& f, uint32_t length_dw) {
  const uint32_t len = length_dw & 0x3ff;  // 1024 DW is encoded as 0
  return uint32_t(fmt_type) << 24 | uint32_t((f.tag >> 9) & 1) << 23 | uint32_t(f.tc & 7) << 20 |
         uint32_t((f.tag >> 8) & 1) << 19 | uint32_t((f.attr >> 2) & 1) << 18 |
         uint32_t(f.attr & 3) << 12 | len;
}

Bytes mem_request(uint8_t type, uint64_t addr, uint32_t length_dw, unsigned fbe, unsigned lbe,
                  const Fields& f, const Bytes& payload = {}) {
  const bool wide = addr >= (uint64_t(1) << 32);
  const uint8_t fmt = uint8_t((payload.empty() ? 0 : 2) | (wide ? 1 : 0));
  Bytes b;
  put32(b, dw0(uint8_t(fmt << 5 | type), f, length_dw));
  put32(b, uint32_t(f.rid) << 16 | uint32_t(f.tag & 0xff) << 8 | (lbe & 0xf) << 4 | (fbe & 0xf));
  if (wide) put32(b, uint32_t(addr >> 32));
  put32(b, uint32_t(addr) & ~3u);
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

// A 3DW memory read header with a 4DW address below 4 GiB (§2.2.7 forbids it).
Bytes mrd_4dw_low(uint32_t addr, const Fields& f) {
  Bytes b;
  put32(b, dw0(0x20, f, 1));
  put32(b, uint32_t(f.rid) << 16 | uint32_t(f.tag & 0xff) << 8 | 0xf);
  put32(b, 0);
  put32(b, addr);
  return b;
}

Bytes cfg_request(bool write, uint16_t bdf, uint16_t reg, unsigned fbe, const Fields& f) {
  Fields z = f;
  z.tc = 0;
  z.attr = 0;
  Bytes b;
  put32(b, dw0(write ? 0x44 : 0x04, z, 1));
  put32(b, uint32_t(f.rid) << 16 | uint32_t(f.tag & 0xff) << 8 | (fbe & 0xf));
  put32(b, uint32_t(bdf) << 16 | (reg & 0xffc));
  if (write) put32(b, 0x11223344);
  return b;
}

Bytes io_read(uint32_t addr, const Fields& f) {
  Fields z = f;
  z.tc = 0;
  z.attr = 0;
  Bytes b;
  put32(b, dw0(0x02, z, 1));
  put32(b, uint32_t(f.rid) << 16 | uint32_t(f.tag & 0xff) << 8 | 0xf);
  put32(b, addr & ~3u);
  return b;
}

// A completion as Figure 2-39 draws it.
Bytes completion(bool with_data, bool locked, const Fields& f, uint16_t completer, uint8_t status,
                 uint32_t byte_count, uint8_t lower, const uint8_t* data, size_t n) {
  const uint8_t fmt_type = uint8_t((with_data ? 0x40 : 0x00) | (locked ? 0x0b : 0x0a));
  Bytes b;
  put32(b, dw0(fmt_type, f, uint32_t(n / 4)));
  put32(b, uint32_t(completer) << 16 | uint32_t(status & 7) << 13 | (byte_count & 0xfff));
  put32(b, uint32_t(f.rid) << 16 | uint32_t(f.tag & 0xff) << 8 | (lower & 0x7f));
  if (with_data) b.insert(b.end(), data, data + n);
  return b;
}

unsigned lowest(unsigned be) {
  for (unsigned i = 0; i < 4; ++i)
    if (be >> i & 1) return i;
  return 0;
}
unsigned highest(unsigned be) {
  for (unsigned i = 4; i-- > 0;)
    if (be >> i & 1) return i;
  return 0;
}

// §2.3.1.1 for a memory read of `length_dw` DWs at the DW address `addr` with data `data`
// (length_dw * 4 bytes): the expected completions.
std::vector<Bytes> read_completions(uint64_t addr, uint32_t length_dw, unsigned fbe, unsigned lbe,
                                    bool locked, const Fields& f, uint16_t completer,
                                    uint8_t status, unsigned mps, unsigned rcb, const uint8_t* data) {
  // Byte enables table: where the enabled bytes start and how many bytes the read returns.
  unsigned first = 0, count = 0;
  if (length_dw == 1) {
    if (fbe == 0) {
      count = 1;  // zero-length read
    } else {
      first = lowest(fbe);
      count = highest(fbe) - lowest(fbe) + 1;
    }
  } else {
    first = lowest(fbe);
    count = length_dw * 4 - lowest(fbe) - (3 - highest(lbe));
  }
  if (status != 0)  // no data: one completion with the whole count, at the first enabled byte
    return {completion(false, locked, f, completer, status, count, uint8_t(addr + first), nullptr, 0)};
  std::vector<Bytes> out;
  const uint64_t end = addr + uint64_t(length_dw) * 4;
  const uint64_t last = addr + first + count;  // past the last returned byte
  for (uint64_t cur = addr; cur < end;) {
    // Candidate ends: every RCB boundary inside (cur, end), and end; the farthest within MPS.
    uint64_t stop = 0;
    for (uint64_t c = (cur / rcb + 1) * rcb; c < end; c += rcb)
      if (c - cur <= mps) stop = c;
    if (end - cur <= mps) stop = end;
    const uint64_t first_byte = cur == addr ? addr + first : cur;
    out.push_back(completion(true, locked, f, completer, 0, uint32_t(last - first_byte),
                             uint8_t(first_byte), data + (cur - addr), size_t(stop - cur)));
    cur = stop;
  }
  return out;
}

struct Stream {
  Bytes reqs, data, statuses;
  std::vector<Req> items;
  void add(Req r, const uint8_t* share_data) {
    reqs.insert(reqs.end(), r.rec.begin(), r.rec.end());
    data.insert(data.end(), share_data, share_data + r.share);
    statuses.push_back(r.status);
    items.push_back(std::move(r));
  }
};

Bytes pattern(size_t n, unsigned seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = uint8_t(i * 131 + seed * 7 + (i >> 8));
  return b;
}

// The hand-made mix: reads crossing RCB boundaries at and above Max_Payload_Size, a zero-length
// read, 1-DW reads with sparse byte enables, 4DW addresses, a locked read, 10-bit tags, TC/Attr,
// error statuses, configuration / I/O requests, a posted write, and one broken request of
// each kind of field error (each gets no completion, the rest of the stream is unaffected).
Stream mixed(const CompletionParams& p) {
  Stream s;
  const unsigned mps = p.max_payload, rcb = p.rcb;
  const uint16_t cid = p.completer_id;
  unsigned seed = 0;
  auto read = [&](uint64_t addr, uint32_t dws, unsigned fbe, unsigned lbe, Fields f, uint8_t status = 0,
                  bool locked = false) {
    Req r;
    r.rec = mem_request(locked ? 0x01 : 0x00, addr, dws, fbe, lbe, f);
    r.status = status;
    r.share = status == 0 ? size_t(dws) * 4 : 0;
    const Bytes d = pattern(size_t(dws) * 4, ++seed);
    r.cpls = read_completions(addr, dws, fbe, lbe, locked, f, cid, status, mps, rcb, d.data());
    s.add(std::move(r), d.data());
  };
  auto broken = [&](Bytes rec, uint8_t status, size_t share, Status why) {
    Req r;
    r.rec = std::move(rec);
    r.status = status;
    r.share = share;
    r.want = why;
    const Bytes d = pattern(share, ++seed);
    s.add(std::move(r), d.data());
  };
  const Fields a{0x0100, 0x012, 0, 0};
  const Fields tagged{0x0203, 0x2a5, 5, 0x6};  // 10-bit tag (T9 and T8 set), TC 5, IDO + RO
  read(0xe0000000, 1, 0xf, 0, a);                     // one DW
  read(0xe0000004, 1, 0x0, 0, a);                     // zero-length read: Byte Count 1
  read(0xe0000008, 1, 0x6, 0, tagged);                // bytes 1..2 only
  read(0xe0000038, 4, 0xe, 0x3, a);                   // crosses 64 inside MPS: one completion
  read(0xe0000024, 64, 0xc, 0x1, tagged);             // 256 bytes from 0x24: RCB splits
  read(0xe0000f00, 64, 0xf, 0xf, a);                  // up to the 4 KiB boundary exactly
  read(0xe0001000, 1024, 0x8, 0x1, a);                // a whole page: Length 0, Byte Count 4090
  read(0x1234567000ull + 0x7c, 33, 0xf, 0x8, tagged);  // 4DW address
  read(0xe0000100, 40, 0xf, 0xf, a, 0, true);         // MRdLk: CplDLk
  read(0xe0000204, 8, 0x3, 0xf, a, 1);                // UR: one Cpl, no data, whole count
  read(0xe0000300, 2, 0xf, 0x1, tagged, 4, true);     // CA on a locked read: CplLk
  {  // configuration read and write, I/O read: one completion each, Byte Count 4, LA 0
    Req r;
    r.rec = cfg_request(false, 0x0100, 0x10, 0xf, a);
    r.share = 4;
    const Bytes d = pattern(4, ++seed);
    Fields z = a;
    r.cpls = {completion(true, false, z, cid, 0, 4, 0, d.data(), 4)};
    s.add(std::move(r), d.data());
    Req w;
    w.rec = cfg_request(true, 0x0100, 0x04, 0x3, a);
    w.cpls = {completion(false, false, z, cid, 0, 4, 0, nullptr, 0)};
    s.add(std::move(w), nullptr);
    Req c;  // Configuration Request Retry Status: a configuration read's only non-SC+data case
    c.rec = cfg_request(false, 0x0100, 0x00, 0xf, a);
    c.status = 2;
    c.cpls = {completion(false, false, z, cid, 2, 4, 0, nullptr, 0)};
    s.add(std::move(c), nullptr);
    Req io;
    io.rec = io_read(0x3f8, a);
    io.share = 4;
    const Bytes e = pattern(4, ++seed);
    io.cpls = {completion(true, false, z, cid, 0, 4, 0, e.data(), 4)};
    s.add(std::move(io), e.data());
  }
  {  // a posted write: no completion, no error, no data share
    Req w;
    w.rec = mem_request(0x00, 0xe0000400, 2, 0xf, 0xf, a, pattern(8, 99));
    s.add(std::move(w), nullptr);
  }
  // Field errors: no completion; an SC read still takes its data share (later requests keep
  // their data).
  broken(mem_request(0x00, 0xe0000000, 2, 0x0, 0xf, a), 0, 8, Status::first_be_zero);
  broken(mem_request(0x00, 0xe0000000, 2, 0xf, 0x0, a), 0, 8, Status::last_be_zero);
  broken(mem_request(0x00, 0xe0000000, 1, 0xf, 0x1, a), 0, 4, Status::last_be_on_single_dw);
  broken(mem_request(0x00, 0xe0000ff0, 8, 0xf, 0xf, a), 0, 32, Status::crosses_4k);
  broken(mrd_4dw_low(0xe0000000, a), 0, 4, Status::addr64_below_4g);
  broken(mem_request(0x00, 0xe0000000, 1, 0xf, 0, a), 2, 0, Status::crs_not_config);
  read(0xe0000040, 32, 0xf, 0xf, a);  // after the broken ones: its own data
  return s;
}

// What bulk_plan must report, from the oracle.
void check_plan(const Stream& s, const BulkPlan& plan) {
  CHECK(plan.requests == s.items.size());
  size_t total = 0, bad = 0, first_bad = 0, longest = 0, most = 0;
  for (size_t i = 0; i < s.items.size(); ++i) {
    const Req& r = s.items[i];
    CHECK(plan.errors[i] == uint8_t(r.want));
    if (r.want != Status::ok && bad++ == 0) first_bad = i;
    CHECK(plan.ends[i] == total);
    total += r.cpls.size();
    for (const Bytes& c : r.cpls) longest = std::max(longest, c.size());
    most = std::max(most, r.cpls.size());
  }
  CHECK(plan.ends[s.items.size()] == total && plan.completions == total);
  CHECK(plan.bad == bad && (bad == 0 || plan.first_bad == first_bad));
  CHECK(plan.longest == longest && plan.most == most);
  // The named requests really have the longest completion and the most completions.
  if (plan.longest_request < s.items.size()) {
    size_t l = 0;
    for (const Bytes& c : s.items[plan.longest_request].cpls) l = std::max(l, c.size());
    CHECK(l == longest);
  }
  CHECK(plan.most_request < s.items.size() && s.items[plan.most_request].cpls.size() == most);
}

// bulk_emit_request for every request, into slots of `cap` bytes: every byte and length.
void check_emit(const Stream& s, const CompletionParams& p, size_t cap) {
  std::vector<Bytes> slots(kMaxCompletions, Bytes(cap, 0xee));
  std::vector<uint8_t*> out(kMaxCompletions);
  for (size_t k = 0; k < out.size(); ++k) out[k] = slots[k].data();
  std::vector<uint32_t> lens(kMaxCompletions);
  size_t off = 0, used = 0;
  for (const Req& r : s.items) {
    CompletionParams rp = p;
    rp.status = r.status;
    size_t rec = 0, share = 0;
    if (r.want != Status::ok) {
      bulk_extent(s.reqs.data() + off, s.reqs.size() - off, r.status, &rec, &share);
    } else {
      const size_t n = bulk_emit_request(s.reqs.data() + off, s.reqs.size() - off,
                                         s.data.data() + used, s.data.size() - used, rp, out.data(),
                                         cap, lens.data(), &rec, &share);
      CHECK(n == r.cpls.size());
      for (size_t k = 0; k < std::min(n, r.cpls.size()); ++k) {
        CHECK(lens[k] == r.cpls[k].size());
        CHECK(std::memcmp(out[k], r.cpls[k].data(), r.cpls[k].size()) == 0);
      }
    }
    CHECK(rec == r.rec.size() && share == r.share);
    off += rec == 0 ? r.rec.size() : rec;
    used += share;
  }
  CHECK(off == s.reqs.size() && used == s.data.size());
}

// bulk_build (the two-step path) gives the same completions, in order.
void check_build(const Stream& s, const CompletionParams& p) {
  BulkSizes sz;
  CHECK(bulk_measure(s.reqs.data(), s.reqs.size(), p, &sz) == Status::ok);
  BulkStorage store;
  BulkOutput o = store.bind(sz);
  CHECK(bulk_build(s.reqs.data(), s.reqs.size(), s.data.data(), s.data.size(), s.statuses.data(),
                   s.statuses.size(), p, &o) == Status::ok);
  size_t k = 0;
  for (size_t i = 0; i < s.items.size(); ++i) {
    const Req& r = s.items[i];
    // bulk_build reports a posted write as ok and a non-request as no_completion, as bulk_plan.
    CHECK(store.errors[i] == uint8_t(r.want));
    CHECK(store.request_first[i] == k);
    for (const Bytes& c : r.cpls) {
      CHECK(k < o.completions);
      if (k >= o.completions) return;
      const uint32_t a = store.offsets[k], b = store.offsets[k + 1];
      CHECK(b - a == c.size() && std::memcmp(store.buf.data() + a, c.data(), c.size()) == 0);
      ++k;
    }
  }
  CHECK(k == o.completions && o.data_used == s.data.size());
}

void mixed_streams() {
  for (const auto& [mps, rcb] : {std::pair<uint16_t, uint16_t>{128, 64}, {256, 128}, {512, 64},
                                {4096, 128}}) {
    CompletionParams p;
    p.completer_id = 0x0a01;
    p.max_payload = mps;
    p.rcb = rcb;
    Stream s = mixed(p);
    BulkPlan plan;
    plan.reserve_for(s.reqs.size());
    CHECK(bulk_plan(s.reqs.data(), s.reqs.size(), s.data.data(), s.data.size(), s.statuses.data(),
                    s.statuses.size(), p, &plan) == Status::ok);
    check_plan(s, plan);
    check_emit(s, p, 12 + size_t(mps));
    check_build(s, p);
    // The plan's own bound is enough room: slots of exactly `longest` bytes.
    check_emit(s, p, plan.longest);
  }
}

// Random memory reads (every byte enable pair, sizes 1..1024 DW, any DW offset in a page,
// 3DW / 4DW, random statuses among SC / UR / CA), each one checked through plan and emit.
void random_reads(unsigned rounds) {
  std::mt19937 rng(20261204);
  for (unsigned round = 0; round < rounds; ++round) {
    CompletionParams p;
    p.completer_id = uint16_t(rng());
    p.max_payload = uint16_t(128u << (rng() % 6));
    p.rcb = rng() % 2 ? 64 : 128;
    Stream s;
    const unsigned n = 1 + rng() % 12;
    for (unsigned j = 0; j < n; ++j) {
      const uint32_t dws = rng() % 4 == 0 ? 1 : 1 + rng() % 1024;
      const uint64_t page = rng() % 2 ? 0xc0000000ull : 0x7ff00000000ull;
      const uint64_t max_dw = (4096 - uint64_t(dws) * 4) / 4;
      const uint64_t addr = page + (rng() % (max_dw + 1)) * 4;
      unsigned fbe = rng() % 16, lbe = rng() % 16;
      if (dws == 1) lbe = 0;
      else {
        fbe |= fbe == 0 ? 1 : 0;
        lbe |= lbe == 0 ? 8 : 0;
      }
      const uint8_t status = std::array<uint8_t, 4>{0, 0, 1, 4}[rng() % 4];
      const Fields f{uint16_t(rng()), uint16_t(rng() % 1024), uint8_t(rng() % 8), uint8_t(rng() % 8)};
      Req r;
      r.rec = mem_request(0x00, addr, dws, fbe, lbe, f);
      r.status = status;
      r.share = status == 0 ? size_t(dws) * 4 : 0;
      const Bytes d = pattern(size_t(dws) * 4, round * 31 + j);
      r.cpls = read_completions(addr, dws, fbe, lbe, false, f, p.completer_id, status, p.max_payload,
                                p.rcb, d.data());
      s.add(std::move(r), d.data());
    }
    BulkPlan plan;
    plan.reserve_for(s.reqs.size());
    CHECK(bulk_plan(s.reqs.data(), s.reqs.size(), s.data.data(), s.data.size(), s.statuses.data(),
                    s.statuses.size(), p, &plan) == Status::ok);
    check_plan(s, plan);
    check_emit(s, p, 12 + size_t(p.max_payload));
  }
}

// Whole-call failures: nothing planned (counts 0), the reason returned.
void refusals() {
  CompletionParams p;
  p.max_payload = 128;
  p.rcb = 64;
  Stream s = mixed(p);
  auto plan_with = [&](const Bytes& reqs, const Bytes& data, const uint8_t* st, size_t nst,
                       const CompletionParams& q, BulkPlan& plan) {
    const Status r = bulk_plan(reqs.data(), reqs.size(), data.data(), data.size(), st, nst, q, &plan);
    CHECK(plan.requests == 0 && plan.completions == 0 && plan.bad == 0 && plan.longest == 0);
    return r;
  };
  BulkPlan plan;
  // No room reserved (reserve_for not called): output_too_small.
  CHECK(plan_with(s.reqs, s.data, s.statuses.data(), s.statuses.size(), p, plan) ==
        Status::output_too_small);
  // Room for fewer requests than the stream has.
  plan.reserve_for(24);
  CHECK(plan_with(s.reqs, s.data, s.statuses.data(), s.statuses.size(), p, plan) ==
        Status::output_too_small);
  plan.reserve_for(s.reqs.size());
  // Data shortage: one DW missing from the last read's share; one byte extra; none at all.
  Bytes shorter(s.data.begin(), s.data.end() - 4), longer = s.data;
  longer.push_back(0);
  CHECK(plan_with(s.reqs, shorter, s.statuses.data(), s.statuses.size(), p, plan) ==
        Status::data_length_mismatch);
  CHECK(plan_with(s.reqs, longer, s.statuses.data(), s.statuses.size(), p, plan) ==
        Status::data_length_mismatch);
  CHECK(plan_with(s.reqs, Bytes{}, s.statuses.data(), s.statuses.size(), p, plan) ==
        Status::data_length_mismatch);
  // A status per request, exactly.
  CHECK(plan_with(s.reqs, s.data, s.statuses.data(), s.statuses.size() - 1, p, plan) ==
        Status::field_out_of_range);
  Bytes more = s.statuses;
  more.push_back(0);
  CHECK(plan_with(s.reqs, s.data, more.data(), more.size(), p, plan) == Status::field_out_of_range);
  // Input that does not end on a record boundary: in a header, in a payload.
  Bytes cut(s.reqs.begin(), s.reqs.end() - 1);
  CHECK(plan_with(cut, s.data, s.statuses.data(), s.statuses.size(), p, plan) ==
        Status::truncated_header);
  Bytes w = mem_request(0x00, 0xe0000000, 2, 0xf, 0xf, Fields{}, pattern(8, 1));
  w.pop_back();
  const uint8_t sc = 0;
  CHECK(plan_with(w, Bytes{}, &sc, 1, p, plan) == Status::truncated_payload);
  // Bad parameters.
  CompletionParams q = p;
  q.max_payload = 100;
  CHECK(plan_with(s.reqs, s.data, s.statuses.data(), s.statuses.size(), q, plan) ==
        Status::bad_max_payload);
  q = p;
  q.rcb = 32;
  CHECK(plan_with(s.reqs, s.data, s.statuses.data(), s.statuses.size(), q, plan) == Status::bad_rcb);
  q = p;
  q.status = 3;  // reserved Completion Status (§2.2.9 Table 2-34)
  CHECK(plan_with(s.reqs, s.data, nullptr, 0, q, plan) == Status::bad_completion_status);
  // A plan that failed leaves nothing behind: the next good call plans from scratch.
  CHECK(bulk_plan(s.reqs.data(), s.reqs.size(), s.data.data(), s.data.size(), s.statuses.data(),
                  s.statuses.size(), p, &plan) == Status::ok);
  check_plan(s, plan);

  // Emit into slots too small for the completion: nothing (0), not a partial answer.
  const Req& big = s.items[4];  // 256 bytes from 0x24: its first completion is 12 + 92 bytes
  size_t off = 0, used = 0;
  for (size_t i = 0; i < 4; ++i) {
    off += s.items[i].rec.size();
    used += s.items[i].share;
  }
  Bytes slot(4096);
  std::vector<uint8_t*> out(kMaxCompletions, slot.data());
  std::vector<uint32_t> lens(kMaxCompletions);
  size_t rec = 0, share = 0;
  size_t longest = 0;
  for (const Bytes& c : big.cpls) longest = std::max(longest, c.size());
  CHECK(bulk_emit_request(s.reqs.data() + off, s.reqs.size() - off, s.data.data() + used,
                          s.data.size() - used, p, out.data(), longest - 4, lens.data(), &rec,
                          &share) == 0);
  CHECK(rec == big.rec.size() && share == big.share);  // still tells how to step over it
  // Its data cut short: nothing either.
  CHECK(bulk_emit_request(s.reqs.data() + off, s.reqs.size() - off, s.data.data() + used,
                          big.share - 4, p, out.data(), 4096, lens.data(), &rec, &share) == 0);
}

}  // namespace

int main() {
  mixed_streams();
  random_reads(MLX5TLP_TEST_ASAN ? 200 : 2000);
  refusals();
  return mlx5tlp_test::finish("test_bulk_plan");
}
