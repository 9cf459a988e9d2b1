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
//   RawTlpLayout   PROVISIONAL hardware layout: the raw completion TLP in PCIe wire order, in
//                  rotating slots, written as whole 64-byte chunks (zero-padded) — with one
//                  single-copy-atomic 64-byte store per chunk where the CPU has one (x86
//                  MOVDIR64B, Arm ST64B), else eight aligned 8-byte stores — then a store fence
//                  per record. It is a placeholder for the firmware format, not a claim about it.
//
// Waiting for credits: wait_credits() blocks the writer until the device may have returned
// credits (the sim layout sleeps on a shared futex the device model wakes; docs/ring.md), and
// wake_credit_waiter() (any thread) cuts such a wait short when the gateway closes.
//
// Thread-safety: a layout is used by exactly one thread at a time (the Gateway's committer);
// wake_credit_waiter(), name(), reads_page() and store_path() may be called from any thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "mlx5tlp/deadline.hpp"

namespace mlx5tlp {

// Orders earlier stores to device memory before later ones (a doorbell), and flushes
// write-combining buffers so each record leaves as its own writes: sfence on x86, where WC stores
// (and MOVDIR64B) may otherwise pass each other; `dsb st` on Arm (BlueField), which completes the
// stores rather than only ordering them against other observers as a `dmb` would. These are
// rdma-core's mmio_flush_writes() (util/udma_barrier.h, v63.0).
inline void store_fence() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("sfence" ::: "memory");
#elif defined(__aarch64__)
  asm volatile("dsb st" ::: "memory");
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
  // Called by the Gateway before attach(): whether the page is device memory (a real device's
  // non-cached MMIO page, the rdma backend) or ordinary shared memory (the software device).
  virtual void set_device_memory(bool mmio) noexcept { static_cast<void>(mmio); }
  // Largest record (bytes) one slot holds.
  virtual size_t max_record() const noexcept = 0;
  // Records that may be written now without overwriting one the device has not consumed.
  virtual size_t credits() noexcept = 0;
  // Called by the writer when credits() was 0: returns once credits may be available (true if
  // credits() > 0 now), when woken by wake_credit_waiter(), or at `deadline` (false). It may
  // return early (the writer calls it again). The default is a bounded spin/yield with no
  // sleeping, for layouts whose device has no way to wake the writer.
  // `want`: return true only once at least that many credits are there (a writer that must
  // publish a group of records under one doorbell).
  virtual bool wait_credits(const Deadline& deadline, size_t want = 1) noexcept;
  // Most records the page holds at once (credits() never exceeds it); SIZE_MAX: no limit known.
  virtual size_t capacity() const noexcept { return SIZE_MAX; }
  // Any thread: wakes a writer inside wait_credits() (the gateway is closing). Default: nothing
  // (the default wait_credits() is bounded).
  virtual void wake_credit_waiter() noexcept {}
  // Whether the layout reads the page (the sim's consumer index). False: the gateway maps the
  // page write-only (PROT_WRITE), as a real device's non-cached page should be.
  virtual bool reads_page() const noexcept { return true; }
  // How records reach the page: "store8" (aligned 8-byte stores), "movdir64b" or "st64b".
  virtual const char* store_path() const noexcept { return "store8"; }
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
  // The page's doorbell count as of the last doorbell: the position a request source's mark
  // names ("published once the doorbell reaches seq"). The sim layout continues the count a
  // predecessor left in the page; a layout whose device count is not readable returns 0.
  virtual uint64_t published() const noexcept { return 0; }
};

class SimRingLayout final : public GatewayLayout {
 public:
  const char* name() const noexcept override { return "sim"; }
  void attach(uint8_t* page, size_t length) override;
  size_t max_record() const noexcept override { return slot_size_ - kSlotHeader; }
  size_t credits() noexcept override;
  // Stores 1 in writer_waiting (0x48), a full fence, re-reads the consumer index (0x40) and,
  // if there is still no credit, sleeps on a SHARED futex on its low 32 bits (the device model
  // in another process does FUTEX_WAKE on page + 0x40 after storing it when writer_waiting is
  // set), at most until `deadline` and at most kCreditWaitCap; stores 0 on the way out.
  bool wait_credits(const Deadline& deadline, size_t want = 1) noexcept override;
  size_t capacity() const noexcept override { return count_; }
  void wake_credit_waiter() noexcept override;
  void write(const uint8_t* record, size_t len) noexcept override;
  void doorbell() noexcept override;
  bool batched_doorbell() const noexcept override { return true; }
  void write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                   size_t n) noexcept override;
  uint64_t published() const noexcept override { return produced_; }

  static constexpr uint32_t kMagic = 0x5747354d;  // "M5GW"
  static constexpr size_t kDoorbell = 0x00, kMagicOff = 0x08, kVersion = 0x0c, kCount = 0x10,
                          kConsumer = 0x40, kWriterWaiting = 0x48, kSlots = 0x80,
                          kSlotHeader = 8;
  // Longest single sleep for credits: a safety net for a device model that never wakes the
  // writer (an older host model, or another process scribbling writer_waiting), so such a
  // writer still notices returned credits and a close; a woken writer never waits this long.
  static constexpr std::chrono::milliseconds kCreditWaitCap{2};

 private:
  uint8_t* page_ = nullptr;
  uint32_t slot_size_ = 0;
  uint32_t count_ = 0;
  uint32_t next_slot_ = 0;  // produced_ % count_, kept incrementally (no division per record)
  uint64_t produced_ = 0;   // records written (published up to the last doorbell)
};

// How RawTlpLayout stores a 64-byte chunk.
enum class StorePath : uint8_t {
  // The 64-byte store where the CPU has one and the page is device memory (on a software-device
  // page, ordinary memory, a 64-byte direct store costs ~300 ns: it writes through to DRAM);
  // $MLX5TLP_STORE64=0 turns it off. Else store8.
  automatic,
  store8,     // eight aligned 8-byte stores (every CPU)
  store64,    // MOVDIR64B (x86, CPUID.7.0:ECX[28]) / ST64B (Arm FEAT_LS64); refused without it
};
// Whether this CPU has a single-copy-atomic 64-byte store, and its name ("movdir64b" /
// "st64b"), else nullptr.
const char* cpu_store64() noexcept;

class RawTlpLayout final : public GatewayLayout {
 public:
  // `slot_size`: bytes per slot, a multiple of 64 that divides the page. A `store64` path on a
  // CPU without a 64-byte store throws Error(not_supported).
  explicit RawTlpLayout(size_t slot_size = 512, StorePath path = StorePath::automatic);
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
  void set_device_memory(bool mmio) noexcept override;
  bool reads_page() const noexcept override { return false; }
  const char* store_path() const noexcept override { return store64_ ? cpu_store64() : "store8"; }

 private:
  template <bool Store64>
  static void put(uint8_t* slot, const uint8_t* record, size_t len) noexcept;
  template <bool Store64>
  void put_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                 size_t n) noexcept;
  size_t slot_size_;
  StorePath path_;
  bool store64_;
  uint8_t* page_ = nullptr;
  size_t slots_ = 0;
  size_t next_ = 0;  // next slot, wrapping (no division per record)
};

// "sim" or "raw_tlp[:<slot bytes>][:store8|:store64]"; throws Error(invalid_argument) naming
// the bad spec (Error(not_supported) for store64 on a CPU without a 64-byte store).
std::unique_ptr<GatewayLayout> make_layout(const std::string& spec);

}  // namespace mlx5tlp
