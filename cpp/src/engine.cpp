// The native engine: one lane (thread) per gateway page. See engine.hpp for the routing rules
// and docs/engine.md for the loop, the counters and the trace format.
#include "mlx5tlp/engine.hpp"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <functional>

#include "mlx5tlp/error.hpp"
#include "mlx5tlp/futex.hpp"
#include "mlx5tlp/ring_wait.hpp"
#include "mlx5tlp/spawn.hpp"
#include "mlx5tlp/tlp_completion.hpp"
#include "mlx5tlp/unique_fd.hpp"

namespace mlx5tlp {

namespace {

using pci::hex;
using tlp::CplStatus;
using tlp::Kind;

uint64_t now_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

// Single-writer counters: the lane stores, stats() loads (relaxed: statistics order nothing).
using Counter = std::atomic<uint64_t>;
inline void bump(Counter& c, uint64_t n = 1) noexcept { c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed); }

[[noreturn]] void engine_error(const char* op, int err, const std::string& what) {
  throw Error(ErrorKind::invalid_argument, op, err, what);
}

constexpr uint8_t kTracePosted = 0xfe, kTraceDeferred = 0xfd, kTraceMalformed = 0xff;
constexpr uint32_t kCmdRun = 0, kCmdPause = 1, kCmdStop = 2, kCmdRelease = 3, kCmdReattach = 4,
                   kCmdHold = 5;  // spawned by attach_gateways(), waiting for start()
constexpr uint32_t kAckNone = 0xff;  // a lane's acknowledgement cleared by command()
constexpr int kStateCreated = 0, kStateRunning = 1, kStatePaused = 2, kStateStopped = 3;
constexpr size_t kMaxDataPerRequest = 4096;
constexpr size_t kMaxCplBytesPerRequest = kMaxDataPerRequest + tlp::kMaxCompletions * 16;
constexpr uint64_t kAckSpinNs = 100000;  // a lane / wait_acks polls this long before sleeping
constexpr size_t kFirstBatch = 4;         // requests a lane takes first after a (re)start

struct RegionCountersA {
  Counter reads{0}, writes{0}, read_bytes{0}, write_bytes{0}, batched{0};
};

// One request of the batch being served.
enum class Action : uint8_t { answer, posted, retire_only, deferred, keep };

struct Slot {
  tlp::Tlp t;
  Action action = Action::answer;
  uint8_t status = 0;
  int16_t region = -1;
  uint8_t ncpl = 0;
  uint32_t cpl_first = 0;  // index into cpl_start/cpl_len
  int32_t item = -1;       // BatchItem index
  uint32_t deferred = UINT32_MAX;
  uint64_t seq = 0;        // the mark: in the page once the doorbell count reaches it
  uint32_t resume = 0;     // bytes of the read's DW range a dead claimer already published
};

enum class DState : uint8_t { free = 0, in_call, pending, ready };

struct Deferred {
  DState state = DState::free;
  uint32_t gen = 0;
  tlp::Tlp t;       // header fields only (data null)
  Request req;      // claim/channel/flags (tlp pointer null)
  int16_t region = -1;
  uint64_t deadline_ns = 0;
  uint64_t taken_ns = 0;
  uint8_t status = 0;
  uint32_t resume = 0;  // Slot::resume of the request
  uint8_t hdr_len = 0;
  uint8_t hdr[16] = {};  // the request's first bytes, for the AER Header Log of a late CA
  std::vector<uint8_t> data;
};

// A chunk of an answer longer than one doorbell: re-marked with its progress before its
// doorbell (after the previous chunk's).
struct Remark {
  const Request* r = nullptr;
  uint64_t seq = 0;
  uint32_t before = 0, after = 0;
};

// Bytes of the request's DW range a completion carries (its Length field, §2.2.9).
uint32_t cpl_payload(const uint8_t* p) noexcept {
  if ((p[0] & 0x40) == 0) return 0;
  const uint32_t dw = ((p[2] & 3u) << 8) | p[3];
  return (dw == 0 ? 1024u : dw) * 4;
}

}  // namespace

struct Lane;

struct Engine::Impl {
  class Sink final : public pci::InterruptSink {
   public:
    explicit Sink(Impl* e) : e_(e) {}
    void deliver(uint64_t address, uint32_t data) noexcept override;

   private:
    Impl* e_;
  };

  Impl(std::shared_ptr<const pci::FunctionLayout> l, std::vector<std::shared_ptr<Region>> r,
       const EngineOptions& o, pci::FunctionState* st, pci::Function::Adopt adopt);

  void validate_regions();
  void poke_all() noexcept;
  int find_region(int bar, uint64_t off, uint64_t len) const noexcept;

  std::shared_ptr<const pci::FunctionLayout> layout;
  std::vector<std::shared_ptr<Region>> regions;
  std::vector<uint32_t> by_bar[7];
  EngineOptions opt;
  Sink sink{this};
  mutable std::mutex fn_mu;  // blocking point: configuration / MSI-X table accesses, brief
  std::unique_ptr<pci::Function> fn;
  std::atomic<uint64_t> cfg_gen{1};
  std::atomic<uint32_t> completer{0};
  // Bumped (and woken) by a lane's first answer since a (re)start: wait_first_answer() sleeps
  // on it, so a successor's control thread gives its CPU to the lanes instead of competing.
  std::atomic<uint32_t> answered_bell{0};
  std::atomic<bool> lean{false};  // set_lean(): lanes take what the page can take now
  BatchHandler* handler = nullptr;
  std::vector<std::unique_ptr<Lane>> lanes;
  std::mutex ctl_mu;  // blocking point: lifecycle calls
  std::atomic<int> state{kStateCreated};
  // MSI-X messages waiting for lane 0 to write them (raise_msix may run on any thread).
  std::mutex irq_mu;
  std::vector<std::pair<uint64_t, uint32_t>> irq_q;
  std::atomic<bool> irq_pending{false};
  Counter irq_dropped{0};
};

struct Lane {
  Lane(Engine::Impl* e, uint32_t index, std::shared_ptr<Var> var, std::shared_ptr<Gateway> gw,
       std::unique_ptr<RequestSource> src);
  void run() noexcept;
  void serve_batch(size_t n);
  void serve_range(size_t lo, size_t hi);
  void refresh() noexcept;
  void process(size_t i);
  bool poisoned_write(Slot& s);
  void route_memory(size_t i, Slot& s, bool io);
  void answer(Slot& s, const uint8_t* data, size_t len, uint8_t status, bool log_it = true);
  void log_error(pci::RxError e, bool completion_sent, const uint8_t* tlp, size_t len,
                 const Request* req) noexcept;
  void log_slot_error(const Slot& s, pci::RxError e, bool completion_sent) noexcept;
  void add_batch_item(size_t i, Slot& s, Region& r, uint32_t region_index, uint64_t off, uint32_t len, bool write);
  void run_handler();
  void finish_batched();
  void housekeeping();
  void publish(size_t lo, size_t hi);
  void write_records(size_t nrec);
  void trace(size_t i, const Slot& s, uint64_t lat) noexcept;
  uint64_t new_deferred(const Slot& s, const Request& r);
  void build_deferred(Deferred& d, uint32_t index);
  void poke() noexcept;
  void wait_bell(uint32_t seen) noexcept;
  // A whole batch, or under set_lean() what the page can take now (at least one request).
  // The first batch since a (re)start is small: the host has waited through a handover (or a
  // takeover) for an answer, and a batch's first completion is in the page only once the
  // whole batch is served — the first batch of a fresh engine, every buffer and region page
  // touched for the first time, took 90-190 µs to serve 32 reads.
  size_t take_limit() noexcept {
    if (first_answer.load(std::memory_order_relaxed) == 0) return std::min(batch, kFirstBatch);
    if (!gw || !e->lean.load(std::memory_order_relaxed)) return batch;  // relaxed: a hint
    const size_t room = gw->credits();
    return room >= batch ? batch : std::max<size_t>(room, 1);
  }
  bool want_stop() const noexcept { return cmd.load(std::memory_order_acquire) == kCmdStop; }

  Engine::Impl* e;
  uint32_t index;
  std::shared_ptr<Gateway> gw;
  std::shared_ptr<Var> var;
  std::unique_ptr<RequestSource> src;
  std::thread th;
  // control: the commanding thread stores cmd and pokes; the lane acknowledges in `ack`
  std::atomic<uint32_t> cmd{kCmdRun};
  std::atomic<uint32_t> ack{kCmdRun};
  std::atomic<uint32_t> bell{0};  // private futex: pokes while the lane is paused
  std::string error;              // why the lane ended early (read after join)
  // configuration snapshot (lane-private)
  uint64_t gen = 0;
  std::unique_ptr<uint8_t[]> cfg;
  pci::ConfigSpace cs;
  bool mem_en = false, io_en = false;
  tlp::CompletionParams params;
  uint32_t timeout_us = 50000;
  uint32_t rx_max_payload = 128;  // Device Control Max_Payload_Size: larger payloads are Malformed
  // preallocated batch buffers
  size_t batch;
  std::vector<Request> reqs;
  std::vector<Slot> slots;
  std::vector<uint8_t> rdata;    // read data, kMaxDataPerRequest per request
  std::vector<uint8_t> out;      // completion TLPs
  size_t out_used = 0;
  std::vector<uint32_t> cpl_start, cpl_len;  // completion k: out[cpl_start[k], +cpl_len[k])
  size_t ncpl = 0;
  std::vector<uint32_t> ends_tmp;
  std::vector<uint32_t> rec_off, rec_len;
  std::vector<uint32_t> grp_end, grp_rel;  // record counts at which a request's records end
  std::vector<int32_t> grp_remark;         // per group: its Remark, or -1
  std::vector<Remark> remarks;
  size_t ngrp = 0;
  std::vector<BatchItem> items;
  size_t nitems = 0;
  bool items_have_write = false;
  std::vector<Request> extra;   // deferred answers / expiries being published this round
  std::vector<Slot> extra_slots;
  size_t nextra = 0;
  size_t nirq = 0;         // MSI-X message records: completions [0, nirq) of this round
  uint64_t batch_t0 = 0;
  // deferred reads
  std::mutex dmu;  // blocking point: brief; complete_deferred() from other threads
  std::vector<Deferred> dslots;
  std::vector<uint32_t> dfree;
  std::vector<uint32_t> dready;
  std::atomic<bool> dready_flag{false};
  uint64_t next_expiry = UINT64_MAX;
  uint64_t outstanding = 0;
  std::atomic<uint32_t> open_word{0};    // futex: outstanding (saturated), for drain_deferred()
  std::atomic<uint64_t> first_answer{0};  // CLOCK_MONOTONIC of the first answer since a (re)start
  // counters
  std::array<Counter, tlp::kKindCount> kinds{};
  Counter batches{0}, completions{0}, ur{0}, ca{0}, unsupported_posted{0}, malformed{0}, poisoned{0},
      unexpected{0}, messages{0}, redelivered{0}, published{0}, partial{0}, stale{0}, deferred{0},
      deferred_completed{0}, deferred_expired{0}, deferred_open{0}, handler_batches{0},
      interrupts{0}, config_writes{0}, err_cor_unsent{0}, err_nonfatal_unsent{0}, err_fatal_unsent{0},
      logged_before{0};
  std::array<Counter, kLatencyBuckets> lat{};
  std::unique_ptr<RegionCountersA[]> rc;
  // trace ring
  std::unique_ptr<std::atomic<uint64_t>[]> trace_words;  // entries * 8 words
  size_t trace_n = 0;
  std::atomic<uint64_t> trace_head{0};
};

