// libFuzzer target: the completion builder and the bulk builder (cpp/src/tlp_completion.cpp).
//
// Input: 8 parameter bytes, then request TLPs back to back (the gateway's input format):
//   [0..1] completer ID (LE)   [2] Max_Payload_Size: 128 << (b % 6), raw b * 37 when b >= 0xf8
//   [3] RCB: 64 or 128 by bit 0, raw b when b >= 0xf8   [4] completion status (0..7)
//   [5] bit 0: per-request statuses (from [7])   [6] how far to shrink the output buffers
//   [7] seed of the per-request statuses
// Read data is a fixed pattern, as long as the requests need (so the data checks are exact).
//
// Properties (PCIe Base §2.2.9 "Completion Rules", §2.3.1.1 "Data Return for Read Requests"):
//  * single request: every completion decodes and is valid; Requester ID, Tag, TC and Attr are
//    the request's; IO/Configuration: one completion, Byte Count 4, Lower Address 0, one DW of
//    data for an SC read; memory read: error status -> one Cpl with the whole Byte Count, SC ->
//    payloads concatenate to the data, each at most Max_Payload_Size, every completion but the
//    last ends on an RCB-aligned address, Byte Count = bytes still to return from the
//    completion's first byte, Lower Address = that byte's address bits 6:0. plan_completions()
//    and build_completions() agree. Outputs smaller than needed give output_too_small and
//    nothing is written outside them (exact-size heap buffers under ASan).
//  * bulk: bulk_measure()'s sizes always suffice; bulk_build() writes within every capacity,
//    each request's completions are byte for byte what build_completions() gives for it alone,
//    errors[] holds its status, and smaller outputs give output_too_small, never an overflow.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_check.hpp"
#include "mlx5tlp/tlp_completion.hpp"

using namespace mlx5tlp::tlp;

