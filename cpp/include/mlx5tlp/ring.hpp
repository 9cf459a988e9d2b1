// mlx5tlp/ring.hpp — bounded lock-free multi-producer / single-consumer ring of fixed-size records.
//
// Feeds the single writer thread of a TLP response gateway page: any number of producer threads
// push completion records; one consumer thread takes them in order and writes them to the page.
//
// Thread-safety (Ring = BasicRing<NoLock>, lock-free):
//   any thread, concurrently: try_push, try_push_batch, push, push_wait, push_batch,
//                             try_reserve, slot_data, publish, shutdown, capacity, slot_bytes,
//                             size_approx, stats
//   ONE consumer thread only: consume, wake_waiters, peek_published, empty (one at a time)
//   construction/destruction: no other thread may be using the ring.
// MutexRing (= BasicRing<std::mutex>) is the same ring code with every operation under one
// std::mutex; it exists as the honest baseline for benchmarks/bench_ring.cpp.
// Neither is copyable nor movable: threads hold references to it (put it in a unique_ptr).
//
// Records: a length 0..slot_bytes() and that many bytes; zero-length records are allowed. Every
// entry point refuses a longer record in every build type (never only an assert).
// Blocking: a producer on a full ring spins briefly, then sleeps on a futex until the consumer
// frees slots (the consumer pays one load per consume() for this when nobody waits), its
// deadline passes, or shutdown() wakes it.
// Order: records of one producer thread are consumed in the order that thread pushed them.
// Protocol, memory orders and layout: docs/ring.md.
#pragma once

#include <algorithm>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>

#include "mlx5tlp/deadline.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/ring_wait.hpp"

namespace mlx5tlp {

namespace ring_detail {

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

// Starts every slot; the record bytes follow it. The stamp is the whole synchronisation protocol
// between one producer and the consumer: seq == pos + 1 <=> the record at position pos is published.
struct SlotHeader {
  std::atomic<uint64_t> seq{0};
  uint32_t len = 0;  // bytes used, <= slot_bytes; written before seq is published
  uint32_t reserved = 0;
};
static_assert(sizeof(SlotHeader) == 16, "slot header is 16 bytes; record bytes start 8-aligned");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "the ring needs lock-free 64-bit atomics");
static_assert(std::is_trivially_destructible<SlotHeader>::value, "slot storage is released with free()");

}  // namespace ring_detail

// Lock policy of BasicRing that does nothing: the lock-free ring.
struct NoLock {
  void lock() noexcept {}
  void unlock() noexcept {}
};

struct RingStats {
  uint64_t full_waits = 0;     // blocking push calls that found the ring full and had to wait
  uint64_t push_timeouts = 0;  // blocking push calls that gave up at their deadline
  uint64_t sleeps = 0;         // futex waits of blocked producers
  uint64_t wakes = 0;          // consume() calls that woke sleeping producers
};


// Slots [start, start + count) handed to one producer by try_reserve(); count == 0: ring full.
struct Reservation {
  uint64_t start = 0;
  std::size_t count = 0;
};

template <class Lock>
class BasicRing {
  static constexpr bool kLocked = !std::is_same<Lock, NoLock>::value;
  using SlotHeader = ring_detail::SlotHeader;

 public:
  static constexpr std::size_t kHeaderBytes = sizeof(SlotHeader);
  static constexpr std::size_t kMaxSlotBytes = std::size_t{1} << 20;
  static constexpr std::size_t kMaxCapacity = std::size_t{1} << 30;

  // capacity_slots: power of two in [1, 2^30]; slot_size: record capacity in bytes, a multiple of
  // 8 in [8, 2^20]. Throws Error(invalid_argument, EINVAL) naming the value for others, and
  // Error(resource_exhausted, ENOMEM) when the slots cannot be allocated (one error model).
  BasicRing(std::size_t capacity_slots, std::size_t slot_size)
      : cfg_(make_config(capacity_slots, slot_size)) {
    for (std::size_t i = 0; i < capacity_slots; ++i) new (cfg_.base + i * cfg_.stride) SlotHeader();
  }
  BasicRing(const BasicRing&) = delete;
  BasicRing& operator=(const BasicRing&) = delete;
  ~BasicRing() = default;

  std::size_t capacity() const noexcept { return static_cast<std::size_t>(cfg_.mask + 1); }
  std::size_t slot_bytes() const noexcept { return cfg_.slot_bytes; }

  // ---- producers (any thread) ----

