// Completion builder: PCIe Base §2.2.9 "Completion Rules" and §2.3.1.1 "Data Return for Read
// Requests".
#include "mlx5tlp/tlp_completion.hpp"

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

}  // namespace mlx5tlp::tlp
