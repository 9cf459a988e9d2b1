// Completion builder: PCIe Base §2.2.9 "Completion Rules" and §2.3.1.1 "Data Return for Read
// Requests".
#include "mlx5tlp/tlp_completion.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mlx5tlp::tlp {

namespace {

bool is_read(Kind k) {
  return k == Kind::MRd || k == Kind::MRdLk || k == Kind::IORd || k == Kind::CfgRd0 ||
         k == Kind::CfgRd1;
}
bool is_mem_read(Kind k) { return k == Kind::MRd || k == Kind::MRdLk; }
bool is_cfg(Kind k) {
  return k == Kind::CfgRd0 || k == Kind::CfgWr0 || k == Kind::CfgRd1 || k == Kind::CfgWr1;
}
bool gets_completion(Kind k) {
  return is_read(k) || k == Kind::IOWr || k == Kind::CfgWr0 || k == Kind::CfgWr1;
}
bool valid_status(uint8_t s) { return s == 0 || s == 1 || s == 2 || s == 4; }

unsigned low_bit(unsigned be) {  // be != 0
  unsigned i = 0;
  while ((be & (1u << i)) == 0) ++i;
  return i;
}
unsigned high_bit(unsigned be) {  // be != 0
  unsigned i = 3;
  while ((be & (1u << i)) == 0) --i;
  return i;
}

Status check_params(const CompletionParams& p) {
  const unsigned mps = p.max_payload;
  if (mps < 128 || mps > 4096 || (mps & (mps - 1)) != 0) return Status::bad_max_payload;
  if (p.rcb != 64 && p.rcb != 128) return Status::bad_rcb;
  if (!valid_status(p.status)) return Status::bad_completion_status;
  return Status::ok;
}

// Whether a record of `rec` bytes (record_size()) fits in the `avail` bytes at `p`.
Status check_record(const uint8_t* p, size_t avail, size_t rec) {
  if (rec != 0 && rec <= avail) return Status::ok;
  if (rec == 0) return Status::truncated_header;
  size_t h = 0;
  while ((p[h] >> 5) == 4) h += 4;  // record_size() found a header DW0 within avail
  return avail - h < header_bytes(p[h]) ? Status::truncated_header : Status::truncated_payload;
}

}  // namespace

uint8_t first_enabled_offset(const Tlp& req) noexcept {
  return req.first_be == 0 ? 0 : static_cast<uint8_t>(low_bit(req.first_be & 0xFu));
}

uint16_t read_byte_count(const Tlp& req) noexcept {
  const unsigned fbe = req.first_be & 0xFu;
  const unsigned lbe = req.last_be & 0xFu;
  if (req.length <= 1) {
    // 1 DW: span from the first to the last enabled byte; 0000b (zero-length read) counts 1.
    if (fbe == 0) return 1;
    return static_cast<uint16_t>(high_bit(fbe) - low_bit(fbe) + 1);
  }
  if (fbe == 0 || lbe == 0) return static_cast<uint16_t>(req.length * 4u);  // invalid anyway
  return static_cast<uint16_t>(req.length * 4u - low_bit(fbe) - (3 - high_bit(lbe)));
}

size_t completion_data_bytes(const Tlp& req, uint8_t status) noexcept {
  return (status == 0 && is_read(req.kind)) ? size_t{req.length} * 4 : 0;
}

