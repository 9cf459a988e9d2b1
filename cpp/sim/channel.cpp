// Request channels: the host pushes, functions claim, mark and retire; claims of dead claimer
// sessions are redelivered exactly once. The protocol and its memory orders: docs/sim.md.
//
// Hot path (claim of a fresh request, mark, retire): a few atomic loads and one CAS each, no
// lock, no system call, no allocation. Finding dead claimers costs system calls (one OFD lock
// probe per foreign session), so each process sweeps a channel about once a millisecond.
#include "channel.hpp"

#include <time.h>

#include <cstring>
#include <new>

#include "device_map.hpp"
#include "mlx5tlp/futex.hpp"

namespace mlx5tlp::sim {

namespace {

constexpr int64_t kSweepIntervalNs = 1000000;  // 1 ms: bounds the extra takeover delay

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);  // a few ns; its ticks (1-4 ms) suit the sweep limit
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// The full position of a claimed slot whose word holds its low 32 bits: a claimed slot blocks
// its next lap, so its position is within one ring behind head. ~0 if the word is garbage.
uint64_t claimed_position(const RequestChannel& ch, uint64_t w) {
  // acquire: a head at least as new as the word we decoded (head only grows).
  const uint64_t head = ch.head.load(std::memory_order_acquire);
  const uint32_t back = uint32_t(head) - slot_pos32(w);
  if (back == 0 || back > kRequestSlots) return ~uint64_t(0);
  return head - back;
}

}  // namespace

uint32_t mark_check(uint64_t pos, const MarkRecord& m) {
  uint32_t h = 2166136261u;
  auto mix = [&h](uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) h = (h ^ uint8_t(v >> (8 * i))) * 16777619u;
  };
  mix(0x334b524d, 4);  // "MRK3": the record format of state version 3
  mix(pos, 8);
  mix(m.page, 4);
  mix(m.before, 4);
  mix(m.seq, 8);
  mix(m.gen, 8);
  mix(m.after, 4);
  return h;
}

int channel_push(RequestChannel& ch, const void* data, size_t len) {
  const uint64_t pos = ch.head.load(std::memory_order_relaxed);  // only the host writes head
  const uint32_t i = uint32_t(pos % kRequestSlots);
  // acquire: pairs with the retiring claimer's release; its copy-out is done before we write.
  if (ch.word[i].load(std::memory_order_acquire) != slot_word(pos, kSlotFree)) return EAGAIN;
  RequestSlot& s = ch.slot[i];
  std::memcpy(s.data, data, len);
  s.len = uint32_t(len);
  // release: the request bytes and length are visible to whoever sees READY.
  ch.word[i].store(slot_word(pos, kSlotReady), std::memory_order_release);
  ch.head.store(pos + 1, std::memory_order_release);  // release: counts and scans see the slot
  return 0;
}

void channel_reset(RequestChannel& ch, uint32_t* ready, uint32_t* claimed) {
  // acquire: only the host (us) writes head; positions continue from it, never reused.
  const uint64_t base = ch.head.load(std::memory_order_acquire);
  for (uint32_t i = 0; i < kRequestSlots; ++i) {
    const uint64_t pos = base + ((i + kRequestSlots - uint32_t(base % kRequestSlots)) % kRequestSlots);
    uint64_t w = ch.word[i].load(std::memory_order_acquire);  // acquire: see the CAS's input
    // acq_rel: a claimer that loses this race sees the slot gone when it re-checks its word.
    while (!ch.word[i].compare_exchange_weak(w, slot_word(pos, kSlotFree), std::memory_order_acq_rel,
                                             std::memory_order_acquire)) {
    }
    *ready += slot_state(w) == kSlotReady;
    *claimed += slot_state(w) == kSlotClaimed;
  }
  ch.tail.store(base, std::memory_order_release);  // release: after the words it points past
}

uint32_t channel_count(const RequestChannel& ch, uint32_t state) {
  uint32_t n = 0;
  // acquire: a statistic; any recent value will do, acquire keeps it ordered after the slot.
  for (const auto& w : ch.word) n += slot_state(w.load(std::memory_order_acquire)) == state;
  return n;
}

// ---- blocking wait for requests ----