// ---------------------------------------------------------------- Impl

Engine::Impl::Impl(std::shared_ptr<const pci::FunctionLayout> l, std::vector<std::shared_ptr<Region>> r,
                   const EngineOptions& o, pci::FunctionState* st, pci::Function::Adopt adopt)
    : layout(std::move(l)), regions(std::move(r)), opt(o) {
  if (!layout) engine_error("create engine", EINVAL, "no function layout");
  if (opt.batch == 0 || opt.batch > 1024) engine_error("create engine", EINVAL, "batch: " + std::to_string(opt.batch) + " is not 1..1024");
  if (opt.deferred_max == 0 || opt.deferred_max > 65536)
    engine_error("create engine", EINVAL, "deferred_max: " + std::to_string(opt.deferred_max) + " is not 1..65536");
  if (opt.trace_entries != 0 && (opt.trace_entries & (opt.trace_entries - 1)) != 0)
    engine_error("create engine", EINVAL, "trace_entries: " + std::to_string(opt.trace_entries) + " is not a power of two");
  if (regions.size() > 255) engine_error("create engine", EINVAL, "more than 255 regions");
  fn = st != nullptr ? std::make_unique<pci::Function>(layout, &sink, st, adopt)
                     : std::make_unique<pci::Function>(layout, &sink);
  uint32_t cid = opt.completer_id;
  if (opt.completer_word != nullptr) {
    const uint32_t w = opt.completer_word->load(std::memory_order_relaxed);  // a predecessor's
    if (w != 0) cid = (w - 1) & 0xfff8u;
  }
  completer.store(cid, std::memory_order_relaxed);
  validate_regions();
}

void Engine::Impl::validate_regions() {
  const pci::BarTable& b = layout->bars;
  for (size_t i = 0; i < regions.size(); ++i) {
    const Region* r = regions[i].get();
    if (r == nullptr) engine_error("create engine", EINVAL, "regions[" + std::to_string(i) + "] is None");
    const std::string what = "region '" + r->name() + "'";
    const int bar = r->bar();
    const uint64_t size = bar == pci::kRomBar ? b.rom_size : b.size[bar];
    const bool exists = bar == pci::kRomBar ? b.rom_size != 0 : (b.kind[bar] != pci::BarKind::none && !b.upper_half[bar]);
    if (!exists) engine_error("create engine", EINVAL, what + ": bar " + std::to_string(bar) + " is not a BAR of this function");
    if (r->offset() >= size || r->size() > size - r->offset())
      engine_error("create engine", EINVAL, what + ": [" + hex(r->offset()) + ", " + hex(r->offset() + r->size()) +
                                                ") runs past BAR " + std::to_string(bar) + " (" + std::to_string(size) + " bytes)");
    const pci::MsixHit h = fn->msix_hit(bar, r->offset(), uint32_t(std::min<uint64_t>(r->size(), UINT32_MAX)));
    if (h.region != pci::MsixRegion::none)
      engine_error("create engine", EINVAL, what + ": overlaps the MSI-X table or PBA in BAR " + std::to_string(bar));
    by_bar[bar].push_back(uint32_t(i));
  }
  for (auto& v : by_bar) {
    std::sort(v.begin(), v.end(), [&](uint32_t a, uint32_t c) { return regions[a]->offset() < regions[c]->offset(); });
    for (size_t k = 1; k < v.size(); ++k) {
      const Region& a = *regions[v[k - 1]];
      const Region& c = *regions[v[k]];
      if (a.offset() + a.size() > c.offset())
        engine_error("create engine", EINVAL, "region '" + c.name() + "' overlaps region '" + a.name() + "' in BAR " +
                                                  std::to_string(c.bar()));
    }
  }
}

int Engine::Impl::find_region(int bar, uint64_t off, uint64_t len) const noexcept {
  for (uint32_t i : by_bar[bar]) {
    const Region& r = *regions[i];
    if (off < r.offset()) return -1;  // sorted: nothing further can contain it
    if (r.contains(off, len == 0 ? 1 : len)) return int(i);
    if (off < r.offset() + r.size()) return -1;  // starts inside, runs past the end
  }
  return -1;
}

void Engine::Impl::Sink::deliver(uint64_t address, uint32_t data) noexcept {
  {
    std::lock_guard<std::mutex> g(e_->irq_mu);
    if (e_->irq_q.size() >= 4096) {
      bump(e_->irq_dropped);
      return;
    }
    e_->irq_q.emplace_back(address, data);  // capacity reserved: no allocation
  }
  e_->irq_pending.store(true, std::memory_order_release);  // release: after the queue entry
  if (!e_->lanes.empty()) e_->lanes[0]->poke();
}

void Engine::Impl::poke_all() noexcept {
  for (auto& l : lanes) l->poke();
}

// ---------------------------------------------------------------- Lane

Lane::Lane(Engine::Impl* eng, uint32_t idx, std::shared_ptr<Var> v, std::shared_ptr<Gateway> g,
           std::unique_ptr<RequestSource> s)
    : e(eng), index(idx), gw(std::move(g)), src(std::move(s)), cfg(new uint8_t[pci::kConfigSize]()),
      cs(&eng->layout->config, cfg.get()), batch(eng->opt.batch) {
  var = gw ? gw->var() : std::move(v);
  reqs.resize(batch);
  slots.resize(batch);
  rdata.resize(batch * kMaxDataPerRequest);
  const size_t extra_max = batch;  // deferred answers published per round at most
  out.resize((batch + extra_max) * kMaxCplBytesPerRequest + 64 * 32);
  const size_t max_cpl = (batch + extra_max) * tlp::kMaxCompletions + 64;
  cpl_start.resize(max_cpl);
  cpl_len.resize(max_cpl);
  rec_off.resize(max_cpl);
  rec_len.resize(max_cpl);
  grp_end.resize(max_cpl);
  grp_rel.resize(max_cpl);
  grp_remark.resize(max_cpl);
  remarks.resize(max_cpl);
  ends_tmp.resize(tlp::kMaxCompletions);
  items.resize(batch);
  extra.resize(extra_max);
  extra_slots.resize(extra_max);
  dslots.resize(eng->opt.deferred_max);
  dfree.reserve(dslots.size());
  for (size_t i = dslots.size(); i-- > 0;) dfree.push_back(uint32_t(i));
  dready.reserve(dslots.size());
  rc.reset(new RegionCountersA[eng->regions.size() + 1]);
  if (eng->opt.trace_entries != 0) {
    trace_n = eng->opt.trace_entries;
    trace_words.reset(new std::atomic<uint64_t>[trace_n * 8]);
    for (size_t i = 0; i < trace_n * 8; ++i) trace_words[i].store(0, std::memory_order_relaxed);
  }
}

void Lane::poke() noexcept {
  bell.fetch_add(1, std::memory_order_release);  // release: the command / queue entry first
  futex_wake(bell);
  src->wake();
}

void Lane::wait_bell(uint32_t seen) noexcept {
  // Blocking point: paused or released; pokes (commands, deferred answers, MSI-X) wake it.
  futex_wait(bell, seen, Deadline::after(std::chrono::milliseconds(50)));
}

void Lane::refresh() noexcept {
  std::lock_guard<std::mutex> g(e->fn_mu);
  gen = e->cfg_gen.load(std::memory_order_acquire);  // acquire: the writes behind the bump
  const pci::Function& f = *e->fn;
  std::memcpy(cfg.get(), f.config().bytes(), pci::kConfigSize);
  mem_en = f.memory_enabled();
  io_en = f.io_enabled();
  params = f.completion_params(uint16_t(e->completer.load(std::memory_order_relaxed)));
  rx_max_payload = params.max_payload;  // before the clamp below, which is for what we send
  // A gateway record must hold the completion: split payloads to what a slot carries.
  const size_t room = gw ? gw->max_record() : 4096;
  while (params.max_payload > 128 && params.max_payload + 16u > room) params.max_payload = uint16_t(params.max_payload / 2);
  const pci::CompletionTimeout ct = f.completion_timeout();
  timeout_us = ct.max_us;
}