namespace {

// Generate the completions for `req`, handing each to emit(const Tlp&) -> Status.
template <typename Emit>
Status generate(const Tlp& req, const uint8_t* data, size_t data_len, const CompletionParams& p,
                Emit&& emit) {
  if (Status s = check_params(p); s != Status::ok) return s;
  if (!gets_completion(req.kind)) return Status::no_completion;
  if (req.length < 1 || req.length > 1024 || req.tag > 1023) return Status::field_out_of_range;
  if (Status s = validate(req); s != Status::ok) return s;
  if (p.status == static_cast<uint8_t>(CplStatus::CRS) && !is_cfg(req.kind))
    return Status::crs_not_config;
  const size_t need = completion_data_bytes(req, p.status);
  if (data_len != need || (need != 0 && data == nullptr)) return Status::data_length_mismatch;

  // Header fields every completion copies from the request (§2.2.9): Requester ID, Tag, TC
  // and Attr (RO, NS and IDO).
  Tlp c{};
  c.type = 0x0A;
  c.tc = req.tc;
  c.attr = req.attr;
  c.requester_id = req.requester_id;
  c.completer_id = p.completer_id;
  c.tag = req.tag;
  c.status = p.status;
  const bool locked = req.kind == Kind::MRdLk;
  if (locked) c.type = 0x0B;

  if (!is_mem_read(req.kind)) {
    // IO and Configuration: one completion, Byte Count 4, Lower Address 0; data only for an
    // SC read (1 DW).
    c.byte_count = 4;
    c.lower_address = 0;
    if (need != 0) {
      c.kind = Kind::CplD;
      c.fmt = 2;
      c.length = 1;
      c.data = data;
      c.data_len = 4;
    } else {
      c.kind = Kind::Cpl;
    }
    return emit(c);
  }

  const unsigned first_off = first_enabled_offset(req);
  const unsigned total_bc = read_byte_count(req);
  const uint64_t start = req.address;  // DW aligned
  if (p.status != 0) {
    // Error completion of a memory read: no data; Byte Count = all remaining bytes, Lower
    // Address = address of the first enabled byte.
    c.kind = locked ? Kind::CplLk : Kind::Cpl;
    c.byte_count = static_cast<uint16_t>(total_bc);
    c.lower_address = static_cast<uint8_t>((start + first_off) & 0x7F);
    return emit(c);
  }

  // Successful memory read (§2.3.1.1): every completion but the last ends on an RCB-aligned
  // address; each carries as much as Max_Payload_Size allows (so a request inside one RCB
  // block is never split); Byte Count is what remains from the completion's first byte.
  // Positions are offsets in the request's 4 KiB page (a request never crosses one, validate()
  // checked): the page is RCB- and 128-byte aligned, so the low bits are the address's, and
  // nothing wraps for a request at the top of the 64-bit space (end would be 2^64 there).
  const uint64_t base = start & 0xFFF;
  const uint64_t end = base + uint64_t{req.length} * 4;       // <= 4096
  const uint64_t enabled_end = base + first_off + total_bc;  // past the last enabled byte
  const uint64_t rcb = p.rcb;
  c.kind = locked ? Kind::CplDLk : Kind::CplD;
  c.fmt = 2;
  for (uint64_t cur = base; cur < end;) {
    const uint64_t limit = cur + p.max_payload;
    const uint64_t chunk_end = end <= limit ? end : (limit & ~(rcb - 1));
    const uint64_t first_byte = cur == base ? base + first_off : cur;
    c.length = static_cast<uint16_t>((chunk_end - cur) / 4);
    c.byte_count = static_cast<uint16_t>(enabled_end - first_byte);
    c.lower_address = static_cast<uint8_t>(first_byte & 0x7F);
    c.data = data + (cur - base);
    c.data_len = static_cast<size_t>(chunk_end - cur);
    if (Status s = emit(c); s != Status::ok) return s;
    cur = chunk_end;
  }
  return Status::ok;
}

}  // namespace

Status plan_completions(const Tlp& req, const uint8_t* data, size_t data_len,
                        const CompletionParams& p, Tlp* out, size_t cap,
                        size_t* count) noexcept {
  size_t n = 0;
  Status s = generate(req, data, data_len, p, [&](const Tlp& c) {
    if (n >= cap) return Status::output_too_small;
    out[n++] = c;
    return Status::ok;
  });
  *count = s == Status::ok ? n : 0;
  return s;
}

Status build_completions(const Tlp& req, const uint8_t* data, size_t data_len,
                         const CompletionParams& p, uint8_t* out, size_t out_cap,
                         size_t* out_len, uint32_t* ends, size_t ends_cap,
                         size_t* count) noexcept {
  size_t n = 0;
  size_t used = 0;
  Status s = generate(req, data, data_len, p, [&](const Tlp& c) {
    if (n >= ends_cap) return Status::output_too_small;
    size_t w = 0;
    if (Status e = encode(c, out + used, out_cap - used, &w); e != Status::ok) return e;
    used += w;
    if (used > UINT32_MAX) return Status::output_too_small;
    ends[n++] = static_cast<uint32_t>(used);
    return Status::ok;
  });
  *out_len = s == Status::ok ? used : 0;
  *count = s == Status::ok ? n : 0;
  return s;
}

