// The native load generator (mlx5tlp_sim_host_load): an open-loop PCIe host that checks every
// completion without Python per TLP. docs/sim.md, "The load generator".
//
// Ordering model. PCIe lets a posted write pass an earlier read (Base Specification 2.4.1,
// Table 2-40: row A, column 3) but never lets a read pass an earlier write on the same path
// (row B, column 2). So the checker compares read data with its image of the range at
// completion time, and
//  * sends every request for a given 4 KiB page on the same channel when the mix has writes
//    (each channel is one ordered path; across channels nothing is ordered), and
//  * never sends a write over bytes an outstanding read covers (the answer could then be old
//    or new data): such a write waits, with the rest of the schedule, until the read is done.
// A completer that lets a read overtake an earlier write is then reported as a data error.
//
// Hot path: no allocation, no lock, no system call except the gateway's futex wake and the
// clock (vDSO). The gateway pages are hostile: records come out through host_take (host.cpp),
// bounded exactly as the per-record poll.
#include <sched.h>
#include <sys/prctl.h>
#include <time.h>

#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "channel.hpp"
#include "host.hpp"
#include "last_error.hpp"
#include "load.hpp"
#include "load_hist.hpp"

using namespace mlx5tlp::sim;

namespace {

constexpr uint32_t kBatch = 64;          // records taken per page visit, requests sent per round
constexpr int64_t kLateNs = 1000000;     // a send this far behind its schedule counts as late
constexpr int64_t kScanNs = 1000000;     // how often outstanding reads are checked for timeouts

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int64_t thread_cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();  // a spin-wait hint; no memory effect
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

struct Read {
  bool live = false;
  bool failed = false;
  bool flush = false;  // a flushing read (not part of the mix: not in latency or completed)
  uint32_t range = 0;
  uint64_t next = 0;       // bus address of the next byte to be returned
  uint32_t remaining = 0;  // bytes still to be returned
  uint64_t start = 0;      // first byte (for the readers counters)
  uint32_t size = 0;
  int64_t sent = 0, sched = 0;
};

class Run {
 public:
  Run(m5a_sim_host& h, LoadJob& job, m5a_sim_load_result& out)
      : h_(h), job_(job), s_(job.spec), out_(out), rng_{s_.seed} {}

  int init() {
    try {
      reads_.assign(s_.window > 256 ? 1024 : 256, Read{});
      free_.reserve(s_.window);
      for (uint32_t t = s_.window; t-- > 0;) free_.push_back(t);
      slot_size_ = h_.dev->cfg().gw_slot_size;
      buf_.assign(size_t(kBatch) * slot_size_, 0);
      wdata_.assign(4096, 0);
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM, "load: cannot allocate its bookkeeping");
    }
    return 0;
  }