void Lane::trace(size_t i, const Slot& s, uint64_t lat_ns) noexcept {
  if (trace_n == 0) return;
  TraceEntry t{};
  t.time_ns = batch_t0;
  t.address = s.t.address;
  t.lane = index;
  t.requester_id = s.t.requester_id;
  t.tag = s.t.tag;
  t.length_dw = s.t.length;
  t.kind = s.status == kTraceMalformed ? kTraceMalformed : uint8_t(s.t.kind);
  t.status = s.action == Action::posted ? kTracePosted : s.action == Action::deferred ? kTraceDeferred : s.status;
  t.first_be = s.t.first_be;
  t.last_be = s.t.last_be;
  t.completions = s.ncpl;
  t.region = uint8_t(s.region + 1);
  t.latency_ns = lat_ns > UINT32_MAX ? UINT32_MAX : uint32_t(lat_ns);
  if (i < batch) std::memcpy(t.header, reqs[i].tlp, std::min<size_t>(16, reqs[i].len));
  uint64_t w[8];
  std::memcpy(w, &t, sizeof w);
  const uint64_t h = trace_head.load(std::memory_order_relaxed);  // only this lane writes it
  std::atomic<uint64_t>* dst = &trace_words[(h & (trace_n - 1)) * 8];
  for (int k = 0; k < 8; ++k) dst[k].store(w[k], std::memory_order_relaxed);  // relaxed: the head publishes
  trace_head.store(h + 1, std::memory_order_release);  // release: the entry's words first
}

void Lane::answer(Slot& s, const uint8_t* data, size_t len, uint8_t status, bool log_it) {
  s.status = status;
  s.action = Action::answer;
  tlp::CompletionParams p = params;
  p.completer_id = uint16_t(e->completer.load(std::memory_order_relaxed));
  p.status = status;
  if (status != uint8_t(CplStatus::SC)) {
    data = nullptr;
    len = 0;
    bump(status == uint8_t(CplStatus::UR) ? ur : ca);
  }
  const tlp::Tlp* req = &s.t;
  tlp::Tlp rest;
  if (s.resume != 0 && data != nullptr && s.resume < len) {
    // The host has the first `resume` bytes (a dead claimer's completions ending on an RCB
    // boundary): complete the rest as a read of what is left, whose Byte Count (the bytes
    // still to be returned) and Lower Address continue the host's sequence (§2.3.1.1).
    rest = s.t;
    rest.address = s.t.address + s.resume;
    rest.length = uint16_t(s.t.length - s.resume / 4);
    if (rest.length == 1) {
      rest.first_be = s.t.last_be;
      rest.last_be = 0;
    } else {
      rest.first_be = 0xf;
    }
    data += s.resume;
    len -= s.resume;
    req = &rest;
  }
  size_t used = 0, count = 0;
  tlp::Status st = tlp::build_completions(*req, data, len, p, out.data() + out_used, out.size() - out_used, &used,
                                          ends_tmp.data(), ends_tmp.size(), &count);
  if (st != tlp::Status::ok) {
    // A request that breaks a field rule the decoder let through: nothing sensible to send.
    s.action = Action::retire_only;
    s.ncpl = 0;
    bump(malformed);
    log_slot_error(s, pci::RxError::malformed_tlp, false);
    return;
  }
  if (log_it && status != uint8_t(CplStatus::SC))
    log_slot_error(s, status == uint8_t(CplStatus::UR) ? pci::RxError::unsupported_request
                                                       : pci::RxError::completer_abort, true);
  s.cpl_first = uint32_t(ncpl);
  s.ncpl = uint8_t(count);
  uint32_t prev = 0;
  for (size_t k = 0; k < count; ++k) {
    cpl_start[ncpl] = uint32_t(out_used + prev);
    cpl_len[ncpl] = ends_tmp[k] - prev;
    prev = ends_tmp[k];
    ++ncpl;
  }
  out_used += used;
}

void Lane::log_error(pci::RxError err, bool completion_sent, const uint8_t* tlp, size_t len,
                     const Request* req) noexcept {
  // PCIe Base 6.x §6.2.5 (Figure 6-2): one detected error is logged once and signalled by one
  // Message. A redelivered request whose dead claimer logged its error already (and noted so
  // on the claim) is answered again but not a second detection: its status bits, First Error
  // Pointer and Header Log are in the shared configuration space as that claimer left them
  // (logging again could record its header late, once the host freed the log), and its
  // Message was called for then. Counted, so that a takeover's skipped logs are visible.
  if (req != nullptr && (req->flags & kRequestLogged) != 0) {
    bump(logged_before);
    return;
  }
  // The function's own error logging in configuration space (Function::log_error,
  // cpp/src/error_logging.cpp: device-side writes, RW1C for the host). Errors are rare: the
  // function's mutex is fine here, and nothing allocates.
  pci::ErrorMessage m;
  {
    std::lock_guard<std::mutex> g(e->fn_mu);
    m = e->fn->log_error(err, completion_sent, tlp, len);
  }
  // Error Messages are not sent: the software device's host model takes completions and
  // MSI-X writes from a gateway page, nothing else, and how real mlx5 hardware would carry a
  // Message is not public (docs/engine.md). Counted, so that a user sees what was called for.
  if (m == pci::ErrorMessage::err_cor) bump(err_cor_unsent);
  else if (m == pci::ErrorMessage::err_nonfatal) bump(err_nonfatal_unsent);
  else if (m == pci::ErrorMessage::err_fatal) bump(err_fatal_unsent);
  // After logging, not before: a process killed in between leaves the claim unnoted, and its
  // successor logs the error again (status bits are idempotent; one Message too many) rather
  // than never. ESTALE (a new host epoch discarded the request) or ENOTSUP: nothing to keep.
  if (req != nullptr) (void)src->note_logged(*req);
}

void Lane::log_slot_error(const Slot& s, pci::RxError err, bool completion_sent) noexcept {
  // The Header Log wants the request as received: a batch slot's bytes are still in its
  // Request; a deferred answer's were kept in its Deferred slot.
  const std::less<const Slot*> lt;
  if (!lt(&s, slots.data()) && lt(&s, slots.data() + slots.size())) {
    const Request& r = reqs[size_t(&s - slots.data())];
    return log_error(err, completion_sent, r.tlp, r.tlp != nullptr ? r.len : 0, &r);
  }
  if (s.deferred < dslots.size()) {
    const Deferred& d = dslots[s.deferred];
    return log_error(err, completion_sent, d.hdr, d.hdr_len, &d.req);
  }
  log_error(err, completion_sent, nullptr, 0, nullptr);
}

void Lane::add_batch_item(size_t i, Slot& s, Region& r, uint32_t region_index, uint64_t off, uint32_t len, bool write) {
  BatchItem& it = items[nitems];
  it = BatchItem{};
  it.region = &r;
  it.region_index = region_index;
  it.offset = off;
  it.len = len;
  it.first_be = s.t.first_be;
  it.last_be = s.t.last_be;
  it.kind = s.t.kind;
  it.write = write;
  it.requester_id = s.t.requester_id;
  it.tag = s.t.tag;
  it.data = write ? s.t.data : nullptr;
  s.item = int32_t(nitems++);
  if (write) items_have_write = true;
  bump(rc[region_index].batched);
  if (!write || s.t.kind == Kind::IOWr) {
    // Non-posted: it may be answered from another thread, so it gets its id now.
    it.deferred_id = new_deferred(s, reqs[i]);
    if (it.deferred_id == 0) {
      // No room for one more deferred request: Completer Abort now (counted as ca).
      --nitems;
      s.item = -1;
      answer(s, nullptr, 0, uint8_t(CplStatus::CA));
      return;
    }
  }
  s.action = Action::deferred;  // finish_batched() decides
}

uint64_t Lane::new_deferred(const Slot& s, const Request& r) {
  std::lock_guard<std::mutex> g(dmu);
  if (dfree.empty()) return 0;
  const uint32_t k = dfree.back();
  dfree.pop_back();
  Deferred& d = dslots[k];
  d.state = DState::in_call;
  ++d.gen;
  if (d.gen == 0) d.gen = 1;
  d.t = s.t;
  d.t.data = nullptr;
  d.t.data_len = 0;
  d.req = r;
  d.hdr_len = uint8_t(r.tlp != nullptr ? std::min<size_t>(r.len, sizeof d.hdr) : 0);
  if (d.hdr_len != 0) std::memcpy(d.hdr, r.tlp, d.hdr_len);
  d.req.tlp = nullptr;
  d.region = s.region;
  d.taken_ns = batch_t0;
  d.status = 0;
  d.resume = s.resume;
  d.data.clear();
  return (uint64_t(index) << 48) | (uint64_t(k) << 32) | d.gen;
}

