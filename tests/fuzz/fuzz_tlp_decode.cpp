// libFuzzer target: the TLP header codec (cpp/src/tlp.cpp).
//
// Properties, on every input:
//  1. decode(bytes) returns a defined Status and never reads outside the input (ASan: the
//     input is an exact-size heap copy). When it returns ok, the TLP is valid (validate()),
//     record_size() and encoded_size() both give the input's length, and encode(decode(x))
//     reproduces x in every bit the header defines (reserved bits are written as 0, PCIe Base
//     §2.2.1 "Reserved fields"), and decodes back to the same fields.
//  2. encode(fields) of arbitrary fields (taken from the same bytes) into an exact-size buffer
//     of arbitrary capacity never writes outside it, writes exactly encoded_size() bytes when
//     it succeeds, reports output_too_small exactly when the capacity is short, and what it
//     wrote decodes to the same fields (those the kind carries).
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_check.hpp"

using namespace mlx5tlp::tlp;
using fuzz::is_cfg;
using fuzz::is_completion;
using fuzz::is_mem;
using fuzz::is_message;

namespace {

bool length_reserved(Kind k) { return k == Kind::Cpl || k == Kind::CplLk || k == Kind::Msg; }

// Bits of the wire header that carry a field of `t` (the others are Reserved: encode writes
// them as 0 and decode ignores them).
void defined_bits(const Tlp& t, size_t hdr, uint8_t* mask) {
  std::memset(mask, 0xff, hdr);
  if (length_reserved(t.kind)) {  // Length[9:0] is Reserved
    mask[2] &= 0xfc;
    mask[3] = 0;
  }
  if (is_completion(t.kind)) {
    mask[11] &= 0x7f;  // DW2 bit 7: R (§2.2.9 completion header)
  } else if (is_cfg(t.kind)) {
    mask[10] &= 0x0f;  // DW2 [15:12]: R
    mask[11] &= 0xfc;  // DW2 [1:0]: R
  } else if (!is_message(t.kind)) {
    mask[hdr - 1] &= 0xfc;  // memory: PH[1:0] (TPH, unsupported: TH is 0); I/O: R
  }
}

void decode_properties(const uint8_t* data, size_t size) {
  Tlp t;
  const Status s = decode(data, size, &t);
  FUZZ_CHECK(static_cast<int>(s) < kStatusCount, "status %d", static_cast<int>(s));
  FUZZ_CHECK(reason(s) != nullptr && status_name(s) != nullptr, "no text for status");
  const size_t rs = record_size(data, size);
  if (s != Status::ok) return;

  FUZZ_CHECK(validate(t) == Status::ok, "decoded TLP fails validate: %s",
             status_name(validate(t)));
  FUZZ_CHECK(rs == size, "record_size %zu, decoded %zu bytes", rs, size);
  FUZZ_CHECK(encoded_size(t) == size, "encoded_size %zu of a %zu-byte TLP", encoded_size(t), size);
  FUZZ_CHECK(kind_name(t.kind) != nullptr, "kind %d", static_cast<int>(t.kind));
  if (t.data_len != 0)
    FUZZ_CHECK(t.data >= data && t.data + t.data_len <= data + size, "payload outside the input");

  std::vector<uint8_t> out(size);
  size_t w = 0;
  Status e = encode(t, out.data(), out.size(), &w);
  FUZZ_CHECK(e == Status::ok && w == size, "re-encode of a decoded %s: %s, %zu bytes",
             kind_name(t.kind), status_name(e), w);
  const size_t hdr = header_bytes(data[0]);
  uint8_t mask[16];
  defined_bits(t, hdr, mask);
  for (size_t i = 0; i < size; ++i) {
    const uint8_t m = i < hdr ? mask[i] : 0xff;
    FUZZ_CHECK(((out[i] ^ data[i]) & m) == 0, "%s: byte %zu re-encoded as %02x, was %02x",
               kind_name(t.kind), i, out[i], data[i]);
  }
  Tlp u;
  e = decode(out.data(), out.size(), &u);
  const char* what = "";
  FUZZ_CHECK(e == Status::ok && fuzz::same(t, u, &what), "%s: decode(encode(t)) differs in %s (%s)",
             kind_name(t.kind), what, status_name(e));
  std::vector<uint8_t> short_out(size - 1);
  e = encode(t, short_out.data(), short_out.size(), &w);
  FUZZ_CHECK(e == Status::output_too_small && w == 0, "1 byte short: %s", status_name(e));
}

// What decode() must give back for an encoded `t`: the wire format encode() chose and only the
// fields `t.kind` carries.
Tlp expected_decode(const Tlp& t) {
  Tlp n = t;
  const bool wide = is_message(t.kind) || (is_mem(t.kind) && (t.fmt & 1) != 0);
  Tlp f = t;
  set_format(&f);
  n.type = f.type;
  n.fmt = static_cast<uint8_t>((has_data(t.kind) ? 2 : 0) | (wide ? 1 : 0));
  if (!is_completion(t.kind)) {
    n.completer_id = 0;
    n.status = 0;
    n.bcm = false;
    n.byte_count = 0;
    n.lower_address = 0;
  } else {
    n.first_be = n.last_be = 0;
    n.address = 0;
  }
  if (!is_message(t.kind)) {
    n.message_code = 0;
    n.routing = 0;
  } else {
    n.first_be = n.last_be = 0;
  }
  if (!is_cfg(t.kind)) n.dest_id = 0;
  if (!t.td) n.digest = 0;
  return n;
}

void encode_properties(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  Tlp t;
  t.kind = static_cast<Kind>(in.ConsumeIntegralInRange<int>(0, kKindCount));  // one past: invalid
  t.fmt = in.ConsumeIntegral<uint8_t>();
  t.tc = in.ConsumeIntegralInRange<uint8_t>(0, 8);
  t.attr = in.ConsumeIntegralInRange<uint8_t>(0, 8);
  t.td = in.ConsumeBool();
  t.ep = in.ConsumeBool();
  t.length = in.ConsumeIntegralInRange<uint16_t>(0, 1025);
  t.requester_id = in.ConsumeIntegral<uint16_t>();
  t.completer_id = in.ConsumeIntegral<uint16_t>();
  t.tag = in.ConsumeIntegralInRange<uint16_t>(0, 1024);
  t.first_be = in.ConsumeIntegralInRange<uint8_t>(0, 16);
  t.last_be = in.ConsumeIntegralInRange<uint8_t>(0, 16);
  t.address = in.ConsumeBool() ? in.ConsumeIntegral<uint64_t>() : in.ConsumeIntegral<uint16_t>();
  t.dest_id = in.ConsumeIntegral<uint16_t>();
  t.status = in.ConsumeIntegralInRange<uint8_t>(0, 8);
  t.bcm = in.ConsumeBool();
  t.byte_count = in.ConsumeIntegralInRange<uint16_t>(0, 4097);
  t.lower_address = in.ConsumeIntegralInRange<uint8_t>(0, 128);
  t.message_code = in.ConsumeIntegral<uint8_t>();
  t.routing = in.ConsumeIntegralInRange<uint8_t>(0, 8);
  t.digest = in.ConsumeIntegral<uint32_t>();
  const size_t cap = in.ConsumeIntegralInRange<size_t>(0, 4200);
  // Usually the payload the header needs, sometimes another length.
  const size_t want = in.ConsumeBool() ? size_t{t.length} * 4 : in.ConsumeIntegralInRange<size_t>(0, 4100);
  std::vector<uint8_t> payload = in.ConsumeBytes<uint8_t>(want);
  t.data = payload.empty() ? nullptr : payload.data();
  t.data_len = payload.size();

  std::vector<uint8_t> out(cap);
  size_t w = 1;
  const Status s = encode(t, out.data(), out.size(), &w);
  FUZZ_CHECK(static_cast<int>(s) < kStatusCount, "status %d", static_cast<int>(s));
  if (s == Status::output_too_small) {
    FUZZ_CHECK(w == 0 && encoded_size(t) > cap, "output_too_small with %zu of %zu bytes", cap,
               encoded_size(t));
    std::vector<uint8_t> big(encoded_size(t));
    const Status s2 = encode(t, big.data(), big.size(), &w);
    FUZZ_CHECK(s2 == Status::ok && w == big.size(), "with room: %s", status_name(s2));
    return;
  }
  if (s != Status::ok) {
    FUZZ_CHECK(w == 0, "failed encode wrote %zu", w);
    return;
  }
  FUZZ_CHECK(w == encoded_size(t) && w <= cap, "wrote %zu, encoded_size %zu, cap %zu", w,
             encoded_size(t), cap);
  Tlp u;
  const Status d = decode(out.data(), w, &u);
  const char* what = "";
  FUZZ_CHECK(d == Status::ok && fuzz::same(expected_decode(t), u, &what),
             "%s: encoded TLP decodes with %s, differs in %s", kind_name(t.kind), status_name(d),
             what);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  decode_properties(data, size);
  encode_properties(data, size);
  return 0;
}
