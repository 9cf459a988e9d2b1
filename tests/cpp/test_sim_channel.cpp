// Request channels with claims, across real processes: claim -> mark -> answer (a completion in
// a gateway page, then its doorbell) -> retire. A claimer SIGKILLed at each step loses nothing
// and duplicates nothing: its claims are redelivered exactly once to the next claimer, with the
// mark, so the successor retires what was published and answers the rest. The device model
// checks every completion against its request (an answer twice is "unexpected").
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <random>

#include <sys/mman.h>

#include "../../cpp/sim/state.hpp"  // white-box: the mark records damaged below
#include "sim_util.hpp"

using namespace simtest;

namespace {

constexpr const char* kDev = "chan";
constexpr uint32_t kSlot = 64;  // 64 KiB pages of 64-byte slots: 1022 records in flight

struct Rig {
  m5a_ibv_context* ctx = nullptr;
  m5a_sim_host* host = nullptr;
  m5a_mlx5dv_var* var = nullptr;
  void* page = nullptr;
  pid_t host_pid = getpid();  // only this process may poll the device model
  size_t collected = 0;
  unsigned redelivered = 0, published = 0;  // seen by this process's answer()
  unsigned jitter_us = 0;  // a random pause of up to this between protocol steps

  void pause_a_little() {
    if (jitter_us == 0) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(rand() % jitter_us);
    while (std::chrono::steady_clock::now() < until) {
    }
  }