void Lane::route_memory(size_t i, Slot& s, bool io) {
  const tlp::Tlp& t = s.t;
  const uint32_t len = uint32_t(t.length) * 4;
  const bool write = t.kind == Kind::MWr || t.kind == Kind::IOWr;
  const bool posted = t.kind == Kind::MWr;
  pci::DecodeResult d = io ? pci::decode_io(e->layout->bars, cs, uint32_t(t.address), len, io_en)
                           : pci::decode_memory(e->layout->bars, cs, t.address, len, mem_en);
  auto unsupported = [&] {
    if (posted) {
      s.action = Action::posted;
      s.status = uint8_t(CplStatus::UR);
      bump(unsupported_posted);
      log_slot_error(s, pci::RxError::unsupported_request, false);
    } else {
      answer(s, nullptr, 0, uint8_t(CplStatus::UR));
    }
  };
  if (d.status != pci::Decode::hit) return unsupported();
  const pci::MsixHit h = e->fn->msix_hit(d.bar, d.offset, len);
  if (h.region != pci::MsixRegion::none) {
    if (h.region == pci::MsixRegion::straddles) return unsupported();
    uint8_t* buf = rdata.data() + i * kMaxDataPerRequest;
    std::lock_guard<std::mutex> g(e->fn_mu);
    if (write) {
      e->fn->msix_write(d.bar, d.offset, t.data, len, t.first_be, t.length == 1 ? 0 : t.last_be);
      if (posted) s.action = Action::posted;
      else answer(s, nullptr, 0, uint8_t(CplStatus::SC));
    } else {
      e->fn->msix_read(d.bar, d.offset, len, buf);
      answer(s, buf, len, uint8_t(CplStatus::SC));
    }
    return;
  }
  const int ri = e->find_region(d.bar, d.offset, len);
  if (ri < 0) return unsupported();
  s.region = int16_t(ri);
  Region& r = *e->regions[size_t(ri)];
  const uint64_t off = d.offset - r.offset();
  RegionCountersA& c = rc[ri];
  if (write) {
    bump(c.writes);
    bump(c.write_bytes, len);
  } else {
    bump(c.reads);
    bump(c.read_bytes, len);
  }
  const bool batched = r.batched(off, len);
  if (!batched && items_have_write) run_handler();  // a read or write must not pass a write
  if (write) {
    // Registers update natively first, then a write hook sees the access.
    if (r.kind() != RegionKind::callback) r.write(off, t.data, len, t.first_be, t.length == 1 ? 0 : t.last_be);
    if (batched) return add_batch_item(i, s, r, uint32_t(ri), off, len, true);
    if (posted) s.action = Action::posted;
    else answer(s, nullptr, 0, uint8_t(CplStatus::SC));
    return;
  }
  if (batched) return add_batch_item(i, s, r, uint32_t(ri), off, len, false);
  uint8_t* buf = rdata.data() + i * kMaxDataPerRequest;
  if (!r.read(off, len, buf)) return answer(s, nullptr, 0, uint8_t(CplStatus::CA));
  answer(s, buf, len, uint8_t(CplStatus::SC));
}

// §2.7.2.2 (Rules for Use of Data Poisoning): the data of a poisoned write is never applied —
// not to memory, registers, a callback, the MSI-X table or configuration space. A poisoned
// Configuration or I/O Write is discarded and answered UR; a poisoned Memory Write is posted:
// discarded without a completion, logged as an Unsupported Request like a write to nothing.
// Poisoned reads carry no data and Messages are only counted: served as usual.
bool Lane::poisoned_write(Slot& s) {
  switch (s.t.kind) {
    case Kind::MWr:
      bump(poisoned);
      s.action = Action::posted;
      s.status = uint8_t(CplStatus::UR);
      bump(unsupported_posted);
      log_slot_error(s, pci::RxError::poisoned_tlp, false);
      return true;
    case Kind::IOWr:
    case Kind::CfgWr0:
    case Kind::CfgWr1:
      // §2.7.2.1: handled as a Poisoned TLP Received error; the UR is only the Completion's
      // status, so the error logged is the poison, not an Unsupported Request.
      bump(poisoned);
      log_slot_error(s, pci::RxError::poisoned_tlp, true);
      answer(s, nullptr, 0, uint8_t(CplStatus::UR), false);
      return true;
    default:
      return false;
  }
}

void Lane::process(size_t i) {
  Slot& s = slots[i];
  s = Slot{};
  const Request& r = reqs[i];
  if (r.flags & kRequestRedelivered) {
    bump(redelivered);
    if (r.flags & kRequestPublished) {
      // The dead claimer's answer reached the host: answering again would duplicate it.
      s.action = Action::retire_only;
      bump(published);
      return;
    }
  }
  const tlp::Status st = tlp::decode(r.tlp, r.len, &s.t);
  if (st != tlp::Status::ok) {
    s.action = Action::retire_only;
    s.status = kTraceMalformed;
    bump(malformed);
    log_error(pci::RxError::malformed_tlp, false, r.tlp, r.tlp != nullptr ? r.len : 0, &r);
    return;
  }
  const tlp::Tlp& t = s.t;
  if (r.flags & kRequestPartial) {
    // A dead claimer's answer was cut across doorbells (more completions than the page holds)
    // and the host has its first r.progress bytes: answer only the rest (answer()). Only a
    // memory read is answered in parts, and only at DW offsets inside it.
    if (t.kind != Kind::MRd || r.progress % 4 != 0 || r.progress >= uint32_t(t.length) * 4) {
      s.action = Action::retire_only;  // what the host has is unknown: neither duplicate nor guess
      s.status = kTraceMalformed;
      bump(malformed);
      return;
    }
    s.resume = r.progress;
    bump(partial);
  }
  bump(kinds[size_t(t.kind)]);
  // §2.2.2: a payload above the Max_Payload_Size programmed in Device Control is a Malformed
  // TLP, which receivers must check: not applied, no completion.
  if (tlp::has_data(t.kind) && uint32_t(t.length) * 4 > rx_max_payload) {
    s.action = Action::retire_only;
    s.status = kTraceMalformed;
    bump(malformed);
    log_error(pci::RxError::malformed_tlp, false, r.tlp, r.len, &r);
    return;
  }
  if (t.ep && poisoned_write(s)) return;
  switch (t.kind) {
    case Kind::MRd:
    case Kind::MWr:
      return route_memory(i, s, false);
    case Kind::IORd:
    case Kind::IOWr:
      return route_memory(i, s, true);
    case Kind::MRdLk:
      return answer(s, nullptr, 0, uint8_t(CplStatus::UR));
    case Kind::CfgRd0:
    case Kind::CfgWr0: {
      if ((t.dest_id & 7u) != 0) return answer(s, nullptr, 0, uint8_t(CplStatus::UR));
      const auto dw = uint16_t(t.address & 0xffc);
      if (t.kind == Kind::CfgRd0) {
        uint32_t v;
        {
          std::lock_guard<std::mutex> g(e->fn_mu);
          v = e->fn->config_read(dw);
        }
        uint8_t b[4] = {uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)};
        return answer(s, b, 4, uint8_t(CplStatus::SC));
      }
      uint32_t v = 0;
      std::memcpy(&v, t.data, 4);  // payload byte 0 is the register's byte 0 (little-endian)
      {
        std::lock_guard<std::mutex> g(e->fn_mu);
        e->fn->config_write(dw, v, t.first_be);
        // §2.2.6.2: capture the Bus and Device Numbers of every Type 0 write we complete.
        e->completer.store(uint32_t(t.dest_id & 0xfff8u), std::memory_order_relaxed);
        if (e->opt.completer_word != nullptr)  // relaxed: read by a successor after we stopped
          e->opt.completer_word->store(uint32_t(t.dest_id & 0xfff8u) + 1, std::memory_order_relaxed);
        e->cfg_gen.fetch_add(1, std::memory_order_release);  // release: after the write
      }
      bump(config_writes);
      refresh();  // later requests of this batch see the new enables and bases
      return answer(s, nullptr, 0, uint8_t(CplStatus::SC));
    }
    case Kind::CfgRd1:
    case Kind::CfgWr1:
      return answer(s, nullptr, 0, uint8_t(CplStatus::UR));
    case Kind::Msg:
    case Kind::MsgD:
      bump(messages);
      s.action = Action::posted;
      return;
    default:  // completions: the function has no request outstanding but MSI-X writes
      bump(unexpected);
      s.action = Action::retire_only;
      log_error(pci::RxError::unexpected_completion, false, r.tlp, r.len, &r);
      return;
  }
}

void Lane::run_handler() {
  if (nitems == 0) return;
  if (e->handler != nullptr) {
    bump(handler_batches);
    e->handler->run(items.data(), nitems);
  }
  finish_batched();
}

void Lane::finish_batched() {
  // Items map back to their slots: walk the slots that point at an item.
  for (size_t i = 0; i < batch; ++i) {
    Slot& s = slots[i];
    if (s.item < 0 || size_t(s.item) >= nitems || s.action != Action::deferred) continue;
    BatchItem& it = items[size_t(s.item)];
    s.item = -1;
    if (it.deferred_id == 0) {  // a posted write: the hook ran
      s.action = Action::posted;
      continue;
    }
    const uint32_t k = uint32_t(it.deferred_id >> 32) & 0xffff;
    Deferred& d = dslots[k];
    std::unique_lock<std::mutex> g(dmu);
    if (d.state == DState::ready) {  // answered during the call
      d.state = DState::free;
      dfree.push_back(k);
      const uint8_t status = d.status;
      uint8_t* buf = rdata.data() + i * kMaxDataPerRequest;
      if (status == uint8_t(CplStatus::SC) && !d.data.empty()) std::memcpy(buf, d.data.data(), d.data.size());
      g.unlock();
      answer(s, buf, s.t.kind == Kind::IOWr ? 0 : size_t(s.t.length) * 4, status);
      continue;
    }
    if (it.region->kind() == RegionKind::registers || it.write) {
      // Hooked registers answer from the register file once the hooks ran; an IOWr is done.
      d.state = DState::free;
      dfree.push_back(k);
      g.unlock();
      if (it.write) {
        answer(s, nullptr, 0, uint8_t(CplStatus::SC));
        continue;
      }
      uint8_t* buf = rdata.data() + i * kMaxDataPerRequest;
      it.region->read(it.offset, it.len, buf);
      answer(s, buf, it.len, uint8_t(CplStatus::SC));
      continue;
    }
    // Deferred: kept claimed until answered or expired.
    d.state = DState::pending;
    const auto* cr = static_cast<const CallbackRegion*>(it.region);
    const uint64_t us = cr->deadline_us() != 0 ? cr->deadline_us() : timeout_us;
    d.deadline_ns = batch_t0 + us * 1000;
    if (d.deadline_ns < next_expiry) next_expiry = d.deadline_ns;
    ++outstanding;
    g.unlock();
    bump(deferred);
    s.deferred = k;
  }
  nitems = 0;
  items_have_write = false;
}

void Lane::build_deferred(Deferred& d, uint32_t k) {
  // Publish the answer (or the CA of an expiry) of deferred slot k with this round's batch.
  if (nextra >= extra.size()) return;
  Slot& s = extra_slots[nextra];
  s = Slot{};
  s.t = d.t;
  s.region = d.region;
  s.resume = d.resume;
  extra[nextra] = d.req;
  const size_t len = d.status == uint8_t(CplStatus::SC) ? size_t(d.t.length) * 4 : 0;
  s.deferred = k;  // before answer(): a CA's Header Log comes from d
  answer(s, len != 0 ? d.data.data() : nullptr, len, d.status);
  ++nextra;
}

