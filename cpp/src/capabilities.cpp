// Capability structures (PCIe Base 6.x sections cited at each register). Every register's
// semantics is data: reset value, RW mask, RW1C mask; ConfigSpace::write applies them.
#include "mlx5tlp/capabilities.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp::pci {

void spec_error(const std::string& field, const std::string& what) {
  throw Error(ErrorKind::invalid_argument, "compile FunctionSpec", EINVAL, field + ": " + what);
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

static bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint16_t CapabilityBuilder::place(uint32_t lo, uint32_t hi, uint32_t len, int offset,
                                  const std::string& field, const char* space) {
  const uint32_t span = (len + 3) & ~3u;  // keep the next structure DW-aligned
  if (offset >= 0) {
    const auto o = uint32_t(offset);
    // §7.5.1.1.11 / §7.6.3: capability pointers are DW-aligned (bottom two bits reserved).
    if (o % 4 != 0) spec_error(field + ".offset", hex(o) + " is not DW-aligned");
    if (o < lo || o + span > hi)
      spec_error(field + ".offset", hex(o) + " (+" + std::to_string(span) + " bytes) is outside " +
                                        space + " [" + hex(lo) + ", " + hex(hi) + ")");
    if (!t_->claim(uint16_t(o), span))
      spec_error(field + ".offset", hex(o) + " overlaps the header or another capability");
    return uint16_t(o);
  }
  for (uint32_t o = lo; o + span <= hi; o += 4)
    if (t_->claim(uint16_t(o), span)) return uint16_t(o);
  spec_error(field, "no room for " + std::to_string(span) + " bytes in " + space);
}

uint16_t CapabilityBuilder::add(uint8_t id, uint32_t len, int offset, const std::string& field) {
  const uint16_t o = place(reg::kHeaderEnd, kLegacyConfigSize, len, offset, field,
                           "PCI-compatible configuration space");
  t_->set(o, 1, id);
  t_->set(uint16_t(o + 1), 1, 0);  // Next: linked by finish()
  std_.push_back(o);
  return o;
}

uint16_t CapabilityBuilder::add_extended(uint16_t id, uint8_t version, uint32_t len, int offset,
                                         const std::string& field) {
  const uint16_t o = place(kExtCapStart, kConfigSize, len, offset, field,
                           "extended configuration space");
  t_->set(o, 4, uint32_t(id) | uint32_t(version & 0xf) << 16);  // Next: linked by finish()
  ext_.push_back(o);
  return o;
}

void CapabilityBuilder::finish() {
  // Lists in ascending offset order, so the extended list's head is its lowest structure.
  std::sort(std_.begin(), std_.end());
  std::sort(ext_.begin(), ext_.end());
  t_->set(reg::kCapPtr, 1, std_.empty() ? 0 : std_.front());
  for (size_t i = 0; i + 1 < std_.size(); ++i) t_->set(uint16_t(std_[i] + 1), 1, std_[i + 1]);
  if (!ext_.empty() && ext_.front() != kExtCapStart)
    spec_error("extended capabilities", "the first must be at 0x100 (PCIe Base §7.6.3), not " +
                                            hex(ext_.front()));
  for (size_t i = 0; i + 1 < ext_.size(); ++i) {
    const auto h = uint32_t(t_->get_init(ext_[i], 4));
    t_->set(ext_[i], 4, (h & 0x000fffffu) | uint32_t(ext_[i + 1]) << 20);
  }
}

uint16_t CapabilityBuilder::add_pcie(const PcieParams& p, const std::string& f) {
  const uint16_t mps = p.max_payload_supported;
  if (!is_pow2(mps) || mps < 128 || mps > 4096)
    spec_error(f + ".max_payload_supported", std::to_string(mps) +
                                                 " is not a power of two in [128, 4096]");
  if (p.max_link_speed < 1 || p.max_link_speed > 6)
    spec_error(f + ".max_link_speed", std::to_string(p.max_link_speed) +
                                          " is not 1 (2.5 GT/s) .. 6 (64.0 GT/s)");
  static const uint8_t widths[] = {1, 2, 4, 8, 12, 16, 32};
  if (std::find(std::begin(widths), std::end(widths), p.max_link_width) == std::end(widths))
    spec_error(f + ".max_link_width", std::to_string(p.max_link_width) +
                                          " is not one of 1, 2, 4, 8, 12, 16, 32");
  if (p.completion_timeout_ranges > 0xf)
    spec_error(f + ".completion_timeout_ranges", "is a 4-bit mask (ranges A..D)");
  const uint16_t o = add(cap_id::kPciExpress, pcie::kSize, p.offset, f);
  unsigned mps_code = 0;
  while ((128u << mps_code) < mps) ++mps_code;

  // §7.5.3.2: Capability Version 2, Device/Port Type 0000b (PCI Express Endpoint).
  t_->set(uint16_t(o + pcie::kCaps), 2, 0x0002);
  // §7.5.3.3 Device Capabilities: MPS Supported, Extended Tag, L0s/L1 acceptable latency
  // "no limit", Role-Based Error Reporting (must be 1b).
  t_->set(uint16_t(o + pcie::kDevCap), 4,
          mps_code | (p.extended_tag ? 1u << 5 : 0) | 7u << 6 | 7u << 9 | 1u << 15);
  // §7.5.3.4 Device Control: error reporting enables (3:0), Relaxed Ordering (4, default 1),
  // MPS (7:5, RW; see Function::max_payload_size for values above Supported), Extended Tag
  // Field Enable (8, RW when supported), No Snoop (11, default 1), Max_Read_Request_Size
  // (14:12, default 010b). Phantom Functions (9), Aux Power PM (10), FLR (15): not supported,
  // hardwired 0.
  const uint16_t devctl_w = 0x000f | 1u << 4 | 7u << 5 | (p.extended_tag ? 1u << 8 : 0) |
                            1u << 11 | 7u << 12;
  t_->set(uint16_t(o + pcie::kDevCtl), 2, 1u << 4 | 1u << 11 | 2u << 12, devctl_w);
  // §7.5.3.5 Device Status: Correctable/Non-Fatal/Fatal/Unsupported Request Detected RW1C;
  // Transactions Pending (5) is the device's.
  t_->set(uint16_t(o + pcie::kDevSta), 2, 0, 0, 0x000f);
  t_->set_volatile(uint16_t(o + pcie::kDevSta), 2, 1u << 5);
  // §7.5.3.6 Link Capabilities: speed, width, ASPM not supported, ASPM Optionality
  // Compliance (22), Port Number 0.
  t_->set(uint16_t(o + pcie::kLinkCap), 4,
          uint32_t(p.max_link_speed) | uint32_t(p.max_link_width) << 4 | 1u << 22);
  // §7.5.3.7 Link Control: ASPM Control (1:0), RCB (3, RW for Endpoints), Common Clock (6),
  // Extended Synch (7). The Downstream-Port-only bits are reserved here.
  t_->set(uint16_t(o + pcie::kLinkCtl), 2, 0, 0x0003 | pcie::kLinkCtlRcb | 1u << 6 | 1u << 7);
  // §7.5.3.8 Link Status: trained at the maximum, Slot Clock Configuration (12).
  t_->set(uint16_t(o + pcie::kLinkSta), 2,
          uint32_t(p.max_link_speed) | uint32_t(p.max_link_width) << 4 | 1u << 12);
  // §7.5.3.15 Device Capabilities 2: Completion Timeout Ranges Supported (3:0), Completion
  // Timeout Disable Supported (4).
  t_->set(uint16_t(o + pcie::kDevCap2), 4,
          uint32_t(p.completion_timeout_ranges) | (p.completion_timeout_disable ? 1u << 4 : 0));
  // §7.5.3.16 Device Control 2: Completion Timeout Value RW if programmable (else hardwired
  // 0000b), Completion Timeout Disable RW if supported.
  t_->set(uint16_t(o + pcie::kDevCtl2), 2, 0,
          (p.completion_timeout_ranges != 0 ? 0x000fu : 0) |
              (p.completion_timeout_disable ? pcie::kDevCtl2CtdBit : 0));
  // §7.5.3.18 Link Capabilities 2: Supported Link Speeds Vector (7:1), every speed up to max.
  t_->set(uint16_t(o + pcie::kLinkCap2), 4, ((1u << p.max_link_speed) - 1) << 1);
  // §7.5.3.19 Link Control 2: Target Link Speed (3:0, RWS), reset to the maximum.
  t_->set(uint16_t(o + pcie::kLinkCtl2), 2, p.max_link_speed, 0x000f);
  return o;
}

uint16_t CapabilityBuilder::add_power_management(const PmParams& p, const std::string& f) {
  if (p.pme_support > 0x1f) spec_error(f + ".pme_support", "is a 5-bit mask (D0..D3cold)");
  const uint16_t o = add(cap_id::kPowerManagement, pm::kSize, p.offset, f);
  // §7.5.2.1 PMC: Version 011b, D1/D2 Support (9, 10), PME_Support (15:11).
  t_->set(uint16_t(o + pm::kPmc), 2,
          3u | (p.d1 ? 1u << 9 : 0) | (p.d2 ? 1u << 10 : 0) | uint32_t(p.pme_support) << 11);
  // §7.5.2.2 PMCSR: PowerState (1:0) RW (unsupported states are discarded by Function),
  // No_Soft_Reset (3) RO, PME_En (8) RW and PME_Status (15) RW1C only with PME support.
  const bool pme = p.pme_support != 0;
  t_->set(uint16_t(o + pm::kPmcsr), 2, p.no_soft_reset ? pm::kNoSoftReset : 0,
          pm::kStateMask | (pme ? 1u << 8 : 0), pme ? 1u << 15 : 0);
  t_->set(uint16_t(o + 6), 2, 0);  // PMCSR_BSE (reserved for PCIe) and Data (not implemented)
  return o;
}

uint16_t CapabilityBuilder::add_msix(const MsixParams& p, const std::string& f) {
  const uint16_t o = add(cap_id::kMsix, msix_cap::kSize, p.offset, f);
  // §7.7.2.2 Message Control: Table Size (10:0) RO N-1, Function Mask (14) and MSI-X Enable
  // (15) RW, 13:11 RsvdP.
  t_->set(uint16_t(o + msix_cap::kControl), 2, uint32_t(p.vectors - 1),
          msix_cap::kFunctionMask | msix_cap::kEnable);
  // §7.7.2.3 / §7.7.2.4: QWORD-aligned offsets with the BIR in bits 2:0, RO.
  t_->set(uint16_t(o + msix_cap::kTable), 4, p.table_offset | p.table_bar);
  t_->set(uint16_t(o + msix_cap::kPba), 4, p.pba_offset | p.pba_bar);
  return o;
}

uint16_t CapabilityBuilder::add_aer(const AerParams& p, const std::string& f) {
  const uint16_t o = add_extended(ext_cap_id::kAer, 2, aer::kSize, p.offset, f);
  // §7.8.4.2-7.8.4.6: status RW1CS (set by the device), mask and severity RWS.
  t_->set(uint16_t(o + aer::kUncorStatus), 4, 0, 0, aer::kUncorBits);
  t_->set(uint16_t(o + aer::kUncorMask), 4, 0, aer::kUncorBits);
  t_->set(uint16_t(o + aer::kUncorSeverity), 4, aer::kUncorSeverityDefault, aer::kUncorBits);
  t_->set(uint16_t(o + aer::kCorStatus), 4, 0, 0, aer::kCorBits);
  t_->set(uint16_t(o + aer::kCorMask), 4, aer::kCorMaskDefault, aer::kCorBits);
  // §7.8.4.7 Capabilities and Control: First Error Pointer (4:0, ROS, the device's), ECRC
  // Generation Capable (5) / Enable (6, RW if capable), ECRC Check Capable (7) / Enable (8).
  const uint32_t caps = (p.ecrc_generation ? 1u << 5 : 0) | (p.ecrc_check ? 1u << 7 : 0);
  const uint32_t en = (p.ecrc_generation ? 1u << 6 : 0) | (p.ecrc_check ? 1u << 8 : 0);
  t_->set(uint16_t(o + aer::kCapControl), 4, caps, en);
  t_->set_volatile(uint16_t(o + aer::kCapControl), 4, 0x1f);
  // §7.8.4.8 Header Log: RO, written by the device when it logs an error.
  for (uint16_t i = 0; i < 16; i += 4) {
    t_->set(uint16_t(o + aer::kHeaderLog + i), 4, 0);
    t_->set_volatile(uint16_t(o + aer::kHeaderLog + i), 4, 0xffffffffu);
  }
  // 0x2c-0x37: Root Port / RCEC registers, reserved in an Endpoint.
  for (uint16_t i = 0x2c; i < aer::kSize; i += 4) t_->set(uint16_t(o + i), 4, 0);
  return o;
}

uint16_t CapabilityBuilder::add_serial_number(const SerialNumberParams& p, const std::string& f) {
  const uint16_t o = add_extended(ext_cap_id::kSerialNumber, 1, 12, p.offset, f);
  t_->set(uint16_t(o + 4), 8, p.serial);  // §7.9.3.2/7.9.3.3: lower DW, upper DW, RO
  return o;
}

void CapabilityBuilder::define_user_bytes(uint16_t at, const std::vector<uint8_t>& data,
                                          const std::vector<ByteRange>& writable,
                                          const std::string& f) {
  std::vector<uint8_t> wm(data.size(), 0);
  for (size_t i = 0; i < writable.size(); ++i) {
    const ByteRange& r = writable[i];
    const std::string rf = f + ".writable[" + std::to_string(i) + "]";
    if (r.length == 0) spec_error(rf, "is empty");
    if (uint32_t(r.start) + r.length > data.size())
      spec_error(rf, "[" + std::to_string(r.start) + ", " + std::to_string(r.start + r.length) +
                         ") is outside the " + std::to_string(data.size()) + " data bytes");
    std::fill(wm.begin() + r.start, wm.begin() + r.start + r.length, uint8_t(0xff));
  }
  for (size_t i = 0; i < data.size(); ++i) t_->set(uint16_t(at + i), 1, data[i], wm[i]);
}

uint16_t CapabilityBuilder::add_vendor(const VendorCapParams& p, const std::string& f) {
  // §7.9.4: Capability Length counts the three header bytes; it is one byte.
  if (p.data.size() + 3 > 0xff)
    spec_error(f + ".data", std::to_string(p.data.size()) + " bytes: at most 252 fit the length byte");
  const uint16_t o = add(cap_id::kVendorSpecific, uint32_t(p.data.size() + 3), p.offset, f);
  t_->set(uint16_t(o + 2), 1, p.data.size() + 3);
  define_user_bytes(uint16_t(o + 3), p.data, p.writable, f);
  return o;
}

uint16_t CapabilityBuilder::add_vendor_extended(const VendorExtCapParams& p, const std::string& f) {
  if (p.revision > 0xf) spec_error(f + ".revision", "is 4 bits (0..15)");
  // §7.9.5.2: VSEC Length (31:20) counts both headers and the registers: 12 bits.
  if (p.data.size() + 8 > 0xfff)
    spec_error(f + ".data", std::to_string(p.data.size()) + " bytes: at most 4087 fit VSEC Length");
  const uint16_t o = add_extended(ext_cap_id::kVendorSpecific, 1, uint32_t(p.data.size() + 8),
                                  p.offset, f);
  t_->set(uint16_t(o + 4), 4,
          uint32_t(p.vsec_id) | uint32_t(p.revision) << 16 | uint32_t(p.data.size() + 8) << 20);
  define_user_bytes(uint16_t(o + 8), p.data, p.writable, f);
  return o;
}

}  // namespace mlx5tlp::pci