Status bulk_measure(const uint8_t* reqs, size_t len, const CompletionParams& p,
                    BulkSizes* out) noexcept {
  *out = BulkSizes{};
  if (p.rcb != 64 && p.rcb != 128) return Status::bad_rcb;
  size_t off = 0;
  while (off < len) {
    const size_t rec = record_size(reqs + off, len - off);
    if (Status s = check_record(reqs + off, len - off, rec); s != Status::ok) return s;
    // Skip TLP prefixes to the header's DW0.
    size_t h = off;
    while ((reqs[h] >> 5) == 4) h += 4;
    if ((reqs[h] & 0x40) != 0) {
      // With data: only IOWr / CfgWr get a completion (12 bytes, no data).
      out->max_completions += 1;
      out->max_bytes += 12;
    } else {
      unsigned raw_len = ((reqs[h + 2] & 3u) << 8) | reqs[h + 3];
      if (raw_len == 0) raw_len = 1024;
      const size_t bytes = size_t{raw_len} * 4;
      const size_t n = bytes / p.rcb + 2;
      out->max_completions += n;
      out->max_bytes += n * 12 + bytes;
    }
    ++out->requests;
    off += rec;
  }
  return Status::ok;
}

Status bulk_build(const uint8_t* reqs, size_t len, const uint8_t* data, size_t data_len,
                  const uint8_t* statuses, size_t n_statuses, const CompletionParams& p,
                  BulkOutput* out) noexcept {
  out->completions = 0;
  out->bytes = 0;
  out->data_used = 0;
  if (Status s = check_params(p); s != Status::ok) return s;
  if (out->buf_cap > UINT32_MAX) out->buf_cap = UINT32_MAX;
  if (out->offsets_cap < 1) return Status::output_too_small;
  out->offsets[0] = 0;
  size_t off = 0;
  size_t i = 0;
  while (off < len) {
    const size_t rec = record_size(reqs + off, len - off);
    if (Status s = check_record(reqs + off, len - off, rec); s != Status::ok) return s;
    if (statuses != nullptr && i >= n_statuses) return Status::field_out_of_range;
    if (i >= out->requests_cap) return Status::output_too_small;
    CompletionParams rp = p;
    if (statuses != nullptr) rp.status = statuses[i];
    out->request_first[i] = static_cast<uint32_t>(out->completions);
    out->errors[i] = static_cast<uint8_t>(Status::ok);

    // Data share, from the header alone so that rejected reads keep the data aligned.
    size_t h = off;
    while ((reqs[h] >> 5) == 4) h += 4;
    Kind hk{};
    size_t share = 0;
    if (kind_of(reqs[h], &hk) == Status::ok && rp.status == 0 &&
        (hk == Kind::MRd || hk == Kind::MRdLk || hk == Kind::IORd || hk == Kind::CfgRd0 ||
         hk == Kind::CfgRd1)) {
      unsigned raw_len = ((reqs[h + 2] & 3u) << 8) | reqs[h + 3];
      share = size_t{raw_len == 0 ? 1024u : raw_len} * 4;
    }
    if (share > data_len - out->data_used) return Status::data_length_mismatch;
    const uint8_t* share_ptr = data == nullptr ? nullptr : data + out->data_used;
    out->data_used += share;

    Tlp req;
    Status s = decode(reqs + off, rec, &req);
    if (s == Status::ok) {
      size_t n = 0;
      size_t w = 0;
      s = build_completions(req, share_ptr, share, rp, out->buf + out->bytes,
                            out->buf_cap - out->bytes, &w, out->offsets + out->completions + 1,
                            out->offsets_cap - out->completions - 1, &n);
      if (s == Status::output_too_small) return s;
      if (s == Status::ok) {
        uint32_t* ends = out->offsets + out->completions + 1;  // relative to this request
        for (size_t j = 0; j < n; ++j) ends[j] += static_cast<uint32_t>(out->bytes);
        out->completions += n;
        out->bytes += w;
      }
    }
    if (s == Status::no_completion && req.kind == Kind::MWr) s = Status::ok;
    out->errors[i] = static_cast<uint8_t>(s);
    ++i;
    off += rec;
  }
  if (statuses != nullptr && i != n_statuses) return Status::field_out_of_range;
  out->request_first[i] = static_cast<uint32_t>(out->completions);
  if (out->data_used != data_len) return Status::data_length_mismatch;
  return Status::ok;
}

