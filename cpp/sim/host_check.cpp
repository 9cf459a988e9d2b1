#include "host_check.hpp"

#include "state.hpp"

namespace mlx5tlp::sim {

namespace {

// Just enough TLP decoding to match completions to requests (full codec: mlx5tlp/tlp.hpp).
struct Hdr {
  uint8_t fmt, type;
  uint32_t length;  // DWs
  uint16_t rid;     // requester id
  uint16_t tag;     // 10-bit
};

Hdr common(const uint8_t* p) {
  Hdr h{};
  h.fmt = p[0] >> 5;
  h.type = p[0] & 0x1f;
  h.length = ((p[2] & 0x3u) << 8) | p[3];
  if (h.length == 0) h.length = 1024;
  return h;
}

uint16_t tag10(const uint8_t* p, uint8_t tag_byte) {
  return uint16_t(((p[1] & 0x80u) << 2) | ((p[1] & 0x08u) << 5) | tag_byte);
}

int lowest_bit(unsigned be) { return be == 0 ? 0 : __builtin_ctz(be); }
int highest_bit(unsigned be) { return be == 0 ? 3 : 31 - __builtin_clz(be); }

}  // namespace

void Checker::track_request(const uint8_t* p, size_t len) {
  ++stats.requests;
  if (len < 12) return;
  Hdr h = common(p);
  const bool has_data = h.fmt & 0x2;
  const uint16_t rid = get_be16(p + 4);
  const uint16_t tag = tag10(p, p[6]);
  const unsigned first_be = p[7] & 0xf, last_be = p[7] >> 4;
  Outstanding o{};
  if (h.type == 0x00 || h.type == 0x01) {  // MRd / MRdLk (MWr is posted: nothing to track)
    if (has_data) return;
    o.memory = true;
    o.expects_data = true;
    uint64_t addr = (h.fmt & 0x1) ? ((uint64_t(get_be32(p + 8)) << 32) | get_be32(p + 12))
                                  : get_be32(p + 8);
    addr &= ~uint64_t(3);
    if (h.length == 1) {
      o.remaining = first_be == 0 ? 1 : uint32_t(highest_bit(first_be) - lowest_bit(first_be) + 1);
    } else {
      o.remaining = h.length * 4 - uint32_t(lowest_bit(first_be)) - uint32_t(3 - highest_bit(last_be));
    }
    o.next_la = uint32_t(addr + uint32_t(lowest_bit(first_be))) & 0x7f;
  } else if (h.type == 0x02 || h.type == 0x04 || h.type == 0x05) {  // IO, Cfg0, Cfg1
    o.expects_data = !has_data;
    o.remaining = 4;
  } else {
    return;  // posted or a message
  }
  outstanding[(uint32_t(rid) << 16) | tag] = o;
  stats.outstanding = outstanding.size();
}

void Checker::check_completion(const uint8_t* p, size_t len) {
  if (len >= 16 && (p[0] & 0xdf) == 0x40) {
    // A Memory Write from the function: its MSI-X message (§7.7.2: a DWORD MWr of the vector's
    // Message Data to its Message Address). Not a completion; counted.
    ++stats.interrupts;
    return;
  }
  ++stats.completions;
  if (len < 12) return fail("completion of %u bytes is shorter than a header (%u%u)", uint32_t(len), 0, 0);
  Hdr h = common(p);
  if (h.type != 0x0a && h.type != 0x0b)
    return fail("record type 0x%x fmt %u is not a completion (%u)", h.type, h.fmt, 0);
  const bool with_data = h.fmt & 0x2;
  const uint8_t status = p[6] >> 5;
  uint32_t bc = ((p[6] & 0xfu) << 8) | p[7];
  if (bc == 0) bc = 4096;
  const uint16_t rid = get_be16(p + 8);
  const uint16_t tag = tag10(p, p[10]);
  const uint32_t la = p[11] & 0x7f;
  auto it = outstanding.find((uint32_t(rid) << 16) | tag);
  if (it == outstanding.end()) {
    ++stats.unexpected;
    return fail("unexpected completion: requester %04x tag %u (%u)", rid, tag, 0);
  }
  Outstanding& o = it->second;
  bool done = false;
  if (status != 0) {
    stats.status_ur += status == 1;
    stats.status_crs += status == 2;
    stats.status_ca += status == 4;
    if (with_data) fail("status %u completion carries data (rid %04x tag %u)", status, rid, tag);
    done = true;  // UR/CA/CRS end the request
  } else if (!o.memory) {
    if (bc != 4 || la != 0 || with_data != o.expects_data || (with_data && h.length != 1))
      fail("IO/config completion: byte count %u lower address %u data %u (want 4, 0, read)",
           bc, la, with_data);
    done = true;
  } else {
    if (!with_data) return fail("memory read completion without data (tag %u)%u%u", tag, 0, 0);
    if (bc != o.remaining)
      fail("byte count %u, expected %u remaining (tag %u)", bc, o.remaining, tag);
    if (la != o.next_la) fail("lower address %u, expected %u (tag %u)", la, o.next_la, tag);
    const uint32_t lead = la & 3;
    const uint32_t bytes = h.length * 4 - lead < bc ? h.length * 4 - lead : bc;
    if (h.length * 4 > bc + lead + 3 + 3)
      fail("payload of %u DW exceeds the %u bytes remaining (tag %u)", h.length, bc, tag);
    if (len < 12 + size_t(h.length) * 4)
      fail("record of %u bytes too short for %u DW of payload (tag %u)", uint32_t(len), h.length, tag);
    o.remaining = bc > bytes ? bc - bytes : 0;
    o.next_la = (la + bytes) & 0x7f;
    done = o.remaining == 0;
  }
  if (done) {
    outstanding.erase(it);
    ++stats.retired;
  }
  stats.outstanding = outstanding.size();
}


}  // namespace mlx5tlp::sim