void request_pushed(DeviceState& st) {
  // seq_cst fence: the push's READY/head stores are ordered before the flag load (the other
  // half of the waiter's flag CAS + fence + scan).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if ((st.req_wake.load(std::memory_order_relaxed) & kReqWaiting) == 0) return;  // relaxed: after the fence
  wake_request_waiters(st);
}

void wake_request_waiters(DeviceState& st) {
  uint32_t v = st.req_wake.load(std::memory_order_relaxed);  // relaxed: the CAS below decides
  // acq_rel: a new sequence (flag cleared) that every waiter's FUTEX_WAIT compares against.
  while (!st.req_wake.compare_exchange_weak(v, (v + 1) & ~kReqWaiting, std::memory_order_acq_rel,
                                            std::memory_order_relaxed)) {
  }
  mlx5tlp::futex_wake(&st.req_wake, INT_MAX, true);
}

namespace {

// Whether a slot of `ch` holds a request no one has claimed yet.
bool channel_ready(const RequestChannel& ch) {
  // acquire: as fresh() reads them.
  uint64_t t = ch.tail.load(std::memory_order_acquire);
  const uint64_t h = ch.head.load(std::memory_order_acquire);
  if (t > h || h - t > kRequestSlots) t = h - (h < kRequestSlots ? h : kRequestSlots);  // garbage
  for (uint64_t pos = t; pos < h; ++pos)  // acquire: pairs with the host's READY release
    if (ch.word[pos % kRequestSlots].load(std::memory_order_acquire) == slot_word(pos, kSlotReady)) return true;
  return false;
}

}  // namespace

namespace {

constexpr ssize_t kVanished = -1000;  // copy_out: a new epoch discarded the claim meanwhile
constexpr ssize_t kCorrupt = -1001;   // copy_out: the slot's length is impossible
constexpr ssize_t kBadMark = -1002;   // copy_out: the current mark record is damaged or foreign

struct Claimer {
  DeviceMap& d;
  RequestChannel& ch;
  uint32_t channel;
  uint32_t session, gen;  // ours
  MarkRecord bad_mark{};  // the record copy_out refused (for the error message)

  bool mine(uint64_t w) const {
    return slot_state(w) == kSlotClaimed && slot_session(w) == session &&
           slot_session_gen16(w) == (gen & 0xffff);
  }
  // A claimer session is alive while its generation is current and its lock byte is held.
  bool alive(uint32_t s, uint32_t g16) const {
    if (s >= kMaxSessions) return false;
    // acquire: pairs with the release that published a new owner of the session slot.
    if ((d.st()->sessions[s].gen.load(std::memory_order_acquire) & 0xffff) != g16) return false;
    return d.lock_held(kSessionLockBase + s);
  }

  // Copies the claimed slot out; false if the claim vanished meanwhile (a new host epoch).
  ssize_t copy_out(uint32_t i, uint64_t w, void* buf, size_t len, m5a_sim_claim_info* info,
                   uint64_t pos, uint32_t flags) {
    RequestSlot& s = ch.slot[i];
    const uint32_t n = s.len;
    if (n > len || n > kRequestMax) return kCorrupt;
    std::memcpy(buf, s.data, n);
    m5a_sim_claim_info out{};
    out.claim = pos;
    out.flags = flags;
    out.length = n;
    if (w & kWordLogged) out.flags |= M5A_SIM_CLAIM_LOGGED;
    if (w & kWordMarked) {
      // A private copy: the file is another process's input, checked once and then trusted.
      const MarkRecord m = s.mark[(w & kWordMarkSelect) ? 1 : 0];
      if (m.check != mark_check(pos, m) || m.page >= d.cfg().gw_pages || m.before > m.after ||
          m.before == M5A_SIM_PROGRESS_ALL) {
        bad_mark = m;
        return kBadMark;
      }
      out.flags |= M5A_SIM_CLAIM_MARKED;
      out.page_id = m.page;
      out.seq = m.seq;
      out.progress = m.before;  // published before the mark was made, whatever came after
      // acquire: pairs with the allocation's release of a new page generation.
      if (d.st()->gw[m.page].gen.load(std::memory_order_acquire) != m.gen) {
        out.flags |= M5A_SIM_CLAIM_PAGE_GONE;
      } else {
        // acquire: the doorbell the dead claimer (or its gateway writer) stored. A u64 count
        // of records from 0 for each allocation: it cannot wrap, so >= is exact.
        const uint64_t db = __atomic_load_n(
            reinterpret_cast<uint64_t*>(d.gw_page(m.page) + gw::kDoorbell), __ATOMIC_ACQUIRE);
        if (db >= m.seq) out.progress = m.after;
        if (out.progress == M5A_SIM_PROGRESS_ALL) out.flags |= M5A_SIM_CLAIM_PUBLISHED;
      }
      if (out.progress != 0 && out.progress != M5A_SIM_PROGRESS_ALL) out.flags |= M5A_SIM_CLAIM_PARTIAL;
    }
    // acquire: re-check (seqlock style) that the bytes we copied were still our claim's.
    if (!same_claim(ch.word[i].load(std::memory_order_acquire), w)) return kVanished;
    if (info != nullptr) *info = out;
    return ssize_t(n);
  }