  void run() {
    // The schedule's sleeps should end on time: the default 50 us timer slack would make
    // open-loop sends late (restored below).
    const int slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0);
    const int64_t cpu0 = thread_cpu_ns();
    const double period = s_.rate > 0 ? 1e9 / s_.rate : 0;
    t0_ = now_ns();
    int64_t last_scan = t0_, last_activity = t0_;
    unsigned idle = 0;
    // A write over bytes an outstanding read covers waits ("parked", at most one) while later
    // requests go ahead; it is sent as soon as those reads are done. Every op picked is sent
    // (unless the run ends first), so the mix is the one asked for.
    bool have_next = false, have_parked = false;
    LoadOp next, parked;
    for (;;) {
      int64_t now = now_ns();
      bool progress = false;
      const bool open = more(now, period);
      for (uint32_t round = 0; open && round < kBatch; ++round) {
        if (!more(now, period)) break;
        const int64_t due = due_ns(period);
        if (period > 0 && due > now) break;
        if (have_parked && !covered_by_read(parked)) {
          if (!send(parked, due)) break;  // the channel is full: back-pressure
          have_parked = false;
          progress = true;
          continue;
        }
        if (!have_next) {
          next = pick_op(job_, rng_);
          have_next = true;
        }
        if (next.kind == M5A_SIM_LOAD_WRITE && covered_by_read(next)) {
          if (have_parked) break;  // a second one: wait for the reads to finish
          parked = next;
          have_parked = true;
          have_next = false;
          continue;
        }
        if (next.kind == M5A_SIM_LOAD_READ && free_.empty()) break;  // the window is full
        if (!send(next, due)) break;  // the channel is full: back-pressure
        have_next = false;
        progress = true;
      }
      // One wake-up check for the round's requests (a fence and a load; a futex wake only
      // when a function blocks waiting for requests).
      if (progress) request_pushed(*h_.dev->st());
      uint64_t bad = 0;
      const uint32_t n = host_take(h_, buf_.data(), kBatch, recs_, &bad);
      if (bad != 0) add_error(M5A_SIM_LOAD_ERR_RECORD, bad, "%s", h_.check.stats.last_error);
      if (n != 0) {
        now = now_ns();
        for (uint32_t i = 0; i < n; ++i) check(recs_[i], now);
        progress = true;
        last_activity = now;
      }
      if (!open && flush()) progress = true;
      if (!open && live_ == 0 && !unflushed()) break;
      if (now - last_scan >= kScanNs) {
        last_scan = now;
        expire(now);
        stall(now);
        if (!more(now, period) && live_ == 0 && !unflushed()) break;
      }
      if (progress) {
        idle = 0;
        continue;
      }
      wait(++idle, period, now, last_activity);
    }
    if (slack > 0) prctl(PR_SET_TIMERSLACK, slack, 0, 0, 0);
    out_.elapsed_ns = uint64_t(now_ns() - t0_);
    out_.cpu_ns = uint64_t(thread_cpu_ns() - cpu0);
    out_.achieved_rps = out_.elapsed_ns ? double(out_.sent) * 1e9 / double(out_.elapsed_ns) : 0;
    out_.lat_min_ns = lat_.min();
    out_.lat_p50_ns = lat_.percentile(0.50);
    out_.lat_p90_ns = lat_.percentile(0.90);
    out_.lat_p99_ns = lat_.percentile(0.99);
    out_.lat_p999_ns = lat_.percentile(0.999);
    out_.lat_max_ns = lat_.max();
    out_.lat_mean_ns = lat_.mean();
    out_.sched_p50_ns = sched_.percentile(0.50);
    out_.sched_p99_ns = sched_.percentile(0.99);
    out_.sched_p999_ns = sched_.percentile(0.999);
    out_.sched_max_ns = sched_.max();
  }

 private:
  // Nothing happened this round. Completions have no wake-up (a writer rings a doorbell, it
  // cannot wake the model), so the host polls: it spins briefly, then yields the CPU (the
  // function, often on the same CPUs, may need it). With nothing outstanding and the next send
  // far off, it sleeps until shortly before the send is due.
  // Posted writes have no completion: the run ends with one 4-byte read behind the last write
  // of each channel that carried writes, at that write's address (a read does not pass an
  // earlier posted write on its path, PCIe Base 2.4.1), so when the run returns every write it
  // sent has reached the function. Checked like any read; counted in flush_reads only.
  bool flush() {
    bool sent = false;
    for (uint32_t c = 0; c < kChannels; ++c) {
      if (!has_unflushed_[c] || free_.empty()) continue;
      LoadOp r = unflushed_[c];
      r.kind = M5A_SIM_LOAD_READ;
      r.size = 4;
      if (!send(r, now_ns(), int(c))) continue;  // the channel is full: next round
      has_unflushed_[c] = false;
      sent = true;
    }
    if (sent) request_pushed(*h_.dev->st());
    return sent;
  }
  bool unflushed() const {
    if (stalled_) return false;  // the flushing reads cannot be sent either
    if (free_.empty() && live_ == 0) return false;  // every tag lost to timeouts: give up
    for (bool u : has_unflushed_)
      if (u) return true;
    return false;
  }

  // When the next request is due (open loop: request i at t0 + i / rate).
  int64_t due_ns(double period) const { return t0_ + int64_t(double(out_.sent) * period); }

  // Whether requests remain to be sent. With a rate, `duration` bounds the schedule, not the
  // clock: every request due within it is sent, late if the window held it back, so a run
  // offers exactly rate x duration requests however slow the function is.
  bool more(int64_t now, double period) const {
    if (s_.count != 0 && out_.sent >= s_.count) return false;
    if (stalled_) return false;
    if (free_.empty() && live_ == 0) return false;  // every tag lost to timeouts: give up
    if (s_.duration_ns == 0) return true;
    return (period > 0 ? due_ns(period) : now) - t0_ < int64_t(s_.duration_ns);
  }

  void wait(unsigned idle, double period, int64_t now, int64_t last_activity) {
    if (live_ == 0 && period > 0) {
      const int64_t due = due_ns(period);
      if (due - now > 20000) {
        timespec ts{time_t((due - 10000) / 1000000000), long((due - 10000) % 1000000000)};
        // Blocking point: the open-loop schedule (bounded: the next send is due then).
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr);
        return;
      }
    }
    if (idle < 256 || now - last_activity < 20000) {
      cpu_relax();
      return;
    }
    sched_yield();
  }

  bool covered_by_read(const LoadOp& op) const {
    const LoadRange& r = job_.ranges[op.range];
    const uint64_t a = op.address - r.address;
    for (uint64_t b = a / kLoadBlock; b <= (a + op.size - 1) / kLoadBlock; ++b)
      if (r.readers[b] != 0) return true;
    return false;
  }

  void count_readers(const Read& rd, int delta) {
    LoadRange& r = job_.ranges[rd.range];
    const uint64_t a = rd.start - r.address;
    for (uint64_t b = a / kLoadBlock; b <= (a + rd.size - 1) / kLoadBlock; ++b)
      r.readers[b] = uint16_t(r.readers[b] + delta);
  }

  uint32_t channel_for(const LoadOp& op) {
    if (s_.channels == 1) return 0;
    if (!job_.has_writes) return rr_++ % s_.channels;
    // Writes in the mix: one channel per 4 KiB page keeps a page's requests in order.
    return uint32_t(((op.address >> 12) * 0x9E3779B97F4A7C15ull) >> 40) % s_.channels;
  }

  // Sends `op` (on channel `force` if not negative): false when the channel is full.
  bool send(const LoadOp& op, int64_t due, int force = -1) {
    const bool write = op.kind == M5A_SIM_LOAD_WRITE;
    const uint32_t tag = write ? 0 : free_.back();
    LoadRange& r = job_.ranges[op.range];
    if (write)
      for (uint32_t i = 0; i < op.size; i += 8) {
        const uint64_t v = rng_.next();
        std::memcpy(&wdata_[i], &v, op.size - i < 8 ? op.size - i : 8);
      }
    const size_t len = encode_request(tlp_, op, s_.requester_id, tag, wdata_.data());
    uint32_t ch = force >= 0 ? uint32_t(force) : channel_for(op);
    int rc = channel_push(h_.dev->st()->chan[ch], tlp_, len);
    for (uint32_t k = 1; rc == EAGAIN && force < 0 && !job_.has_writes && k < s_.channels; ++k) {
      ch = rr_++ % s_.channels;  // reads only: any channel will do
      rc = channel_push(h_.dev->st()->chan[ch], tlp_, len);
    }
    const int64_t sent = now_ns();
    if (rc != 0) {
      if (blocked_since_ == 0) blocked_since_ = sent;
      return false;
    }
    blocked_since_ = 0;
    const bool flush = force >= 0;
    if (!flush) {
      if (s_.rate > 0 && sent - due > kLateNs) ++out_.late;
      ++out_.sent;
    }
    if (write) {
      ++out_.writes;
      std::memcpy(&r.image[op.address - r.address], wdata_.data(), op.size);
      unflushed_[ch] = op;
      has_unflushed_[ch] = true;
      return true;
    }
    if (flush) ++out_.flush_reads;
    else ++out_.reads;
    free_.pop_back();
    Read& rd = reads_[tag];
    rd = Read{true, false, flush, op.range, op.address, op.size, op.address, op.size, sent,
              s_.rate > 0 ? due : sent};
    count_readers(rd, +1);
    ++live_;
    return true;
  }

  // `reuse` false (a timed-out read): the tag is not used again in this run, so a completion
  // that arrives late is reported as unexpected instead of being taken for a new read's.
  void retire(uint32_t tag, int64_t now, bool reuse = true) {
    Read& rd = reads_[tag];
    if (!rd.failed && !rd.flush) {
      ++out_.completed;
      lat_.add(uint64_t(now - rd.sent));
      sched_.add(uint64_t(now - rd.sched));
    }
    count_readers(rd, -1);
    rd.live = false;
    if (reuse) free_.push_back(tag);
    --live_;
  }

  void expire(int64_t now) {
    for (uint32_t t = 0; t < reads_.size(); ++t) {
      Read& rd = reads_[t];
      if (!rd.live || now - rd.sent < int64_t(s_.timeout_ns)) continue;
      add_error(M5A_SIM_LOAD_ERR_TIMEOUT, 1, "read of %u bytes at %#" PRIx64 " (tag %u): %u bytes "
                "unanswered after %" PRIu64 " us", rd.size, rd.start, t, rd.remaining,
                uint64_t(now - rd.sent) / 1000);
      rd.failed = true;
      retire(t, now, false);
    }
  }

  // Posted writes have no completion to time out: a function that stopped taking requests
  // (killed, hung) would leave the sends back-pressured, and the run waiting, forever. A send
  // refused for `timeout` ends the schedule (one timeout error; the rest is not sent), and the
  // reads still out time out as usual.
  void stall(int64_t now) {
    if (stalled_ || blocked_since_ == 0 || now - blocked_since_ < int64_t(s_.timeout_ns)) return;
    stalled_ = true;
    add_error(M5A_SIM_LOAD_ERR_TIMEOUT, 1, "the function took no request for %" PRIu64 " us "
              "(a full channel): %" PRIu64 " requests sent, the rest of the schedule is not",
              uint64_t(now - blocked_since_) / 1000, out_.sent);
  }

  void add_error(uint32_t kind, uint64_t n, const char* fmt, ...) __attribute__((format(printf, 4, 5))) {
    out_.errors_by_kind[kind] += n;
    out_.errors += n;
    if (out_.nfirst >= M5A_SIM_LOAD_FIRST_ERRORS) return;
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(out_.first_errors[out_.nfirst++], sizeof out_.first_errors[0], fmt, ap);
    va_end(ap);
  }

  // Fails the record with one error of `kind` (the first check it fails) and, for a known read,
  // marks the read failed (and retires it when the record ends it).
  void check(const TakenRecord& rec, int64_t now);

  m5a_sim_host& h_;
  LoadJob& job_;
  const m5a_sim_load_spec& s_;
  m5a_sim_load_result& out_;
  Rng rng_;
  std::vector<Read> reads_;
  std::vector<uint32_t> free_;
  std::vector<uint8_t> buf_, wdata_;
  TakenRecord recs_[kBatch];
  uint8_t tlp_[16 + 4096];
  uint32_t slot_size_ = 0, rr_ = 0, live_ = 0;
  LoadOp unflushed_[kChannels];  // per channel: its last write not yet followed by a read
  bool has_unflushed_[kChannels] = {};
  int64_t t0_ = 0;
  int64_t blocked_since_ = 0;  // the first refused send since the last one accepted, or 0
  bool stalled_ = false;       // blocked for `timeout`: nothing more is sent
  LatencyHistogram lat_, sched_;
};

