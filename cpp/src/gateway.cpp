#include "mlx5tlp/gateway.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>

#include "mlx5tlp/error.hpp"
#include "mlx5tlp/futex.hpp"
#include "mlx5tlp/spawn.hpp"

namespace mlx5tlp {

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kOpen = uint32_t(GatewayState::open), kClosing = uint32_t(GatewayState::closing),
                   kDraining = uint32_t(GatewayState::draining),
                   kClosed = uint32_t(GatewayState::closed);
// How long an idle writer keeps polling the ring before it parks: long enough that a steady
// stream of posts a few microseconds apart never pays a futex wake-up, short enough that an idle
// gateway costs nothing measurable (it then sleeps until the next post, untimed).
constexpr auto kIdleSpin = std::chrono::microseconds(50);
// How long post_completions() polls a full ring that does not drain before it blocks.
constexpr auto kFullPoll = std::chrono::microseconds(50);

// The page lock, keyed by the device and the page's mmap offset (see page_lock.hpp).
PageLock lock_page(const Var& var) {
  const Context& ctx = *var.context();
  char off[32];
  std::snprintf(off, sizeof off, "%llx", static_cast<unsigned long long>(var.mmap_off()));
  const std::string busy = "TLP gateway page " + std::to_string(var.page_id()) + " (mmap offset 0x" +
                           off + ") of device " + ctx.name() +
                           " already has a writer (in this or another process): the hardware "
                           "allows one committer per page";
  const auto& sim = ctx.lib().sym().sim;
  if (sim.device_dir != nullptr) {  // the software device: in the device's own directory
    char root[4096];
    if (sim.device_dir(root, sizeof root) == 0) {
      const std::string dir = std::string(root) + "/" + ctx.name();
      PageLock::check_dir(dir, false);
      return PageLock::acquire(dir, std::string("gw-off") + off + ".lock", busy);
    }
  }
  bool is_default = true;
  const std::string dir = PageLock::default_dir(&is_default);
  PageLock::check_dir(dir, is_default);
  char guid[24];
  std::snprintf(guid, sizeof guid, "%016llx", static_cast<unsigned long long>(ctx.node_guid()));
  return PageLock::acquire(dir, ctx.name() + "-" + guid + "-off" + off + ".lock", busy);
}

}  // namespace

const char* to_string(GatewayState s) noexcept {
  switch (s) {
    case GatewayState::open: return "open";
    case GatewayState::closing: return "closing";
    case GatewayState::draining: return "draining";
    case GatewayState::closed: return "closed";
  }
  return "?";
}

std::shared_ptr<Gateway> Gateway::open(std::shared_ptr<Var> var,
                                       std::unique_ptr<GatewayLayout> layout,
                                       const GatewayOptions& options) {
  if (!var->is_tlp())
    throw Error(ErrorKind::invalid_argument, "open gateway", EINVAL,
                "VAR page " + std::to_string(var->page_id()) +
                    " is a VirtIO VAR, not a TLP response gateway page");
  if (options.batch_max == 0)
    throw Error(ErrorKind::invalid_argument, "open gateway", EINVAL, "batch_max must be >= 1");
  const bool sim = var->context()->lib().sym().sim.mmap != nullptr;
  if (!layout) layout = make_layout(sim ? "sim" : "raw_tlp");
  layout->set_device_memory(!sim);  // a real device's page is MMIO; the software device's is not
  // Write-only unless the layout reads the page: the kernel maps TLP pages non-cached and the
  // raw_tlp layout never reads them (the sim layout reads its consumer index).
  const int prot = layout->reads_page() ? PROT_READ | PROT_WRITE : PROT_WRITE;
  // Map first: the mapping is the device's check that mmap_off is a live page of this context,
  // and the lock is keyed by that offset (never by an envelope's page_id).
  Mapping m = var->map(prot);
  PageLock lock = lock_page(*var);
  layout->attach(static_cast<uint8_t*>(m.data()), m.size());
  std::shared_ptr<Gateway> gw(new Gateway(std::move(m), std::move(layout), options, std::move(lock), prot));
  if (!gw->direct_)
    gw->writer_ = std::make_unique<std::thread>(spawn("open gateway", [g = gw.get()] { g->run(); }));
  {
    // Under a Use, as every child: a close() in progress refuses it (and ~Gateway undoes it).
    const std::shared_ptr<Context>& ctx = gw->var()->context();
    Context::Use u(*ctx);
    ctx->adopt(gw, u);
  }
  return gw;
}