  // Takes over one claim of a dead session, the OLDEST (lowest position) first: a successor
  // answers what a dead claimer left in the order the host sent it (a redelivered read must
  // not see a write the host sent after it; slot order is not position order once the ring
  // wraps). 0: none; >0: its length; <0: -errno.
  ssize_t redeliver(void* buf, size_t len, m5a_sim_claim_info* info) {
    uint64_t dead = 0;     // sessions found dead in this sweep (bit per session slot)
    uint64_t checked = 0;  // sessions whose liveness we probed in this sweep
    // acquire: a head at least as new as the words below (a claim is within one ring of it).
    const uint64_t head = ch.head.load(std::memory_order_acquire);
    const uint64_t first = head > kRequestSlots ? head - kRequestSlots : 0;
    for (uint64_t at = first; at < head; ++at) {
      const uint32_t i = uint32_t(at % kRequestSlots);
      uint64_t w = ch.word[i].load(std::memory_order_acquire);  // acquire: the claim's fields
      if (slot_state(w) != kSlotClaimed || mine(w) || slot_pos32(w) != uint32_t(at)) continue;
      const uint32_t s = slot_session(w);
      if (s >= kMaxSessions) continue;
      if (!(checked >> s & 1)) {
        checked |= uint64_t(1) << s;
        if (!alive(s, slot_session_gen16(w))) dead |= uint64_t(1) << s;
      }
      if (!(dead >> s & 1)) continue;
      const uint64_t pos = claimed_position(ch, w);
      if (pos == ~uint64_t(0)) continue;
      if (ch.slot[i].len > len) return -ENOBUFS;
      const uint64_t next =
          claimed_word(pos, session, gen, (w & (kWordMarked | kWordMarkSelect | kWordLogged)) | kWordRedelivered);
      // acq_rel: exactly one taker wins; it sees the data and mark the dead claimer wrote.
      if (!ch.word[i].compare_exchange_strong(w, next, std::memory_order_acq_rel)) continue;
      const ssize_t n = copy_out(i, next, buf, len, info, pos, M5A_SIM_CLAIM_REDELIVERED);
      if (n >= 0) return n;
      if (n == kCorrupt) return drop(i, next, pos);
      if (n == kBadMark) return drop_marked(i, next, pos);
      // kVanished: a new epoch discarded it while we copied: nothing to deliver.
    }
    return 0;
  }

