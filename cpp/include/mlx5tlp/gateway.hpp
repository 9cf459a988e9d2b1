// mlx5tlp/gateway.hpp — writes TLP completion records into a mapped TLP response gateway page.
//
// Two modes:
//   direct  write()/write_batch() from ONE thread, straight into the page (no ring, no thread).
//   loop    any number of producer threads post()/post_batch() into a bounded lock-free MPSC
//           ring; one writer thread drains it in batches into the page, one doorbell per batch
//           where the layout allows. An idle writer blocks (futex) until the next post.
// Back-pressure is explicit: post blocks up to a deadline (a producer on a full ring sleeps
// and is woken when the writer frees slots) and returns false when the ring stayed full.
// flush() blocks until everything posted before it is in the page (woken by the writer).
//
// Lifecycle, an explicit state machine; every transition wakes every waiter (producers blocked
// in post/post_batch, flushers, the writer, a writer waiting for device credits):
//   open      posts are accepted.
//   closing   close() was called: new calls and blocked producers fail with
//             Error(invalid_handle, EBADF, "the gateway was closed"); close() waits for the
//             producers still inside a call (none can block any more).
//   draining  the writer writes what was accepted, giving the device up to the drain timeout
//             to return credits; then it stops.
//   closed    unmapped and unlocked; records that could not be written are counted in `lost`,
//             and close() throws Error(resource_exhausted, ETIMEDOUT) naming how many.
// close() therefore always ends within the drain timeout (plus at most one
// SimRingLayout::kCreditWaitCap), even while other threads are blocked with no deadline, and
// the destructor never waits longer.
//
// One committer per page: mlx5 hardware forbids starting a doorbell write while another is in
// progress on the same page, so a second Gateway on a page (this or another process) is refused
// (EBUSY) through a PageLock keyed by the page's verified mmap offset (page_lock.hpp).
//
// Fork: a child does not inherit the writer thread. Every call in a child on a gateway opened by
// the parent throws Error(invalid_handle); the child opens its own gateway.
//
// Ownership: a Gateway keeps its Var (and so its Context) alive and holds the page mapping
// (write-only when the layout never reads the page, as raw_tlp on a real device's non-cached
// page); Var::free() is refused while it is open. Thread-safety: post/post_batch/flush/stats/
// close from any thread; write/write_batch from one thread at a time (concurrent use throws).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "mlx5tlp/deadline.hpp"
#include "mlx5tlp/gateway_layout.hpp"
#include "mlx5tlp/page_lock.hpp"
#include "mlx5tlp/ring.hpp"
#include "mlx5tlp/tlp_completion.hpp"
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
  uint64_t full_waits = 0;   // post/post_batch calls that found the ring full and waited
  uint64_t credit_waits = 0; // times the writer found no device credit and waited
  uint64_t lost = 0;         // records close() could not write (device stopped consuming)
  uint64_t producer_sleeps = 0;  // futex sleeps of producers on a full ring
  uint64_t writer_parks = 0;     // times the idle writer blocked until the next post
};

// What post_completions() queued: the first `requests` requests have every completion in the
// ring (a prefix; requests without completions count), `completions` records in all.
struct PostedCompletions {
  size_t requests = 0;
  size_t completions = 0;
};