void Run::check(const TakenRecord& rec, int64_t now) {
  const uint8_t* p = rec.data;
  const uint32_t len = rec.len;
  if (len >= 16 && (p[0] & 0xdf) == 0x40) {
    // A Memory Write from the function: an MSI-X message (PCIe Base 7.7.2), not a completion.
    ++out_.interrupts;
    ++h_.check.stats.interrupts;
    return;
  }
  ++out_.completions;
  if (len < 12) {
    add_error(M5A_SIM_LOAD_ERR_FORMAT, 1, "page %u record %" PRIu64 ": %u bytes, shorter than a "
              "completion header", rec.page, rec.seq, len);
    return;
  }
  const uint32_t fmt = p[0] >> 5, type = p[0] & 0x1f;
  const uint16_t rid = get_be16(p + 8);
  const uint32_t tag = ((p[1] & 0x80u) << 2) | ((p[1] & 0x08u) << 5) | p[10];
  if (type != 0x0a || (fmt != 0 && fmt != 2)) {
    add_error(M5A_SIM_LOAD_ERR_FORMAT, 1, "page %u record %" PRIu64 ": fmt %u type %#x is not a "
              "Cpl/CplD", rec.page, rec.seq, fmt, type);
    return;
  }
  if (rid != s_.requester_id || tag >= reads_.size() || !reads_[tag].live) {
    ++h_.check.stats.unexpected;
    add_error(M5A_SIM_LOAD_ERR_TAG, 1, "unexpected completion: requester %04x tag %u matches no "
              "outstanding read", rid, tag);
    return;
  }
  Read& rd = reads_[tag];
  const uint16_t cid = get_be16(p + 4);
  const uint32_t status = p[6] >> 5;
  uint32_t bc = ((p[6] & 0xfu) << 8) | p[7];
  if (bc == 0) bc = 4096;
  const uint32_t la = p[11] & 0x7f;
  uint32_t dws = ((p[2] & 0x3u) << 8) | p[3];
  if (dws == 0) dws = 1024;
  const bool data = fmt == 2;
  const uint32_t digest = (p[2] & 0x80) ? 4 : 0;
  auto bad = [&](uint32_t kind, const char* what, uint64_t got, uint64_t want) {
    add_error(kind, 1, "read of %u bytes at %#" PRIx64 " (tag %u): %s %" PRIu64 ", expected %"
              PRIu64, rd.size, rd.start, tag, what, got, want);
    rd.failed = true;
  };
  if (s_.check_completer && cid != s_.completer_id) bad(M5A_SIM_LOAD_ERR_COMPLETER, "completer id", cid, s_.completer_id);
  if (status != 0) {
    if (data) bad(M5A_SIM_LOAD_ERR_FORMAT, "failed completion carries data: status", status, 0);
    else bad(M5A_SIM_LOAD_ERR_STATUS, "completion status", status, 0);
    return retire(tag, now);  // UR/CA/CRS end the request
  }
  if (!data || len != 12 + 4 * dws + digest) {
    if (!data) bad(M5A_SIM_LOAD_ERR_FORMAT, "successful read completion without data: length", 0, rd.remaining);
    else bad(M5A_SIM_LOAD_ERR_FORMAT, "record bytes", len, 12 + 4 * dws + digest);
    return retire(tag, now);
  }
  const uint32_t lead = uint32_t(rd.next & 3);
  const uint32_t room = 4 * dws > lead ? 4 * dws - lead : 0;
  const uint32_t bytes = room < rd.remaining ? room : rd.remaining;
  if (bc != rd.remaining) bad(M5A_SIM_LOAD_ERR_BYTE_COUNT, "byte count", bc, rd.remaining);
  else if (la != (rd.next & 0x7f)) bad(M5A_SIM_LOAD_ERR_LOWER_ADDRESS, "lower address", la, rd.next & 0x7f);
  else if (dws != (lead + bytes + 3) / 4) bad(M5A_SIM_LOAD_ERR_FORMAT, "payload DWs", dws, (lead + bytes + 3) / 4);
  else if (4 * dws > s_.max_payload) bad(M5A_SIM_LOAD_ERR_SPLIT, "payload bytes above Max_Payload_Size: ", 4 * dws, s_.max_payload);
  else if (bytes < rd.remaining && ((rd.next + bytes) % s_.rcb) != 0)
    bad(M5A_SIM_LOAD_ERR_SPLIT, "non-final completion ends off the RCB at", rd.next + bytes, s_.rcb);
  else {
    const LoadRange& r = job_.ranges[rd.range];
    const uint8_t* want = &r.image[rd.next - r.address];
    if (std::memcmp(p + 12 + lead, want, bytes) != 0) {
      uint32_t i = 0;
      while (p[12 + lead + i] == want[i]) ++i;
      add_error(M5A_SIM_LOAD_ERR_DATA, 1, "read of %u bytes at %#" PRIx64 " (tag %u): byte at %#"
                PRIx64 " is %#x, expected %#x", rd.size, rd.start, tag, rd.next + i,
                p[12 + lead + i], want[i]);
      rd.failed = true;
    }
    out_.bytes_read += bytes;
  }
  rd.next += bytes;
  rd.remaining -= bytes;
  if (rd.remaining == 0 || bytes == 0) retire(tag, now);
}

}  // namespace