void Lane::housekeeping() {
  nextra = 0;
  // MSI-X messages (lane 0): a DWORD MWr of `data` to `address` (§7.7.2), requester = us.
  if (index == 0 && e->irq_pending.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> g(e->irq_mu);
    e->irq_pending.store(false, std::memory_order_relaxed);  // relaxed: under irq_mu
    for (const auto& m : e->irq_q) {
      if (out.size() - out_used < 32 || ncpl >= cpl_start.size()) break;
      tlp::Tlp w;
      w.kind = Kind::MWr;
      w.length = 1;
      w.first_be = 0xf;
      w.requester_id = uint16_t(e->completer.load(std::memory_order_relaxed));
      w.address = m.first;
      uint8_t payload[4] = {uint8_t(m.second), uint8_t(m.second >> 8), uint8_t(m.second >> 16), uint8_t(m.second >> 24)};
      w.data = payload;
      w.data_len = 4;
      tlp::set_format(&w);
      size_t n = 0;
      if (tlp::encode(w, out.data() + out_used, out.size() - out_used, &n) != tlp::Status::ok) continue;
      cpl_start[ncpl] = uint32_t(out_used);
      cpl_len[ncpl] = uint32_t(n);
      ++ncpl;
      ++nirq;
      out_used += n;
      bump(interrupts);
    }
    e->irq_q.clear();
  }
  if (!dready_flag.load(std::memory_order_acquire) && next_expiry == UINT64_MAX) return;
  const uint64_t now = now_ns();
  std::lock_guard<std::mutex> g(dmu);
  dready_flag.store(false, std::memory_order_relaxed);  // relaxed: under dmu
  size_t keep = 0;
  for (size_t j = 0; j < dready.size(); ++j) {
    const uint32_t k = dready[j];
    if (nextra >= extra.size()) {
      dready[keep++] = k;  // next round
      continue;
    }
    build_deferred(dslots[k], k);
    bump(deferred_completed);
  }
  dready.resize(keep);
  if (keep != 0) dready_flag.store(true, std::memory_order_relaxed);
  if (now >= next_expiry) {
    next_expiry = UINT64_MAX;
    for (uint32_t k = 0; k < dslots.size(); ++k) {
      Deferred& d = dslots[k];
      if (d.state != DState::pending) continue;
      if (d.deadline_ns > now) {
        next_expiry = std::min(next_expiry, d.deadline_ns);
        continue;
      }
      if (nextra >= extra.size()) {
        next_expiry = now;
        break;
      }
      d.state = DState::ready;
      d.status = uint8_t(CplStatus::CA);
      build_deferred(d, k);
      bump(deferred_expired);
    }
  }
}

void Lane::publish(size_t lo, size_t hi) {
  // Mark every answered request with the doorbell count its last completion reaches, in
  // record order, before those records are written; then write them, then retire.
  // An answer longer than one doorbell (group_max) goes in chunks, each under one doorbell and
  // marked with its progress ("the first `before` bytes are out; `after` once the doorbell
  // reaches the chunk's end") before that doorbell: a successor answers only what is missing.
  const uint64_t base = gw ? gw->published() : 0;
  const size_t gmax = gw ? gw->group_max() : SIZE_MAX;
  size_t nrec = 0, nremark = 0;
  const uint32_t page = var->page_id();
  auto bytes = [&](const Slot& s, size_t k0, size_t k1) {
    uint32_t b = 0;
    for (size_t k = k0; k < k1; ++k) b += cpl_payload(out.data() + cpl_start[s.cpl_first + k]);
    return b;
  };
  auto mark = [&](const Request& r, Slot& s) {
    if (s.action != Action::answer || s.ncpl == 0) return;
    const size_t n = s.ncpl;
    const size_t first = std::min(n, gmax);
    const uint32_t after = first == n ? kProgressAll : s.resume + bytes(s, 0, first);
    const int rc2 = src->mark(r, page, base + nrec + first, s.resume, after);
    if (rc2 != 0) {
      bump(stale);
      s.action = Action::retire_only;  // discarded (a new host epoch): nothing to answer
      return;
    }
    const size_t start = nrec;
    for (uint32_t k = 0; k < s.ncpl; ++k) {
      rec_off[nrec] = cpl_start[s.cpl_first + k];
      rec_len[nrec] = cpl_len[s.cpl_first + k];
      ++nrec;
    }
    s.seq = base + nrec;
    uint32_t done = s.resume;
    for (size_t k0 = 0; k0 < n;) {  // one doorbell per chunk (one chunk unless split)
      const size_t k1 = std::min(n, k0 + gmax);
      const uint32_t b = bytes(s, k0, k1);
      grp_remark[ngrp] = -1;
      if (k0 != 0) {
        remarks[nremark] = Remark{&r, base + start + k1, done, k1 == n ? kProgressAll : done + b};
        grp_remark[ngrp] = int32_t(nremark++);
      }
      done += b;
      grp_end[ngrp++] = uint32_t(start + k1);
      k0 = k1;
    }
  };
  ngrp = 0;
  // MSI-X messages first (they were built first and answer no request).
  for (size_t k = 0; k < nirq; ++k) {
    rec_off[nrec] = cpl_start[k];
    rec_len[nrec] = cpl_len[k];
    ++nrec;
    grp_remark[ngrp] = -1;
    grp_end[ngrp++] = uint32_t(nrec);
  }
  for (size_t i = 0; i < nextra; ++i) mark(extra[i], extra_slots[i]);
  for (size_t i = lo; i < hi; ++i) mark(reqs[i], slots[i]);
  write_records(nrec);
  const uint64_t t1 = now_ns();
  auto finish = [&](size_t i, const Request& r, Slot& s, bool is_extra) {
    if (s.action == Action::deferred || s.action == Action::keep) {
      if (!is_extra) trace(i, s, 0);
      return;
    }
    if (s.action == Action::answer && s.ncpl != 0 && (!gw || gw->published() < s.seq))
      return;  // not in the page (stopped while the host did not consume): stays claimed

    const int rc2 = src->retire(r);
    if (rc2 != 0) bump(stale);
    bump(completions, s.ncpl);
    if (first_answer.load(std::memory_order_relaxed) == 0) {
      first_answer.store(t1, std::memory_order_relaxed);
      e->answered_bell.fetch_add(1, std::memory_order_release);
      futex_wake(e->answered_bell);  // once per (re)start: off the hot path
    }
    const uint64_t lat_ns = t1 - (is_extra ? 0 : batch_t0);
    if (!is_extra) {
      const unsigned b = lat_ns == 0 ? 0 : unsigned(63 - __builtin_clzll(lat_ns));
      bump(lat[std::min<unsigned>(b, kLatencyBuckets - 1)]);
      trace(i, s, lat_ns);
    }
    if (is_extra && s.deferred != UINT32_MAX) {
      std::lock_guard<std::mutex> g(dmu);
      Deferred& d = dslots[s.deferred];
      d.state = DState::free;
      dfree.push_back(s.deferred);
      --outstanding;
    }
  };
  for (size_t i = 0; i < nextra; ++i) finish(batch, extra[i], extra_slots[i], true);
  for (size_t i = lo; i < hi; ++i) finish(i, reqs[i], slots[i], false);
  deferred_open.store(outstanding, std::memory_order_relaxed);
  const auto open32 = uint32_t(std::min<uint64_t>(outstanding, UINT32_MAX));
  if (open_word.load(std::memory_order_relaxed) != open32) {
    open_word.store(open32, std::memory_order_release);  // release: the answers are published
    futex_wake(open_word);
  }
  out_used = 0;
  ncpl = 0;
  nextra = 0;
  nirq = 0;
}

void Lane::write_records(size_t nrec) {
  size_t done = 0, g = 0, remarked = 0;  // groups [0, remarked) had their re-mark made
  const uint32_t page = var->page_id();
  while (done < nrec && gw) {
    // Group ends relative to `done`: a group (a request's completions, or one chunk of an
    // answer longer than one doorbell) never straddles two doorbells, so a successor's
    // "doorbell >= mark" is all or nothing for what the mark names.
    while (g < ngrp && grp_end[g] <= done) ++g;
    if (g < ngrp && grp_remark[g] >= 0 && remarked <= g) {
      // The previous chunk's doorbell is rung (done is past it): this chunk's progress now.
      // A failure is a request discarded by a new host epoch: its records still go out, so
      // that the doorbell counts every later mark of this round names stay true.
      const Remark& m = remarks[size_t(grp_remark[g])];
      if (src->mark(*m.r, page, m.seq, m.before, m.after) != 0) bump(stale);
      remarked = g + 1;
    }
    size_t stop = g + 1;  // up to the next group that must be re-marked first
    while (stop < ngrp && grp_remark[stop] < 0) ++stop;
    const size_t limit = stop < ngrp ? grp_end[stop - 1] : nrec;
    size_t m = 0;
    for (size_t h = g; h < stop; ++h) grp_rel[m++] = uint32_t(grp_end[h] - done);
    // Bounded waits so that a stop is noticed while the host does not consume.
    done += gw->write_groups(out.data(), rec_off.data() + done, rec_len.data() + done, limit - done,
                             grp_rel.data(), m, Deadline::after(std::chrono::milliseconds(100)));
    if (done < nrec && (want_stop() || gw->closed())) break;
  }
}

namespace {
// A non-posted write (CfgWr0/1, IOWr: Fmt/Type bytes 0x44, 0x45, 0x42) changes state the
// requests before it may read.
bool nonposted_write(const Request& r) noexcept {
  const uint8_t ft = r.len != 0 ? r.tlp[0] : 0;
  return ft == 0x44 || ft == 0x45 || ft == 0x42;
}
}  // namespace