  ssize_t fresh(void* buf, size_t len, m5a_sim_claim_info* info) {
    for (;;) {
      uint64_t t = ch.tail.load(std::memory_order_acquire);        // acquire: a recent hint
      const uint64_t h = ch.head.load(std::memory_order_acquire);  // acquire: pairs with push
      if (t > h || h - t > kRequestSlots) t = h - (h < kRequestSlots ? h : kRequestSlots);  // garbage
      bool retry = false;
      for (uint64_t pos = t; pos < h; ++pos) {
        const uint32_t i = uint32_t(pos % kRequestSlots);
        uint64_t w = ch.word[i].load(std::memory_order_acquire);  // acquire: pairs with READY
        if (w != slot_word(pos, kSlotReady)) continue;  // claimed by someone, or reset
        if (ch.slot[i].len > len) return -ENOBUFS;  // leave it for a caller with a bigger buffer
        const uint64_t next = claimed_word(pos, session, gen, 0);
        // acq_rel: acquire pairs with the host's READY release (the request bytes).
        if (!ch.word[i].compare_exchange_strong(w, next, std::memory_order_acq_rel)) continue;
        // relaxed: the tail is a hint; every position below it is claimed or retired.
        uint64_t cur = ch.tail.load(std::memory_order_relaxed);
        while (cur < pos + 1 && !ch.tail.compare_exchange_weak(cur, pos + 1, std::memory_order_relaxed)) {
        }
        const ssize_t n = copy_out(i, next, buf, len, info, pos, 0);  // fresh: never marked
        if (n >= 0) return n;
        if (n == kCorrupt) return drop(i, next, pos);
        retry = true;  // kVanished: discarded by a new epoch while we copied: look again
        break;
      }
      if (!retry) return 0;
    }
  }

  // A slot whose length the state file no longer vouches for: retire it, report EPROTO.
  ssize_t drop(uint32_t i, uint64_t w, uint64_t pos) {
    // release: as retire().
    ch.word[i].compare_exchange_strong(w, slot_word(pos + kRequestSlots, kSlotFree), std::memory_order_acq_rel);
    return -fail(EPROTO, "channel %u slot %u holds a request of impossible length %u: dropped it",
                 channel, i, ch.slot[i].len);
  }

  // A dead claimer's claim whose mark the state file no longer vouches for: how much of its
  // answer the host has is unknown, so neither answering it (a duplicate) nor retiring it as
  // answered is right. It is dropped (the host's Completion Timeout reports it), EPROTO.
  ssize_t drop_marked(uint32_t i, uint64_t w, uint64_t pos) {
    const MarkRecord m = bad_mark;
    // acq_rel: as retire().
    ch.word[i].compare_exchange_strong(w, slot_word(pos + kRequestSlots, kSlotFree), std::memory_order_acq_rel);
    return -fail(EPROTO,
                 "channel %u slot %u (claim %llu): its mark record is damaged or another claim's "
                 "(page %u, progress %u..%u, check %#x, expected %#x): dropped the request",
                 channel, i, (unsigned long long)pos, m.page, m.before, m.after, m.check,
                 mark_check(pos, m));
  }

  ssize_t claim(void* buf, size_t len, m5a_sim_claim_info* info) {
    const int64_t now = now_ns();
    // relaxed: a rate limit of this process; a stale value only sweeps a little more or later.
    const int64_t last = d.last_sweep_ns[channel].load(std::memory_order_relaxed);
    if (last == 0 || now - last >= kSweepIntervalNs) {
      d.last_sweep_ns[channel].store(now, std::memory_order_relaxed);
      const ssize_t n = redeliver(buf, len, info);
      if (n != 0) return n;
    }
    return fresh(buf, len, info);
  }

  // The claim's word if it is ours and still exists; else 0 with *err set.
  uint64_t own(uint64_t claim, int* err) const {
    const uint32_t i = uint32_t(claim % kRequestSlots);
    const uint64_t w = ch.word[i].load(std::memory_order_acquire);  // acquire: our own claim
    if (slot_state(w) == kSlotClaimed && slot_pos32(w) == uint32_t(claim)) {
      if (mine(w)) return w;
      *err = EPERM;  // another live claimer's
      return 0;
    }
    *err = ESTALE;  // retired, or discarded by a new host epoch / reset
    return 0;
  }