  Rig() {
    ctx = open_raw(kDev);
    host = ss().host_open(kDev);
    CHECK(ctx != nullptr && host != nullptr);
    var = sym().mlx5dv_alloc_var(ctx, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
    page = map_page(ctx, var);
  }
  ~Rig() {
    munmap(page, var->length);
    sym().mlx5dv_free_var(var);
    ss().host_close(host);
    sym().ibv_close_device(ctx);
  }
  void send(uint16_t rid, uint8_t tag, uint32_t channel = 0) {
    const auto r = cfgrd0(rid, tag);
    CHECK(ss().host_send(host, channel, r.data(), r.size()) == 0);
  }
  // The answer protocol up to `steps` (1 claim, 2 mark, 3 write + doorbell, 4 retire), for
  // the next request (`recovered`: the next redelivered one, already claimed).
  bool answer(uint32_t channel, int steps, m5a_sim_claim_info* out = nullptr,
              const uint8_t* recovered = nullptr, const m5a_sim_claim_info* rinfo = nullptr) {
    uint8_t buf[4096];
    m5a_sim_claim_info info{};
    if (recovered != nullptr) {
      std::memcpy(buf, recovered, rinfo->length);
      info = *rinfo;
    } else if (ss().function_claim(ctx, channel, buf, sizeof buf, &info) <= 0) {
      return false;
    }
    if (out != nullptr) *out = info;
    redelivered += (info.flags & M5A_SIM_CLAIM_REDELIVERED) != 0;
    published += (info.flags & M5A_SIM_CLAIM_PUBLISHED) != 0;
    pause_a_little();
    if (steps >= 2 && (info.flags & M5A_SIM_CLAIM_PUBLISHED) == 0) {
      const uint64_t next = load64(page, kDoorbell) + 1;
      CHECK(ss().function_mark(ctx, channel, info.claim, var->page_id, next) == 0);
      pause_a_little();
      if (steps >= 3) write_answer(buf);
      pause_a_little();
    }
    if (steps >= 4) CHECK(ss().function_retire(ctx, channel, info.claim) == 0);
    return true;
  }
  // Writes the completion for `req` and rings the doorbell, waiting for a free slot (the host
  // process consumes meanwhile; another process waits for it).
  void write_answer(const uint8_t* req) {
    uint32_t count;
    std::memcpy(&count, static_cast<uint8_t*>(page) + kSlotCount, 4);
    while (load64(page, kDoorbell) - load64(page, kConsumer) >= count) {
      if (getpid() == host_pid) drain();
      else sched_yield();
    }
    ring(page, write_slot(page, kSlot, cpld_for(req)));
  }
  void drain() {
    uint8_t buf[4096];
    m5a_sim_completion info{};
    while (ss().host_poll(host, buf, sizeof buf, &info) > 0) ++collected;
  }
  // Collects completions until `n` arrived in total (or nothing comes for a while).
  size_t collect(size_t n) {
    for (int idle = 0; collected < n && idle < 200000; ++idle) {
      const size_t before = collected;
      drain();
      if (collected != before) idle = 0;
    }
    return collected;
  }
  m5a_sim_host_stats host_stats() {
    m5a_sim_host_stats s{};
    ss().host_stats(host, &s);
    return s;
  }
};

void basics() {
  Rig r;
  r.send(1, 1);
  r.send(1, 2);
  uint8_t buf[4096], small[4];
  m5a_sim_claim_info a{}, b{};
  CHECK(ss().function_claim(r.ctx, 0, small, sizeof small, &a) == -ENOBUFS);  // stays queued
  CHECK(ss().function_claim(r.ctx, 0, buf, sizeof buf, &a) == 12 && buf[6] == 1 && a.flags == 0);
  CHECK(ss().function_claim(r.ctx, 0, buf, sizeof buf, &b) == 12 && buf[6] == 2 && b.claim == a.claim + 1);
  CHECK(ss().function_claim(r.ctx, 0, buf, sizeof buf, &b) == 0);
  CHECK(stats(kDev).requests_claimed == 2 && stats(kDev).requests_pending == 0);
  CHECK(ss().function_mark(r.ctx, 0, a.claim, 99, 1) == EINVAL);  // no such page
  CHECK(ss().function_mark(r.ctx, 0, a.claim, r.var->page_id, 1) == 0);
  CHECK(ss().function_mark(r.ctx, 0, a.claim, r.var->page_id, 2) == 0);  // re-mark
  CHECK(ss().function_retire(r.ctx, 0, a.claim) == 0);
  CHECK(ss().function_retire(r.ctx, 0, a.claim) == ESTALE);
  CHECK(ss().function_mark(r.ctx, 0, a.claim, r.var->page_id, 1) == ESTALE);
  CHECK(ss().function_retire(r.ctx, 0, b.claim) == 0);
  CHECK(ss().function_claim(r.ctx, 8, buf, sizeof buf, &b) == -EINVAL);
  // poll = claim + retire
  r.send(1, 3, 5);
  CHECK(ss().function_poll(r.ctx, 5, buf, sizeof buf) == 12 && buf[6] == 3);
  CHECK(stats(kDev).requests_claimed == 0);
  // A full channel: 64 slots, back-pressure until a claim is retired (not merely claimed).
  for (uint32_t i = 0; i < 64; ++i) r.send(2, uint8_t(i), 1);
  const auto extra = cfgrd0(2, 200);
  CHECK(ss().host_send(r.host, 1, extra.data(), extra.size()) == EAGAIN);
  CHECK(ss().function_claim(r.ctx, 1, buf, sizeof buf, &a) > 0);
  CHECK(ss().host_send(r.host, 1, extra.data(), extra.size()) == EAGAIN);
  CHECK(ss().function_retire(r.ctx, 1, a.claim) == 0);
  CHECK(ss().host_send(r.host, 1, extra.data(), extra.size()) == 0);
  while (ss().function_poll(r.ctx, 1, buf, sizeof buf) > 0) {
  }
}

// A child claims one request and runs the protocol to `steps`, then is SIGKILLed; the parent is
// the successor. Each request must be answered exactly once.
void killed_at_each_step() {
  Rig r;
  for (int steps = 1; steps <= 4; ++steps) {
    r.send(3, uint8_t(steps));
    int ready[2];
    CHECK(pipe(ready) == 0);
    pid_t pid = fork();
    if (pid == 0) {
      // Same context (the fd is inherited, as a standby's is), its own claimer session.
      const bool ok = r.answer(0, steps);
      char c = ok ? 'y' : 'n';
      if (write(ready[1], &c, 1) != 1) _exit(3);
      for (;;) pause();
    }
    char c = 0;
    CHECK(read(ready[0], &c, 1) == 1 && c == 'y');
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    close(ready[0]);
    close(ready[1]);
    m5a_sim_claim_info info{};
    uint8_t buf[4096];
    // The successor takes the dead claim (recover looks for dead claimers at once).
    const ssize_t n = ss().function_recover(r.ctx, 0, buf, sizeof buf, &info);
    if (steps == 4) {
      CHECK(n == 0);
      CHECK(ss().function_claim(r.ctx, 0, buf, sizeof buf, &info) == 0);  // retired: nothing left
    } else {
      CHECK(n == 12 && buf[6] == uint8_t(steps));
      CHECK(info.flags & M5A_SIM_CLAIM_REDELIVERED);
      CHECK(bool(info.flags & M5A_SIM_CLAIM_MARKED) == (steps >= 2));
      CHECK(bool(info.flags & M5A_SIM_CLAIM_PUBLISHED) == (steps >= 3));
      if (steps >= 2) CHECK(info.page_id == r.var->page_id && info.seq == load64(r.page, kDoorbell) + (steps == 2));
      if (!(info.flags & M5A_SIM_CLAIM_PUBLISHED)) {  // not published: answer it
        CHECK(ss().function_mark(r.ctx, 0, info.claim, r.var->page_id, load64(r.page, kDoorbell) + 1) == 0);
        r.write_answer(buf);
      }
      CHECK(ss().function_retire(r.ctx, 0, info.claim) == 0);
    }
    CHECK(r.collect(size_t(steps)) == size_t(steps));
  }
  const m5a_sim_host_stats s = r.host_stats();
  CHECK(s.retired == 4 && s.unexpected == 0 && s.errors == 0 && s.outstanding == 0);
}

// Many requests, a claimer killed at a random point of its loop; the successor finishes.
void random_kills(unsigned rounds) {
  Rig r;
  std::mt19937 rng(1234);
  uint32_t sent = 0;
  for (unsigned round = 0; round < rounds; ++round) {
    for (int i = 0; i < 40; ++i, ++sent) r.send(uint16_t(0x100 + sent / 256), uint8_t(sent));
    pid_t pid = fork();
    if (pid == 0) {
      srand(unsigned(getpid()));
      r.jitter_us = 50;
      for (;;) r.answer(0, 4);  // answers until killed
    }
    usleep(rng() % 1500);
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    // Successor: first take every redelivered claim (their PUBLISHED flags are judged against
    // the doorbell the dead claimer left), then answer them by their flags, then the rest.
    std::vector<std::pair<std::vector<uint8_t>, m5a_sim_claim_info>> taken;
    for (;;) {
      std::vector<uint8_t> req(4096);
      m5a_sim_claim_info info{};
      if (ss().function_recover(r.ctx, 0, req.data(), req.size(), &info) <= 0) break;
      CHECK(info.flags & M5A_SIM_CLAIM_REDELIVERED);
      taken.emplace_back(std::move(req), info);
    }
    for (auto& [req, info] : taken) r.answer(0, 4, nullptr, req.data(), &info);
    // Then until nothing is left for a while (claim's own sweep may find more, later).
    for (auto quiet = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
         std::chrono::steady_clock::now() < quiet;) {
      if (r.answer(0, 4)) quiet = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
    }
  }
  r.collect(sent);
  const m5a_sim_host_stats s = r.host_stats();
  CHECK(s.requests == sent && s.retired == sent && s.unexpected == 0 && s.errors == 0 && s.outstanding == 0);
  if (s.retired != sent || s.unexpected != 0)
    std::fprintf(stderr, "random kills: sent %u retired %llu unexpected %llu errors %llu (%s)\n", sent,
                 (unsigned long long)s.retired, (unsigned long long)s.unexpected,
                 (unsigned long long)s.errors, s.last_error);
  CHECK(r.redelivered > 0);  // the kills did land inside claims
  std::printf("random kills: %u rounds, %u requests answered exactly once (%u redelivered, %u of "
              "them already published)\n", rounds, sent, r.redelivered, r.published);
}

// A process's session dies with the process, not with a forked child that inherited its fds.
void fork_inherits_no_session() {
  Rig r;
  r.send(4, 1);
  int ready[2], go[2];
  CHECK(pipe(ready) == 0 && pipe(go) == 0);
  pid_t parent = fork();  // plays "a parent that claims, forks a long-lived child, then dies"
  if (parent == 0) {
    uint8_t buf[4096];
    m5a_sim_claim_info info{};
    if (ss().function_claim(r.ctx, 0, buf, sizeof buf, &info) != 12) _exit(2);
    pid_t child = fork();
    if (child == 0) {
      char c;
      if (read(go[0], &c, 1) != 1) _exit(4);  // lives until the test says so
      _exit(0);
    }
    char c = 'y';
    if (write(ready[1], &c, 1) != 1) _exit(3);
    for (;;) pause();
  }
  char c = 0;
  CHECK(read(ready[0], &c, 1) == 1);
  kill(parent, SIGKILL);
  waitpid(parent, nullptr, 0);
  // Its child still holds copies of all its fds, yet the claim is redelivered.
  uint8_t buf[4096];
  m5a_sim_claim_info info{};
  // A plain claim finds it too: its sweep for dead claimers runs about once a millisecond.
  ssize_t n = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (n == 0 && std::chrono::steady_clock::now() < until)
    n = ss().function_claim(r.ctx, 0, buf, sizeof buf, &info);
  CHECK(n == 12 && (info.flags & M5A_SIM_CLAIM_REDELIVERED));
  CHECK(ss().function_retire(r.ctx, 0, info.claim) == 0);
  CHECK(write(go[1], "x", 1) == 1);
  for (int fd : {ready[0], ready[1], go[0], go[1]}) close(fd);
  while (waitpid(-1, nullptr, WNOHANG) > 0) {
  }
}

// A new device model starts a new epoch: what the previous one left is discarded and counted,
// and claims of it are stale.
void epochs() {
  m5a_ibv_context* c = open_raw(kDev);
  m5a_sim_host* h = ss().host_open(kDev);
  CHECK(ss().host_open(kDev) == nullptr && errno == EBUSY);
  for (uint8_t t = 0; t < 3; ++t) {
    const auto req = cfgrd0(5, t);
    ss().host_send(h, 2, req.data(), req.size());
  }
  uint8_t buf[4096];
  m5a_sim_claim_info info{};
  CHECK(ss().function_claim(c, 2, buf, sizeof buf, &info) == 12);
  ss().host_close(h);  // e.g. the host process died: its lock byte is gone either way
  h = ss().host_open(kDev);
  CHECK(h != nullptr);
  m5a_sim_host_stats s{};
  ss().host_stats(h, &s);
  CHECK(s.stale_requests == 3 && s.epoch >= 2);
  CHECK(ss().function_retire(c, 2, info.claim) == ESTALE);
  CHECK(ss().function_claim(c, 2, buf, sizeof buf, &info) == 0);  // a clean channel
  const auto req = cfgrd0(5, 9);
  CHECK(ss().host_send(h, 2, req.data(), req.size()) == 0);
  CHECK(ss().function_claim(c, 2, buf, sizeof buf, &info) == 12 && buf[6] == 9);
  CHECK(info.flags == 0);
  CHECK(ss().function_retire(c, 2, info.claim) == 0);
  CHECK(stats(kDev).stale_requests >= 3);
  ss().host_close(h);
  sym().ibv_close_device(c);
}

// A host killed at a random point of its send loop (while functions claim) wedges nothing: the
// next host's epoch starts from clean channels and says how many requests it discarded.
void killed_host() {
  m5a_ibv_context* c = open_raw(kDev);
  std::mt19937 rng(77);
  for (int round = 0; round < 5; ++round) {
    pid_t pid = fork();
    if (pid == 0) {
      m5a_sim_host* h = ss().host_open(kDev);
      if (h == nullptr) _exit(2);
      for (uint32_t i = 0;; ++i) {
        const auto req = cfgrd0(6, uint8_t(i));
        ss().host_send(h, 3, req.data(), req.size());  // EAGAIN when full: keep trying
      }
    }
    uint8_t buf[4096];
    m5a_sim_claim_info info{};
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(rng() % 3000);
    while (std::chrono::steady_clock::now() < until)
      if (ss().function_claim(c, 3, buf, sizeof buf, &info) > 0) ss().function_retire(c, 3, info.claim);
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    m5a_sim_host* h = ss().host_open(kDev);
    CHECK(h != nullptr);
    m5a_sim_host_stats s{};
    ss().host_stats(h, &s);
    CHECK(s.stale_requests <= 64);
    CHECK(stats(kDev).requests_pending == 0 && stats(kDev).requests_claimed == 0);
    for (uint8_t t = 0; t < 64; ++t) {  // a whole channel's worth goes through
      const auto req = cfgrd0(7, t);
      CHECK(ss().host_send(h, 3, req.data(), req.size()) == 0);
    }
    for (uint8_t t = 0; t < 64; ++t) {
      CHECK(ss().function_claim(c, 3, buf, sizeof buf, &info) == 12 && buf[6] == t && info.flags == 0);
      CHECK(ss().function_retire(c, 3, info.claim) == 0);
    }
    ss().host_close(h);
  }
  sym().ibv_close_device(c);
}


// The record format (state version 3, cpp/sim/channel.cpp mark_check), restated: FNV-1a over
// the tag "MRK3", the claim position and the fields, so a record checked here is one the
// device would accept.
uint32_t record_check(uint64_t pos, const mlx5tlp::sim::MarkRecord& m) {
  uint32_t h = 2166136261u;
  auto mix = [&h](uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) h = (h ^ uint8_t(v >> (8 * i))) * 16777619u;
  };
  mix(0x334b524d, 4);
  mix(pos, 8);
  mix(m.page, 4);
  mix(m.before, 4);
  mix(m.seq, 8);
  mix(m.gen, 8);
  mix(m.after, 4);
  return h;
}

struct StateMap {
  mlx5tlp::sim::DeviceState* st = nullptr;
  StateMap() {
    const std::string path = std::string(getenv("MLX5TLP_SIM_DIR")) + "/" + kDev + "/state";
    const int fd = open(path.c_str(), O_RDWR);
    CHECK(fd >= 0);
    void* p = mmap(nullptr, sizeof(mlx5tlp::sim::DeviceState), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    CHECK(p != MAP_FAILED);
    st = static_cast<mlx5tlp::sim::DeviceState*>(p);
  }
  ~StateMap() { munmap(st, sizeof(mlx5tlp::sim::DeviceState)); }
  uint64_t word(uint64_t claim) const { return st->chan[0].word[claim % 64].load(); }
  mlx5tlp::sim::MarkRecord& current(uint64_t claim) const {
    return st->chan[0].slot[claim % 64].mark[(word(claim) >> 38) & 1];
  }
  mlx5tlp::sim::MarkRecord& other(uint64_t claim) const {
    return st->chan[0].slot[claim % 64].mark[((word(claim) >> 38) & 1) ^ 1];
  }
};

// A child claims a request, marks progress `marks` times (before=64*k, after=64*(k+1)), ringing
// the doorbell past each mark but the last, and is SIGKILLed; returns its claim id.
uint64_t die_after_marks(Rig& r, int marks, uint8_t tag) {
  r.send(9, tag);
  int ready[2];
  CHECK(pipe(ready) == 0);
  const pid_t pid = fork();
  if (pid == 0) {
    uint8_t buf[4096];
    m5a_sim_claim_info info{};
    if (ss().function_claim(r.ctx, 0, buf, sizeof buf, &info) <= 0) _exit(2);
    for (int k = 0; k < marks; ++k) {
      const uint64_t db = load64(r.page, kDoorbell);
      if (ss().function_mark_progress(r.ctx, 0, info.claim, r.var->page_id, db + 1, uint32_t(64 * k),
                                      uint32_t(64 * (k + 1))) != 0)
        _exit(3);
      if (k + 1 < marks) ring(r.page, write_slot(r.page, kSlot, cpld_for(buf)));  // this chunk is out
    }
    if (write(ready[1], &info.claim, sizeof info.claim) != sizeof info.claim) _exit(4);
    for (;;) pause();
  }
  uint64_t claim = 0;
  CHECK(read(ready[0], &claim, sizeof claim) == sizeof claim);
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  close(ready[0]);
  close(ready[1]);
  return claim;
}

// Marks with progress (MLX5TLP_SIM_1.1): a redelivered claim reports how much of its answer
// the host has; the previous mark survives a re-mark cut short; a damaged mark record, or one
// of another claim, is refused (the claim dropped with EPROTO), never read as progress.
void mark_records() {
  Rig r;
  StateMap sm;
  uint8_t buf[4096];
  m5a_sim_claim_info info{};
  CHECK(ss().function_mark_progress != nullptr);  // resolved under its own version node
  // Argument checks.
  r.send(9, 1);
  CHECK(ss().function_claim(r.ctx, 0, buf, sizeof buf, &info) == 12);
  CHECK(ss().function_mark_progress(r.ctx, 0, info.claim, r.var->page_id, 1, 65, 64) == EINVAL);
  CHECK(last_error().find("progress 65..64") != std::string::npos);
  CHECK(ss().function_mark_progress(r.ctx, 0, info.claim, r.var->page_id, 1, M5A_SIM_PROGRESS_ALL,
                                    M5A_SIM_PROGRESS_ALL) == EINVAL);
  CHECK(ss().function_mark_progress(r.ctx, 0, info.claim, 99, 1, 0, 64) == EINVAL);
  CHECK(ss().function_retire(r.ctx, 0, info.claim) == 0);

  // Three marks, two chunks out, killed before the third doorbell: `before` of the last mark.
  uint64_t claim = die_after_marks(r, 3, 2);
  CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == 12 && info.claim == claim);
  CHECK(info.flags == (M5A_SIM_CLAIM_REDELIVERED | M5A_SIM_CLAIM_MARKED | M5A_SIM_CLAIM_PARTIAL));
  CHECK(info.progress == 128 && info.seq == load64(r.page, kDoorbell) + 1);
  // The successor publishes the last chunk (marked first: before 128, all of it after).
  CHECK(ss().function_mark_progress(r.ctx, 0, claim, r.var->page_id, load64(r.page, kDoorbell) + 1, 128,
                                    M5A_SIM_PROGRESS_ALL) == 0);
  r.write_answer(buf);
  CHECK(ss().function_retire(r.ctx, 0, claim) == 0);

