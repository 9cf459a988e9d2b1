// mlx5tlp/msix.hpp — MSI-X table, Pending Bit Array and interrupt delivery.
//
// PCIe Base 6.x §7.7.2 (structures) and §6.1.4 (masking and pending semantics):
//   * table entry k (16 bytes at k * 16): Message Address (bits 1:0 reserved: read-only zero
//     here, which §7.7.2.5 permits), Message Upper Address, Message Data, Vector Control (bit 0
//     Mask, default 1b; bits 31:1 RsvdP here, which §7.7.2.8 permits);
//   * PBA: bit k of QWORD k / 64, read-only here ("Software should never write ... the result
//     is undefined", §7.7.2.9: writes are ignored);
//   * "For all accesses to MSI-X Table and MSI-X PBA fields, software must use aligned full
//     DWORD or aligned full QWORD transactions; otherwise, the result is undefined" (§7.7.2):
//     such writes are ignored and reported as MsixAccess::undefined_size;
//   * "while a vector is masked, the Function is prohibited from sending the associated
//     message, and the Function must Set the associated Pending bit whenever the Function
//     would otherwise send the message. When software unmasks a vector whose associated
//     Pending bit is Set, the Function must schedule sending the associated message, and
//     Clear the Pending bit as soon as the message has been sent" (§6.1.4.5). A vector is
//     masked while its Mask bit or the Function Mask is set. Here it is also held pending
//     while the function may not send a Memory Write (Bus Master Enable clear, §7.5.1.1.3:
//     "setting the Bus Master Enable bit to 0b disables MSI/MSI-X interrupt Messages", or not
//     in D0), and delivered when that ends.
//   * While MSI-X Enable is clear the function "is prohibited from using MSI-X" (§7.7.2.2):
//     raise() returns disabled and sets nothing.
//
// Delivery goes through InterruptSink::deliver(address, data): the message is a DWORD Memory
// Write of `data` to `address` (§7.7.2). On the software device the engine's sink posts that
// MWr to the host model. On mlx5 hardware the mechanism by which an emulated function sends
// its MSI-X messages is not public: it is left behind this interface, and no hardware sink
// ships. Nothing here pretends to know it.
//
// State (MsixState) is plain data in caller memory (shared memory for handover); every word
// that two threads touch is accessed with atomic builtins, never through a lock.
// Thread-safety: raise(), pending(), clear_pending() from any thread, concurrently with one
// other thread doing table/PBA accesses and set_control() (the engine). Delivery is exactly
// once per pending bit: whoever clears the bit sends the message.
#pragma once

#include <atomic>
#include <cstdint>

#include "mlx5tlp/capabilities.hpp"

namespace mlx5tlp::pci {

class InterruptSink {
 public:
  virtual ~InterruptSink() = default;
  // One MSI-X message. Called from raise() (any thread) or from the thread whose table or
  // config write unmasked a pending vector; must not throw and should not block.
  virtual void deliver(uint64_t address, uint32_t data) noexcept = 0;
};

// Plain data: can live in shared memory and be copied as bytes (a snapshot).
struct MsixState {
  uint32_t table[msix_cap::kMaxVectors * 4];  // entry k: DWs 4k .. 4k+3
  uint64_t pba[msix_cap::kMaxVectors / 64];
  uint32_t control;   // mirror of the config side: kCtl* bits below
  uint32_t reserved;
};
inline constexpr uint32_t kCtlEnable = 1u << 0, kCtlFunctionMask = 1u << 1, kCtlCanSend = 1u << 2;

enum class RaiseResult : uint8_t {
  sent = 0,    // delivered now
  pending,     // masked (or may not send): the pending bit is set
  disabled,    // MSI-X Enable is clear: nothing happened
  bad_vector,  // vector >= table size
};
const char* raise_result_name(RaiseResult r) noexcept;

enum class MsixAccess : uint8_t {
  ok = 0,
  undefined_size,  // not an aligned full DW or QW: a write is ignored, a read still returns data
  read_only,       // a PBA write: ignored
  out_of_range,    // beyond the structure
};
const char* msix_access_name(MsixAccess a) noexcept;

class Msix {
 public:
  // `state` outlives the object; `sink` may be nullptr (messages are counted, not sent).
  Msix(MsixState* state, uint16_t vectors, InterruptSink* sink) noexcept
      : s_(state), n_(vectors), sink_(sink) {}

  // Reset values: every vector masked, address/data 0, nothing pending, control 0.
  void reset() noexcept;

  uint16_t vectors() const noexcept { return n_; }
  uint32_t table_bytes() const noexcept { return uint32_t(n_) * 16; }
  uint32_t pba_bytes() const noexcept { return (uint32_t(n_) + 63) / 64 * 8; }

  // The config side changed (MSI-X Enable, Function Mask, Bus Master Enable, power state):
  // publish it, then send every pending vector that is no longer masked.
  void set_control(uint32_t control) noexcept;
  // seq_cst: the load half of the Dekker pair with set_control() (msix.cpp).
  uint32_t control() const noexcept { return __atomic_load_n(&s_->control, __ATOMIC_SEQ_CST); }

  RaiseResult raise(uint16_t vector) noexcept;
  bool pending(uint16_t vector) const noexcept;
  // §6.1.4.5: the interrupt condition went away while masked; no message on unmask.
  void clear_pending(uint16_t vector) noexcept;
  bool vector_masked(uint16_t vector) const noexcept;

  // Accesses at `offset` from the structure's start. Writes carry the request's byte enables:
  // `first_be` / `last_be` as in the TLP (last_be 0 for a 1-DW write).
  MsixAccess table_read(uint32_t offset, uint32_t len, uint8_t* out) const noexcept;
  MsixAccess table_write(uint32_t offset, const uint8_t* data, uint32_t len, uint8_t first_be,
                         uint8_t last_be) noexcept;
  MsixAccess pba_read(uint32_t offset, uint32_t len, uint8_t* out) const noexcept;
  MsixAccess pba_write(uint32_t offset, uint32_t len) const noexcept;

  uint64_t messages_sent() const noexcept { return sent_.load(std::memory_order_relaxed); }  // a statistic

 private:
  bool open(uint32_t ctl) const noexcept;
  void send(uint16_t vector) noexcept;
  void send_if_pending(uint16_t vector) noexcept;
  void write_dw(uint32_t dw, uint32_t value) noexcept;

  MsixState* s_;
  uint16_t n_;
  InterruptSink* sink_;
  std::atomic<uint64_t> sent_{0};  // relaxed: a statistic, orders nothing
};

// How an access of `len` bytes at `offset` with these byte enables may touch MSI-X fields.
bool msix_aligned(uint32_t offset, uint32_t len, uint8_t first_be, uint8_t last_be) noexcept;

}  // namespace mlx5tlp::pci