Gateway::Gateway(Mapping mapping, std::unique_ptr<GatewayLayout> layout, const GatewayOptions& o,
                 PageLock lock, int prot)
    : var_(mapping.var()),
      mapping_(std::move(mapping)),
      layout_(std::move(layout)),
      ring_(o.direct ? nullptr : std::make_unique<Ring>(o.ring_slots, (layout_->max_record() + 7) / 8 * 8)),
      direct_(o.direct),
      batch_max_(o.batch_max),
      drain_timeout_(o.drain_timeout),
      max_record_(layout_->max_record()),
      fork_gen_(fork_generation()),
      prot_(prot),
      lock_(std::move(lock)) {}

Gateway::~Gateway() {
  try {
    close();  // bounded by the drain timeout (see the lifecycle in gateway.hpp)
  } catch (...) {
    // close() reports undeliverable records; a destructor cannot.
  }
}

void Gateway::closed_error(const char* op) const {
  throw Error(ErrorKind::invalid_handle, op, EBADF, "the gateway was closed");
}

void Gateway::check_usable(const char* op) const {
  // relaxed: a fast refusal only; Inflight re-checks with seq_cst.
  if (state_.load(std::memory_order_relaxed) != kOpen) closed_error(op);
  if (fork_generation() != fork_gen_)
    throw Error(ErrorKind::invalid_handle, op, EBADF,
                "this gateway was opened before fork(); a child does not inherit its writer: "
                "open a new gateway in this process");
}

void Gateway::check_record(size_t len, const char* op) const {
  if (len == 0 || len > max_record_)
    throw Error(ErrorKind::invalid_argument, op, EINVAL,
                "a record is 1.." + std::to_string(max_record_) + " bytes for layout '" +
                    layout_->name() + "', not " + std::to_string(len));
}

// Marks a caller inside post()/post_batch()/write*(). Dekker pair with close(): close() stores
// state_ then loads inflight_; a caller increments inflight_ then loads state_ (all seq_cst),
// so either the caller sees the close (and backs out) or close() sees the caller (and waits).
// On the way out, a caller that sees the gateway closing wakes close() if it was the last.
struct Gateway::Inflight {
  Gateway& g;
  Inflight(Gateway& gw, const char* op) : g(gw) {
    // seq_cst: the caller half of the Dekker pair (see above).
    g.inflight_.fetch_add(1, std::memory_order_seq_cst);
    if (g.state_.load(std::memory_order_seq_cst) != kOpen) {
      leave();
      g.closed_error(op);
    }
  }
  ~Inflight() { leave(); }
  void leave() noexcept {
    // seq_cst: our pushes happen-before close() sees the count drop, and the decrement is
    // ordered before the state load below (the same Dekker pair, on the way out).
    if (g.inflight_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        g.state_.load(std::memory_order_seq_cst) != kOpen)
      futex_wake(g.inflight_, INT_MAX);
  }
  Inflight(const Inflight&) = delete;
  Inflight& operator=(const Inflight&) = delete;
};