void Lane::serve_batch(size_t n) {
  batch_t0 = now_ns();
  bump(batches);
  if (e->cfg_gen.load(std::memory_order_acquire) != gen) refresh();  // acquire: see refresh()
  for (size_t i = 0; i < batch; ++i) slots[i] = Slot{};  // finish_batched() walks them all
  // Served and published in rounds that end before each non-posted write: if this process
  // dies between rounds, a successor answers a redelivered read against the state the read
  // saw, never against a write that came after it (the write is not applied before every
  // earlier answer is in the page). Posted writes (MWr) may pass reads (PCIe Base 6.x §2.4.1,
  // Table 2-40 A2), so they do not end a round.
  size_t lo = 0;
  while (lo < n) {
    size_t hi = lo + 1;
    while (hi < n && !nonposted_write(reqs[hi])) ++hi;
    serve_range(lo, hi);
    publish(lo, hi);
    lo = hi;
  }
}

void Lane::serve_range(size_t lo, size_t hi) {
  nitems = 0;
  items_have_write = false;
  for (size_t i = lo; i < hi; ++i) process(i);
  run_handler();
}

void Lane::run() noexcept {
  try {
    for (bool told = false;;) {  // parked until start() (spawned early: add_detached_lane, attach)
      const uint32_t seen = bell.load(std::memory_order_acquire);  // acquire: the command
      if (cmd.load(std::memory_order_acquire) != kCmdHold) break;
      if (!told) {
        // The spawner waits for this (park_lanes): a thread that has run once and sleeps
        // here is woken by start() at once, while a thread the scheduler has not run yet
        // may wait for a tick — milliseconds, inside a handover's pause.
        ack.store(kCmdHold, std::memory_order_release);
        futex_wake(ack);
        told = true;
      }
      wait_bell(seen);
    }
    refresh();
    // A successor first takes every request a dead claimer left, before it writes to any
    // page: the source judges "published" against the doorbells the dead claimer left.
    for (size_t n; !want_stop() && (n = src->recover(reqs.data(), batch)) != 0;) {
      serve_batch(n);
    }
    for (;;) {
      const uint32_t c = cmd.load(std::memory_order_acquire);  // acquire: the command's data
      if (c == kCmdStop) break;
      if (c == kCmdRelease && gw) {
        try {
          gw->close(std::chrono::seconds(1));
        } catch (const std::exception& ex) {
          error = ex.what();  // records the host did not take: counted in the gateway's lost
        }
        gw.reset();
      }
      if (c == kCmdReattach && !gw) {
        GatewayOptions o;
        o.direct = true;
        gw = Gateway::open(var, nullptr, o);
        refresh();
      }
      if (c != kCmdRun) {
        const uint32_t seen = bell.load(std::memory_order_acquire);
        if (gw) {
          housekeeping();
          if (nextra != 0 || ncpl != 0) publish(0, 0);
        }
        ack.store(c, std::memory_order_release);  // release: everything before is done
        futex_wake(ack);
        // A handover's commands come in quick succession (pause, release): look for the next
        // one briefly before sleeping, so that it does not wait for this thread's wake-up.
        for (const uint64_t until = now_ns() + kAckSpinNs;
             cmd.load(std::memory_order_acquire) == c && now_ns() < until;)
          ring_detail::cpu_relax();
        if (cmd.load(std::memory_order_acquire) == c) wait_bell(seen);
        continue;
      }
      ack.store(kCmdRun, std::memory_order_release);
      housekeeping();
      const uint64_t now = now_ns();
      Deadline d = Deadline::after(std::chrono::milliseconds(200));
      if (next_expiry != UINT64_MAX)
        d = d.earliest(Deadline::after(std::chrono::nanoseconds(next_expiry > now ? next_expiry - now : 0)));
      size_t n = 0;
      const size_t want = take_limit();
      if (nextra == 0 && ncpl == 0 && !dready_flag.load(std::memory_order_acquire)) n = src->take(reqs.data(), want, d);
      else n = src->take(reqs.data(), want, Deadline::poll());
      if (n != 0) serve_batch(n);
      else if (nextra != 0 || ncpl != 0) publish(0, 0);
    }
    // Stopping: answer every deferred request still open with Completer Abort (the host
    // would otherwise wait for its completion timeout), as far as the page takes them.
    for (int round = 0; round < 64 && outstanding != 0 && gw; ++round) {
      {
        std::lock_guard<std::mutex> g(dmu);
        for (Deferred& d : dslots)
          if (d.state == DState::pending) d.deadline_ns = 0;
        next_expiry = 0;
      }
      housekeeping();
      if (nextra == 0 && ncpl == 0) break;
      publish(0, 0);
    }
  } catch (const std::exception& ex) {
    error = ex.what();
  }
  ack.store(kCmdStop, std::memory_order_release);
  futex_wake(ack);
}

// ---------------------------------------------------------------- Engine

Engine::Engine(std::shared_ptr<const pci::FunctionLayout> layout, std::vector<std::shared_ptr<Region>> regions,
               const EngineOptions& options, pci::FunctionState* state, pci::Function::Adopt adopt)
    : impl_(std::make_unique<Impl>(std::move(layout), std::move(regions), options, state, adopt)) {
  impl_->irq_q.reserve(4096);
}

Engine::~Engine() { stop(); }

void Engine::add_lane(std::shared_ptr<Gateway> gateway, std::unique_ptr<RequestSource> source) {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStateCreated) engine_error("add lane", EBUSY, "the engine was started");
  if (!gateway || !source) engine_error("add lane", EINVAL, "no gateway or no request source");
  if (!gateway->direct()) engine_error("add lane", EINVAL, "the gateway must be a direct-mode gateway (the lane writes it)");
  if (gateway->max_record() < 128 + 16)
    engine_error("add lane", EINVAL, "gateway records of " + std::to_string(gateway->max_record()) +
                                         " bytes cannot hold a 128-byte completion payload (use slots of 256 bytes or more)");
  if (impl_->lanes.size() >= 64) engine_error("add lane", EINVAL, "more than 64 lanes");
  impl_->lanes.push_back(std::make_unique<Lane>(impl_.get(), uint32_t(impl_->lanes.size()), nullptr, std::move(gateway),
                                                std::move(source)));
}

// Until the thread just spawned for `l` has run and parked (Lane::run), at most 1 s.
static void wait_parked(Lane& l) noexcept {
  const Deadline d = Deadline::after(std::chrono::seconds(1));
  for (;;) {
    const uint32_t a = l.ack.load(std::memory_order_acquire);
    if (a == kCmdHold || a == kCmdStop) return;
    // Blocking point: the new thread stores ack and wakes us.
    if (!futex_wait(l.ack, a, d)) return;
  }
}

void Engine::add_detached_lane(std::shared_ptr<Var> var, std::unique_ptr<RequestSource> source) {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStateCreated) engine_error("add lane", EBUSY, "the engine was started");
  if (!var || !source) engine_error("add lane", EINVAL, "no VAR or no request source");
  if (impl_->lanes.size() >= 64) engine_error("add lane", EINVAL, "more than 64 lanes");
  impl_->lanes.push_back(std::make_unique<Lane>(impl_.get(), uint32_t(impl_->lanes.size()), std::move(var), nullptr,
                                                std::move(source)));
  // A detached lane is a successor's, built before it asks for a handover: its thread is
  // created now and parked until start(), so creating and scheduling it is not part of the
  // handover's pause (docs/handover.md). Parked, it touches nothing but cmd and bell.
  Lane* p = impl_->lanes.back().get();
  p->cmd.store(kCmdHold, std::memory_order_relaxed);  // relaxed: the thread starts after it
  try {
    p->th = spawn("add lane", [p] { p->run(); });
  } catch (const Error&) {
    impl_->lanes.pop_back();
    throw;
  }
  wait_parked(*p);
}

static void stop_locked(Engine::Impl& impl) noexcept;

void Engine::attach_gateways() {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStateCreated) engine_error("attach gateways", EBUSY, std::string("the engine is ") + state() + ", not created");
  for (auto& l : impl_->lanes) {
    if (l->gw) continue;
    GatewayOptions o;
    o.direct = true;
    auto gw = Gateway::open(l->var, nullptr, o);  // EBUSY while another process commits to the page
    if (gw->max_record() < 128 + 16)
      engine_error("attach gateways", EINVAL, "gateway records of " + std::to_string(gw->max_record()) +
                                                  " bytes cannot hold a 128-byte completion payload");
    l->gw = std::move(gw);
  }
  // Lanes added with a gateway get their threads now, parked until start() (detached lanes
  // have theirs since add_detached_lane).
  for (auto& l : impl_->lanes) {
    if (l->th.joinable()) continue;
    Lane* p = l.get();
    p->cmd.store(kCmdHold, std::memory_order_relaxed);  // relaxed: the thread starts after it
    try {
      p->th = spawn("attach gateways", [p] { p->run(); });
    } catch (const Error&) {
      stop_locked(*impl_);  // nothing left parked behind a failed attach
      throw;
    }
    wait_parked(*p);
  }
}

void Engine::adopt_state(pci::FunctionState* st, std::atomic<uint32_t>* completer_word) {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStateCreated) engine_error("adopt state", EBUSY, std::string("the engine is ") + state());
  if (st == nullptr) engine_error("adopt state", EINVAL, "no state");
  auto f = std::make_unique<pci::Function>(impl_->layout, &impl_->sink, st, pci::Function::Adopt::keep);
  std::lock_guard<std::mutex> fg(impl_->fn_mu);
  impl_->fn = std::move(f);
  impl_->opt.completer_word = completer_word;  // read by start(): no lane runs yet
  impl_->cfg_gen.fetch_add(1, std::memory_order_release);  // release: lanes refresh after it
}

void Engine::set_batch_handler(BatchHandler* handler) noexcept { impl_->handler = handler; }