M5A_EXPORT int mlx5tlp_sim_host_load(m5a_sim_host* host, const m5a_sim_load_spec* spec,
                                     m5a_sim_load_result* out) {
  if (host == nullptr || spec == nullptr || out == nullptr)
    return fail(EINVAL, "load: a null host, spec or result");
  if (out->struct_size != sizeof(m5a_sim_load_result))
    return fail(EINVAL, "load result: struct_size %u, expected %zu", out->struct_size,
                sizeof(m5a_sim_load_result));
  if (host->check.stats.outstanding != 0)
    return fail(EBUSY, "load: the host has %llu requests of its own outstanding",
                (unsigned long long)host->check.stats.outstanding);
  LoadJob job;
  if (int rc = load_job_init(*spec, job); rc != 0) return rc;
  *out = m5a_sim_load_result{};
  out->struct_size = sizeof *out;
  std::unique_ptr<Run> run(new (std::nothrow) Run(*host, job, *out));
  if (!run) return fail(ENOMEM, "load: cannot allocate its state");
  if (int rc = run->init(); rc != 0) return rc;
  run->run();
  m5a_sim_host_stats& st = host->check.stats;
  st.requests += out->sent;
  st.completions += out->completions;
  st.retired += out->completed;
  st.errors += out->errors - out->errors_by_kind[M5A_SIM_LOAD_ERR_RECORD];  // those: counted already
  clear_error();
  return 0;
}