// ---------------------------------------------------------------- direct mode
void Gateway::count_written(size_t n, bool batched) noexcept {
  // seq_cst (a release store and more): a flush()/stats() reader that sees the count sees the
  // page writes before it; and it precedes our load of flush_waiters_ (Dekker with flush()).
  written_.store(written_.load(std::memory_order_relaxed) + n, std::memory_order_seq_cst);
  // relaxed: statistics.
  batches_.fetch_add(batched ? 1 : n, std::memory_order_relaxed);
  if (n > max_batch_.load(std::memory_order_relaxed)) max_batch_.store(n, std::memory_order_relaxed);
  // seq_cst: the writer half of the Dekker pair with flush(); a plain load when nobody waits.
  if (flush_waiters_.load(std::memory_order_seq_cst) != 0) wake_flushers();
}

size_t Gateway::write_direct(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                             size_t n, Deadline deadline, const uint32_t* ends, size_t nends) {
  const bool batched = layout_->batched_doorbell();
  size_t done = 0;
  size_t g = 0;  // ends[g]: the end of the group `done` is in
  while (done < n) {
    // relaxed: a close() wakes us (wake_credit_waiter) and waits for us to leave (Inflight).
    if (state_.load(std::memory_order_relaxed) != kOpen) break;
    const size_t credits = layout_->credits();
    size_t k = std::min({credits, n - done, batch_max_});
    size_t want = 1;
    if (ends != nullptr && k != 0) {
      while (g < nends && ends[g] <= done) ++g;
      const size_t group_end = g < nends ? std::min<size_t>(ends[g], n) : n;
      if (group_end - done > k) {
        // The group does not fit: wait for room for all of it, unless it can never fit.
        const size_t whole = group_end - done;
        if (whole <= std::min(layout_->capacity(), batch_max_)) {
          k = 0;
          want = whole;
        }
      } else {
        size_t last = group_end;  // the furthest group end within k
        for (size_t h = g + 1; h < nends && ends[h] <= done + k; ++h) last = ends[h];
        k = last - done;
      }
    }
    if (k == 0) {
      credit_waits_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
      if (deadline.expired()) break;
      layout_->wait_credits(deadline, want);  // blocking point: the device returns credits or close()
      continue;
    }
    layout_->write_batch(buf, offsets + done, lengths + done, k);
    done += k;
    count_written(k, batched);
  }
  return done;
}

bool Gateway::write(const uint8_t* rec, size_t len, Deadline deadline) {
  const uint32_t off = 0, l = uint32_t(len);
  check_record(len, "write");
  return write_batch(rec, &off, &l, 1, deadline) == 1;
}

size_t Gateway::write_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                            size_t n, Deadline deadline) {
  return write_groups(buf, offsets, lengths, n, nullptr, 0, deadline);
}

size_t Gateway::write_groups(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                             size_t n, const uint32_t* ends, size_t nends, Deadline deadline) {
  check_usable("write");
  if (!direct_)
    throw Error(ErrorKind::invalid_argument, "write", EINVAL,
                "this gateway runs the doorbell loop: use post(); write() is for direct mode");
  for (size_t i = 0; i < n; ++i)  // one compare per record; the error path is out of line
    if (lengths[i] - 1u >= max_record_) check_record(lengths[i], "write_batch");
  Inflight in(*this, "write");
  // acquire: pairs with the release below, so one direct caller's page writes precede the next's.
  if (direct_busy_.exchange(true, std::memory_order_acquire))
    throw Error(ErrorKind::invalid_argument, "write", EBUSY,
                "direct mode is for one thread at a time; use a doorbell-loop gateway and post()");
  struct Unbusy {
    std::atomic<bool>& f;
    ~Unbusy() { f.store(false, std::memory_order_release); }  // release: see the exchange above
  } unbusy{direct_busy_};
  const size_t done = write_direct(buf, offsets, lengths, n, deadline, ends, nends);
  if (done == 0 && n != 0 && state_.load(std::memory_order_relaxed) != kOpen) closed_error("write");
  return done;
}