  int mark(uint64_t claim, uint32_t page, uint64_t seq, uint32_t before, uint32_t after) {
    if (page >= d.cfg().gw_pages) return fail(EINVAL, "page %u is not a gateway page (0..%u)", page, d.cfg().gw_pages - 1);
    if (before > after || before == M5A_SIM_PROGRESS_ALL)
      return fail(EINVAL, "progress %u..%u: `before` must be at most `after` and not all of the answer",
                  before, after);
    int err = 0;
    uint64_t w = own(claim, &err);
    if (w == 0) return err;
    const uint32_t i = uint32_t(claim % kRequestSlots);
    // Write the record the word does not select (the current one stays whole until the CAS).
    const bool sel = (w & kWordMarked) ? (w & kWordMarkSelect) == 0 : false;
    MarkRecord& m = ch.slot[i].mark[sel ? 1 : 0];
    m.page = page;
    m.before = before;
    m.seq = seq;
    m.gen = d.st()->gw[page].gen.load(std::memory_order_acquire);  // acquire: as published
    m.after = after;
    m.check = mark_check(claim, m);
    const uint64_t next = (w & ~kWordMarkSelect) | kWordMarked | (sel ? kWordMarkSelect : 0);
    // release: the record happen-before any redeliverer's acquire of the word that selects it.
    if (!ch.word[i].compare_exchange_strong(w, next, std::memory_order_acq_rel)) return ESTALE;
    return 0;
  }

  int note_logged(uint64_t claim) {
    int err = 0;
    uint64_t w = own(claim, &err);
    if (w == 0) return err;
    // acq_rel: as mark(); a successor's redelivery CAS sees the bit with the claim's marks.
    if (!ch.word[claim % kRequestSlots].compare_exchange_strong(w, w | kWordLogged, std::memory_order_acq_rel))
      return ESTALE;
    return 0;
  }

  int retire(uint64_t claim) {
    int err = 0;
    uint64_t w = own(claim, &err);
    if (w == 0) return err;
    const uint32_t i = uint32_t(claim % kRequestSlots);
    // release: our reads of the slot happen-before the host's acquire and its next write.
    if (!ch.word[i].compare_exchange_strong(w, slot_word(claim + kRequestSlots, kSlotFree),
                                            std::memory_order_acq_rel))
      return ESTALE;
    return 0;
  }
};

// The claimer for (ctx, channel) in *out, or a positive errno.
int make_claimer(m5a_ibv_context* context, uint32_t channel, Claimer** out, void* mem) {
  if (context == nullptr || channel >= kChannels)
    return fail(EINVAL, "no context, or channel %u is not 0..%u", channel, kChannels - 1);
  SimContext* c = sim_ctx(context);
  uint32_t s = 0, g = 0;
  if (!c->dev->session(&s, &g)) return errno;
  *out = new (mem) Claimer{*c->dev, c->dev->st()->chan[channel], channel, s, g};
  return 0;
}

}  // namespace

}  // namespace mlx5tlp::sim

using namespace mlx5tlp::sim;

M5A_EXPORT ssize_t mlx5tlp_sim_function_claim(m5a_ibv_context* context, uint32_t channel, void* buf,
                                              size_t len, m5a_sim_claim_info* info) {
  if (buf == nullptr) return -EINVAL;
  alignas(Claimer) unsigned char mem[sizeof(Claimer)];
  Claimer* cl = nullptr;
  if (int rc = make_claimer(context, channel, &cl, mem)) return -rc;
  return cl->claim(buf, len, info);
}

// Only claims of dead claimers, sweeping now (no rate limit): a successor takes them all
// before it writes to the dead claimer's pages (see M5A_SIM_CLAIM_PUBLISHED).
M5A_EXPORT ssize_t mlx5tlp_sim_function_recover(m5a_ibv_context* context, uint32_t channel,
                                                void* buf, size_t len, m5a_sim_claim_info* info) {
  if (buf == nullptr) return -EINVAL;
  alignas(Claimer) unsigned char mem[sizeof(Claimer)];
  Claimer* cl = nullptr;
  if (int rc = make_claimer(context, channel, &cl, mem)) return -rc;
  return cl->redeliver(buf, len, info);
}

M5A_EXPORT int mlx5tlp_sim_function_mark(m5a_ibv_context* context, uint32_t channel, uint64_t claim,
                                         uint32_t page_id, uint64_t seq) {
  alignas(Claimer) unsigned char mem[sizeof(Claimer)];
  Claimer* cl = nullptr;
  if (int rc = make_claimer(context, channel, &cl, mem)) return rc;
  return cl->mark(claim, page_id, seq, 0, M5A_SIM_PROGRESS_ALL);
}

