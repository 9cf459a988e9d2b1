// MSI-X masking and pending-bit protocol (PCIe Base 6.x §6.1.4.5, §7.7.2).
//
// Exactly-once delivery between a raiser (any thread) and an unmasker (the engine):
//   raiser:   masked? -> pba |= bit (seq_cst RMW) -> re-read mask/control (seq_cst) ->
//             unmasked now? -> pba &= ~bit (seq_cst RMW) -> send if the bit was ours
//   unmasker: store mask/control (seq_cst) -> pba &= ~bit (seq_cst RMW) -> send if it was set
// Both sides write then read the other's word: with every access seq_cst (one total order)
// at least one of them sees the other's write (Dekker), and the RMW that clears the bit
// decides who sends. Address and data are written before the Vector Control store that
// unmasks (release) and read after the load that sees it (acquire): seq_cst covers both.
#include "mlx5tlp/msix.hpp"

#include <cstring>

namespace mlx5tlp::pci {

const char* raise_result_name(RaiseResult r) noexcept {
  switch (r) {
    case RaiseResult::sent: return "sent";
    case RaiseResult::pending: return "pending";
    case RaiseResult::disabled: return "disabled";
    case RaiseResult::bad_vector: return "bad_vector";
  }
  return "?";
}

const char* msix_access_name(MsixAccess a) noexcept {
  switch (a) {
    case MsixAccess::ok: return "ok";
    case MsixAccess::undefined_size: return "undefined_size";
    case MsixAccess::read_only: return "read_only";
    case MsixAccess::out_of_range: return "out_of_range";
  }
  return "?";
}

bool msix_aligned(uint32_t offset, uint32_t len, uint8_t first_be, uint8_t last_be) noexcept {
  if (len == 4) return offset % 4 == 0 && first_be == 0xf && last_be == 0;
  if (len == 8) return offset % 8 == 0 && first_be == 0xf && last_be == 0xf;
  return false;
}

void Msix::reset() noexcept {
  for (uint32_t k = 0; k < msix_cap::kMaxVectors; ++k) {
    // Relaxed: address/data are published by the seq_cst Vector Control store that follows.
    for (uint32_t i = 0; i < 3; ++i) __atomic_store_n(&s_->table[4 * k + i], 0u, __ATOMIC_RELAXED);
    // Vector Control: Mask Bit default 1b (§7.7.2.8). seq_cst: pairs with raise().
    __atomic_store_n(&s_->table[4 * k + 3], 1u, __ATOMIC_SEQ_CST);
  }
  // seq_cst: the same total order raise() and set_control() use for these words.
  for (auto& w : s_->pba) __atomic_store_n(&w, uint64_t(0), __ATOMIC_SEQ_CST);
  __atomic_store_n(&s_->control, 0u, __ATOMIC_SEQ_CST);
  s_->reserved = 0;
}

bool Msix::open(uint32_t ctl) const noexcept {
  return (ctl & kCtlEnable) != 0 && (ctl & kCtlFunctionMask) == 0 && (ctl & kCtlCanSend) != 0;
}

bool Msix::vector_masked(uint16_t v) const noexcept {
  // seq_cst: the load half of the Dekker pair with the unmasking store (see top of file).
  return (__atomic_load_n(&s_->table[4 * v + 3], __ATOMIC_SEQ_CST) & 1u) != 0;
}

void Msix::send(uint16_t v) noexcept {
  // Relaxed: ordered after the seq_cst load of Vector Control that found the vector open.
  const uint32_t lo = __atomic_load_n(&s_->table[4 * v + 0], __ATOMIC_RELAXED);
  const uint32_t hi = __atomic_load_n(&s_->table[4 * v + 1], __ATOMIC_RELAXED);
  const uint32_t data = __atomic_load_n(&s_->table[4 * v + 2], __ATOMIC_RELAXED);
  sent_.fetch_add(1, std::memory_order_relaxed);  // a statistic
  if (sink_ != nullptr) sink_->deliver(uint64_t(hi) << 32 | lo, data);
}

void Msix::send_if_pending(uint16_t v) noexcept {
  const uint64_t bit = uint64_t(1) << (v % 64);
  // seq_cst RMW: clearing the bit is the claim to send; only one party can win it.
  if ((__atomic_fetch_and(&s_->pba[v / 64], ~bit, __ATOMIC_SEQ_CST) & bit) != 0) send(v);
}

RaiseResult Msix::raise(uint16_t v) noexcept {
  if (v >= n_) return RaiseResult::bad_vector;
  const uint32_t ctl = control();
  if ((ctl & kCtlEnable) == 0) return RaiseResult::disabled;
  if (open(ctl) && !vector_masked(v)) {
    send(v);
    return RaiseResult::sent;
  }
  // seq_cst RMW: publish the pending bit before re-reading the masks (Dekker, see top).
  __atomic_fetch_or(&s_->pba[v / 64], uint64_t(1) << (v % 64), __ATOMIC_SEQ_CST);
  if (open(control()) && !vector_masked(v)) {
    // Unmasked meanwhile: the unmasker may have scanned before our bit was visible.
    send_if_pending(v);
    return RaiseResult::sent;
  }
  return RaiseResult::pending;
}

bool Msix::pending(uint16_t v) const noexcept {
  if (v >= n_) return false;
  // seq_cst: a consistent view for callers polling pending bits (§6.1.4.5 allows polling).
  return (__atomic_load_n(&s_->pba[v / 64], __ATOMIC_SEQ_CST) >> (v % 64) & 1u) != 0;
}

void Msix::clear_pending(uint16_t v) noexcept {
  if (v >= n_) return;
  // seq_cst RMW: competes with send_if_pending() for the same bit; either wins, never both.
  __atomic_fetch_and(&s_->pba[v / 64], ~(uint64_t(1) << (v % 64)), __ATOMIC_SEQ_CST);
}

void Msix::set_control(uint32_t ctl) noexcept {
  // seq_cst store: the store half of the Dekker pair with raise() (see top of file).
  __atomic_store_n(&s_->control, ctl, __ATOMIC_SEQ_CST);
  if (!open(ctl)) return;
  for (uint32_t w = 0; w * 64 < n_; ++w) {
    uint64_t bits = __atomic_load_n(&s_->pba[w], __ATOMIC_SEQ_CST);  // seq_cst: after the store
    while (bits != 0) {
      const auto v = uint16_t(w * 64 + uint32_t(__builtin_ctzll(bits)));
      bits &= bits - 1;
      if (v < n_ && !vector_masked(v)) send_if_pending(v);
    }
  }
}

void Msix::write_dw(uint32_t dw, uint32_t value) noexcept {
  const uint32_t field = dw % 4;
  const auto v = uint16_t(dw / 4);
  if (field == 3) {
    // seq_cst store (also a release for the address/data written before it): Dekker pair.
    __atomic_store_n(&s_->table[dw], value & 1u, __ATOMIC_SEQ_CST);
    if ((value & 1u) == 0 && open(control())) send_if_pending(v);
    return;
  }
  // Message Address bits 1:0 are reserved (read-only zero); upper address and data are RW.
  // Relaxed: published to raisers by the next Vector Control store or load (seq_cst).
  __atomic_store_n(&s_->table[dw], field == 0 ? value & ~3u : value, __ATOMIC_RELAXED);
}

MsixAccess Msix::table_read(uint32_t offset, uint32_t len, uint8_t* out) const noexcept {
  if (len > table_bytes() || offset > table_bytes() - len) return MsixAccess::out_of_range;
  for (uint32_t i = 0; i < len;) {
    const uint32_t dw = (offset + i) / 4;
    // Relaxed: a host read of one field; no ordering with anything else is implied.
    const uint32_t word = __atomic_load_n(&s_->table[dw], __ATOMIC_RELAXED);
    for (uint32_t b = (offset + i) % 4; b < 4 && i < len; ++b, ++i) out[i] = uint8_t(word >> (8 * b));
  }
  return msix_aligned(offset, len, 0xf, len == 8 ? 0xf : 0) ? MsixAccess::ok : MsixAccess::undefined_size;
}

MsixAccess Msix::table_write(uint32_t offset, const uint8_t* data, uint32_t len, uint8_t first_be,
                             uint8_t last_be) noexcept {
  if (len > table_bytes() || offset > table_bytes() - len) return MsixAccess::out_of_range;
  if (!msix_aligned(offset, len, first_be, last_be)) return MsixAccess::undefined_size;
  // A QW write updates the lower DW first: for the (Upper Address, ...) pairs this order is
  // irrelevant; for (Data, Vector Control) the data is in place before an unmask sends.
  for (uint32_t i = 0; i < len; i += 4) {
    uint32_t v = 0;
    std::memcpy(&v, data + i, 4);  // little-endian host, like the TLP payload order
    write_dw((offset + i) / 4, v);
  }
  return MsixAccess::ok;
}

MsixAccess Msix::pba_read(uint32_t offset, uint32_t len, uint8_t* out) const noexcept {
  if (len > pba_bytes() || offset > pba_bytes() - len) return MsixAccess::out_of_range;
  for (uint32_t i = 0; i < len;) {
    const uint32_t qw = (offset + i) / 8;
    // seq_cst: the same view of pending bits raise()/set_control() act on.
    const uint64_t word = __atomic_load_n(&s_->pba[qw], __ATOMIC_SEQ_CST);
    for (uint32_t b = (offset + i) % 8; b < 8 && i < len; ++b, ++i) out[i] = uint8_t(word >> (8 * b));
  }
  return msix_aligned(offset, len, 0xf, len == 8 ? 0xf : 0) ? MsixAccess::ok : MsixAccess::undefined_size;
}

MsixAccess Msix::pba_write(uint32_t offset, uint32_t len) const noexcept {
  if (len > pba_bytes() || offset > pba_bytes() - len) return MsixAccess::out_of_range;
  return MsixAccess::read_only;
}

}  // namespace mlx5tlp::pci