// ---------------------------------------------------------------- fused path (bulk_plan)

namespace {

// A plain memory read that decode() and validate() accept, reduced to what its completions
// need. fast_read() takes only requests whose every field it checked itself (the checks of
// decode() and validate() for MRd / MRdLk), so anything it declines goes the general way and
// gets exactly the general path's verdict.
struct FastRead {
  uint32_t dw0 = 0, dw1 = 0;  // the request's header DW0 and DW1
  uint64_t base = 0;          // the request's offset in its 4 KiB page
  uint64_t end = 0;           // base + Length * 4
  uint64_t enabled_end = 0;   // past the last enabled byte
  unsigned first_off = 0;     // first enabled byte in the first DW
  size_t rec = 0;             // record bytes: 12 or 16
};

inline uint32_t load_be32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return __builtin_bswap32(v);
}
inline void store_be32(uint8_t* p, uint32_t v) {
  v = __builtin_bswap32(v);
  std::memcpy(p, &v, 4);
}

// A completion's payload (a multiple of 4 bytes): small ones inline. A call of the library
// memcpy for a 20-byte payload measured ~20 ns here (2-vCPU VM), more than the whole rest
// of building the completion; fixed-size copies compile to plain moves.
inline void copy_payload(uint8_t* d, const uint8_t* s, size_t n) {
  if (n > 128) {
    std::memcpy(d, s, n);
    return;
  }
  if (n >= 16) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) std::memcpy(d + i, s + i, 16);
    if (i < n) std::memcpy(d + n - 16, s + n - 16, 16);  // the tail, overlapping
    return;
  }
  if ((n & 8) != 0) {
    std::memcpy(d, s, 8);
    d += 8;
    s += 8;
  }
  if ((n & 4) != 0) std::memcpy(d, s, 4);
}

inline bool fast_read(const uint8_t* h, size_t avail, FastRead* f) {
  if (avail < 12) return false;
  const uint32_t dw0 = load_be32(h);
  // Fmt 000b / 001b (3DW / 4DW, no data), Type 00000b (MRd) or 00001b (MRdLk) (so no prefix);
  // LN and TH (DW0 byte 1 bits 1:0), TD and AT (byte 2 bits 7, 3:2) clear: no digest.
  if ((dw0 & 0xDE038C00u) != 0) return false;
  const bool wide = (dw0 & 0x20000000u) != 0;
  if (wide && avail < 16) return false;
  unsigned len = dw0 & 0x3FFu;
  if (len == 0) len = 1024;
  const uint32_t dw1 = load_be32(h + 4);
  const unsigned fbe = dw1 & 0xFu, lbe = (dw1 >> 4) & 0xFu;
  // §2.2.5 byte enable rules (validate()).
  if (len == 1 ? lbe != 0 : (fbe == 0 || lbe == 0)) return false;
  uint64_t addr = load_be32(h + 8);
  if (wide) {
    addr = addr << 32 | (load_be32(h + 12) & ~3u);
    if (addr < (uint64_t{1} << 32)) return false;  // §2.2.7: 4DW below 4 GiB
  } else {
    addr &= ~uint64_t{3};
  }
  const uint64_t base = addr & 0xFFF;
  if (base + uint64_t{len} * 4 > 4096) return false;  // §2.2.7: crosses 4 KiB
  f->dw0 = dw0;
  f->dw1 = dw1;
  f->base = base;
  f->end = base + uint64_t{len} * 4;
  // Byte Count (§2.3.1.1): first to last enabled byte; a zero-length read (1 DW, BE 0000b) 1.
  unsigned first = 0, bc;
  if (len == 1) {
    if (fbe == 0) {
      bc = 1;
    } else {
      first = unsigned(__builtin_ctz(fbe));
      bc = unsigned(31 - __builtin_clz(fbe)) - first + 1;
    }
  } else {
    first = unsigned(__builtin_ctz(fbe));
    bc = len * 4u - first - (3 - unsigned(31 - __builtin_clz(lbe)));
  }
  f->first_off = first;
  f->enabled_end = base + first + bc;
  f->rec = wide ? 16 : 12;
  return true;
}