enum class GatewayState : uint32_t { open = 0, closing = 1, draining = 2, closed = 3 };
const char* to_string(GatewayState s) noexcept;

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
  // "store8", "movdir64b" or "st64b": how the layout stores records (raw_tlp: run-time choice).
  const char* store_path() const noexcept { return layout_->store_path(); }
  // PROT_WRITE, or PROT_READ | PROT_WRITE when the layout reads the page.
  int page_prot() const noexcept { return prot_; }
  const std::shared_ptr<Var>& var() const noexcept { return var_; }
  GatewayState state() const noexcept {
    // acquire: a caller that sees closed also sees the final counters.
    return static_cast<GatewayState>(state_.load(std::memory_order_acquire));
  }

  // Direct mode. Waits up to `deadline` for device credits; returns how many records were
  // written (fewer when the device stopped consuming or the gateway was closed meanwhile).
  bool write(const uint8_t* rec, size_t len, Deadline deadline);
  size_t write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                     size_t n, Deadline deadline);
  // The same, never splitting a group across doorbells: `ends` (strictly increasing, the last
  // == n) are the record counts at which a group ends — e.g. every completion of one request,
  // so that a crash between two doorbells leaves each request published entirely or not at
  // all (a mark names one doorbell count, request_source.hpp). It waits for credits for a
  // whole group; a group larger than the page holds (capacity()) is split, unavoidably.
  // Returns the records written, always at a group end unless such a split happened.
  size_t write_groups(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                      size_t n, const uint32_t* ends, size_t nends, Deadline deadline);
  // Direct mode, the writing thread: the page's doorbell count after the last write
  // (GatewayLayout::published), so the caller can mark a request "answered at seq" before it
  // writes the answer (request_source.hpp).
  uint64_t published() const noexcept { return layout_->published(); }
  // Direct mode, the writing thread: records the page can take now without waiting.
  size_t credits() noexcept { return layout_->credits(); }
  // Direct mode: the most records one write_groups() group publishes under one doorbell (the
  // page's capacity, at most batch_max): a longer answer takes several doorbells.
  size_t group_max() const noexcept { return std::min(layout_->capacity(), batch_max_); }

  // Loop mode. Records are 1..max_record() bytes (others throw Error(invalid_argument)).
  // post: true when queued, false when the ring stayed full until `deadline`; throws
  // Error(invalid_handle, EBADF) when the gateway is (or gets) closed. post_batch: how many were
  // queued (a prefix); a close while it waits ends it with what was queued (EBADF if nothing).
  bool post(const uint8_t* rec, size_t len, Deadline deadline);
  size_t post_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                    size_t n, Deadline deadline);
  // Loop mode, the fused bulk path: builds the completions of requests `reqs` (with `data`,
  // `statuses` (nullable), `p`, as tlp::bulk_build takes them) straight into ring slots, with
  // no intermediate buffer, and queues them. `plan` must be tlp::bulk_plan's (Status::ok) over
  // exactly these arguments, unchanged since (the caller keeps the bytes still: immutable or
  // a private copy). Requests the plan refused (plan.errors[i] != ok) get no completion, as in
  // bulk_build; a caller that wants all or nothing checks plan.bad first. The completions of
  // one request are never split between two ring reservations, so a deadline or a close()
  // ends the call between two requests: the result says how many were queued (a prefix).
  // Throws Error(invalid_argument, EINVAL) before queueing anything when a completion is
  // longer than max_record() or one request has more completions than the ring holds;
  // Error(invalid_handle, EBADF) as post_batch. Allocates nothing.
  PostedCompletions post_completions(const uint8_t* reqs, size_t len, const uint8_t* data,
                                     size_t data_len, const uint8_t* statuses,
                                     const tlp::CompletionParams& p, const tlp::BulkPlan& plan,
                                     Deadline deadline);
  // True once every record posted before the call is in the page; false at the deadline, or
  // when the gateway closed without writing them all.
  bool flush(Deadline deadline);

  // close() with this gateway's drain timeout, or with `drain_timeout` (e.g. a short limit at
  // interpreter exit). Idempotent; a concurrent second call waits for the first.
  void close() override;
  void close(std::chrono::nanoseconds drain_timeout);
  bool closed() const override { return state() == GatewayState::closed; }
  GatewayStats stats() const noexcept;

 private:
  Gateway(Mapping mapping, std::unique_ptr<GatewayLayout> layout, const GatewayOptions& o,
          PageLock lock, int prot);
  void check_usable(const char* op) const;
  void check_record(size_t len, const char* op) const;
  [[noreturn]] void closed_error(const char* op) const;
  void wake_writer() noexcept;
  void wake_writer_for_state() noexcept;
  void wake_flushers() noexcept;
  void idle_wait(uint32_t seen_state) noexcept;
  void run() noexcept;
  size_t drain_batch(size_t max) noexcept;
  void count_written(size_t n, bool batched) noexcept;
  size_t write_direct(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                      size_t n, Deadline deadline, const uint32_t* ends = nullptr, size_t nends = 0);

  std::shared_ptr<Var> var_;
  Mapping mapping_;
  std::unique_ptr<GatewayLayout> layout_;
  std::unique_ptr<Ring> ring_;
  const bool direct_;
  const size_t batch_max_;
  const std::chrono::nanoseconds drain_timeout_;
  const size_t max_record_;
  const uint64_t fork_gen_;
  const int prot_;
  PageLock lock_;
  std::unique_ptr<std::thread> writer_;
  std::atomic<bool> direct_busy_{false};
  std::mutex close_mu_;
  Deadline drain_deadline_ = Deadline::never();  // set by close() before `draining`

  // GatewayState; written by close() only.
  alignas(kCacheLine) std::atomic<uint32_t> state_{0};
  // Callers inside post/post_batch/write*: close() waits (futex) for 0. Its own line: every
  // post touches it.
  alignas(kCacheLine) std::atomic<uint32_t> inflight_{0};
  struct Inflight;
  // The idle writer's futex word: 1 while it is (about to be) parked. Read by every post.
  alignas(kCacheLine) std::atomic<uint32_t> writer_sleep_{0};
  // flush() callers blocked until the writer's count passes their target.
  alignas(kCacheLine) std::atomic<uint32_t> flush_waiters_{0};
  std::atomic<uint32_t> flush_seq_{0};

  // Counters: written by the writer (or the direct caller) only, read by stats()/flush().
  alignas(kCacheLine) std::atomic<uint64_t> written_{0};
  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> max_batch_{0};
  std::atomic<uint64_t> credit_waits_{0};
  std::atomic<uint64_t> writer_parks_{0};
  std::atomic<uint64_t> lost_{0};
};

}  // namespace mlx5tlp