  // Copies one record in. False when the ring is full, len > slot_bytes(), or rec is null with
  // len > 0 (a record that can never fit is refused, never truncated).
  bool try_push(const void* rec, std::size_t len) noexcept {
    if (len > cfg_.slot_bytes || (rec == nullptr && len != 0)) return false;
    std::lock_guard<Lock> guard(lock_);
    const Reservation r = reserve_unlocked(1);
    if (r.count == 0) return false;
    write_unlocked(r.start, rec, static_cast<uint32_t>(len));
    return true;
  }

  // Record i is lengths[i] bytes at buf + offsets[i]. Reserves as many of the n records as fit,
  // in one atomic step, and returns how many were pushed: always a prefix, so the caller retries
  // with the rest. A record longer than slot_bytes() ends the prefix (it is never pushed).
  std::size_t try_push_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                             std::size_t n) noexcept {
    std::size_t valid = 0;
    while (valid < n && lengths[valid] <= cfg_.slot_bytes) ++valid;
    if (valid == 0) return 0;
    std::lock_guard<Lock> guard(lock_);
    const Reservation r = reserve_unlocked(valid);
    for (std::size_t i = 0; i < r.count; ++i)
      write_unlocked(r.start + i, buf + offsets[i], lengths[i]);
    return r.count;
  }

  // Blocking forms. A producer that finds the ring full spins briefly, then sleeps on a futex
  // until the consumer frees slots, `deadline` passes, or shutdown() is called (see wait_until).
  // push(): true when pushed; false on timeout, shutdown, or at once for a record that can
  // never fit.
  bool push(const void* rec, std::size_t len, Deadline deadline) noexcept {
    return push_wait(rec, len, deadline) == PushStatus::pushed;
  }
  PushStatus push_wait(const void* rec, std::size_t len, const Deadline& deadline) noexcept {
    if (len > cfg_.slot_bytes || (rec == nullptr && len != 0)) return PushStatus::too_long;
    if (try_push(rec, len)) return PushStatus::pushed;
    return wait_until(deadline, [&] { return try_push(rec, len); });
  }
  // Pushes records 0..n-1 (as try_push_batch), waiting for room as push_wait does; returns how
  // many were pushed (always a prefix) and, in *why, pushed (all of them), timed_out,
  // shut_down, or too_long (the record right after the prefix is longer than slot_bytes()).
  std::size_t push_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                         std::size_t n, const Deadline& deadline, PushStatus* why = nullptr) noexcept {
    std::size_t valid = 0;
    while (valid < n && lengths[valid] <= cfg_.slot_bytes) ++valid;
    std::size_t done = try_push_batch(buf, offsets, lengths, valid);
    PushStatus st = PushStatus::pushed;
    if (done < valid)
      st = wait_until(deadline, [&] {
        done += try_push_batch(buf, offsets + done, lengths + done, valid - done);
        return done == valid;
      });
    if (st == PushStatus::pushed && valid < n) st = PushStatus::too_long;
    if (why != nullptr) *why = st;
    return done;
  }

  // The blocking step itself, for callers with their own push logic (the Gateway wakes its
  // writer after each partial push): calls attempt() — which tries to push and returns true
  // when done — until it succeeds, sleeping on the futex in between while the ring is full.
  // Returns pushed, timed_out (one last attempt failed at the deadline) or shut_down. A past
  // deadline makes exactly one attempt, without spinning.
  template <class Attempt>
  PushStatus wait_until(const Deadline& deadline, Attempt&& attempt) noexcept {
    return wait_.wait(deadline, attempt, [this] { return has_room_seq_cst(); });
  }

  // wait_until() for a caller that needs need() >= 1 free slots at once (a group that
  // try_reserve_fit must not split): it sleeps while fewer are free, so it does not spin on a
  // ring whose consumer is stalled (the consumer wakes waiters when it frees half the ring,
  // and whenever it stops consuming: wake_waiters()). need() must not exceed capacity().
  template <class Attempt, class Need>
  PushStatus wait_until_room(const Deadline& deadline, Attempt&& attempt, Need&& need) noexcept {
    return wait_.wait(deadline, attempt, [this, &need] {
      // seq_cst: as has_room_seq_cst(), the producer's look in RoomWaiters' Dekker pair.
      const uint64_t t = cons_.tail.load(std::memory_order_seq_cst);
      const uint64_t h = prod_.head.load(std::memory_order_seq_cst);
      return h - t + need() <= cfg_.mask + 1;
    });
  }

  // Wakes every producer blocked in a push and makes every later blocking push that would have
  // to wait return shut_down. try_push*/try_reserve keep working (the owner decides whether to
  // accept); the consumer keeps consuming. Irreversible.
  void shutdown() noexcept { wait_.shut_down(); }
  bool is_shut_down() const noexcept { return wait_.is_shut_down(); }

  // Zero-copy form: reserve up to n slots, fill slot_data(r, i) with up to slot_bytes() bytes,
  // then publish(r, i, len) EVERY reserved slot (in any order; a zero-length record is a valid
  // filler). The consumer stops at the first unpublished slot, so an unpublished reservation
  // stalls the ring for everyone. `r` must come from try_reserve() on this ring.
  Reservation try_reserve(std::size_t n) noexcept {
    std::lock_guard<Lock> guard(lock_);
    return reserve_unlocked(n, [](std::size_t k) { return k; });
  }
  // The same, for a caller whose records come in groups that must not be split between
  // reservations (every completion of one request): fit(k) (called with 1 <= k <= n, possibly
  // several times) returns how many of k slots to take, at most k (0: none). The reservation
  // then holds fit(min(n, room)) slots, so a group never straddles two reservations.
  template <class Fit>
  Reservation try_reserve_fit(std::size_t n, Fit&& fit) noexcept {
    std::lock_guard<Lock> guard(lock_);
    return reserve_unlocked(n, fit);
  }
  // nullptr when i is not a slot of r.
  uint8_t* slot_data(const Reservation& r, std::size_t i) const noexcept {
    return i < r.count ? data(r.start + i) : nullptr;
  }
  // False when i is not a slot of r (nothing happens) or len > slot_bytes(): such a record is
  // refused in every build type, and the slot is published as a zero-length record so that the
  // ring does not stall behind it.
  bool publish(const Reservation& r, std::size_t i, std::size_t len) noexcept {
    if (i >= r.count) return false;
    const bool fits = len <= cfg_.slot_bytes;
    std::lock_guard<Lock> guard(lock_);
    publish_unlocked(r.start + i, fits ? static_cast<uint32_t>(len) : 0u);
    return fits;
  }

  // ---- consumer (one thread) ----

  // Calls fn(const uint8_t* data, uint32_t len) for up to max published records in ring order,
  // stopping at the first slot that is not published, then hands the slots back to producers
  // with one store (and wakes producers blocked on a full ring, if there are any). The bytes are valid only during the call. If fn throws, the records
  // before the throwing one count as consumed and the throwing one is delivered again next time.
  template <class F>
  std::size_t consume(std::size_t max, F&& fn) {
    std::lock_guard<Lock> guard(lock_);
    // relaxed: only this (the consumer) thread ever writes tail.
    const uint64_t t = cons_.tail.load(std::memory_order_relaxed);
    std::size_t n = 0;
    struct Release {  // runs also when fn throws
      BasicRing& ring;
      const uint64_t first;
      const std::size_t& done;
      ~Release() { if (done != 0) ring.hand_back(first + done); }
    } release{*this, t, n};
    max = std::min(max, capacity());
    while (n < max && is_published(t + n)) {
      fn(static_cast<const uint8_t*>(data(t + n)), header(t + n)->len);
      ++n;
    }
    return n;
  }

  // Wakes producers blocked on a full ring if any room at all is free. consume() wakes them only
  // once half the ring is free; a consumer that stops consuming for a while (nothing published,
  // or its own output is blocked) calls this first, so no producer sleeps while room is unused.
  void wake_waiters() noexcept {
    // relaxed: only the consumer writes tail; its last store was seq_cst (Dekker, see hand_back).
    const uint64_t t = cons_.tail.load(std::memory_order_relaxed);
    wait_.notify([&] { return free_after(t) > 0; });
  }

  // Number of published records consume() would deliver right now (contiguous from the front).
  std::size_t peek_published() const noexcept {
    std::lock_guard<Lock> guard(lock_);
    // relaxed: only the consumer writes tail, and only the consumer calls this.
    const uint64_t t = cons_.tail.load(std::memory_order_relaxed);
    std::size_t n = 0;
    while (n < capacity() && is_published(t + n)) ++n;
    return n;
  }
  bool empty() const noexcept {
    std::lock_guard<Lock> guard(lock_);
    // relaxed: only the consumer writes tail, and only the consumer calls this.
    return !is_published(cons_.tail.load(std::memory_order_relaxed));
  }

  // ---- any thread ----

  // Reserved-or-published records not yet consumed; a snapshot, stale as soon as it returns.
  std::size_t size_approx() const noexcept {
    // acquire: the head store that made head >= this tail then happens-before the head load
    // below, so head - tail cannot go negative.
    const uint64_t t = cons_.tail.load(std::memory_order_acquire);
    // relaxed: a snapshot; no data is read through it.
    const uint64_t h = prod_.head.load(std::memory_order_relaxed);
    return static_cast<std::size_t>(std::min<uint64_t>(h - t, cfg_.mask + 1));
  }
  // Positions handed out so far (every record ever reserved); a snapshot. Once the consumer's
  // total reaches a snapshot taken after a push returned, that record has been consumed.
  uint64_t reserved_total() const noexcept {
    // relaxed: a snapshot; no data is read through it.
    return prod_.head.load(std::memory_order_relaxed);
  }
  RingStats stats() const noexcept {
    RingStats s;
    s.full_waits = wait_.full_waits();
    s.push_timeouts = wait_.push_timeouts();
    s.sleeps = wait_.sleeps();
    s.wakes = wait_.wakes();
    return s;
  }

 private:
  // Read-only after construction and read by every thread: its own line, so head CASes and
  // tail stores do not invalidate it.
  struct alignas(kCacheLine) Config {
    std::unique_ptr<uint8_t, ring_detail::FreeDeleter> storage;
    uint8_t* base = nullptr;
    uint64_t mask = 0;        // capacity - 1
    std::size_t stride = 0;   // bytes per slot: header + slot_bytes rounded up to a cache line
    std::size_t slot_bytes = 0;
  };
  // Written by producers only (CAS on head; tail_cache after a refresh).
  struct alignas(kCacheLine) ProducerSide {
    std::atomic<uint64_t> head{0};        // next position to hand out
    std::atomic<uint64_t> tail_cache{0};  // producers' cached (possibly stale, never ahead) tail
  };
  // Written by the consumer only; producers read it only when the cached copy says "full".
  struct alignas(kCacheLine) ConsumerSide {
    std::atomic<uint64_t> tail{0};  // first position not yet handed back to producers
  };
  static_assert(sizeof(ProducerSide) == kCacheLine, "producer indices fill exactly one line");
  static_assert(sizeof(ConsumerSide) == kCacheLine, "consumer index has a line of its own");
  static_assert(alignof(Config) == kCacheLine && sizeof(Config) == kCacheLine, "config line");
  static_assert(kHeaderBytes % 8 == 0, "record bytes must stay 8-byte aligned");

  static Config make_config(std::size_t capacity_slots, std::size_t slot_size) {
    if (capacity_slots == 0 || (capacity_slots & (capacity_slots - 1)) != 0 ||
        capacity_slots > kMaxCapacity)
      throw Error(ErrorKind::invalid_argument, "create ring", EINVAL,
                  "capacity must be a power of two in [1, 2^30], got " + std::to_string(capacity_slots));
    if (slot_size < 8 || slot_size % 8 != 0 || slot_size > kMaxSlotBytes)
      throw Error(ErrorKind::invalid_argument, "create ring", EINVAL,
                  "slot_bytes must be a multiple of 8 in [8, 2^20], got " + std::to_string(slot_size));
    Config c;
    c.stride = (kHeaderBytes + slot_size + kCacheLine - 1) / kCacheLine * kCacheLine;
    c.storage.reset(static_cast<uint8_t*>(std::aligned_alloc(kCacheLine, capacity_slots * c.stride)));
    if (!c.storage)
      throw Error(ErrorKind::resource_exhausted, "create ring", ENOMEM,
                  std::to_string(capacity_slots) + " slots of " + std::to_string(c.stride) + " bytes");
    c.base = c.storage.get();
    c.mask = capacity_slots - 1;
    c.slot_bytes = slot_size;
    return c;
  }

  uint8_t* slot(uint64_t pos) const noexcept {
    return cfg_.base + static_cast<std::size_t>(pos & cfg_.mask) * cfg_.stride;
  }
  SlotHeader* header(uint64_t pos) const noexcept {
    return std::launder(reinterpret_cast<SlotHeader*>(slot(pos)));
  }
  uint8_t* data(uint64_t pos) const noexcept { return slot(pos) + kHeaderBytes; }

  bool is_published(uint64_t pos) const noexcept {
    // acquire: pairs with the producer's release of this stamp, so len and the record bytes it
    // wrote before publishing are visible to us.
    return header(pos)->seq.load(std::memory_order_acquire) == pos + 1;
  }

  // The consumer hands slots [.., new_tail) back and wakes blocked producers if there are any
  // and at least half the ring is free (RoomWaiters: hysteresis).
  void hand_back(uint64_t new_tail) noexcept {
    // seq_cst (a release store and more): our reads of the consumed slots happen-before a
    // producer reserves and overwrites them (it acquires tail or the producers' cached copy),
    // and the store precedes notify()'s load of the waiter count (RoomWaiters' Dekker pair).
    cons_.tail.store(new_tail, std::memory_order_seq_cst);
    wait_.notify([&] { return free_after(new_tail) >= (cfg_.mask + 2) / 2; });
  }
  uint64_t free_after(uint64_t tail) const noexcept {
    // relaxed: a snapshot (only ever behind), read only when producers wait.
    return cfg_.mask + 1 - (prod_.head.load(std::memory_order_relaxed) - tail);
  }

  bool has_room_seq_cst() const noexcept {
    // seq_cst: the producer's look at tail in the Dekker pair of RoomWaiters.
    const uint64_t t = cons_.tail.load(std::memory_order_seq_cst);
    // seq_cst (a snapshot): loaded after t, so h >= t.
    const uint64_t h = prod_.head.load(std::memory_order_seq_cst);
    return h - t < cfg_.mask + 1;
  }

  void publish_unlocked(uint64_t pos, uint32_t len) noexcept {
    header(pos)->len = len;
    // release: len and the record bytes written before this store are visible to the consumer
    // once its acquire load sees the stamp.
    header(pos)->seq.store(pos + 1, std::memory_order_release);
  }
  void write_unlocked(uint64_t pos, const void* rec, uint32_t len) noexcept {
    if (len != 0) std::memcpy(data(pos), rec, len);
    publish_unlocked(pos, len);
  }

  // Hands out up to `want` consecutive positions with ONE CAS on head (one store under a lock).
  // Free space is judged from the consumer's tail (never from slot stamps), via the producers'
  // cached copy; the consumer's line is read only when the cached copy says "not enough room".
  Reservation reserve_unlocked(std::size_t want) noexcept {
    return reserve_unlocked(want, [](std::size_t k) { return k; });
  }
  template <class Fit>
  Reservation reserve_unlocked(std::size_t want, Fit&& fit) noexcept {
    const uint64_t cap = cfg_.mask + 1;
    if (want == 0) return {};
    // acquire: pairs with the release store of tail_cache below, so the consumer's reads of the
    // slots it freed happen-before our writes into them (transitively via that producer).
    uint64_t t = prod_.tail_cache.load(std::memory_order_acquire);
    // relaxed: a stale head only makes the CAS fail; loaded after t (acquire), so h >= t.
    uint64_t h = prod_.head.load(std::memory_order_relaxed);
    bool refreshed = false;
    for (;;) {
      const uint64_t used = h - t;  // > cap only while t is stale
      const uint64_t room = used < cap ? cap - used : 0;
      if (room < want && !refreshed) {
        const uint64_t cached = t;
        // acquire: pairs with the consumer's release of tail: its reads of the slots it freed
        // happen-before we overwrite them.
        t = cons_.tail.load(std::memory_order_acquire);
        // release: passes that happens-before on to producers that acquire the cached copy.
        if (t != cached) prod_.tail_cache.store(t, std::memory_order_release);
        // relaxed: reloaded after the newer t so that h >= t holds again.
        h = prod_.head.load(std::memory_order_relaxed);
        refreshed = true;
        continue;
      }
      if (room == 0) return {};
      const uint64_t n = fit(static_cast<std::size_t>(std::min<uint64_t>(want, room)));
      if (n == 0) return {};
      if constexpr (kLocked) {
        // relaxed: the mutex orders everything in MutexRing.
        prod_.head.store(h + n, std::memory_order_relaxed);
        return {h, static_cast<std::size_t>(n)};
      } else if (prod_.head.compare_exchange_weak(h, h + n, std::memory_order_relaxed,
                                                  std::memory_order_relaxed)) {
        // relaxed (both): the CAS only hands out positions; the bytes are ordered by the slot
        // stamps (release/acquire) and slot reuse by the tail acquire above.
        return {h, static_cast<std::size_t>(n)};
      }
    }
  }

  Config cfg_;
  ProducerSide prod_;
  ConsumerSide cons_;
  RoomWaiters wait_;
  alignas(kCacheLine) mutable Lock lock_;
};

using Ring = BasicRing<NoLock>;
using MutexRing = BasicRing<std::mutex>;

static_assert(alignof(Ring) == kCacheLine, "ring must be cache-line aligned");
static_assert(sizeof(Ring) % kCacheLine == 0, "nothing after the ring shares its last line");
static_assert(!std::is_copy_constructible<Ring>::value && !std::is_move_constructible<Ring>::value,
              "threads hold references to a ring: neither copyable nor movable");

}  // namespace mlx5tlp
