// The device model (PCIe host): sends requests to the emulated function and collects every
// completion written into any gateway page of the device.
//
// A gateway page is hostile input: every process that maps it can write all of it. The model
// therefore keeps the geometry private (slot size and count from the validated device
// configuration, never from the page header), keeps its own consumer count per page (the
// state's trusted copy, not the page's), bound-checks the doorbell against a ring's worth of
// records and every record length against the slot, copies a record out before checking it,
// and counts garbage in bad_records. Nothing read from a page is an index without a bound.
//
// One model per device (an OFD lock byte on bar). Attaching starts a new epoch: requests a
// previous model queued and records of pages freed while it was attached are discarded and
// counted; records in live pages are collected.
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <memory>

#include "channel.hpp"
#include "device_map.hpp"
#include "host.hpp"

using namespace mlx5tlp::sim;

namespace {

uint64_t load_doorbell(const DeviceMap& d, uint32_t page) {
  // acquire: pairs with the writer's release (+ store fence) at the doorbell, so the slot bytes
  // written before the doorbell are visible here.
  return __atomic_load_n(reinterpret_cast<uint64_t*>(d.gw_page(page) + gw::kDoorbell), __ATOMIC_ACQUIRE);
}

// Gives `count` back to the page's writer: our copy, the state's, the page's, and a wake-up.
void publish_consumed(m5a_sim_host& h, uint32_t page, uint64_t count) {
  DeviceMap& d = *h.dev;
  h.consumed[page] = count;
  // release: the device's copy, read by free/reclaim to decide whether the page drains.
  d.st()->gw[page].consumed.store(count, std::memory_order_release);
  uint8_t* base = d.gw_page(page);
  // release: our copy-out happens before the writer may reuse the slot (a credit returned).
  __atomic_store_n(reinterpret_cast<uint64_t*>(base + gw::kConsumer), count, __ATOMIC_RELEASE);
  // A writer out of credits sets writer_waiting and futex-waits on the consumer's low 32 bits
  // (docs/ring.md). The flag is a hint from a hostile page: waking when it lies costs a system
  // call, never correctness. seq_cst: the consumer store above is ordered before this load, the
  // mirror of the writer's store-flag / full-fence / re-read-consumer (no lost wake-up).
  if (__atomic_load_n(reinterpret_cast<uint32_t*>(base + gw::kWriterWaiting), __ATOMIC_SEQ_CST) != 0)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(base + gw::kConsumer), FUTEX_WAKE, INT_MAX, nullptr,
            nullptr, 0);
}

// Under lock: a new epoch. The channels start clean (requests a previous host queued, and
// claims of them, are discarded), and so do freed pages still draining for a previous host
// (their records were for it; the pages go back to the pool). Live pages keep their records:
// they are collected by this host, from the consumer count the device keeps.
void start_epoch(m5a_sim_host& h) {
  DeviceMap& d = *h.dev;
  DeviceState* st = d.st();
  st->host_epoch += 1;
  uint32_t ready = 0, claimed = 0;
  for (auto& ch : st->chan) channel_reset(ch, &ready, &claimed);
  uint64_t stale = 0;
  for (uint32_t p = 0; p < d.cfg().gw_pages; ++p) {
    const uint32_t owner = st->gw[p].owner.load(std::memory_order_acquire);  // acquire: as alloc
    if (owner == 0) continue;
    if (owner == kPageDraining) {
      const int64_t n = d.unconsumed(p);
      if (n > 0) stale += uint64_t(n);
      d.scrub_gw_page(p);
      continue;
    }
    h.gen[p] = st->gw[p].gen.load(std::memory_order_acquire);  // acquire: pairs with alloc
    // The page's copy of the consumer may be behind ours if a previous host died between the
    // two stores: make the writer's view match (and wake it if it waits for these credits).
    publish_consumed(h, p, st->gw[p].consumed.load(std::memory_order_acquire));
  }
  st->stale_requests += ready + claimed;
  st->stale_completions += stale;
  h.check.stats.epoch = st->host_epoch;
  h.check.stats.stale_requests = ready + claimed;
  h.check.stats.stale_completions = stale;
}

// Under lock: a freed page whose records are all consumed goes back to the pool.
void finish_drain(DeviceMap& d, uint32_t page) {
  Locked lock(d);
  // acquire: the owner is re-read under the device mutex (another free may have raced).
  if (lock.ok() && d.st()->gw[page].owner.load(std::memory_order_acquire) == kPageDraining &&
      d.unconsumed(page) <= 0)
    d.scrub_gw_page(page);
}

}  // namespace