M5A_EXPORT int mlx5tlp_sim_function_mark_progress(m5a_ibv_context* context, uint32_t channel,
                                                  uint64_t claim, uint32_t page_id, uint64_t seq,
                                                  uint32_t before, uint32_t after) {
  alignas(Claimer) unsigned char mem[sizeof(Claimer)];
  Claimer* cl = nullptr;
  if (int rc = make_claimer(context, channel, &cl, mem)) return rc;
  return cl->mark(claim, page_id, seq, before, after);
}

M5A_EXPORT int mlx5tlp_sim_function_note_logged(m5a_ibv_context* context, uint32_t channel,
                                                uint64_t claim) {
  alignas(Claimer) unsigned char mem[sizeof(Claimer)];
  Claimer* cl = nullptr;
  if (int rc = make_claimer(context, channel, &cl, mem)) return rc;
  return cl->note_logged(claim);
}

M5A_EXPORT int mlx5tlp_sim_function_retire(m5a_ibv_context* context, uint32_t channel, uint64_t claim) {
  alignas(Claimer) unsigned char mem[sizeof(Claimer)];
  Claimer* cl = nullptr;
  if (int rc = make_claimer(context, channel, &cl, mem)) return rc;
  return cl->retire(claim);
}

// Blocks until a channel of `mask` may hold a request, a wake, or the timeout. Spurious
// returns are allowed (the caller claims and waits again); claims of dead claimers announce
// nothing, so a caller bounds its wait to find them (claim sweeps about once a millisecond).
M5A_EXPORT int mlx5tlp_sim_function_wait(m5a_ibv_context* context, uint32_t channel_mask,
                                         int64_t timeout_ns) {
  if (context == nullptr || channel_mask == 0 || (channel_mask >> kChannels) != 0)
    return fail(EINVAL, "no context, or channel mask %#x is empty or names channels beyond %u",
                channel_mask, kChannels - 1);
  DeviceState& st = *sim_ctx(context)->dev->st();
  const mlx5tlp::Deadline deadline =
      timeout_ns < 0 ? mlx5tlp::Deadline::never() : mlx5tlp::Deadline::after(std::chrono::nanoseconds(timeout_ns));
  uint32_t v = st.req_wake.load(std::memory_order_relaxed);  // relaxed: the CAS below decides
  // acq_rel: announce the waiter (the pusher's fence + load sees it, or our scan sees the push).
  while ((v & kReqWaiting) == 0 &&
         !st.req_wake.compare_exchange_weak(v, v | kReqWaiting, std::memory_order_acq_rel, std::memory_order_relaxed)) {
  }
  v |= kReqWaiting;
  std::atomic_thread_fence(std::memory_order_seq_cst);  // seq_cst: flag before the scan
  for (uint32_t c = 0; c < kChannels; ++c)
    if ((channel_mask >> c & 1u) != 0 && channel_ready(st.chan[c])) return 0;
  if (!mlx5tlp::futex_wait(&st.req_wake, v, deadline, true)) return ETIMEDOUT;
  return 0;
}

// Wakes every function blocked in mlx5tlp_sim_function_wait on the device (a stop, a pause, a
// deferred completion to send).
M5A_EXPORT int mlx5tlp_sim_function_wake(m5a_ibv_context* context) {
  if (context == nullptr) return fail(EINVAL, "no context");
  wake_request_waiters(*sim_ctx(context)->dev->st());
  return 0;
}

// Claim + retire in one call: at most once (a caller killed after it returns loses the
// request). A redelivered claim whose answer was already published is retired, not returned.
M5A_EXPORT ssize_t mlx5tlp_sim_function_poll(m5a_ibv_context* context, uint32_t channel, void* buf,
                                             size_t len) {
  if (buf == nullptr) return -EINVAL;
  alignas(Claimer) unsigned char mem[sizeof(Claimer)];
  Claimer* cl = nullptr;
  if (int rc = make_claimer(context, channel, &cl, mem)) return -rc;
  for (;;) {
    m5a_sim_claim_info info{};
    const ssize_t n = cl->claim(buf, len, &info);
    if (n <= 0) return n;
    cl->retire(info.claim);
    if (!(info.flags & M5A_SIM_CLAIM_PUBLISHED)) return n;
  }
}
