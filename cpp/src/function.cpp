#include "mlx5tlp/function.hpp"

#include <cerrno>
#include <cstring>
#include <string>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp::pci {

namespace {

[[noreturn]] void state_error(int err, const std::string& what) {
  throw Error(ErrorKind::invalid_argument, "restore function state", err, what);
}

bool power_state_supported(const FunctionLayout& L, unsigned s) {
  return s == pm::kD0 || s == pm::kD3hot || (s == pm::kD1 && L.pm_d1) || (s == pm::kD2 && L.pm_d2);
}

}  // namespace

Function::Function(std::shared_ptr<const FunctionLayout> layout, InterruptSink* sink)
    : Function(std::move(layout), sink, nullptr, Adopt::reset) {}

Function::Function(std::shared_ptr<const FunctionLayout> layout, InterruptSink* sink,
                   FunctionState* state, Adopt mode)
    : layout_(std::move(layout)),
      owned_(state == nullptr ? std::make_unique<FunctionState>() : nullptr),
      st_(state != nullptr ? state : owned_.get()),
      cs_(&layout_->config, st_->config),
      msix_(&st_->msix, layout_->msix_params.vectors, sink) {
  if (mode == Adopt::keep) {
    check_state(*st_);
    sync_msix_control();
    return;
  }
  init_header();
  reset();
}

void Function::init_header() noexcept {
  FunctionStateHeader& h = st_->header;
  h.magic = kFunctionStateMagic;
  h.version = kFunctionStateVersion;
  h.header_bytes = sizeof(FunctionStateHeader);
  h.state_bytes = sizeof(FunctionState);
  h.msix_vectors = layout_->msix_params.vectors;
  h.spec_digest = layout_->digest;
}

void Function::reset() noexcept {
  cs_.reset();
  msix_.reset();
  sync_msix_control();
}

void Function::config_write(uint16_t dw_offset, uint32_t value, uint8_t byte_enables) noexcept {
  dw_offset &= 0xffc;
  const FunctionLayout& L = *layout_;
  const auto pmcsr = uint16_t(L.pm + pm::kPmcsr);
  const auto old_pmcsr = uint16_t(cs_.read(pmcsr, 2));
  const uint8_t changed = cs_.write(dw_offset, value, uint8_t(byte_enables & 0xf));
  if (changed == 0) return;
  auto touched = [&](uint16_t off, unsigned width) {
    for (unsigned i = 0; i < 4; ++i)
      if ((changed >> i & 1u) != 0 && dw_offset + i >= off && dw_offset + i < off + width) return true;
    return false;
  };
  const bool pm_changed = touched(pmcsr, 2);
  if (pm_changed) on_pmcsr_write(old_pmcsr);
  // Side effects beyond storage, as QEMU's config_write hooks: what MSI-X may send.
  if (pm_changed || touched(reg::kCommand, 2) ||
      (L.msix != 0 && touched(uint16_t(L.msix + msix_cap::kControl), 2)))
    sync_msix_control();
  if (L.aer != 0 && touched(uint16_t(L.aer + aer::kUncorStatus), 4)) on_uncor_status_write();
}

void Function::on_pmcsr_write(uint16_t old_pmcsr) noexcept {
  const auto pmcsr = uint16_t(layout_->pm + pm::kPmcsr);
  const auto now = uint16_t(cs_.read(pmcsr, 2));
  const unsigned from = old_pmcsr & pm::kStateMask, to = now & pm::kStateMask;
  if (!power_state_supported(*layout_, to)) {
    // §7.5.2.2 PowerState: "If software attempts to write an unsupported, optional state to
    // this field, the write operation must complete normally; however, the data is discarded
    // and no state change occurs."
    cs_.device_write(pmcsr, 2, (now & ~pm::kStateMask) | from);
    return;
  }
  // §7.5.2.2 No_Soft_Reset: when clear, D3hot -> D0 performs an internal reset (the
  // function returns to D0uninitialized; configuration registers to their defaults).
  if (from == pm::kD3hot && to == pm::kD0 && !layout_->no_soft_reset) {
    cs_.reset();
    msix_.reset();
  }
}

void Function::sync_msix_control() noexcept {
  if (layout_->msix == 0) return;
  const auto mc = uint16_t(cs_.read(uint16_t(layout_->msix + msix_cap::kControl), 2));
  uint32_t ctl = 0;
  if ((mc & msix_cap::kEnable) != 0) ctl |= kCtlEnable;
  if ((mc & msix_cap::kFunctionMask) != 0) ctl |= kCtlFunctionMask;
  if (bus_master()) ctl |= kCtlCanSend;
  msix_.set_control(ctl);
}

uint8_t Function::power_state() const noexcept {
  return uint8_t(cs_.read(uint16_t(layout_->pm + pm::kPmcsr), 2) & pm::kStateMask);
}

