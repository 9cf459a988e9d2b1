// mlx5tlp/gateway.hpp — writes TLP completion records into a mapped TLP response gateway page.
//
// Two modes:
//   direct  write()/write_batch() from ONE thread, straight into the page (no ring, no thread).
//   loop    any number of producer threads post()/post_batch() into a bounded lock-free MPSC
//           ring; one writer thread drains it in batches into the page, one doorbell per batch
//           where the layout allows, spinning briefly then parking when idle.
// Back-pressure is explicit: post blocks up to a timeout (0: never) and returns false when the
// ring stayed full. flush() waits until everything posted before it is in the page; close()
// drains (giving the device up to `drain_timeout` to return credits) and stops the writer.
// Nothing accepted is dropped silently: close() reports records it could not write.
//
// One committer per page: mlx5 hardware forbids starting a doorbell write while another is in
// progress on the same page, so a second Gateway on a page (this or another process) is refused
// (EBUSY) through an OFD lock on a per-page lock file.
//
// Fork: a child does not inherit the writer thread. Every call in a child on a gateway opened by
// the parent throws Error(invalid_handle); the child opens its own gateway.
//
// Ownership: a Gateway keeps its Var (and so its Context) alive and holds the page mapping;
// Var::free() is refused while it is open. Thread-safety: post/post_batch/flush/stats from any
// thread; write/write_batch from one thread at a time (concurrent use throws); close() from any.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "mlx5tlp/deadline.hpp"
#include "mlx5tlp/gateway_layout.hpp"
#include "mlx5tlp/ring.hpp"
#include "mlx5tlp/var.hpp"

namespace mlx5tlp {

struct GatewayOptions {
  bool direct = false;         // direct mode: no ring, no writer thread
  size_t ring_slots = 1024;    // power of two
  size_t batch_max = 64;       // records per doorbell at most
  // How long close() lets the device take what is queued; nanoseconds::max(): no limit.
  std::chrono::nanoseconds drain_timeout = std::chrono::seconds(10);
};

struct GatewayStats {
  uint64_t posted = 0;       // records accepted by post/post_batch (or written in direct mode)
  uint64_t written = 0;      // records in the page and published by a doorbell
  uint64_t batches = 0;      // doorbells rung
  uint64_t max_batch = 0;    // largest batch behind one doorbell
  uint64_t full_waits = 0;   // posts that found the ring full and waited
  uint64_t credit_waits = 0; // times the writer found no device credit and waited
  uint64_t lost = 0;         // records close() could not write (device stopped consuming)
};

class Gateway final : public Child, public std::enable_shared_from_this<Gateway> {
 public:
  static std::shared_ptr<Gateway> open(std::shared_ptr<Var> var,
                                       std::unique_ptr<GatewayLayout> layout,
                                       const GatewayOptions& options = {});
  ~Gateway() override;
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  size_t max_record() const noexcept { return max_record_; }
  bool direct() const noexcept { return direct_; }
  const char* layout_name() const noexcept { return layout_->name(); }
  const std::shared_ptr<Var>& var() const noexcept { return var_; }

  // Direct mode. Waits up to `timeout` for device credits; returns how many records were
  // written (all of them unless the device stopped consuming).
  bool write(const uint8_t* rec, size_t len, Deadline deadline);
  size_t write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                     size_t n, Deadline deadline);

  // Loop mode. Records are 1..max_record() bytes (others throw Error(invalid_argument)).
  bool post(const uint8_t* rec, size_t len, Deadline deadline);
  size_t post_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                    size_t n, Deadline deadline);
  bool flush(Deadline deadline);

  void close() override;
  bool closed() const override { return closed_.load(std::memory_order_acquire); }
  GatewayStats stats() const noexcept;

 private:
  Gateway(Mapping mapping, std::unique_ptr<GatewayLayout> layout, const GatewayOptions& o, int lock_fd);
  void check_usable(const char* op) const;
  void check_record(size_t len, const char* op) const;
  void wake_writer() noexcept;
  void run() noexcept;
  size_t drain_batch(size_t max) noexcept;
  size_t write_direct(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                      size_t n, Deadline deadline);

  std::shared_ptr<Var> var_;
  Mapping mapping_;
  std::unique_ptr<GatewayLayout> layout_;
  std::unique_ptr<Ring> ring_;
  const bool direct_;
  const size_t batch_max_;
  const std::chrono::nanoseconds drain_timeout_;
  const size_t max_record_;
  const uint64_t fork_gen_;
  int lock_fd_;

  std::unique_ptr<std::thread> writer_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> closed_{false};
  std::atomic<bool> parked_{false};
  std::atomic<bool> direct_busy_{false};
  std::mutex park_mu_;
  std::condition_variable park_cv_;
  std::mutex close_mu_;
  // Producers inside post()/post_batch(): close() waits for them before stopping the writer,
  // so a record accepted by post() is always drained. Its own line: every post touches it.
  alignas(kCacheLine) std::atomic<uint64_t> inflight_{0};
  struct Inflight;

  // Counters: written by the writer (or the direct caller) only, read by stats()/flush().
  std::atomic<uint64_t> written_{0};
  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> max_batch_{0};
  std::atomic<uint64_t> credit_waits_{0};
  std::atomic<uint64_t> full_waits_{0};
  std::atomic<uint64_t> lost_{0};
};

}  // namespace mlx5tlp