// ---------------------------------------------------------------- doorbell loop
void Gateway::wake_writer() noexcept {
  // Dekker with idle_wait(): our publication (the slot stamp) and the writer's writer_sleep_
  // store are each followed by a full fence before reading the other side, so either the
  // writer sees the record or we see it parked. The exchange makes one waker do the syscall.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // relaxed: ordered by the fence; the exchange below decides.
  if (writer_sleep_.load(std::memory_order_relaxed) != 0 &&
      writer_sleep_.exchange(0, std::memory_order_acq_rel) != 0)
    futex_wake(writer_sleep_, 1);
}

void Gateway::wake_writer_for_state() noexcept {
  // seq_cst: follows close()'s seq_cst state store; a writer that stores 1 after this exchange
  // loads state_ after it in the total order and sees the new state (idle_wait).
  if (writer_sleep_.exchange(0, std::memory_order_seq_cst) != 0) futex_wake(writer_sleep_, 1);
  layout_->wake_credit_waiter();
}

void Gateway::wake_flushers() noexcept {
  // seq_cst: a flusher that read flush_seq_ before this bump finds FUTEX_WAIT failing its value
  // check; one that reads it after sees the count (or state) stored before.
  flush_seq_.fetch_add(1, std::memory_order_seq_cst);
  futex_wake(flush_seq_, INT_MAX);
}

bool Gateway::post(const uint8_t* rec, size_t len, Deadline deadline) {
  check_usable("post");
  if (direct_)
    throw Error(ErrorKind::invalid_argument, "post", EINVAL,
                "this gateway is in direct mode: use write()");
  check_record(len, "post");
  Inflight in(*this, "post");
  if (ring_->try_push(rec, len)) {
    wake_writer();
    return true;
  }
  // Ring full: the ring sleeps us until the writer frees slots, the deadline, or close().
  const PushStatus st = ring_->wait_until(deadline, [&] { return ring_->try_push(rec, len); });
  if (st == PushStatus::pushed) {
    wake_writer();
    return true;
  }
  if (st == PushStatus::shut_down) closed_error("post");
  return false;
}

size_t Gateway::post_batch(const uint8_t* buf, const uint32_t* offsets, const uint32_t* lengths,
                           size_t n, Deadline deadline) {
  check_usable("post_batch");
  if (direct_)
    throw Error(ErrorKind::invalid_argument, "post_batch", EINVAL,
                "this gateway is in direct mode: use write_batch()");
  for (size_t i = 0; i < n; ++i)  // one compare per record; the error path is out of line
    if (lengths[i] - 1u >= max_record_) check_record(lengths[i], "post_batch");
  Inflight in(*this, "post_batch");
  size_t done = 0;
  // Every partial push wakes the writer: it must drain while we wait for the rest.
  auto attempt = [&] {
    const size_t k = ring_->try_push_batch(buf, offsets + done, lengths + done, n - done);
    if (k != 0) {
      done += k;
      wake_writer();
    }
    return done == n;
  };
  if (n == 0 || attempt()) return done;
  const PushStatus st = ring_->wait_until(deadline, attempt);
  if (st == PushStatus::shut_down && done == 0) closed_error("post_batch");
  return done;
}