M5A_EXPORT m5a_sim_host* mlx5tlp_sim_host_open(const char* device) {
  auto d = DeviceMap::get(device != nullptr ? device : M5A_SIM_DEFAULT_DEVICE);
  if (!d) return nullptr;
  mlx5tlp::UniqueFd fd(openat(d->dir_fd(), "bar", O_RDWR | O_NOFOLLOW | O_CLOEXEC));
  if (!fd || !d->same_bar(fd.get())) {
    fail(errno ? errno : ENODEV, "cannot open '%s/bar' for the device model", d->dir().c_str());
    return nullptr;
  }
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = kHostLock;
  fl.l_len = 1;
  if (fcntl(fd.get(), F_OFD_SETLK, &fl) != 0) {
    // One device model per device: it owns the gateway consumer indexes.
    fail(EBUSY, "another device model is attached to '%s'", d->name().c_str());
    return nullptr;
  }
  auto h = std::make_unique<m5a_sim_host>();
  h->dev = std::move(d);
  close_in_child(fd.get(), true);  // the model is this process: a forked child does not hold it
  h->lock_fd = std::move(fd);
  {
    Locked lock(*h->dev);
    if (!lock.ok()) return nullptr;
    h->dev->collect();
    start_epoch(*h);
  }
  return h.release();
}

M5A_EXPORT void mlx5tlp_sim_host_close(m5a_sim_host* host) {
  if (host == nullptr) return;
  // Pages still draining stay so: the next host's epoch (or an allocation that finds no host)
  // discards them and counts them.
  std::unique_ptr<m5a_sim_host> h(host);
  std::shared_ptr<DeviceMap> keep = std::move(h->dev);  // released after the host struct
  h.reset();
}

M5A_EXPORT int mlx5tlp_sim_host_send(m5a_sim_host* host, uint32_t channel, const void* tlp,
                                     size_t len) {
  if (host == nullptr || tlp == nullptr || channel >= kChannels || len < 12 || len > kRequestMax)
    return EINVAL;
  const int rc = channel_push(host->dev->st()->chan[channel], tlp, len);
  if (rc == 0) {
    host->check.track_request(static_cast<const uint8_t*>(tlp), len);
    request_pushed(*host->dev->st());
  }
  return rc;
}

namespace {

// What a page offers the model: records [consumed, consumed + n) with every bound applied to
// the hostile doorbell (n is 0 for nothing, or for garbage, which is counted here).
struct Offer {
  uint32_t owner;
  uint64_t gen;
  uint64_t consumed;
  uint64_t produced;
  uint64_t n;
};

Offer page_offer(m5a_sim_host& h, uint32_t page, uint64_t* bad) {
  DeviceMap& d = *h.dev;
  GwPage& g = d.st()->gw[page];
  Offer o{};
  // acquire: pairs with the allocation's release; the page's header and generation are set.
  o.owner = g.owner.load(std::memory_order_acquire);
  if (o.owner == 0) return o;
  // acquire: a new allocation's consumed (0) and scrubbed page are visible with its generation.
  o.gen = g.gen.load(std::memory_order_acquire);
  if (o.gen != h.gen[page]) {
    h.gen[page] = o.gen;
    h.bad_doorbell[page] = ~uint64_t(0);
    h.consumed[page] = g.consumed.load(std::memory_order_acquire);  // acquire: 0 for a new one
  }
  o.produced = load_doorbell(d, page);
  o.consumed = h.consumed[page];
  if (o.produced == o.consumed) {
    if (o.owner == kPageDraining) finish_drain(d, page);
    return o;
  }
  if (o.produced < o.consumed) {
    // The doorbell only grows: a writer never moves it back (a page reallocation starts a new
    // generation instead). A lower value is garbage or a torn store: count it once and do not
    // read the page's old records again. If it stays there (seen again on the next poll), a
    // writer restarted lower: continue from it.
    if (h.bad_doorbell[page] != o.produced) {
      h.bad_doorbell[page] = o.produced;
      ++h.check.stats.bad_records;
      ++*bad;
      h.check.fail("page %u: doorbell %u went back below consumer %u", page, uint32_t(o.produced),
                   uint32_t(o.consumed));
    } else {
      publish_consumed(h, page, o.produced);
    }
    return o;
  }
  h.bad_doorbell[page] = ~uint64_t(0);
  if (o.produced - o.consumed > d.gw_slot_count()) {
    ++h.check.stats.bad_records;
    ++*bad;
    h.check.fail("page %u: doorbell %u is more than a ring ahead of consumer %u", page,
                 uint32_t(o.produced), uint32_t(o.consumed));
    publish_consumed(h, page, o.produced);  // those records are lost: continue from the doorbell
    return o;
  }
  o.n = o.produced - o.consumed;
  return o;
}

// The slot holding record `seq` (private geometry: inside the page whatever its header says),
// and its length read once (the page may change under us); 0 if impossible (counted).
const uint8_t* record_slot(m5a_sim_host& h, uint32_t page, uint64_t seq, uint32_t* len,
                           uint64_t* bad) {
  DeviceMap& d = *h.dev;
  const uint32_t slot_size = d.cfg().gw_slot_size;
  const uint8_t* slot = d.gw_page(page) + gw::kSlots + size_t(seq % d.gw_slot_count()) * slot_size;
  std::memcpy(len, slot, 4);
  if (*len > slot_size - gw::kSlotHeader || *len == 0) {
    ++h.check.stats.bad_records;
    ++*bad;
    h.check.fail("page %u: record %u has impossible length %u", page, uint32_t(seq), *len);
    *len = 0;
  }
  return slot + gw::kSlotHeader;
}

}  // namespace

