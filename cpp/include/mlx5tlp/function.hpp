// mlx5tlp/function.hpp — an emulated PCIe function's run-time model: configuration space,
// BAR decode, MSI-X, and its state as one fixed-size block of plain data.
//
// The engine (one thread per function) calls, per TLP: config_read / config_write (CfgRd0 /
// CfgWr0: one DW and its First DW BE, PCIe Base 6.x §2.2.7), decode_memory / decode_io
// (which BAR a request hits; requests to a disabled space are its Unsupported Request),
// msix_hit / msix_read / msix_write (the MSI-X table and PBA inside their BARs), and the
// queries below for completion building (Max_Payload_Size, Read Completion Boundary) and
// request policing (Bus Master Enable). None of these allocate, lock or throw.
//
// State: FunctionState is a POD (no pointers; trivially copyable) that lives in memory the
// caller chooses (shared memory, so that a successor process can take the function over)
// or that the Function owns. Layout (docs/function.md): a header {magic "M5FN", layout
// version, sizes, MSI-X vector count, spec digest}, the 4096 configuration bytes, then the
// MSI-X table, PBA and control word. snapshot() copies it; restore() and the adopting
// constructor check it first: same layout version, same spec digest (the compiled masks and
// layout), every read-only / reserved bit equal to the compiled value (the cmask check),
// MSI-X reserved bits clear and a supported power state. Errors: mlx5tlp::Error kind
// invalid_argument, EINVAL (EPROTO for a different layout version), naming what differs.
//
// Thread-safety: one thread at a time drives configuration, decode and MSI-X table/PBA
// accesses (the engine); raise_msix, msix_pending and clear_msix_pending may be called from
// any thread concurrently with it (msix.hpp). Not copyable or movable (other threads refer
// to it); hold it in a unique_ptr.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "mlx5tlp/bars.hpp"
#include "mlx5tlp/config_space.hpp"
#include "mlx5tlp/function_spec.hpp"
#include "mlx5tlp/msix.hpp"
#include "mlx5tlp/tlp_completion.hpp"

namespace mlx5tlp::pci {

inline constexpr uint32_t kFunctionStateMagic = 0x4e46354d;  // "M5FN" little-endian
inline constexpr uint16_t kFunctionStateVersion = 1;

struct FunctionStateHeader {
  uint32_t magic;
  uint16_t version;       // kFunctionStateVersion
  uint16_t header_bytes;  // sizeof(FunctionStateHeader)
  uint32_t state_bytes;   // sizeof(FunctionState)
  uint32_t msix_vectors;
  uint64_t spec_digest;   // FunctionLayout::digest
};

struct FunctionState {
  FunctionStateHeader header;
  uint8_t config[kConfigSize];
  MsixState msix;
};
static_assert(std::is_trivially_copyable_v<FunctionState> && std::is_standard_layout_v<FunctionState>,
              "FunctionState must be plain data: it lives in shared memory and is copied as bytes");
static_assert(sizeof(FunctionStateHeader) == 24 && offsetof(FunctionState, config) == 24 &&
                  offsetof(FunctionState, msix) == 4120 && sizeof(FunctionState) == 37152,
              "the documented state layout (docs/function.md): change kFunctionStateVersion too");

// Completion Timeout the host programmed (Device Control 2, §7.5.3.16), in microseconds.
struct CompletionTimeout {
  bool disabled = false;
  uint32_t min_us = 50;
  uint32_t max_us = 50000;
};

// Errors this function detects as a Completer / Receiver of a TLP (PCIe Base §6.2.7, Table 6-5).
enum class RxError : uint8_t {
  unsupported_request,    // Uncorrectable Error Status bit 20
  completer_abort,        // bit 15 (the function completed a request CA)
  malformed_tlp,          // bit 18
  poisoned_tlp,           // bit 12 (a poisoned write, discarded: §2.7.2.1)
  unexpected_completion,  // bit 16
};
// The error Message the function's enables call for after logging an error (§6.2.5, §6.2.6).
enum class ErrorMessage : uint8_t { none = 0, err_cor, err_nonfatal, err_fatal };

enum class MsixRegion : uint8_t { none = 0, table, pba, straddles };
struct MsixHit {
  MsixRegion region = MsixRegion::none;
  uint32_t offset = 0;  // from the structure's start
};

class Function {
 public:
  enum class Adopt { reset, keep };
  // Owns its state, reset to the compiled values.
  Function(std::shared_ptr<const FunctionLayout> layout, InterruptSink* sink);
  // State in caller memory (`state` outlives the Function). reset: initialise it; keep:
  // validate what is there (a predecessor's state) and continue from it (throws as restore).
  Function(std::shared_ptr<const FunctionLayout> layout, InterruptSink* sink, FunctionState* state,
           Adopt mode);
  Function(const Function&) = delete;
  Function& operator=(const Function&) = delete;