bool Function::memory_enabled() const noexcept {
  return (cs_.read(reg::kCommand, 2) & command::kMemorySpace) != 0 && power_state() == pm::kD0;
}

bool Function::io_enabled() const noexcept {
  return (cs_.read(reg::kCommand, 2) & command::kIoSpace) != 0 && power_state() == pm::kD0;
}

bool Function::bus_master() const noexcept {
  return (cs_.read(reg::kCommand, 2) & command::kBusMaster) != 0 && power_state() == pm::kD0;
}

uint16_t Function::max_payload_size() const noexcept {
  // §7.5.3.4: "Permissible values that can be programmed are indicated by the
  // Max_Payload_Size Supported field"; the result of other values is not defined. §2.2.2:
  // a transmitter's payload "must never exceed the Function's Max_Payload_Size Supported".
  // The field keeps what software wrote; the function uses the smaller of the two, which
  // respects both limits (reserved encodings 110b/111b count as above Supported).
  const auto ctl = uint16_t(cs_.read(uint16_t(layout_->pcie + pcie::kDevCtl), 2));
  const unsigned code = (ctl >> pcie::kDevCtlMpsShift) & 7u;
  const uint16_t programmed = code > 5 ? 4096 : payload_bytes(code);
  return programmed < layout_->max_payload_supported ? programmed : layout_->max_payload_supported;
}

uint16_t Function::max_read_request_size() const noexcept {
  const auto ctl = uint16_t(cs_.read(uint16_t(layout_->pcie + pcie::kDevCtl), 2));
  return payload_bytes((ctl >> pcie::kDevCtlMrrsShift) & 7u);  // reserved 110b/111b: 4096
}

uint16_t Function::read_completion_boundary() const noexcept {
  const auto ctl = uint16_t(cs_.read(uint16_t(layout_->pcie + pcie::kLinkCtl), 2));
  return (ctl & pcie::kLinkCtlRcb) != 0 ? 128 : 64;  // §7.5.3.7 bit 3: 0b 64 bytes, 1b 128
}

CompletionTimeout Function::completion_timeout() const noexcept {
  // §7.5.3.16 Table 7-34 encodings; a value outside the supported ranges (or reserved) is
  // not defined by the spec: the function then keeps the default range.
  struct Row { uint8_t code, range_bit; uint32_t min_us, max_us; };
  static constexpr Row rows[] = {
      {0x1, 0x1, 50, 100},           {0x2, 0x1, 1000, 10000},        {0x5, 0x2, 16000, 55000},
      {0x6, 0x2, 65000, 210000},     {0x9, 0x4, 260000, 900000},     {0xa, 0x4, 1000000, 3500000},
      {0xd, 0x8, 4000000, 13000000}, {0xe, 0x8, 17000000, 64000000}};
  CompletionTimeout ct;
  const auto ctl2 = uint16_t(cs_.read(uint16_t(layout_->pcie + pcie::kDevCtl2), 2));
  ct.disabled = layout_->completion_timeout_disable && (ctl2 & pcie::kDevCtl2CtdBit) != 0;
  const unsigned code = ctl2 & 0xfu;
  for (const Row& r : rows)
    if (r.code == code && (layout_->completion_timeout_ranges & r.range_bit) != 0) {
      ct.min_us = r.min_us;
      ct.max_us = r.max_us;
    }
  return ct;
}

MsixHit Function::msix_hit(int bar, uint64_t offset, uint32_t len) const noexcept {
  MsixHit h;
  if (layout_->msix == 0) return h;
  const MsixParams& m = layout_->msix_params;
  const uint64_t n = len == 0 ? 1 : len;
  auto test = [&](uint8_t sbar, uint64_t start, uint64_t bytes, MsixRegion r) {
    if (bar != sbar || offset + n <= start || offset >= start + bytes) return false;
    const bool inside = offset >= start && offset + n <= start + bytes;
    h.region = inside ? r : MsixRegion::straddles;
    h.offset = inside ? uint32_t(offset - start) : 0;
    return true;
  };
  if (!test(m.table_bar, m.table_offset, msix_.table_bytes(), MsixRegion::table))
    test(m.pba_bar, m.pba_offset, msix_.pba_bytes(), MsixRegion::pba);
  return h;
}

MsixAccess Function::msix_read(int bar, uint64_t offset, uint32_t len, uint8_t* out) const noexcept {
  const MsixHit h = msix_hit(bar, offset, len);
  if (h.region == MsixRegion::table) return msix_.table_read(h.offset, len, out);
  if (h.region == MsixRegion::pba) return msix_.pba_read(h.offset, len, out);
  return MsixAccess::out_of_range;
}

MsixAccess Function::msix_write(int bar, uint64_t offset, const uint8_t* data, uint32_t len,
                                uint8_t first_be, uint8_t last_be) noexcept {
  const MsixHit h = msix_hit(bar, offset, len);
  if (h.region == MsixRegion::table) return msix_.table_write(h.offset, data, len, first_be, last_be);
  if (h.region == MsixRegion::pba) return msix_.pba_write(h.offset, len);
  return MsixAccess::out_of_range;
}

