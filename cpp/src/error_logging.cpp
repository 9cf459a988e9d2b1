// The function's error logging in configuration space: PCIe Base 6.x §6.2.4 (Error Logging),
// §6.2.5 Figure 6-2 (Sequence of Device Error Signaling and Logging Operations), §6.2.3.2.4
// (Advisory Non-Fatal Error cases), §6.2.4.3 (Advisory Non-Fatal Error logging), §7.5.1.1.4
// Status, §7.5.3.4 / §7.5.3.5 Device Control / Status, §7.8.4 AER registers. QEMU's
// hw/pci/pcie_aer.c implements the same flowchart independently; its choices were compared.
#include "mlx5tlp/function.hpp"

namespace mlx5tlp::pci {

namespace {

uint32_t uncor_bit(RxError e) noexcept {
  switch (e) {
    case RxError::unsupported_request: return aer::kUncUnsupportedRequest;
    case RxError::completer_abort: return aer::kUncCompleterAbort;
    case RxError::malformed_tlp: return aer::kUncMalformedTlp;
    case RxError::poisoned_tlp: return aer::kUncPoisonedTlp;
    case RxError::unexpected_completion: return aer::kUncUnexpectedCompletion;
  }
  return 0;
}

// §7.8.4.8: the header is captured so that DW reads show it as the spec draws headers: header
// byte 0 in bits 31:24 of the first DW, byte 1 in 23:16, and so on. A 3-DW header leaves the
// fourth DW undefined; we store zeros there (and past the end of a truncated Malformed TLP).
void write_header_log(ConfigSpace& cs, uint16_t aer_off, const uint8_t* tlp, size_t len) noexcept {
  const size_t hdr = len == 0 ? 0 : ((tlp[0] & 0x20) != 0 ? 16 : 12);  // Fmt bit 0: 4-DW header
  const size_t n = len < hdr ? len : hdr;
  for (uint16_t dw = 0; dw < 4; ++dw) {
    uint32_t v = 0;
    for (unsigned b = 0; b < 4; ++b) {
      const size_t k = size_t(dw) * 4 + b;
      if (k < n) v |= uint32_t(tlp[k]) << (24 - 8 * b);
    }
    cs.device_write(uint16_t(aer_off + aer::kHeaderLog + 4 * dw), 4, v);
  }
}

}  // namespace

ErrorMessage Function::log_error(RxError e, bool completion_sent, const uint8_t* tlp, size_t len) noexcept {
  const FunctionLayout& L = *layout_;
  const uint32_t bit = uncor_bit(e);
  if (bit == 0) return ErrorMessage::none;  // not an RxError value
  const bool ur = e == RxError::unsupported_request;

  // Conventional PCI mapping (§6.2.7.1, Table 7-5): Signaled Target Abort when the function
  // completes a request as Completer Abort; Detected Parity Error "whenever it receives a
  // Poisoned TLP, regardless of the state of the Parity Error Response bit".
  if (e == RxError::completer_abort) cs_.device_set_bits(reg::kStatus, 2, status::kSignaledTargetAbort);
  if (e == RxError::poisoned_tlp) cs_.device_set_bits(reg::kStatus, 2, status::kDetectedParityError);

  // Severity: the AER Uncorrectable Error Severity register, else the defaults of Table 6-5
  // (§6.2.7: "Device Functions without AER use the default associations").
  const uint32_t severity =
      L.aer != 0 ? uint32_t(cs_.read(uint16_t(L.aer + aer::kUncorSeverity), 4)) : aer::kUncorSeverityDefault;
  const bool fatal = (severity & bit) != 0;
  // §6.2.3.2.4.1 (a Completer sending a UR / CA Completion) and §6.2.3.2.4.5 (the Receiver of
  // an Unexpected Completion): non-fatal, these are Advisory Non-Fatal Errors. A posted UR has
  // no Completion that tells the Requester, so it stays an uncorrectable error. Poisoned
  // writes are discarded, which continuing as if corrected would turn into silent data loss:
  // §6.2.3.2.4.3 forbids the advisory case then (and §2.7.2.1 requires it for Configuration
  // and control-register writes). Malformed TLP is never advisory (fatal by default).
  const bool advisory = !fatal && ((completion_sent && (ur || e == RxError::completer_abort)) ||
                                   e == RxError::unexpected_completion);

  // Device Status (§7.5.3.5): logged "regardless of whether error reporting is enabled" and,
  // with AER, regardless of the mask registers. An Advisory Non-Fatal Error is handled as a
  // correctable one (Figure 6-2; QEMU's pcie_aer_inject_cor_error sets CED the same way).
  uint16_t devctl = 0;
  if (L.pcie != 0) {
    uint16_t sta = advisory ? pcie::kDevStaCed : fatal ? pcie::kDevStaFed : pcie::kDevStaNfed;
    if (ur) sta |= pcie::kDevStaUrd;
    cs_.device_set_bits(uint16_t(L.pcie + pcie::kDevSta), 2, sta);
    devctl = uint16_t(cs_.read(uint16_t(L.pcie + pcie::kDevCtl), 2));
  }
  const bool serr = (cs_.read(reg::kCommand, 2) & command::kSerrEnable) != 0;

  if (L.aer != 0) {
    const auto ust = uint16_t(L.aer + aer::kUncorStatus), cst = uint16_t(L.aer + aer::kCorStatus);
    const auto capctl = uint16_t(L.aer + aer::kCapControl);
    const auto status_now = uint32_t(cs_.read(ust, 4));
    const auto ctl = uint32_t(cs_.read(capctl, 4));
    // §6.2.4.2: "The First Error Pointer is valid when the corresponding bit of the
    // Uncorrectable Error Status register is set"; only one header is recorded (Multiple
    // Header Recording Capable is 0), so a valid pointer means the log is in use.
    const bool log_free = (status_now & (1u << (ctl & aer::kFirstErrorPointerMask))) == 0;
    const bool unmasked = (uint32_t(cs_.read(uint16_t(L.aer + aer::kUncorMask), 4)) & bit) == 0;
    if (advisory) {
      // §6.2.4.3: set Advisory Non-Fatal Error Status; if its mask bit is set, "no further
      // processing is done". Otherwise set the corresponding uncorrectable status bit, record
      // the header if that bit is unmasked, and send ERR_COR if Correctable Error Reporting is
      // enabled (for a UR also UR Reporting: §7.5.3.4, QEMU the same).
      cs_.device_set_bits(cst, 4, aer::kCorAdvisoryNonFatal);
      if ((uint32_t(cs_.read(uint16_t(L.aer + aer::kCorMask), 4)) & aer::kCorAdvisoryNonFatal) != 0)
        return ErrorMessage::none;
    } else if (!unmasked) {
      // §6.2.3.2.2: "If an individual error is masked when it is detected, its error status bit
      // is still affected, but no error reporting Message is sent ... and the error is not
      // recorded in the Header Log ... or First Error Pointer."
      cs_.device_set_bits(ust, 4, bit);
      return ErrorMessage::none;
    }
    if (unmasked && log_free) {
      unsigned pos = 0;
      while ((bit >> pos) != 1) ++pos;
      cs_.device_write(capctl, 4, (ctl & ~aer::kFirstErrorPointerMask) | pos);
      write_header_log(cs_, L.aer, tlp, len);
    }
    cs_.device_set_bits(ust, 4, bit);
    if (advisory)
      return (devctl & pcie::kDevCtlCere) != 0 && (!ur || (devctl & pcie::kDevCtlUrre) != 0)
                 ? ErrorMessage::err_cor
                 : ErrorMessage::none;
  } else if (advisory) {
    // §6.2.3.2.4: "An agent without AER sends no error Message for these cases."
    return ErrorMessage::none;
  }
  // Uncorrectable, not advisory (§6.2.5, §6.2.7 Implementation Note "Device UR Reporting
  // Compatibility"): SERR# Enable alone enables ERR_NONFATAL / ERR_FATAL, even for a UR whose
  // UR Reporting Enable is clear; without SERR#, a UR needs UR Reporting Enable as well.
  if (ur && !serr && (devctl & pcie::kDevCtlUrre) == 0) return ErrorMessage::none;
  if (fatal) return serr || (devctl & pcie::kDevCtlFere) != 0 ? ErrorMessage::err_fatal : ErrorMessage::none;
  return serr || (devctl & pcie::kDevCtlNfere) != 0 ? ErrorMessage::err_nonfatal : ErrorMessage::none;
}

void Function::on_uncor_status_write() noexcept {
  // §6.2.4.2 Implementation Note "First Error Pointer Register Being Valid": once software
  // clears the status bit the pointer names, point it at a bit hardware never sets (bit 0 is
  // reserved in an Endpoint's Uncorrectable Error Status), so a later masked error of the same
  // kind cannot make a stale pointer look valid and block recording.
  const auto capctl = uint16_t(layout_->aer + aer::kCapControl);
  const auto ctl = uint32_t(cs_.read(capctl, 4));
  const uint32_t fep = ctl & aer::kFirstErrorPointerMask;
  if (fep == 0) return;
  const auto st = uint32_t(cs_.read(uint16_t(layout_->aer + aer::kUncorStatus), 4));
  if ((st & (1u << fep)) == 0) cs_.device_write(capctl, 4, ctl & ~aer::kFirstErrorPointerMask);
}

}  // namespace mlx5tlp::pci