PostedCompletions Gateway::post_completions(const uint8_t* reqs, size_t len, const uint8_t* data,
                                           size_t data_len, const uint8_t* statuses,
                                           const tlp::CompletionParams& p,
                                           const tlp::BulkPlan& plan, Deadline deadline) {
  check_usable("post_completions");
  if (direct_)
    throw Error(ErrorKind::invalid_argument, "post_completions", EINVAL,
                "this gateway is in direct mode: use write_batch()");
  if (plan.longest > max_record_)
    throw Error(ErrorKind::invalid_argument, "post_completions", EINVAL,
                "request " + std::to_string(plan.longest_request) + " has a " +
                    std::to_string(plan.longest) + "-byte completion; a record is 1.." +
                    std::to_string(max_record_) + " bytes for layout '" + layout_->name() +
                    "' (lower max_payload, or use larger gateway slots); nothing was posted");
  if (plan.most > ring_->capacity())
    throw Error(ErrorKind::invalid_argument, "post_completions", EINVAL,
                "request " + std::to_string(plan.most_request) + " has " +
                    std::to_string(plan.most) + " completions, more than the ring's " +
                    std::to_string(ring_->capacity()) +
                    " slots hold at once (open the gateway with a larger ring_slots); nothing "
                    "was posted");
  PostedCompletions out;
  const size_t n = plan.requests, total = plan.completions;
  const uint32_t* ends = plan.ends.data();
  if (total == 0) {
    out.requests = n;
    return out;
  }
  Inflight in(*this, "post_completions");
  const size_t cap = ring_->slot_bytes();
  // A reservation per batch_max records at most, so the writer starts on the first batch
  // while we build the next.
  const size_t chunk = std::max<size_t>(batch_max_, 1);
  size_t done = 0;  // completions published; ends[i] == done between requests
  size_t i = 0, off = 0, used = 0;
  bool mismatch = false;
  uint8_t* slots[tlp::kMaxCompletions];
  uint32_t lens[tlp::kMaxCompletions];
  tlp::CompletionParams rp = p;
  // The most of k free slots that end on a request boundary.
  auto fit = [&](size_t k) -> size_t {
    const uint32_t* e = std::upper_bound(ends + i, ends + n + 1, uint32_t(done + k));
    return size_t(e[-1]) - done;
  };
  auto attempt = [&]() -> bool {
    while (done < total) {
      const Reservation r = ring_->try_reserve_fit(std::min(total - done, chunk), fit);
      if (r.count == 0) return false;
      size_t k = 0;
      while (k < r.count) {
        const size_t cnt = ends[i + 1] - ends[i];
        const uint8_t st = statuses != nullptr ? statuses[i] : p.status;
        size_t rl = 0, sh = 0;
        if (cnt == 0) {  // refused by the plan, or a posted request: step over it
          tlp::bulk_extent(reqs + off, len - off, st, &rl, &sh);
        } else {
          for (size_t j = 0; j < cnt; ++j) slots[j] = ring_->slot_data(r, k + j);
          rp.status = st;
          const size_t got = tlp::bulk_emit_request(
              reqs + off, len - off, data == nullptr ? nullptr : data + used, data_len - used,
              rp, slots, cap, lens, &rl, &sh);
          if (got != cnt) {  // the input changed after planning: publish fillers, fail below
            mismatch = true;
            for (size_t j = got; j < cnt; ++j) lens[j] = 0;
          }
          for (size_t j = 0; j < cnt; ++j) ring_->publish(r, k + j, lens[j]);
          k += cnt;
        }
        off += rl;
        used += sh;
        ++i;
      }
      done += r.count;
      wake_writer();
    }
    return true;
  };
  // A full ring: while the writer drains it, poll (PAUSE, then yield: it may need our CPU)
  // and refill as slots come free; block on the futex only after kFullPoll without progress.
  // A sleep and a wake-up per refill cost more than the writer needs to free half the ring
  // (1024 slots: ~5 us), and halved the throughput here.
  auto moved = [&] {
    const size_t before = done;
    return attempt() || done != before;
  };
  while (!attempt()) {
    bool progress = false;
    const auto poll_until = Clock::now() + kFullPoll;
    for (unsigned it = 1;; ++it) {
      // relaxed: a hint; the blocking wait below checks the state exactly.
      if (state_.load(std::memory_order_relaxed) != kOpen || deadline.expired()) break;
      ring_detail::backoff(it);
      if (moved()) {
        progress = true;
        break;
      }
      if (it % 16 == 0 && Clock::now() >= poll_until) break;
    }
    if (progress) continue;
    // Sleep until the next request's completions fit at once (done < total: it exists).
    const PushStatus st = ring_->wait_until_room(deadline, moved, [&] {
      return size_t(*std::upper_bound(ends + i, ends + n + 1, uint32_t(done))) - done;
    });
    if (st == PushStatus::pushed && done < total) continue;
    if (st == PushStatus::shut_down && done == 0) closed_error("post_completions");
    break;
  }
  if (mismatch)
    throw Error(ErrorKind::invalid_argument, "post_completions", EINVAL,
                "the requests changed between planning and building (tlp::bulk_plan must be "
                "over the same bytes); zero-length records were queued in their place");
  out.completions = done;
  out.requests = size_t(std::upper_bound(ends, ends + n + 1, uint32_t(done)) - ends) - 1;
  return out;
}