  // Killed after its doorbell: `after` of its mark.
  claim = die_after_marks(r, 2, 3);
  ring(r.page, write_slot(r.page, kSlot, cpld_for(buf)));  // as if it rang before it died
  CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == 12 && info.claim == claim);
  CHECK((info.flags & M5A_SIM_CLAIM_PARTIAL) && !(info.flags & M5A_SIM_CLAIM_PUBLISHED) && info.progress == 128);
  CHECK(ss().function_retire(r.ctx, 0, claim) == 0);

  // A re-mark cut short (the unselected record half written, the word not yet flipped):
  // the previous mark is what a successor reads.
  claim = die_after_marks(r, 2, 4);
  sm.other(claim).before = 4000;
  sm.other(claim).check ^= 0x5a;
  CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == 12 && info.claim == claim);
  CHECK((info.flags & M5A_SIM_CLAIM_PARTIAL) && info.progress == 64);
  CHECK(ss().function_retire(r.ctx, 0, claim) == 0);

  // Damaged: one bit of the selected record's progress.
  claim = die_after_marks(r, 2, 5);
  sm.current(claim).after ^= 1;
  CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == -EPROTO);
  CHECK(last_error().find("mark record is damaged") != std::string::npos);
  CHECK(stats(kDev).requests_claimed == 0);  // dropped, not left claimed forever
  CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == 0);

  // An old record: a whole, once valid record of an earlier claim of the same slot (64
  // positions back), put where this claim's mark is.
  claim = die_after_marks(r, 2, 6);
  mlx5tlp::sim::MarkRecord old = sm.current(claim);
  old.check = record_check(claim - 64, old);
  sm.current(claim) = old;
  CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == -EPROTO);
  CHECK(stats(kDev).requests_claimed == 0);

  // A record whose check matches but whose fields cannot be: before above after.
  claim = die_after_marks(r, 2, 7);
  mlx5tlp::sim::MarkRecord bad = sm.current(claim);
  bad.before = bad.after + 4;
  bad.check = record_check(claim, bad);
  sm.current(claim) = bad;
  CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == -EPROTO);

  // mark() is the whole answer: PUBLISHED once the doorbell reaches it, progress ALL.
  r.send(9, 8);
  CHECK(ss().function_claim(r.ctx, 0, buf, sizeof buf, &info) == 12);
  claim = info.claim;
  CHECK(ss().function_mark(r.ctx, 0, claim, r.var->page_id, load64(r.page, kDoorbell) + 1) == 0);
  const mlx5tlp::sim::MarkRecord& whole = sm.current(claim);
  CHECK(whole.before == 0 && whole.after == M5A_SIM_PROGRESS_ALL && whole.check == record_check(claim, whole));
  CHECK(ss().function_retire(r.ctx, 0, claim) == 0);
  r.collect(r.collected + 1);
}