namespace {

constexpr size_t kMaxRequests = 64;  // per input: keeps every execution fast

bool is_read(Kind k) {
  return k == Kind::MRd || k == Kind::MRdLk || k == Kind::IORd || k == Kind::CfgRd0 ||
         k == Kind::CfgRd1;
}

unsigned low(unsigned be) { return be & 1 ? 0 : be & 2 ? 1 : be & 4 ? 2 : 3; }
unsigned high(unsigned be) { return be & 8 ? 3 : be & 4 ? 2 : be & 2 ? 1 : 0; }

// §2.3.1.1, "Calculating Byte Count" tables, written out independently of the builder.
unsigned expected_byte_count(const Tlp& r) {
  if (r.length == 1) return r.first_be == 0 ? 1 : high(r.first_be) - low(r.first_be) + 1;
  return r.length * 4u - low(r.first_be) - (3 - high(r.last_be));
}

std::vector<uint8_t> pattern(size_t n, size_t from) {
  std::vector<uint8_t> d(n);
  for (size_t i = 0; i < n; ++i) d[i] = static_cast<uint8_t>((from + i) * 7 + 3);
  return d;
}

struct Built {
  Status status;
  std::vector<uint8_t> bytes;
  std::vector<uint32_t> ends;
};

Built build(const Tlp& req, const std::vector<uint8_t>& data, const CompletionParams& p,
            size_t out_cap, size_t ends_cap) {
  Built b;
  std::vector<uint8_t> out(out_cap);
  std::vector<uint32_t> ends(ends_cap);
  size_t len = 1, count = 1;
  b.status = build_completions(req, data.empty() ? nullptr : data.data(), data.size(), p,
                               out.data(), out.size(), &len, ends.data(), ends.size(), &count);
  if (b.status != Status::ok) {
    FUZZ_CHECK(len == 0 && count == 0, "failed build reports %zu bytes, %zu completions", len, count);
    return b;
  }
  FUZZ_CHECK(len <= out_cap && count <= ends_cap, "%zu bytes / %zu completions in %zu / %zu", len,
             count, out_cap, ends_cap);
  b.bytes.assign(out.begin(), out.begin() + static_cast<ptrdiff_t>(len));
  b.ends.assign(ends.begin(), ends.begin() + static_cast<ptrdiff_t>(count));
  return b;
}

void check_single(const Tlp& req, const CompletionParams& p, uint8_t shrink) {
  const size_t need = completion_data_bytes(req, p.status);
  const std::vector<uint8_t> data = pattern(need, 0);
  const size_t full_out = kMaxCompletions * 16 + 4096;
  const Built b = build(req, data, p, full_out, kMaxCompletions);

  std::vector<Tlp> plan(kMaxCompletions);
  size_t pn = 0;
  const Status ps = plan_completions(req, data.empty() ? nullptr : data.data(), data.size(), p,
                                     plan.data(), plan.size(), &pn);
  FUZZ_CHECK(ps == b.status,
             "plan_completions %s, build_completions %s (%s length %u address 0x%llx BE %x/%x, "
             "MPS %u RCB %u)",
             status_name(ps), status_name(b.status), kind_name(req.kind), req.length,
             static_cast<unsigned long long>(req.address), req.first_be, req.last_be,
             p.max_payload, p.rcb);
  if (b.status != Status::ok) return;
  FUZZ_CHECK(pn == b.ends.size() && pn >= 1, "plan %zu, built %zu completions", pn, b.ends.size());

  const bool mem = req.kind == Kind::MRd || req.kind == Kind::MRdLk;
  const bool locked = req.kind == Kind::MRdLk;
  const unsigned first_off = req.first_be == 0 ? 0 : low(req.first_be);
  const unsigned total_bc = mem ? expected_byte_count(req) : 4;
  const uint64_t enabled_end = req.address + first_off + total_bc;
  if (!mem || p.status != 0) FUZZ_CHECK(pn == 1, "%zu completions, expected one", pn);
  size_t at = 0, payload_at = 0;
  for (size_t k = 0; k < pn; ++k) {
    FUZZ_CHECK(b.ends[k] > at && b.ends[k] <= b.bytes.size(), "ends[%zu] = %u", k, b.ends[k]);
    Tlp c;
    const Status d = decode(b.bytes.data() + at, b.ends[k] - at, &c);
    FUZZ_CHECK(d == Status::ok, "completion %zu does not decode: %s", k, status_name(d));
    std::vector<uint8_t> again(encoded_size(plan[k]));
    size_t w = 0;
    FUZZ_CHECK(encode(plan[k], again.data(), again.size(), &w) == Status::ok &&
                   w == b.ends[k] - at && std::memcmp(again.data(), b.bytes.data() + at, w) == 0,
               "plan[%zu] differs from the built completion", k);
    at = b.ends[k];
    FUZZ_CHECK(c.requester_id == req.requester_id && c.tag == req.tag && c.tc == req.tc &&
                   c.attr == req.attr,
               "completion %zu: transaction ID / TC / Attr not the request's", k);
    FUZZ_CHECK(c.completer_id == p.completer_id && c.status == p.status && !c.bcm && !c.ep && !c.td,
               "completion %zu: completer %04x status %u bcm %d", k, c.completer_id, c.status, c.bcm);
    const bool with_data = p.status == 0 && is_read(req.kind);
    const Kind want = with_data ? (locked ? Kind::CplDLk : Kind::CplD) : (locked ? Kind::CplLk : Kind::Cpl);
    FUZZ_CHECK(c.kind == want, "completion %zu is %s, expected %s", k, kind_name(c.kind), kind_name(want));
    if (!mem) {
      FUZZ_CHECK(c.byte_count == 4 && c.lower_address == 0, "IO/Cfg completion: BC %u LA %u",
                 c.byte_count, c.lower_address);
      FUZZ_CHECK(!with_data || (c.length == 1 && std::memcmp(c.data, data.data(), 4) == 0),
                 "IO/Cfg read data");
      continue;
    }
    const uint64_t first_byte = k == 0 ? req.address + first_off : req.address + payload_at;
    FUZZ_CHECK(c.byte_count == enabled_end - first_byte, "completion %zu: Byte Count %u, expected %llu",
               k, c.byte_count, static_cast<unsigned long long>(enabled_end - first_byte));
    FUZZ_CHECK(c.lower_address == (first_byte & 0x7f), "completion %zu: Lower Address %u, expected %llu",
               k, c.lower_address, static_cast<unsigned long long>(first_byte & 0x7f));
    if (!with_data) continue;
    FUZZ_CHECK(c.data_len <= p.max_payload, "payload %zu > Max_Payload_Size %u", c.data_len, p.max_payload);
    FUZZ_CHECK(payload_at + c.data_len <= data.size() &&
                   std::memcmp(c.data, data.data() + payload_at, c.data_len) == 0,
               "completion %zu carries the wrong data", k);
    payload_at += c.data_len;
    if (k + 1 < pn)
      FUZZ_CHECK((req.address + payload_at) % p.rcb == 0, "completion %zu ends off the RCB (%u)", k, p.rcb);
  }
  if (mem && p.status == 0)
    FUZZ_CHECK(payload_at == data.size(), "%zu of %zu data bytes returned", payload_at, data.size());

  // Smaller outputs: output_too_small or the same result, never a write outside them.
  const size_t out_cap = shrink >= 0xf0 ? b.bytes.size() : b.bytes.size() * shrink / 256;
  const size_t ends_cap = (shrink & 0x10) != 0 ? pn : pn * (shrink & 0xf) / 16;
  const Built s = build(req, data, p, out_cap, ends_cap);
  if (out_cap >= b.bytes.size() && ends_cap >= pn)
    FUZZ_CHECK(s.status == Status::ok && s.bytes == b.bytes, "with exact room: %s", status_name(s.status));
  else
    FUZZ_CHECK(s.status == Status::output_too_small, "short output: %s", status_name(s.status));
}

uint8_t status_for(uint8_t seed, size_t i) {
  static const uint8_t table[8] = {0, 0, 0, 1, 2, 4, 0, 3};  // mostly valid, SC most often
  return table[(seed + i * 5 + (i >> 3)) & 7];
}

// Bytes of read data the bulk builder consumes: the documented contract, from each header.
size_t bulk_data_bytes(const uint8_t* reqs, size_t len, const uint8_t* statuses, uint8_t status) {
  size_t off = 0, i = 0, total = 0;
  while (off < len) {
    const size_t rec = record_size(reqs + off, len - off);
    size_t h = off;
    while ((reqs[h] >> 5) == 4) h += 4;
    Kind k{};
    const uint8_t st = statuses != nullptr ? statuses[i] : status;
    if (kind_of(reqs[h], &k) == Status::ok && st == 0 && is_read(k)) {
      const unsigned n = ((reqs[h + 2] & 3u) << 8) | reqs[h + 3];
      total += size_t{n == 0 ? 1024u : n} * 4;
    }
    off += rec;
    ++i;
  }
  return total;
}

void check_bulk(const uint8_t* reqs, size_t len, const CompletionParams& p, bool per_request,
                uint8_t seed, uint8_t shrink) {
  BulkSizes sz;
  if (bulk_measure(reqs, len, p, &sz) != Status::ok) return;
  FUZZ_CHECK(sz.requests <= len / 4, "%zu requests in %zu bytes", sz.requests, len);
  std::vector<uint8_t> statuses(sz.requests);
  for (size_t i = 0; i < sz.requests; ++i) statuses[i] = status_for(seed, i);
  const uint8_t* st = per_request ? statuses.data() : nullptr;
  const std::vector<uint8_t> data = pattern(bulk_data_bytes(reqs, len, st, p.status), 0);

  std::vector<uint8_t> buf(sz.max_bytes);
  std::vector<uint32_t> offsets(sz.max_completions + 1), first(sz.requests + 1);
  std::vector<uint8_t> errors(sz.requests);
  BulkOutput o;
  o.buf = buf.data();
  o.buf_cap = buf.size();
  o.offsets = offsets.data();
  o.offsets_cap = offsets.size();
  o.request_first = first.data();
  o.errors = errors.data();
  o.requests_cap = errors.size();
  const Status s = bulk_build(reqs, len, data.empty() ? nullptr : data.data(), data.size(), st,
                              per_request ? statuses.size() : 0, p, &o);
  FUZZ_CHECK(s != Status::output_too_small, "bulk_measure's sizes were too small");
  FUZZ_CHECK(s == Status::ok || s == Status::bad_max_payload || s == Status::bad_completion_status,
             "bulk_build of a measured input: %s", status_name(s));
  if (s != Status::ok) return;
  FUZZ_CHECK(o.bytes <= buf.size() && o.completions <= sz.max_completions && o.data_used == data.size(),
             "%zu bytes, %zu completions, %zu data", o.bytes, o.completions, o.data_used);
  FUZZ_CHECK(offsets[0] == 0 && offsets[o.completions] == o.bytes && first[0] == 0 &&
                 first[sz.requests] == o.completions,
             "offsets / request_first do not span the output");

  // Each request against a build of it alone.
  size_t off = 0, used = 0;
  for (size_t i = 0; i < sz.requests; ++i) {
    const size_t rec = record_size(reqs + off, len - off);
    CompletionParams rp = p;
    if (per_request) rp.status = statuses[i];
    Tlp req;
    Status want = decode(reqs + off, rec, &req);
    Built alone{want, {}, {}};
    size_t h = off;
    while ((reqs[h] >> 5) == 4) h += 4;
    Kind hk{};
    const bool reads = kind_of(reqs[h], &hk) == Status::ok && rp.status == 0 && is_read(hk);
    const unsigned raw = ((reqs[h + 2] & 3u) << 8) | reqs[h + 3];
    const size_t share = reads ? size_t{raw == 0 ? 1024u : raw} * 4 : 0;
    if (want == Status::ok) {
      alone = build(req, pattern(share, used), rp, kMaxCompletions * 16 + 4096, kMaxCompletions);
      want = alone.status;
      if (want == Status::no_completion && req.kind == Kind::MWr) want = Status::ok;
    }
    used += share;
    FUZZ_CHECK(errors[i] == static_cast<uint8_t>(want), "request %zu: errors %s, alone %s", i,
               status_name(static_cast<Status>(errors[i])), status_name(want));
    FUZZ_CHECK(first[i] <= first[i + 1], "request_first decreases at %zu", i);
    const size_t n = first[i + 1] - first[i];
    FUZZ_CHECK(n == alone.ends.size(), "request %zu: %zu completions in bulk, %zu alone", i, n,
               alone.ends.size());
    const uint32_t base = offsets[first[i]];
    for (size_t k = 0; k < n; ++k) {
      const uint32_t from = offsets[first[i] + k], to = offsets[first[i] + k + 1];
      const uint32_t afrom = k == 0 ? 0 : alone.ends[k - 1];
      FUZZ_CHECK(to > from && to - from == alone.ends[k] - afrom && from - base == afrom &&
                     std::memcmp(buf.data() + from, alone.bytes.data() + afrom, to - from) == 0,
                 "request %zu completion %zu differs from its build alone", i, k);
    }
    off += rec;
  }

  // Smaller outputs: ok (the bounds are upper bounds) or output_too_small, nothing written
  // outside the exact-size buffers.
  const size_t total_bytes = o.bytes, total_completions = o.completions;
  std::vector<uint8_t> sbuf(shrink >= 0xf0 ? total_bytes : total_bytes * shrink / 256);
  std::vector<uint32_t> soff((shrink & 0x10) != 0 ? total_completions + 1
                                                  : (total_completions + 1) * (shrink & 0xf) / 16);
  o.buf = sbuf.data();
  o.buf_cap = sbuf.size();
  o.offsets = soff.data();
  o.offsets_cap = soff.size();
  const Status s2 = bulk_build(reqs, len, data.empty() ? nullptr : data.data(), data.size(), st,
                               per_request ? statuses.size() : 0, p, &o);
  if (sbuf.size() >= total_bytes && soff.size() > total_completions)
    FUZZ_CHECK(s2 == Status::ok, "with exact room: %s", status_name(s2));
  else
    FUZZ_CHECK(s2 == Status::output_too_small, "short bulk output: %s", status_name(s2));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uint8_t h[8] = {};
  std::memcpy(h, data, size < 8 ? size : 8);
  const uint8_t* reqs = data + (size < 8 ? size : 8);
  const size_t len = size < 8 ? 0 : size - 8;
  CompletionParams p;
  p.completer_id = static_cast<uint16_t>(h[0] | h[1] << 8);
  p.max_payload = static_cast<uint16_t>(h[2] >= 0xf8 ? h[2] * 37 : 128 << (h[2] % 6));
  p.rcb = static_cast<uint16_t>(h[3] >= 0xf8 ? h[3] : (h[3] & 1) ? 128 : 64);
  p.status = h[4] & 7;

  size_t off = 0;
  for (size_t n = 0; off < len && n < kMaxRequests; ++n) {
    const size_t rec = record_size(reqs + off, len - off);
    if (rec == 0 || rec > len - off) break;
    Tlp req;
    if (decode(reqs + off, rec, &req) == Status::ok) check_single(req, p, h[6]);
    off += rec;
  }
  if (off == len && len / 12 <= kMaxRequests) check_bulk(reqs, len, p, (h[5] & 1) != 0, h[7], h[6]);
  return 0;
}