bool Gateway::flush(Deadline deadline) {
  check_usable("flush");
  if (direct_) return true;  // direct writes are in the page when write() returns
  const uint64_t target = ring_->reserved_total();
  // acquire: pairs with the writer's store, so the page holds those records.
  if (written_.load(std::memory_order_acquire) >= target) return true;
  wake_writer();
  // seq_cst: the flusher half of the Dekker pair with count_written().
  flush_waiters_.fetch_add(1, std::memory_order_seq_cst);
  bool ok = false;
  for (;;) {
    // seq_cst: read before looking at the count, so a later wake-up changes it.
    const uint32_t seq = flush_seq_.load(std::memory_order_seq_cst);
    if (written_.load(std::memory_order_seq_cst) >= target) {
      ok = true;
      break;
    }
    if (state_.load(std::memory_order_seq_cst) == kClosed) break;  // not all were written
    // Blocking point: until the writer's count moves, the gateway closes, or the deadline.
    if (!futex_wait(flush_seq_, seq, deadline)) {
      ok = written_.load(std::memory_order_acquire) >= target;
      break;
    }
  }
  // release: nothing is read through it; the writer only tests it for zero.
  flush_waiters_.fetch_sub(1, std::memory_order_release);
  return ok;
}

size_t Gateway::drain_batch(size_t max) noexcept {
  const bool batched = layout_->batched_doorbell();
  GatewayLayout* layout = layout_.get();
  const size_t n = ring_->consume(max, [layout, batched](const uint8_t* d, uint32_t len) {
    layout->write(d, len);
    if (!batched) layout->doorbell();
  });
  if (n == 0) return 0;
  if (batched) layout->doorbell();
  count_written(n, batched);
  return n;
}

// The idle writer: poll the ring for a short while (a post usually follows soon), then park on
// writer_sleep_ with no timeout until a post (wake_writer) or a state change wakes it.
void Gateway::idle_wait(uint32_t seen_state) noexcept {
  const auto spin_until = Clock::now() + kIdleSpin;
  for (unsigned i = 1;; ++i) {
    // relaxed: a hint; the parking protocol below is what is exact.
    if (!ring_->empty() || state_.load(std::memory_order_relaxed) != seen_state) return;
    // PAUSE first; then yield, so that a producer waiting for this CPU (busy machine) runs.
    ring_detail::backoff(i);
    if (i % 16 == 0 && Clock::now() >= spin_until) break;
  }
  // seq_cst store + fence: the writer half of the Dekker pairs with wake_writer() (fence) and
  // with wake_writer_for_state() (seq_cst exchange after close()'s seq_cst state store).
  writer_sleep_.store(1, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ring_->empty() && state_.load(std::memory_order_seq_cst) == seen_state) {
    writer_parks_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
    // Blocking point: untimed; a post or a lifecycle transition sets the word to 0 and wakes.
    futex_wait(writer_sleep_, 1, Deadline::never());
  }
  // relaxed: only this thread sets it to 1; a waker may have cleared it already.
  writer_sleep_.store(0, std::memory_order_relaxed);
}

