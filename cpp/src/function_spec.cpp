// FunctionSpec -> FunctionLayout: the type-0 header (PCIe Base 6.x §7.5.1.1, §7.5.1.2), the
// BARs (bars.cpp), the capabilities (capabilities.cpp), and the checks that need several
// parts of the spec at once (MSI-X structures inside their BARs).
#include "mlx5tlp/function_spec.hpp"

#include <string>

namespace mlx5tlp::pci {

namespace {

void compile_header(const FunctionSpec& s, ConfigTemplate* t) {
  const Identity& id = s.identity;
  if (id.vendor_id == 0xffff)
    spec_error("identity.vendor_id", "0xffff is the invalid Vendor ID (PCIe Base §7.5.1.1.1)");
  if (id.class_code > 0xffffff) spec_error("identity.class_code", hex(id.class_code) + " is not 24 bits");
  if (id.interrupt_pin > 1)
    spec_error("identity.interrupt_pin", "a single-function device uses only INTA (1) or none (0) "
                                         "(PCIe Base §7.5.1.1.13)");
  bool io = false, mem = s.expansion_rom.size != 0;
  for (const BarSpec& b : s.bars) (b.kind == BarKind::io ? io : mem) = true;

  t->set(reg::kVendorId, 2, id.vendor_id);
  t->set(reg::kDeviceId, 2, id.device_id);
  // §7.5.1.1.3 Command: I/O and Memory Space Enable RW only when the function has such
  // space ("permitted to be hardwired to Zero" otherwise), Bus Master, Parity Error
  // Response, SERR# Enable, Interrupt Disable RW; the PCI-only bits hardwired 0.
  t->set(reg::kCommand, 2, 0,
         (io ? command::kIoSpace : 0) | (mem ? command::kMemorySpace : 0) | command::kBusMaster |
             command::kParityErrorResponse | command::kSerrEnable | command::kInterruptDisable);
  // §7.5.1.1.4 Status: Capabilities List hardwired 1b (the PCI Express Capability is
  // mandatory), the error bits RW1C, Interrupt Status the device's.
  t->set(reg::kStatus, 2, status::kCapabilitiesList, 0, status::kRw1cBits);
  t->set_volatile(reg::kStatus, 2, status::kInterruptStatus);
  t->set(reg::kRevision, 4, id.revision | id.class_code << 8);  // §7.5.1.1.5, §7.5.1.1.6
  t->set(reg::kCacheLineSize, 1, 0, 0xff);  // §7.5.1.1.7: RW, no effect on PCIe
  t->set(reg::kLatencyTimer, 1, 0);         // §7.5.1.1.8: hardwired 00h
  t->set(reg::kHeaderType, 1, 0);           // §7.5.1.1.9: type 0, Multi-Function clear
  t->set(reg::kBist, 1, 0);                 // §7.5.1.1.10: BIST not supported
  t->set(reg::kCardbusCis, 4, 0);           // §7.5.1.2.2
  t->set(reg::kSubsystemVendorId, 2, id.subsystem_vendor_id);  // §7.5.1.2.3
  t->set(reg::kSubsystemId, 2, id.subsystem_id);
  t->set(reg::kCapPtr, 4, 0);  // §7.5.1.1.11 (linked by CapabilityBuilder::finish); 35h-37h reserved
  t->set(0x38, 4, 0);          // reserved
  t->set(reg::kInterruptLine, 1, 0, 0xff);  // §7.5.1.1.12: RW
  t->set(reg::kInterruptPin, 1, id.interrupt_pin);
  t->set(reg::kMinGnt, 2, 0);  // Min_Gnt / Max_Lat: do not apply to PCIe, 00h
}

// MSI-X structures: a memory BAR, QWORD-aligned, inside the BAR, not overlapping (§7.7.2).
void check_msix(const MsixParams& m, const BarTable& bars) {
  if (m.vectors > msix_cap::kMaxVectors)
    spec_error("msix.vectors", std::to_string(m.vectors) + " is more than 2048 (Table Size is 11 bits)");
  struct Part { const char* name; uint8_t bar; uint32_t offset; uint64_t bytes; };
  const Part parts[2] = {
      {"table", m.table_bar, m.table_offset, uint64_t(m.vectors) * 16},
      {"pba", m.pba_bar, m.pba_offset, (uint64_t(m.vectors) + 63) / 64 * 8}};
  for (const Part& p : parts) {
    const std::string f = std::string("msix.") + p.name;
    if (p.bar >= kBarCount || !bars.is_memory(p.bar))
      spec_error(f + "_bar", "BAR " + std::to_string(p.bar) + " is not a declared memory BAR "
                             "(the lower register of a 64-bit pair; PCIe Base §7.7.2.3)");
    if (p.offset % 8 != 0)
      spec_error(f + "_offset", hex(p.offset) + " is not QWORD-aligned (PCIe Base §7.7.2.3)");
    if (p.offset + p.bytes > bars.size[p.bar])
      spec_error(f + "_bar", "BAR " + std::to_string(p.bar) + " (" + std::to_string(bars.size[p.bar]) +
                                 " bytes) is too small for the " + std::to_string(m.vectors) +
                                 "-vector " + p.name + " at " + hex(p.offset) + " (" +
                                 std::to_string(p.bytes) + " bytes)");
  }
  if (m.table_bar == m.pba_bar && m.table_offset < m.pba_offset + parts[1].bytes &&
      m.pba_offset < m.table_offset + parts[0].bytes)
    spec_error("msix.pba_offset", "the PBA at " + hex(m.pba_offset) + " overlaps the table at " +
                                      hex(m.table_offset) + " (they must not overlap, PCIe Base §7.7.2)");
}

uint64_t mix(uint64_t h, uint64_t v) {
  for (int i = 0; i < 8; ++i) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace

std::shared_ptr<const FunctionLayout> compile(const FunctionSpec& s) {
  auto L = std::make_shared<FunctionLayout>();
  ConfigTemplate* t = &L->config;
  compile_header(s, t);
  compile_bars(s.bars, s.expansion_rom, t, &L->bars);
  if (s.msix.vectors != 0) check_msix(s.msix, L->bars);

  CapabilityBuilder cb(t);
  L->pcie = cb.add_pcie(s.pcie, "pcie");
  L->pm = cb.add_power_management(s.power_management, "power_management");
  if (s.msix.vectors != 0) L->msix = cb.add_msix(s.msix, "msix");
  for (size_t i = 0; i < s.vendor_caps.size(); ++i)
    L->vendor_caps.push_back(cb.add_vendor(s.vendor_caps[i], "vendor_caps[" + std::to_string(i) + "]"));
  if (s.aer.present) L->aer = cb.add_aer(s.aer, "aer");
  if (s.serial_number.present) L->serial_number = cb.add_serial_number(s.serial_number, "serial_number");
  for (size_t i = 0; i < s.vendor_ext_caps.size(); ++i)
    L->vendor_ext_caps.push_back(
        cb.add_vendor_extended(s.vendor_ext_caps[i], "vendor_ext_caps[" + std::to_string(i) + "]"));
  cb.finish();

  L->max_payload_supported = s.pcie.max_payload_supported;
  L->completion_timeout_ranges = s.pcie.completion_timeout_ranges;
  L->completion_timeout_disable = s.pcie.completion_timeout_disable;
  L->pm_d1 = s.power_management.d1;
  L->pm_d2 = s.power_management.d2;
  L->no_soft_reset = s.power_management.no_soft_reset;
  L->msix_params = s.msix;

  uint64_t h = t->digest();
  for (int i = 0; i < kBarCount; ++i) h = mix(mix(h, uint64_t(L->bars.kind[i])), L->bars.size[i]);
  h = mix(h, L->bars.rom_size);
  h = mix(mix(h, s.msix.vectors), uint64_t(s.msix.table_bar) << 32 | s.msix.table_offset);
  h = mix(h, uint64_t(s.msix.pba_bar) << 32 | s.msix.pba_offset);
  L->digest = h;
  return L;
}

}  // namespace mlx5tlp::pci