// A note that the request's error was logged (MLX5TLP_SIM_1.2): a redelivered claim carries
// it (M5A_SIM_CLAIM_LOGGED), with its mark, to exactly one successor; it is refused on a claim
// that is not the caller's or no longer exists; a claim never noted does not carry it.
void logged_notes() {
  Rig r;
  uint8_t buf[4096];
  m5a_sim_claim_info info{};
  CHECK(ss().function_note_logged != nullptr);  // resolved under its own version node
  for (const bool note : {true, false}) {
    r.send(9, note ? 20 : 21);
    int ready[2];
    CHECK(pipe(ready) == 0);
    const pid_t pid = fork();
    if (pid == 0) {
      m5a_sim_claim_info ci{};
      if (ss().function_claim(r.ctx, 0, buf, sizeof buf, &ci) <= 0) _exit(2);
      if (note && ss().function_note_logged(r.ctx, 0, ci.claim) != 0) _exit(3);
      // Marked after the note (the engine's order): the mark keeps it.
      if (ss().function_mark(r.ctx, 0, ci.claim, r.var->page_id, load64(r.page, kDoorbell) + 1) != 0) _exit(4);
      if (write(ready[1], &ci.claim, sizeof ci.claim) != sizeof ci.claim) _exit(5);
      for (;;) pause();
    }
    uint64_t claim = 0;
    CHECK(read(ready[0], &claim, sizeof claim) == sizeof claim);
    // Another live claimer's claim: not ours to note.
    CHECK(ss().function_note_logged(r.ctx, 0, claim) == EPERM);
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    close(ready[0]);
    close(ready[1]);
    CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == 12 && info.claim == claim);
    const uint32_t want = M5A_SIM_CLAIM_REDELIVERED | M5A_SIM_CLAIM_MARKED | (note ? uint32_t(M5A_SIM_CLAIM_LOGGED) : 0u);
    CHECK(info.flags == want);
    CHECK(ss().function_recover(r.ctx, 0, buf, sizeof buf, &info) == 0);  // exactly once
    CHECK(ss().function_note_logged(r.ctx, 0, claim) == 0);  // now ours: may note it again
    CHECK(ss().function_retire(r.ctx, 0, claim) == 0);
    CHECK(ss().function_note_logged(r.ctx, 0, claim) == ESTALE);  // retired
  }
}

}  // namespace

int main() {
  ScratchDir dir;
  try {
    make_device(kDev, config(4, 4, 4, kSlot));
    basics();
    killed_at_each_step();
    random_kills(MLX5TLP_TEST_ASAN ? 10 : 20);
    fork_inherits_no_session();
    epochs();
    killed_host();
    mark_records();
    logged_notes();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  return mlx5tlp_test::finish("test_sim_channel");
}