  const FunctionLayout& layout() const noexcept { return *layout_; }

  // ---- configuration requests (dw_offset: Register Number * 4, masked to 0..0xffc) ----
  uint32_t config_read(uint16_t dw_offset) const noexcept { return cs_.read32(uint16_t(dw_offset & 0xffc)); }
  void config_write(uint16_t dw_offset, uint32_t value, uint8_t byte_enables) noexcept;
  const ConfigSpace& config() const noexcept { return cs_; }
  ConfigSpace& config() noexcept { return cs_; }  // device-side updates (device_write)

  // ---- what the engine needs ----
  uint8_t power_state() const noexcept;  // 0 = D0 .. 3 = D3hot
  // Memory / I/O decode: the Command enable and D0 (PCIe Base §5.3.1: a function in D1, D2
  // or D3hot accepts only Configuration and Message Requests).
  bool memory_enabled() const noexcept;
  bool io_enabled() const noexcept;
  bool bus_master() const noexcept;  // may issue Memory Requests (MSI-X messages included)
  // Max_Payload_Size for TLPs this function sends: min(Device Control MPS, MPS Supported).
  uint16_t max_payload_size() const noexcept;
  uint16_t max_read_request_size() const noexcept;
  uint16_t read_completion_boundary() const noexcept;  // 64 or 128 (Link Control bit 3)
  CompletionTimeout completion_timeout() const noexcept;
  // The completion builder's parameters for this function's Successful Completions: payloads
  // of at most max_payload_size(), read data split at read_completion_boundary() (§2.3.1.1).
  tlp::CompletionParams completion_params(uint16_t completer_id) const noexcept {
    tlp::CompletionParams p;
    p.completer_id = completer_id;
    p.max_payload = max_payload_size();
    p.rcb = read_completion_boundary();
    return p;
  }

  DecodeResult decode_memory(uint64_t addr, uint32_t len) const noexcept {
    return pci::decode_memory(layout_->bars, cs_, addr, len, memory_enabled());
  }
  DecodeResult decode_io(uint32_t addr, uint32_t len) const noexcept {
    return pci::decode_io(layout_->bars, cs_, addr, len, io_enabled());
  }
  uint64_t bar_base(int bar) const noexcept { return pci::bar_base(layout_->bars, cs_, bar); }

  // ---- MSI-X ----
  MsixHit msix_hit(int bar, uint64_t offset, uint32_t len) const noexcept;
  MsixAccess msix_read(int bar, uint64_t offset, uint32_t len, uint8_t* out) const noexcept;
  MsixAccess msix_write(int bar, uint64_t offset, const uint8_t* data, uint32_t len,
                        uint8_t first_be, uint8_t last_be) noexcept;
  RaiseResult raise_msix(uint16_t vector) noexcept { return msix_.raise(vector); }
  bool msix_pending(uint16_t vector) const noexcept { return msix_.pending(vector); }
  void clear_msix_pending(uint16_t vector) noexcept { msix_.clear_pending(vector); }
  const Msix& msix() const noexcept { return msix_; }

  // ---- error logging (§6.2.4, §6.2.5; cpp/src/error_logging.cpp) ----
  // Logs error `e`, detected on the received TLP whose bytes are tlp[0, len) (its header goes
  // to the AER Header Log when the error is recorded), in the function's configuration space:
  // Status (Signaled Target Abort for CA, Detected Parity Error for poison), Device Status
  // (Correctable / Non-Fatal / Fatal / UR Detected, whatever the enables and masks) and, with
  // AER, the status bits, First Error Pointer and Header Log. `completion_sent`: the function
  // answers the request with a UR / CA Completion (a Non-Posted Request), which makes a
  // non-fatal UR / CA an Advisory Non-Fatal Error (§6.2.3.2.4.1). Returns the error Message the
  // enables and masks call for (the caller sends or counts it). No allocation, no lock.
  ErrorMessage log_error(RxError e, bool completion_sent, const uint8_t* tlp, size_t len) noexcept;

  // Conventional reset of the function (configuration and MSI-X to their reset values).
  void reset() noexcept;

  // ---- state ----
  static constexpr size_t state_size() noexcept { return sizeof(FunctionState); }
  void snapshot(void* out, size_t n) const;   // n must be state_size()
  void restore(const void* in, size_t n);     // checks first; state unchanged on error
  // The checks of restore() on `st` against this function's layout; throws naming the problem.
  void check_state(const FunctionState& st) const;

 private:
  void init_header() noexcept;
  void sync_msix_control() noexcept;
  void on_pmcsr_write(uint16_t old_pmcsr) noexcept;
  void on_uncor_status_write() noexcept;  // error_logging.cpp

  std::shared_ptr<const FunctionLayout> layout_;
  std::unique_ptr<FunctionState> owned_;
  FunctionState* st_;
  ConfigSpace cs_;
  Msix msix_;
};

}  // namespace mlx5tlp::pci
