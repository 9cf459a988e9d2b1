// mlx5tlp/function_spec.hpp — the declarative description of an emulated PCIe function and
// its compilation into a configuration-space template, BAR table and capability layout.
//
// A FunctionSpec says what the function is (identity, BARs, capabilities, MSI-X placement);
// compile() validates every field and produces an immutable FunctionLayout that any number
// of Function objects (function.hpp) share. Field names are those of the spec file format
// (docs/function.md), and every validation error names the field at fault:
//   Error kind invalid_argument, errno EINVAL, operation "compile FunctionSpec", the
//   message ending in "<field>: <what is wrong>", e.g. "bars[1].size: 100 is not a power of two",
//   "msix.table_bar: BAR 2 (4096 bytes) is too small for ...", "bars[0].index: a 64-bit BAR
//   takes two registers; slot 5 has no upper half".
// The PCI Express and Power Management capabilities are always present: every PCI Express
// function implements them (PCIe Base 6.x §7.5.3, §7.5.2); the others are optional.
// Thread-safety: compile() is reentrant; a FunctionLayout is immutable (share it freely).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "mlx5tlp/bars.hpp"
#include "mlx5tlp/capabilities.hpp"
#include "mlx5tlp/config_space.hpp"

namespace mlx5tlp::pci {

struct Identity {
  uint16_t vendor_id = 0;  // FFFFh is invalid (§7.5.1.1.1)
  uint16_t device_id = 0;
  uint16_t subsystem_vendor_id = 0;
  uint16_t subsystem_id = 0;
  uint8_t revision = 0;
  uint32_t class_code = 0;    // base class << 16 | sub-class << 8 | programming interface
  uint8_t interrupt_pin = 0;  // 0: no INTx; 1: INTA (a single-function device uses only INTA)
};

struct FunctionSpec {
  Identity identity;
  std::vector<BarSpec> bars;
  RomSpec expansion_rom;
  PcieParams pcie;
  PmParams power_management;
  MsixParams msix;                 // vectors == 0: no MSI-X capability
  AerParams aer;                   // present == false: none
  SerialNumberParams serial_number;
  std::vector<VendorCapParams> vendor_caps;
  std::vector<VendorExtCapParams> vendor_ext_caps;
};

// The compiled function: what the run-time paths read. Immutable; the mutable state lives
// in FunctionState (function.hpp), which holds no pointers.
struct FunctionLayout {
  ConfigTemplate config;
  BarTable bars;
  // Capability offsets in configuration space (0: absent).
  uint16_t pcie = 0, pm = 0, msix = 0, aer = 0, serial_number = 0;
  std::vector<uint16_t> vendor_caps, vendor_ext_caps;
  // Parameters the run-time rules need.
  uint16_t max_payload_supported = 256;
  uint8_t completion_timeout_ranges = 0;
  bool completion_timeout_disable = false;
  bool pm_d1 = false, pm_d2 = false, no_soft_reset = true;
  MsixParams msix_params;  // vectors, BIRs and offsets
  uint64_t digest = 0;     // ConfigTemplate::digest() mixed with the BAR and MSI-X layout
};

// Validates and compiles `spec`. Throws mlx5tlp::Error (invalid_argument, EINVAL) naming the
// field; allocates (compile time only).
std::shared_ptr<const FunctionLayout> compile(const FunctionSpec& spec);

}  // namespace mlx5tlp::pci