// The chunks of generate()'s successful memory read loop: fn(cur, chunk_end).
template <typename Fn>
inline size_t fast_chunks(const FastRead& f, const CompletionParams& p, Fn&& fn) {
  const uint64_t rcb = p.rcb;
  size_t n = 0;
  for (uint64_t cur = f.base; cur < f.end; ++n) {
    const uint64_t limit = cur + p.max_payload;
    const uint64_t chunk_end = f.end <= limit ? f.end : (limit & ~(rcb - 1));
    fn(n, cur, chunk_end);
    cur = chunk_end;
  }
  return n;
}

inline size_t header_at(const uint8_t* rec) {
  size_t h = 0;
  while ((rec[h] >> 5) == 4) h += 4;
  return h;
}

}  // namespace

size_t bulk_data_share(const uint8_t* rec, uint8_t status) noexcept {
  const size_t h = header_at(rec);
  Kind k{};
  if (status != 0 || kind_of(rec[h], &k) != Status::ok || !is_read(k)) return 0;
  const unsigned raw_len = ((rec[h + 2] & 3u) << 8) | rec[h + 3];
  return size_t{raw_len == 0 ? 1024u : raw_len} * 4;
}

Status bulk_plan(const uint8_t* reqs, size_t len, const uint8_t* data, size_t data_len,
                 const uint8_t* statuses, size_t n_statuses, const CompletionParams& p,
                 BulkPlan* plan) noexcept {
  BulkPlan& b = *plan;
  auto reset = [&b] {
    b.requests = b.completions = b.bad = b.first_bad = 0;
    b.longest = b.longest_request = b.most = b.most_request = 0;
  };
  reset();
  auto fail = [&reset](Status s) {
    reset();
    return s;
  };
  if (Status s = check_params(p); s != Status::ok) return s;
  if (b.ends.empty()) return Status::output_too_small;  // reserve_for() first
  b.ends[0] = 0;
  size_t off = 0, used = 0, i = 0, total = 0;
  // The general path's scratch: one request's completions at most (bulk_measure's bound).
  alignas(8) uint8_t scratch[kMaxCompletions * 16 + 4096];
  uint32_t cends[kMaxCompletions];
  while (off < len) {
    if (statuses != nullptr && i >= n_statuses) return fail(Status::field_out_of_range);
    if (i + 1 >= b.ends.size() || i >= b.errors.size()) return fail(Status::output_too_small);
    CompletionParams rp = p;
    if (statuses != nullptr) rp.status = statuses[i];
    const uint8_t* r = reqs + off;
    Status s = Status::ok;
    size_t count = 0, longest = 0, rec = 0;
    FastRead f;
    if (rp.status == 0 && fast_read(r, len - off, &f)) {
      rec = f.rec;
      const size_t share = size_t(f.end - f.base);
      if (share > data_len - used) return fail(Status::data_length_mismatch);
      used += share;
      count = fast_chunks(f, rp, [&](size_t, uint64_t cur, uint64_t chunk_end) {
        longest = std::max<size_t>(longest, 12 + size_t(chunk_end - cur));
      });
    } else {
      rec = record_size(r, len - off);
      if (Status c = check_record(r, len - off, rec); c != Status::ok) return fail(c);
      const size_t share = bulk_data_share(r, rp.status);
      if (share > data_len - used) return fail(Status::data_length_mismatch);
      const uint8_t* share_ptr = data == nullptr ? nullptr : data + used;
      used += share;
      Tlp req;
      s = decode(r, rec, &req);
      if (s == Status::ok) {
        size_t w = 0;
        s = build_completions(req, share_ptr, share, rp, scratch, sizeof scratch, &w, cends,
                              kMaxCompletions, &count);
        for (size_t k = 0; s == Status::ok && k < count; ++k)
          longest = std::max<size_t>(longest, cends[k] - (k == 0 ? 0 : cends[k - 1]));
      }
      if (s == Status::no_completion && req.kind == Kind::MWr) s = Status::ok;
      if (s != Status::ok) count = longest = 0;
    }
    b.errors[i] = static_cast<uint8_t>(s);
    if (s != Status::ok && b.bad++ == 0) b.first_bad = i;
    if (longest > b.longest) {
      b.longest = longest;
      b.longest_request = i;
    }
    if (count > b.most) {
      b.most = count;
      b.most_request = i;
    }
    total += count;
    if (total > UINT32_MAX) return fail(Status::output_too_small);
    b.ends[i + 1] = static_cast<uint32_t>(total);
    ++i;
    off += rec;
  }
  if (statuses != nullptr && i != n_statuses) return fail(Status::field_out_of_range);
  if (used != data_len) return fail(Status::data_length_mismatch);
  b.requests = i;
  b.completions = total;
  return Status::ok;
}

