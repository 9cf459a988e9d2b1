// mlx5tlp/gateway_layout.hpp — the one place that knows how records go into a gateway page.
//
// The record format of a real TLP response gateway page is defined by NVIDIA firmware and is not
// public. Everything that depends on it — slot size and count, where a record's bytes go, the
// doorbell store that publishes records, the memory ordering around it, and where write credits
// come from — lives behind GatewayLayout, so that a correct layout can replace ours without
// touching the ring, the writer loop or the bindings.
//
// Shipped layouts:
//   SimRingLayout  the software device's page (docs/sim.md): a ring of fixed-size slots with a
//                  producer count (the doorbell) and a consumer count written by the device
//                  model, which is where credits come from. One doorbell per batch.
//   RawTlpLayout   PROVISIONAL hardware layout: the raw completion TLP in PCIe wire order,
//                  written with aligned 8-byte stores into rotating slots, then a store fence
//                  per record. It is a placeholder for the firmware format, not a claim about it.
//
// Thread-safety: a layout is used by exactly one thread at a time (the Gateway's committer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace mlx5tlp {

// Orders earlier stores to device memory before later ones (a doorbell): sfence on x86, where
// write-combining stores may otherwise pass each other; a store barrier on Arm (BlueField), whose
// device memory ordering is weaker. rdma-core's util/mmio.h does the same.
inline void store_fence() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("sfence" ::: "memory");
#elif defined(__aarch64__)
  asm volatile("dmb oshst" ::: "memory");
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

// Copies `len` bytes to 8-byte aligned device memory with single 64-bit stores (never two 32-bit
// halves, which can tear), zero-padding the last word. Inline: it is the inner loop of every
// layout, and small fixed sizes unroll.
inline void copy_to_device(volatile uint64_t* dst, const uint8_t* src, size_t len) noexcept {
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, src + i, 8);  // the source may be unaligned; the store is one word
    dst[i / 8] = w;
  }
  if (i < len) {
    uint64_t w = 0;
    __builtin_memcpy(&w, src + i, len - i);
    dst[i / 8] = w;
  }
}

class GatewayLayout {
 public:
  virtual ~GatewayLayout() = default;
  virtual const char* name() const noexcept = 0;
  // Binds the layout to a mapped page; validates it. Throws Error(invalid_argument).
  virtual void attach(uint8_t* page, size_t length) = 0;
  // Largest record (bytes) one slot holds.
  virtual size_t max_record() const noexcept = 0;
  // Records that may be written now without overwriting one the device has not consumed.
  virtual size_t credits() noexcept = 0;
  // Places one record (1..max_record() bytes); not visible to the device before doorbell().
  virtual void write(const uint8_t* record, size_t len) noexcept = 0;
  // Publishes every record written since the last doorbell.
  virtual void doorbell() noexcept = 0;
  // Whether one doorbell may cover many records (else the writer rings after each record).
  virtual bool batched_doorbell() const noexcept = 0;
  // Writes and publishes n records (record i: lengths[i] bytes at buf + offsets[i]; the caller
  // checked credits and lengths). One virtual call per batch; layouts override it with a tight
  // loop. The default calls write() per record and rings as batched_doorbell() says.
  virtual void write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                           size_t n) noexcept;
};

class SimRingLayout final : public GatewayLayout {
 public:
  const char* name() const noexcept override { return "sim"; }
  void attach(uint8_t* page, size_t length) override;
  size_t max_record() const noexcept override { return slot_size_ - kSlotHeader; }
  size_t credits() noexcept override;
  void write(const uint8_t* record, size_t len) noexcept override;
  void doorbell() noexcept override;
  bool batched_doorbell() const noexcept override { return true; }
  void write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                   size_t n) noexcept override;

  static constexpr uint32_t kMagic = 0x5747354d;  // "M5GW"
  static constexpr size_t kDoorbell = 0x00, kMagicOff = 0x08, kVersion = 0x0c, kCount = 0x10,
                          kConsumer = 0x40, kSlots = 0x80, kSlotHeader = 8;

 private:
  uint8_t* page_ = nullptr;
  uint32_t slot_size_ = 0;
  uint32_t count_ = 0;
  uint32_t next_slot_ = 0;  // produced_ % count_, kept incrementally (no division per record)
  uint64_t produced_ = 0;   // records written (published up to the last doorbell)
};

class RawTlpLayout final : public GatewayLayout {
 public:
  // `slot_size`: bytes per slot, a multiple of 64 that divides the page.
  explicit RawTlpLayout(size_t slot_size = 512) : slot_size_(slot_size) {}
  const char* name() const noexcept override { return "raw_tlp"; }
  void attach(uint8_t* page, size_t length) override;
  size_t max_record() const noexcept override { return slot_size_; }
  // The firmware's flow control is not public: this layout assumes it is always ready.
  size_t credits() noexcept override { return SIZE_MAX; }
  void write(const uint8_t* record, size_t len) noexcept override;
  void doorbell() noexcept override { store_fence(); }
  bool batched_doorbell() const noexcept override { return false; }
  void write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                   size_t n) noexcept override;

 private:
  size_t slot_size_;
  uint8_t* page_ = nullptr;
  size_t slots_ = 0;
  size_t next_ = 0;  // next slot, wrapping (no division per record)
};

// "sim" or "raw_tlp[:<slot size>]"; throws Error(invalid_argument) naming the bad spec.
std::unique_ptr<GatewayLayout> make_layout(const std::string& spec);

}  // namespace mlx5tlp