// ---- state ----

void Function::check_state(const FunctionState& st) const {
  const FunctionStateHeader& h = st.header;
  const FunctionLayout& L = *layout_;
  if (h.magic != kFunctionStateMagic) state_error(EINVAL, "not a function state (bad magic " + hex(h.magic) + ")");
  if (h.version != kFunctionStateVersion)
    state_error(EPROTO, "state layout version " + std::to_string(h.version) + ", this build reads version " +
                            std::to_string(kFunctionStateVersion) + " only (no migration)");
  if (h.header_bytes != sizeof(FunctionStateHeader) || h.state_bytes != sizeof(FunctionState))
    state_error(EINVAL, "header sizes " + std::to_string(h.header_bytes) + "/" + std::to_string(h.state_bytes) +
                            " differ from this build's");
  if (h.spec_digest != L.digest || h.msix_vectors != L.msix_params.vectors)
    state_error(EINVAL, "spec digest " + hex(h.spec_digest) + " differs from this function's " + hex(L.digest) +
                            ": the state belongs to a function compiled from another spec");
  ConfigMismatch m;
  if (!ConfigSpace::check(L.config, st.config, &m))
    state_error(EINVAL, "config byte " + hex(m.offset) + ": read-only/reserved bits " + hex(m.checked) +
                            " must be " + hex(m.expected) + ", found " + hex(m.found));
  const unsigned ps = load_le(st.config + L.pm + pm::kPmcsr, 2) & pm::kStateMask;
  if (!power_state_supported(L, ps)) state_error(EINVAL, "unsupported power state D" + std::to_string(ps));
  const uint32_t n = L.msix_params.vectors;
  for (uint32_t k = 0; k < msix_cap::kMaxVectors; ++k) {
    const uint32_t* e = st.msix.table + 4 * k;
    const bool bad = k < n ? ((e[0] & 3u) != 0 || (e[3] & ~1u) != 0)
                           : (e[0] != 0 || e[1] != 0 || e[2] != 0 || e[3] != 1);
    if (bad) state_error(EINVAL, "MSI-X table entry " + std::to_string(k) + " has reserved bits set");
  }
  for (uint32_t w = 0; w < msix_cap::kMaxVectors / 64; ++w) {
    const uint64_t valid = w * 64 >= n ? 0 : (n - w * 64 >= 64 ? ~uint64_t(0) : (uint64_t(1) << (n - w * 64)) - 1);
    if ((st.msix.pba[w] & ~valid) != 0) state_error(EINVAL, "MSI-X PBA has pending bits beyond the table size");
  }
}

void Function::snapshot(void* out, size_t n) const {
  if (n != sizeof(FunctionState))
    throw Error(ErrorKind::invalid_argument, "snapshot function state", EINVAL,
                "buffer of " + std::to_string(n) + " bytes, need " + std::to_string(sizeof(FunctionState)));
  auto* dst = static_cast<FunctionState*>(out);
  dst->header = st_->header;
  std::memcpy(dst->config, st_->config, kConfigSize);
  // Atomic loads: raisers may be setting pending bits right now (relaxed: a point-in-time copy).
  for (size_t i = 0; i < msix_cap::kMaxVectors * 4; ++i)  // relaxed: a point-in-time copy
    dst->msix.table[i] = __atomic_load_n(&st_->msix.table[i], __ATOMIC_RELAXED);
  for (size_t i = 0; i < msix_cap::kMaxVectors / 64; ++i)
    dst->msix.pba[i] = __atomic_load_n(&st_->msix.pba[i], __ATOMIC_SEQ_CST);  // seq_cst: as raise()
  dst->msix.control = msix_.control();
  dst->msix.reserved = 0;
}

void Function::restore(const void* in, size_t n) {
  if (n != sizeof(FunctionState))
    state_error(EINVAL, "snapshot of " + std::to_string(n) + " bytes, expected " + std::to_string(sizeof(FunctionState)));
  auto copy = std::make_unique<FunctionState>();
  std::memcpy(copy.get(), in, n);
  check_state(*copy);
  st_->header = copy->header;
  std::memcpy(st_->config, copy->config, kConfigSize);
  for (size_t i = 0; i < msix_cap::kMaxVectors * 4; ++i)  // relaxed: published by set_control below
    __atomic_store_n(&st_->msix.table[i], copy->msix.table[i], __ATOMIC_RELAXED);
  for (size_t i = 0; i < msix_cap::kMaxVectors / 64; ++i)  // seq_cst: as raise()
    __atomic_store_n(&st_->msix.pba[i], copy->msix.pba[i], __ATOMIC_SEQ_CST);
  sync_msix_control();  // recomputed from the restored config (seq_cst store inside)
}

}  // namespace mlx5tlp::pci