// Under ctl_mu. A lane that was never started has no thread to join.
static void stop_locked(Engine::Impl& impl) noexcept {
  for (auto& l : impl.lanes) {
    l->cmd.store(kCmdStop, std::memory_order_release);
    l->poke();
  }
  for (auto& l : impl.lanes) {
    if (l->th.joinable()) l->th.join();
    if (l->gw) {
      try {
        l->gw->close(std::chrono::seconds(1));
      } catch (...) {
        // Records the host never took are counted in the gateway's stats (lost).
      }
    }
  }
  impl.state.store(kStateStopped);
  // A thread in wait_first_answer() (no ctl_mu) would otherwise sleep until its deadline —
  // forever for none — on an engine its owner is about to destroy: wake it to see "stopped".
  impl.answered_bell.fetch_add(1, std::memory_order_release);
  futex_wake(impl.answered_bell);
}

void Engine::start() {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStateCreated) engine_error("start engine", EBUSY, std::string("the engine is ") + state());
  if (impl_->lanes.empty()) engine_error("start engine", EINVAL, "no lanes (add a gateway page and a request source)");
  for (auto& l : impl_->lanes)
    if (!l->gw) engine_error("start engine", EINVAL, "a lane has no gateway: attach_gateways() first");
  if (impl_->opt.completer_word != nullptr) {
    // A predecessor may have captured its Bus/Device Numbers after this engine was built.
    const uint32_t w = impl_->opt.completer_word->load(std::memory_order_relaxed);
    if (w != 0) impl_->completer.store((w - 1) & 0xfff8u, std::memory_order_relaxed);
  }
  impl_->lean.store(false, std::memory_order_relaxed);
  for (size_t i = 0; i < impl_->lanes.size(); ++i) {
    Lane* p = impl_->lanes[i].get();
    p->first_answer.store(0, std::memory_order_relaxed);
    if (p->th.joinable()) {  // parked by attach_gateways(): just let it go
      p->cmd.store(kCmdRun, std::memory_order_release);  // release: the state adopted before
      p->poke();
      continue;
    }
    try {
      p->th = spawn("start engine", [p] { p->run(); });
    } catch (const Error&) {
      // The lanes already running are stopped and joined, never left behind a failed start:
      // the engine ends stopped, its gateways closed, as after stop().
      stop_locked(*impl_);
      throw;
    }
  }
  impl_->state.store(kStateRunning);
}

namespace {
// Tells lane `l` to carry out `c` (ctl_mu held). Its last acknowledgement is cleared first,
// unless it has stopped: a lane resumed after an acknowledged pause keeps showing that
// acknowledgement until it runs again, and wait_acks() for the next pause would take it for
// the new one (and report paused a lane about to take a batch). Only a lane carrying out `c`
// stores `c` after this.
void command(Lane& l, uint32_t c) noexcept {
  uint32_t a = l.ack.load(std::memory_order_relaxed);
  while (a != kCmdStop && !l.ack.compare_exchange_weak(a, kAckNone, std::memory_order_relaxed)) {
  }
  l.cmd.store(c, std::memory_order_release);  // release: the cleared ack (and the command's data)
  l.poke();
}

bool wait_acks(std::vector<std::unique_ptr<Lane>>& lanes, uint32_t want, Deadline deadline) {
  // A lane acknowledges a command within microseconds when it runs (it was woken, or spun on
  // its request source): poll for that long before sleeping, so that the commands of a
  // handover's pause (pause, release) do not each add a wake-up of this thread — on a loaded
  // machine with a non-preemptible kernel that is tens of microseconds at p50, more in the tail.
  const uint64_t spin_until = now_ns() + kAckSpinNs;
  for (auto& l : lanes) {
    for (uint32_t a; (a = l->ack.load(std::memory_order_acquire)) != want && a != kCmdStop &&
                     now_ns() < spin_until;)
      ring_detail::cpu_relax();
    for (;;) {
      const uint32_t a = l->ack.load(std::memory_order_acquire);  // acquire: the lane's work
      if (a == want || a == kCmdStop) break;
      // Blocking point: the lane stores ack and wakes us.
      if (!futex_wait(l->ack, a, deadline.earliest(Deadline::after(std::chrono::milliseconds(20))))) {
        if (deadline.expired()) return false;
      }
    }
  }
  return true;
}
}  // namespace

bool Engine::pause(Deadline deadline) {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  const int st = impl_->state.load();
  if (st == kStatePaused) return true;
  if (st != kStateRunning) engine_error("pause engine", EINVAL, std::string("the engine is ") + state());
  for (auto& l : impl_->lanes) command(*l, kCmdPause);
  if (!wait_acks(impl_->lanes, kCmdPause, deadline)) return false;
  impl_->state.store(kStatePaused);
  return true;
}

void Engine::set_lean(bool on) noexcept { impl_->lean.store(on, std::memory_order_relaxed); }

void Engine::resume() {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  const int st = impl_->state.load();
  if (st == kStateRunning) {
    // A pause() that timed out left its command with the lanes (the engine "still pausing"):
    // take it back, or each lane would pause as soon as it could and stay paused — a primary
    // whose planned handover aborted at the pause stopped answering for good.
    for (auto& l : impl_->lanes) {
      if (l->cmd.load(std::memory_order_acquire) == kCmdPause) {
        l->cmd.store(kCmdRun, std::memory_order_release);
        l->poke();
      }
    }
    return;
  }
  if (st != kStatePaused) engine_error("resume engine", EINVAL, std::string("the engine is ") + state());
  for (auto& l : impl_->lanes)
    if (!l->gw) engine_error("resume engine", EINVAL, "the gateways were released: reattach_gateways() first");
  for (auto& l : impl_->lanes) {
    l->first_answer.store(0, std::memory_order_relaxed);  // relaxed: the command publishes it
    l->cmd.store(kCmdRun, std::memory_order_release);
    l->poke();
  }
  impl_->state.store(kStateRunning);
}

bool Engine::drain_deferred(Deadline deadline) {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStatePaused) engine_error("drain deferred requests", EBUSY, std::string("the engine is ") + state() + ", not paused");
  for (auto& l : impl_->lanes) {
    for (;;) {
      const uint32_t v = l->open_word.load(std::memory_order_acquire);  // acquire: their answers
      if (v == 0) break;
      if (!l->gw) return false;  // released: nothing can be published any more
      l->poke();  // a paused lane publishes answers and expiries when woken
      // Blocking point: the lane stores open_word and wakes us; bounded so expiries are seen.
      if (!futex_wait(l->open_word, v, deadline.earliest(Deadline::after(std::chrono::milliseconds(5)))) &&
          deadline.expired())
        return false;
    }
  }
  return true;
}

uint64_t Engine::first_answer_ns() const noexcept {
  uint64_t best = 0;
  for (const auto& l : impl_->lanes) {
    const uint64_t t = l->first_answer.load(std::memory_order_relaxed);
    if (t != 0 && (best == 0 || t < best)) best = t;
  }
  return best;
}

uint64_t Engine::answered() const noexcept {
  uint64_t n = 0;
  for (const auto& l : impl_->lanes)
    for (const Counter& c : l->lat) n += c.load(std::memory_order_relaxed);  // relaxed: a count
  return n;
}

uint64_t Engine::wait_first_answer(Deadline deadline) const noexcept {
  for (;;) {
    const uint32_t seen = impl_->answered_bell.load(std::memory_order_acquire);
    const uint64_t t = first_answer_ns();
    if (t != 0) return t;
    // Stopped: no lane will answer again. stop() rings the bell after storing the state, so a
    // waiter that loaded `seen` before the ring does not sleep through it (the futex compares).
    if (impl_->state.load() == kStateStopped) return 0;
    // Blocking point: until a lane's first answer wakes the bell, or the deadline.
    if (!futex_wait(impl_->answered_bell, seen, deadline)) return first_answer_ns();
  }
}

void Engine::release_gateways(std::chrono::nanoseconds) {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStatePaused) engine_error("release gateways", EBUSY, std::string("the engine is ") + state() + ", not paused");
  for (auto& l : impl_->lanes) command(*l, kCmdRelease);
  wait_acks(impl_->lanes, kCmdRelease, Deadline::never());
}

void Engine::reattach_gateways() {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() != kStatePaused) engine_error("reattach gateways", EBUSY, std::string("the engine is ") + state() + ", not paused");
  for (auto& l : impl_->lanes) command(*l, kCmdReattach);
  wait_acks(impl_->lanes, kCmdReattach, Deadline::never());
  for (auto& l : impl_->lanes) l->first_answer.store(0, std::memory_order_relaxed);
  std::string err;
  for (auto& l : impl_->lanes)
    if (!l->gw) err = l->error.empty() ? "a lane could not reopen its gateway" : l->error;
  for (auto& l : impl_->lanes) command(*l, kCmdPause);
  wait_acks(impl_->lanes, kCmdPause, Deadline::never());
  if (!err.empty()) throw Error(ErrorKind::generic, "reattach gateways", EIO, err);
}

void Engine::stop() noexcept {
  std::lock_guard<std::mutex> g(impl_->ctl_mu);
  if (impl_->state.load() == kStateStopped) return;
  stop_locked(*impl_);
}

const char* Engine::state() const noexcept {
  switch (impl_->state.load()) {
    case kStateCreated: return "created";
    case kStateRunning: return "running";
    case kStatePaused: return "paused";
    default: return "stopped";
  }
}

size_t Engine::lanes() const noexcept { return impl_->lanes.size(); }

namespace {
// The one path that answers a deferred request: find it by `id` (lane, slot, generation),
// let `answer` fill it under the lane's lock (a non-zero errno refuses and changes nothing),
// mark it ready and, if the lane already parked it as pending, queue it and wake the lane.
template <typename Answer>
int finish_deferred(std::vector<std::unique_ptr<Lane>>& lanes, uint64_t id,
                    Answer&& answer) noexcept {
  const size_t lane = size_t(id >> 48), k = size_t(id >> 32) & 0xffff;
  if (lane >= lanes.size()) return ENOENT;
  Lane& l = *lanes[lane];
  if (k >= l.dslots.size()) return ENOENT;
  bool wake = false;
  {
    std::lock_guard<std::mutex> g(l.dmu);
    Deferred& d = l.dslots[k];
    if (d.gen != uint32_t(id) || (d.state != DState::in_call && d.state != DState::pending)) return ENOENT;
    if (const int err = answer(d)) return err;
    if (d.state == DState::pending) {
      l.dready.push_back(uint32_t(k));  // capacity reserved for every slot
      wake = true;
    }
    d.state = DState::ready;
  }
  if (wake) {
    l.dready_flag.store(true, std::memory_order_release);  // release: after the entry
    l.poke();
  }
  return 0;
}
}  // namespace