void Gateway::run() noexcept {
  for (;;) {
    const size_t credits = layout_->credits();
    if (credits > 0 && drain_batch(std::min(credits, batch_max_)) > 0) continue;
    // acquire (seq_cst): once we see draining, every accepted post is in the ring (close()
    // waited for the producers), and drain_deadline_ (written before it) is visible.
    const uint32_t st = state_.load(std::memory_order_seq_cst);
    const bool pending = !ring_->empty();
    if (st == kDraining && (!pending || drain_deadline_.expired())) break;
    ring_->wake_waiters();  // we stop consuming for now: producers may use any room there is
    if (pending) {  // published records wait for device credits
      credit_waits_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
      // Blocking point: the layout sleeps until the device returns credits or close() wakes us.
      layout_->wait_credits(st == kDraining ? drain_deadline_ : Deadline::never());
      continue;
    }
    idle_wait(st);
  }
  size_t left = 0;
  while (ring_->consume(ring_->capacity(), [&left](const uint8_t*, uint32_t) { ++left; }) != 0) {
  }
  lost_.store(left, std::memory_order_release);  // release: close() reads it after join anyway
}

void Gateway::close() { close(drain_timeout_); }

void Gateway::close(std::chrono::nanoseconds drain_timeout) {
  std::lock_guard<std::mutex> l(close_mu_);
  if (state_.load(std::memory_order_acquire) != kOpen) return;
  if (fork_generation() != fork_gen_) {
    // A forked child: the writer thread does not exist here and must not be joined; leak the
    // parent's thread handle (destroying a joinable std::thread would terminate). The at-fork
    // handler already closed our copy of the lock fd: forget it, never close it twice.
    state_.store(kClosed, std::memory_order_seq_cst);
    static_cast<void>(writer_.release());
    lock_.forget_after_fork();
    mapping_.reset();
    return;
  }
  // open -> closing. seq_cst: the closer half of the Inflight Dekker pair.
  state_.store(kClosing, std::memory_order_seq_cst);
  if (ring_) ring_->shutdown();  // producers blocked on a full ring wake and fail (EBADF)
  layout_->wake_credit_waiter();  // a direct writer waiting for credits
  wake_flushers();
  // Wait for the callers still inside: none of them can block any more.
  for (uint32_t n; (n = inflight_.load(std::memory_order_seq_cst)) != 0;)
    futex_wait(inflight_, n, Deadline::never());  // blocking point: the last caller wakes us
  // closing -> draining: every accepted record is in the ring now.
  drain_deadline_ = Deadline::after_or_never(drain_timeout);
  state_.store(kDraining, std::memory_order_seq_cst);  // seq_cst: see wake_writer_for_state
  wake_writer_for_state();
  if (writer_) {
    writer_->join();  // bounded: the writer stops at the drain deadline
    writer_.reset();
  }
  // draining -> closed.
  state_.store(kClosed, std::memory_order_seq_cst);
  wake_flushers();
  mapping_.reset();  // munmap: the Var may be freed now
  lock_.reset();     // releases the page to the next committer
  const uint64_t lost = lost_.load(std::memory_order_acquire);
  if (lost != 0)
    throw Error(ErrorKind::resource_exhausted, "close gateway", ETIMEDOUT,
                std::to_string(lost) + " posted record(s) for TLP gateway page " +
                    std::to_string(var_->page_id()) + " of device " + var_->context()->name() +
                    " could not be written: the device returned no credits within the drain "
                    "timeout");
}

GatewayStats Gateway::stats() const noexcept {
  GatewayStats s;
  // relaxed everywhere: a snapshot of independent counters.
  s.written = written_.load(std::memory_order_relaxed);
  s.posted = direct_ ? s.written : ring_->reserved_total();
  s.batches = batches_.load(std::memory_order_relaxed);
  s.max_batch = max_batch_.load(std::memory_order_relaxed);
  if (ring_) {
    const RingStats r = ring_->stats();
    s.full_waits = r.full_waits;
    s.producer_sleeps = r.sleeps;
  }
  s.credit_waits = credit_waits_.load(std::memory_order_relaxed);
  s.writer_parks = writer_parks_.load(std::memory_order_relaxed);
  s.lost = lost_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace mlx5tlp