M5A_EXPORT ssize_t mlx5tlp_sim_host_poll(m5a_sim_host* host, void* buf, size_t len,
                                         m5a_sim_completion* info) {
  if (host == nullptr || buf == nullptr) return -EINVAL;
  m5a_sim_host& h = *host;
  DeviceMap& d = *h.dev;
  const uint32_t pages = d.cfg().gw_pages;
  uint64_t bad = 0;
  for (uint32_t n = 0; n < pages; ++n) {
    const uint32_t page = (h.next_page + n) % pages;
    const Offer o = page_offer(h, page, &bad);
    if (o.n == 0) continue;
    uint32_t rec_len;
    const uint8_t* rec = record_slot(h, page, o.consumed, &rec_len, &bad);
    if (rec_len == 0) {
      publish_consumed(h, page, o.consumed + 1);
      continue;
    }
    if (rec_len > len) return -ENOBUFS;
    std::memcpy(buf, rec, rec_len);
    // acquire: if the page was freed and reallocated while we copied, what we copied is not
    // this allocation's record: drop the copy and look again next time.
    if (d.st()->gw[page].gen.load(std::memory_order_acquire) != o.gen) continue;
    publish_consumed(h, page, o.consumed + 1);
    if (info != nullptr) *info = m5a_sim_completion{page, rec_len, o.consumed};
    h.next_page = page + 1;  // round robin keeps one busy page from starving the others
    h.check.check_completion(static_cast<const uint8_t*>(buf), rec_len);
    if (o.owner == kPageDraining && o.consumed + 1 == o.produced) finish_drain(d, page);
    return ssize_t(rec_len);
  }
  return 0;
}

namespace mlx5tlp::sim {

uint32_t host_take(m5a_sim_host& h, uint8_t* buf, uint32_t max, TakenRecord* out, uint64_t* bad) {
  DeviceMap& d = *h.dev;
  const uint32_t pages = d.cfg().gw_pages;
  const uint32_t slot_size = d.cfg().gw_slot_size;
  for (uint32_t n = 0; n < pages; ++n) {
    const uint32_t page = (h.next_page + n) % pages;
    const Offer o = page_offer(h, page, bad);
    if (o.n == 0) continue;
    const uint32_t want = o.n < max ? uint32_t(o.n) : max;
    uint32_t got = 0;
    for (uint32_t i = 0; i < want; ++i) {
      uint32_t rec_len;
      const uint8_t* rec = record_slot(h, page, o.consumed + i, &rec_len, bad);
      if (rec_len == 0) continue;  // skipped (counted); its credit is returned with the batch
      uint8_t* dst = buf + size_t(got) * slot_size;
      std::memcpy(dst, rec, rec_len);
      out[got++] = TakenRecord{page, rec_len, o.consumed + i, dst};
    }
    // acquire: as in mlx5tlp_sim_host_poll, a reallocation while we copied voids the copies.
    if (d.st()->gw[page].gen.load(std::memory_order_acquire) != o.gen) continue;
    publish_consumed(h, page, o.consumed + want);  // one credit store (and wake check) per batch
    h.next_page = page + 1;
    if (o.owner == kPageDraining && o.consumed + want == o.produced) finish_drain(d, page);
    if (got != 0) return got;
  }
  return 0;
}

}  // namespace mlx5tlp::sim

M5A_EXPORT int mlx5tlp_sim_host_stats(m5a_sim_host* host, m5a_sim_host_stats* out) {
  if (host == nullptr || out == nullptr) return EINVAL;
  *out = host->check.stats;
  return 0;
}