int Engine::complete_deferred(uint64_t id, const uint8_t* data, size_t len) noexcept {
  return finish_deferred(impl_->lanes, id, [&](Deferred& d) noexcept -> int {
    const size_t want = d.t.kind == Kind::IOWr ? 0 : size_t(d.t.length) * 4;
    if (len != want) return EINVAL;
    try {
      d.data.assign(data, data + len);
    } catch (...) {
      return ENOMEM;
    }
    d.status = uint8_t(CplStatus::SC);
    return 0;
  });
}

int Engine::fail_deferred(uint64_t id, uint8_t status) noexcept {
  if (status != uint8_t(CplStatus::UR) && status != uint8_t(CplStatus::CA)) return EINVAL;
  return finish_deferred(impl_->lanes, id, [&](Deferred& d) noexcept -> int {
    d.status = status;
    return 0;
  });
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.regions.resize(impl_->regions.size());
  auto ld = [](const Counter& c) { return c.load(std::memory_order_relaxed); };
  for (const auto& lp : impl_->lanes) {
    const Lane& l = *lp;
    for (size_t k = 0; k < tlp::kKindCount; ++k) s.requests[k] += ld(l.kinds[k]);
    s.batches += ld(l.batches);
    s.completions += ld(l.completions);
    s.ur += ld(l.ur);
    s.ca += ld(l.ca);
    s.unsupported_posted += ld(l.unsupported_posted);
    s.malformed += ld(l.malformed);
    s.poisoned += ld(l.poisoned);
    s.unexpected_completions += ld(l.unexpected);
    s.messages += ld(l.messages);
    s.redelivered += ld(l.redelivered);
    s.already_published += ld(l.published);
    s.partly_published += ld(l.partial);
    s.stale += ld(l.stale);
    s.deferred += ld(l.deferred);
    s.deferred_completed += ld(l.deferred_completed);
    s.deferred_expired += ld(l.deferred_expired);
    s.deferred_outstanding += ld(l.deferred_open);
    s.handler_batches += ld(l.handler_batches);
    s.interrupts += ld(l.interrupts);
    s.config_writes += ld(l.config_writes);
    s.err_cor_unsent += ld(l.err_cor_unsent);
    s.err_nonfatal_unsent += ld(l.err_nonfatal_unsent);
    s.err_fatal_unsent += ld(l.err_fatal_unsent);
    s.errors_logged_before += ld(l.logged_before);
    for (size_t b = 0; b < kLatencyBuckets; ++b) s.latency_ns_log2[b] += ld(l.lat[b]);
    for (size_t r = 0; r < impl_->regions.size(); ++r) {
      s.regions[r].reads += ld(l.rc[r].reads);
      s.regions[r].writes += ld(l.rc[r].writes);
      s.regions[r].read_bytes += ld(l.rc[r].read_bytes);
      s.regions[r].write_bytes += ld(l.rc[r].write_bytes);
      s.regions[r].batched += ld(l.rc[r].batched);
    }
  }
  for (size_t r = 0; r < impl_->regions.size(); ++r) s.regions[r].backing_lost = impl_->regions[r]->backing_lost();
  return s;
}

namespace {
struct TraceFileHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t entry_bytes;
  uint64_t entries;
};
static_assert(sizeof(TraceFileHeader) == 16, "the documented trace header is 16 bytes");
}  // namespace

size_t Engine::trace_dump(const std::string& path) const {
  std::vector<TraceEntry> all;
  for (const auto& lp : impl_->lanes) {
    const Lane& l = *lp;
    if (l.trace_n == 0) continue;
    const uint64_t head = l.trace_head.load(std::memory_order_acquire);  // acquire: the entries
    const uint64_t first = head > l.trace_n ? head - l.trace_n : 0;
    std::vector<TraceEntry> mine;
    for (uint64_t h = first; h < head; ++h) {
      uint64_t w[8];
      const std::atomic<uint64_t>* src = &l.trace_words[(h & (l.trace_n - 1)) * 8];
      for (int k = 0; k < 8; ++k) w[k] = src[k].load(std::memory_order_relaxed);  // relaxed: checked below
      TraceEntry t;
      std::memcpy(&t, w, sizeof t);
      mine.push_back(t);
    }
    // Seqlock-style: entries the lane overwrote while we copied are dropped.
    const uint64_t head2 = l.trace_head.load(std::memory_order_acquire);
    const uint64_t valid_from = head2 > l.trace_n ? head2 - l.trace_n : 0;
    const size_t skip = valid_from > first ? size_t(std::min<uint64_t>(valid_from - first, mine.size())) : 0;
    all.insert(all.end(), mine.begin() + long(skip), mine.end());
  }
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd) throw_errno("dump trace to '" + path + "'", errno_or_eio(), false, "open");
  TraceFileHeader h{kTraceMagic, kTraceVersion, uint16_t(sizeof(TraceEntry)), all.size()};
  auto put = [&](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    while (n != 0) {
      const ssize_t w = ::write(fd.get(), b, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw_errno("dump trace to '" + path + "'", errno_or_eio(), false, "write");
      }
      b += w;
      n -= size_t(w);
    }
  };
  put(&h, sizeof h);
  if (!all.empty()) put(all.data(), all.size() * sizeof(TraceEntry));
  return all.size();
}

std::vector<TraceEntry> read_trace(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw_errno("read trace '" + path + "'", errno_or_eio(), false, "open");
  std::vector<uint8_t> bytes;
  uint8_t buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("read trace '" + path + "'", errno_or_eio(), false, "read");
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), buf, buf + n);
  }
  TraceFileHeader h{};
  if (bytes.size() < sizeof h) throw Error(ErrorKind::invalid_argument, "read trace", EPROTO, "'" + path + "' is shorter than the 16-byte header");
  std::memcpy(&h, bytes.data(), sizeof h);
  if (h.magic != kTraceMagic) throw Error(ErrorKind::invalid_argument, "read trace", EPROTO, "'" + path + "' is not an mlx5tlp trace (bad magic)");
  if (h.version != kTraceVersion || h.entry_bytes != sizeof(TraceEntry))
    throw Error(ErrorKind::invalid_argument, "read trace", EPROTO,
                "'" + path + "' is trace version " + std::to_string(h.version) + " with " + std::to_string(h.entry_bytes) +
                    "-byte entries; this build reads version 1, 64-byte entries");
  if (h.entries != (bytes.size() - sizeof h) / sizeof(TraceEntry) || (bytes.size() - sizeof h) % sizeof(TraceEntry) != 0)
    throw Error(ErrorKind::invalid_argument, "read trace", EPROTO,
                "'" + path + "' says " + std::to_string(h.entries) + " entries but holds " + std::to_string(bytes.size() - sizeof h) + " bytes after the header");
  std::vector<TraceEntry> out(h.entries);
  if (h.entries != 0) std::memcpy(out.data(), bytes.data() + sizeof h, h.entries * sizeof(TraceEntry));
  return out;
}

uint32_t Engine::config_read(uint16_t dw_offset) const {
  if (dw_offset >= pci::kConfigSize || dw_offset % 4 != 0)
    engine_error("config read", EINVAL, "offset " + hex(dw_offset) + " is not a DW offset below 0x1000");
  std::lock_guard<std::mutex> g(impl_->fn_mu);
  return impl_->fn->config_read(dw_offset);
}

void Engine::config_write(uint16_t dw_offset, uint32_t value, uint8_t byte_enables) {
  if (dw_offset >= pci::kConfigSize || dw_offset % 4 != 0)
    engine_error("config write", EINVAL, "offset " + hex(dw_offset) + " is not a DW offset below 0x1000");
  if (byte_enables > 0xf) engine_error("config write", EINVAL, "byte enables are 4 bits");
  std::lock_guard<std::mutex> g(impl_->fn_mu);
  impl_->fn->config_write(dw_offset, value, byte_enables);
  impl_->cfg_gen.fetch_add(1, std::memory_order_release);  // release: lanes refresh after it
}

void Engine::device_write(uint16_t offset, unsigned width, uint64_t value) {
  if ((width != 1 && width != 2 && width != 4 && width != 8) || !pci::ConfigSpace::in_range(offset, width))
    engine_error("device write", EINVAL, "offset " + hex(offset) + " width " + std::to_string(width) + " is not inside configuration space");
  std::lock_guard<std::mutex> g(impl_->fn_mu);
  impl_->fn->config().device_write(offset, width, value);
  impl_->cfg_gen.fetch_add(1, std::memory_order_release);  // release: lanes refresh after it
}

std::vector<uint8_t> Engine::config_bytes() const {
  std::lock_guard<std::mutex> g(impl_->fn_mu);
  const uint8_t* b = impl_->fn->config().bytes();
  return {b, b + pci::kConfigSize};
}

pci::RaiseResult Engine::raise_msix(uint16_t vector) noexcept { return impl_->fn->raise_msix(vector); }
bool Engine::msix_pending(uint16_t vector) const noexcept { return impl_->fn->msix_pending(vector); }
uint16_t Engine::completer_id() const noexcept { return uint16_t(impl_->completer.load(std::memory_order_relaxed)); }
const pci::FunctionLayout& Engine::layout() const noexcept { return *impl_->layout; }
const std::vector<std::shared_ptr<Region>>& Engine::regions() const noexcept { return impl_->regions; }

}  // namespace mlx5tlp
