// The load generator's job: spec validation, the op mix, request encoding.
#include <cmath>
#include <cstring>
#include <new>

#include "last_error.hpp"
#include "load.hpp"
#include "state.hpp"

namespace mlx5tlp::sim {

namespace {

bool pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint32_t default_align(uint32_t size) {
  uint32_t a = 1;
  while (a < size && a < 4096) a <<= 1;
  return a;
}

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

// The first address of `r` an op may use, or ~0 if the op fits nowhere in it.
uint64_t first_start(uint64_t address, uint64_t size, const m5a_sim_load_op& op) {
  const uint64_t a0 = align_up(address, op.align);
  if (a0 < address || a0 + op.size > address + size) return ~uint64_t(0);
  if ((a0 & 4095) + op.size > 4096) return ~uint64_t(0);  // a request never crosses 4 KiB
  return a0;
}

}  // namespace

int load_job_init(const m5a_sim_load_spec& in, LoadJob& job) {
  if (in.struct_size != sizeof(m5a_sim_load_spec))
    return fail(EINVAL, "load spec: struct_size %u, expected %zu", in.struct_size,
                sizeof(m5a_sim_load_spec));
  m5a_sim_load_spec s = in;
  if (s.nops < 1 || s.nops > M5A_SIM_LOAD_MAX_OPS)
    return fail(EINVAL, "load spec: %u ops, expected 1..%d", s.nops, M5A_SIM_LOAD_MAX_OPS);
  job.weight_total = 0;
  job.has_writes = false;
  for (uint32_t i = 0; i < s.nops; ++i) {
    m5a_sim_load_op& op = s.ops[i];
    if (op.kind != M5A_SIM_LOAD_READ && op.kind != M5A_SIM_LOAD_WRITE)
      return fail(EINVAL, "load spec: op %u has kind %u (0 read, 1 write)", i, op.kind);
    if (op.size < 1 || op.size > 4096)
      return fail(EINVAL, "load spec: op %u has size %u, expected 1..4096", i, op.size);
    if (op.align == 0) op.align = default_align(op.size);
    if (!pow2(op.align) || op.align > 4096)
      return fail(EINVAL, "load spec: op %u has align %u, expected a power of two 1..4096", i,
                  op.align);
    if (op.kind == M5A_SIM_LOAD_WRITE && (op.size % 4 != 0 || op.align < 4))
      return fail(EINVAL, "load spec: write op %u: size %u and align %u must be whole DWs", i,
                  op.size, op.align);
    if (op.weight < 1 || op.weight > (1u << 24))
      return fail(EINVAL, "load spec: op %u has weight %u, expected 1..2^24", i, op.weight);
    job.weight_total += op.weight;
    job.has_writes |= op.kind == M5A_SIM_LOAD_WRITE;
  }
  if (s.nranges < 1 || s.nranges > M5A_SIM_LOAD_MAX_RANGES || s.ranges == nullptr)
    return fail(EINVAL, "load spec: %u ranges, expected 1..%d", s.nranges, M5A_SIM_LOAD_MAX_RANGES);
  if (s.window < 1 || s.window > M5A_SIM_LOAD_MAX_WINDOW)
    return fail(EINVAL, "load spec: window %u, expected 1..%d", s.window, M5A_SIM_LOAD_MAX_WINDOW);
  // The schedule's period (1e9 / rate ns) must fit 64 bits: a tiny rate made it infinite.
  if (!std::isfinite(s.rate) || s.rate < 0 || (s.rate > 0 && s.rate < 1e-6))
    return fail(EINVAL, "load spec: rate %g, expected 0 or a finite number >= 1e-6", s.rate);
  if (s.count == 0 && s.duration_ns == 0)
    return fail(EINVAL, "load spec: neither count nor duration is set");
  if (s.timeout_ns == 0) return fail(EINVAL, "load spec: timeout_ns is 0");
  if (s.channels < 1 || s.channels > kChannels)
    return fail(EINVAL, "load spec: %u channels, expected 1..%u", s.channels, kChannels);
  if (!pow2(s.max_payload) || s.max_payload < 128 || s.max_payload > 4096)
    return fail(EINVAL, "load spec: max_payload %u, expected 128..4096, a power of two",
                s.max_payload);
  for (uint32_t i = 0; i < s.nops; ++i)  // PCIe Base 2.2.2: larger payloads are Malformed TLPs
    if (s.ops[i].kind == M5A_SIM_LOAD_WRITE && s.ops[i].size > s.max_payload)
      return fail(EINVAL, "load spec: write op %u of %u bytes exceeds max_payload %u (the "
                  "function's Max_Payload_Size)", i, s.ops[i].size, s.max_payload);
  if (s.rcb != 64 && s.rcb != 128)
    return fail(EINVAL, "load spec: rcb %u, expected 64 or 128", s.rcb);
  if (s.seed == 0) s.seed = 1;
  uint64_t total = 0;
  try {
    job.ranges.clear();
    job.ranges.resize(s.nranges);
    for (uint32_t i = 0; i < s.nranges; ++i) {
      const m5a_sim_load_range& r = s.ranges[i];
      if (r.expected == nullptr || r.size == 0 || r.address + r.size < r.address)
        return fail(EINVAL, "load spec: range %u (address %#llx size %llu) is empty, wraps or has "
                    "no expected contents", i, (unsigned long long)r.address,
                    (unsigned long long)r.size);
      total += r.size;
      if (total > M5A_SIM_LOAD_MAX_BYTES)
        return fail(EINVAL, "load spec: the ranges hold more than %llu bytes",
                    (unsigned long long)M5A_SIM_LOAD_MAX_BYTES);
      for (uint32_t k = 0; k < s.nops; ++k)
        if (first_start(r.address, r.size, s.ops[k]) == ~uint64_t(0))
          return fail(EINVAL, "load spec: op %u (%u bytes, align %u) does not fit range %u "
                      "(address %#llx, %llu bytes) without crossing 4 KiB", k, s.ops[k].size,
                      s.ops[k].align, i, (unsigned long long)r.address, (unsigned long long)r.size);
      LoadRange& lr = job.ranges[i];
      lr.address = r.address;
      lr.size = r.size;
      lr.image.assign(r.expected, r.expected + r.size);
      lr.readers.assign(size_t((r.size + kLoadBlock - 1) / kLoadBlock) + 1, 0);
    }
  } catch (const std::bad_alloc&) {
    return fail(ENOMEM, "load: cannot copy %llu bytes of expected contents",
                (unsigned long long)total);
  }
  job.spec = s;
  return 0;
}

LoadOp pick_op(const LoadJob& job, Rng& rng) {
  const m5a_sim_load_spec& s = job.spec;
  uint64_t w = rng.below(job.weight_total);
  uint32_t k = 0;
  while (k + 1 < s.nops && w >= s.ops[k].weight) w -= s.ops[k++].weight;
  const m5a_sim_load_op& op = s.ops[k];
  LoadOp o;
  o.kind = op.kind;
  o.size = op.size;
  o.range = uint32_t(rng.below(job.ranges.size()));
  const LoadRange& r = job.ranges[o.range];
  const uint64_t a0 = first_start(r.address, r.size, op);  // validated: fits
  const uint64_t slots = (r.address + r.size - op.size - a0) / op.align + 1;
  for (int tries = 0; tries < 16; ++tries) {
    o.address = a0 + rng.below(slots) * op.align;
    if ((o.address & 4095) + op.size <= 4096) return o;
  }
  o.address = a0;
  return o;
}

size_t encode_request(uint8_t* p, const LoadOp& op, uint16_t requester_id, uint32_t tag,
                      const uint8_t* data) {
  const uint32_t lead = uint32_t(op.address & 3);
  const uint32_t span = lead + op.size;
  const uint32_t dws = (span + 3) / 4;
  uint32_t first_be, last_be;
  if (dws == 1) {
    first_be = ((1u << span) - 1) & ~((1u << lead) - 1) & 0xf;
    last_be = 0;
  } else {
    first_be = (0xfu << lead) & 0xf;
    last_be = (1u << (span - 4 * (dws - 1))) - 1;
  }
  const bool wide = op.address >= (uint64_t(1) << 32);
  const bool write = op.kind == M5A_SIM_LOAD_WRITE;
  // Fmt: bit 0 = 4DW header, bit 1 = with data; Type 0 = memory request (PCIe Base 2.2.1).
  p[0] = uint8_t(((write ? 2u : 0u) | (wide ? 1u : 0u)) << 5);
  p[1] = uint8_t(((tag >> 9) & 1) << 7 | ((tag >> 8) & 1) << 3);  // T9, T8 (10-bit tags)
  const uint32_t len_field = dws & 0x3ff;  // 1024 DW encodes as 0
  p[2] = uint8_t(len_field >> 8);
  p[3] = uint8_t(len_field);
  p[4] = uint8_t(requester_id >> 8);
  p[5] = uint8_t(requester_id);
  p[6] = uint8_t(tag);
  p[7] = uint8_t(last_be << 4 | first_be);
  size_t hdr;
  if (wide) {
    put_be64(p + 8, op.address & ~uint64_t(3));
    hdr = 16;
  } else {
    put_be32(p + 8, uint32_t(op.address) & ~3u);
    hdr = 12;
  }
  if (!write) return hdr;
  std::memcpy(p + hdr, data, op.size);  // writes are whole, aligned DWs (validated)
  return hdr + op.size;
}

}  // namespace mlx5tlp::sim
