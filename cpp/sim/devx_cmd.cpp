// mlx5dv_devx_general_cmd: QUERY_HCA_CAP for the general and TLP-emulation capability pages,
// with the bit positions of the kernel's include/linux/mlx5/mlx5_ifc.h. Other commands get a
// firmware "bad opcode" status, as a device that does not implement them would answer.
#include <cerrno>
#include <cstring>

#include "device_map.hpp"

using namespace mlx5tlp::sim;

namespace {

constexpr uint16_t kQueryHcaCap = 0x100;
constexpr uint16_t kCapGeneral = 0x0;
constexpr uint16_t kCapTlpEmulation = 0x2a;
constexpr uint8_t kStatusBadOp = 0x2;
constexpr uint8_t kStatusBadParam = 0x3;
constexpr size_t kOutHeader = 0x10;  // status, syndrome, reserved; the capability follows
constexpr size_t kCapBytes = 0x1000;

// Sets `width` bits at PRM bit offset `bit` (counted from the MSB of the first big-endian DW,
// the way mlx5_ifc.h lays out u8 name[width] arrays) to `value`. Fields never span DWs here.
void set_field(uint8_t* cap, unsigned bit, unsigned width, uint32_t value) {
  uint8_t* dw = cap + (bit / 32) * 4;
  const unsigned shift = 32 - (bit % 32) - width;
  const uint32_t mask = (width == 32 ? 0xffffffffu : ((1u << width) - 1)) << shift;
  put_be32(dw, (get_be32(dw) & ~mask) | ((value << shift) & mask));
}

int fw_error(uint8_t* out, size_t outlen, uint8_t status, uint32_t syndrome) {
  std::memset(out, 0, outlen);
  out[0] = status;
  put_be32(out + 4, syndrome);
  return EREMOTEIO;  // the kernel reports a bad firmware status this way; the outbox has it
}

}  // namespace

M5A_EXPORT int mlx5dv_devx_general_cmd(m5a_ibv_context* context, const void* in, size_t inlen,
                                       void* out, size_t outlen) {
  if (context == nullptr || in == nullptr || out == nullptr || inlen < 16 || outlen < kOutHeader)
    return EINVAL;
  SimContext* c = sim_ctx(context);
  if (!c->devx) return EOPNOTSUPP;
  const auto* inb = static_cast<const uint8_t*>(in);
  auto* outb = static_cast<uint8_t*>(out);
  const uint16_t opcode = get_be16(inb);
  const uint16_t op_mod = get_be16(inb + 6);
  if (opcode != kQueryHcaCap) return fw_error(outb, outlen, kStatusBadOp, 0x0bad0000u | opcode);

  const uint16_t cap_type = op_mod >> 1;  // bit 0 selects current (1) or maximum (0) values
  const m5a_sim_device_config& cfg = c->dev->cfg();
  uint8_t cap[kCapBytes] = {};
  if (cap_type == kCapGeneral) {
    // cmd_hca_cap: tlp_device_emulation_manager is bit 0x398 (byte 0x70, bit 7 of that DW).
    set_field(cap, 0x398, 1, cfg.tlp);
  } else if (cap_type == kCapTlpEmulation) {
    if (cfg.tlp == 0) return fw_error(outb, outlen, kStatusBadParam, 0x0bad002au);
    // tlp_dev_emu_capabilities
    set_field(cap, 0x33, 5, cfg.gw_log_stride);  // log_tlp_rsp_gw_page_stride
    set_field(cap, 0x10c, 4, cfg.gw_pages);      // tlp_rsp_gw_num_pages
    set_field(cap, 0x1c0, 32, uint32_t(cfg.gw_bar_offset >> 32));  // tlp_rsp_gw_pages_bar_offset
    set_field(cap, 0x1e0, 32, uint32_t(cfg.gw_bar_offset));
  } else {
    return fw_error(outb, outlen, kStatusBadParam, 0x0bad0000u | cap_type);
  }
  std::memset(outb, 0, outlen);
  const size_t n = outlen - kOutHeader < kCapBytes ? outlen - kOutHeader : kCapBytes;
  std::memcpy(outb + kOutHeader, cap, n);
  return 0;
}