void bulk_extent(const uint8_t* rec, size_t avail, uint8_t status, size_t* rec_len,
                 size_t* share_len) noexcept {
  *rec_len = record_size(rec, avail);
  *share_len = *rec_len != 0 && *rec_len <= avail ? bulk_data_share(rec, status) : 0;
}

size_t bulk_emit_request(const uint8_t* rec, size_t avail, const uint8_t* data,
                         size_t data_avail, const CompletionParams& p, uint8_t* const* out,
                         size_t cap, uint32_t* lens, size_t* rec_len,
                         size_t* share_len) noexcept {
  FastRead f;
  if (p.status == 0 && fast_read(rec, avail, &f)) {
    *rec_len = f.rec;
    const size_t share = size_t(f.end - f.base);
    *share_len = share;
    if (share > data_avail || data == nullptr) return 0;
    // The CplD header from the request's header words (§2.2.9): DW0 keeps T9, TC, T8 and
    // Attr[2] (byte 1; LN and TH are 0, fast_read checked) and Attr[1:0] (byte 2; the
    // completion's TD and EP are 0); DW2 takes the Requester ID and Tag[7:0] from DW1.
    const uint32_t dw0 = ((f.dw0 & 0x01000000u) != 0 ? 0x4B000000u : 0x4A000000u) |
                         (f.dw0 & 0x00FF3000u);
    const uint32_t dw1 = uint32_t{p.completer_id} << 16;
    const uint32_t dw2 = f.dw1 & 0xFFFFFF00u;
    bool fits = true;
    const size_t n = fast_chunks(f, p, [&](size_t k, uint64_t cur, uint64_t chunk_end) {
      const size_t bytes = size_t(chunk_end - cur);
      if (!fits || 12 + bytes > cap) {
        fits = false;
        return;
      }
      const uint64_t first_byte = cur == f.base ? f.base + f.first_off : cur;
      const uint32_t dw = static_cast<uint32_t>(bytes / 4) & 0x3FFu;  // 1024 DW encodes as 0
      const uint32_t bc = static_cast<uint32_t>(f.enabled_end - first_byte) & 0xFFFu;  // 4096: 0
      uint8_t* o = out[k];
      store_be32(o, dw0 | dw);
      store_be32(o + 4, dw1 | bc);
      store_be32(o + 8, dw2 | static_cast<uint32_t>(first_byte & 0x7F));
      copy_payload(o + 12, data + (cur - f.base), bytes);
      lens[k] = static_cast<uint32_t>(12 + bytes);
    });
    return fits ? n : 0;
  }
  bulk_extent(rec, avail, p.status, rec_len, share_len);
  if (*rec_len == 0 || *rec_len > avail || *share_len > data_avail) return 0;
  Tlp req;
  if (decode(rec, *rec_len, &req) != Status::ok) return 0;
  size_t n = 0;
  const Status s = generate(req, data == nullptr ? nullptr : data, *share_len, p,
                            [&](const Tlp& c) {
    if (n >= kMaxCompletions) return Status::output_too_small;
    size_t w = 0;
    if (Status e = encode(c, out[n], cap, &w); e != Status::ok) return e;
    lens[n++] = static_cast<uint32_t>(w);
    return Status::ok;
  });
  return s == Status::ok ? n : 0;
}

}  // namespace mlx5tlp::tlp
