// The TLP response gateway from native C++ callers: the doorbell loop with 1, 2 and 4 producer
// threads against a device-model thread in the same process (sim host functions), direct mode,
// back-pressure, close/drain/lost accounting, one-committer-per-page, argument checks and the
// provisional raw_tlp layout. No fork() here (TSan): fork behaviour is covered in Python.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/gateway.hpp"
#include "mlx5tlp/var.hpp"

using namespace mlx5tlp;
using namespace std::chrono_literals;


namespace {

constexpr bool kTsan = MLX5TLP_TEST_TSAN != 0;
constexpr const char* kBig = "gwbig";      // 64 KiB gateway pages, 64-byte slots: 1022 slots
constexpr const char* kSmall = "gwsmall";  // 4 KiB pages, 256-byte slots: 15 slots
constexpr size_t kSmallSlots = (4096 - 0x80) / 256;

const SimSymbols& simsym() { return Library::get(Backend::sim)->sym().sim; }


// ---------------------------------------------------------------- records
// u32 producer | u32 sequence | u32 length | pattern bytes ... | u32 FNV-1a of everything before.
uint32_t fnv(const uint8_t* p, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

size_t record_len(uint32_t producer, uint32_t seq, size_t max) {
  return 16 + (size_t(seq) * 13 + producer * 5) % (max - 16 + 1);
}

std::vector<uint8_t> make_record(uint32_t producer, uint32_t seq, size_t max) {
  const size_t len = record_len(producer, seq, max);
  std::vector<uint8_t> r(len);
  const uint32_t hdr[3] = {producer, seq, uint32_t(len)};
  std::memcpy(r.data(), hdr, 12);
  for (size_t i = 12; i < len - 4; ++i) r[i] = uint8_t(producer * 31 + seq * 7 + i);
  const uint32_t sum = fnv(r.data(), len - 4);
  std::memcpy(r.data() + len - 4, &sum, 4);
  return r;
}

struct Parsed {
  bool ok = false;
  uint32_t producer = 0, seq = 0;
};

Parsed parse_record(const std::vector<uint8_t>& r, size_t max) {
  Parsed p;
  if (r.size() < 16) return p;
  uint32_t hdr[3];
  std::memcpy(hdr, r.data(), 12);
  if (hdr[2] != r.size() || r.size() != record_len(hdr[0], hdr[1], max)) return p;
  for (size_t i = 12; i < r.size() - 4; ++i)
    if (r[i] != uint8_t(hdr[0] * 31 + hdr[1] * 7 + i)) return p;
  uint32_t sum;
  std::memcpy(&sum, r.data() + r.size() - 4, 4);
  if (sum != fnv(r.data(), r.size() - 4)) return p;
  p.ok = true;
  p.producer = hdr[0];
  p.seq = hdr[1];
  return p;
}

// ---------------------------------------------------------------- the device model
struct Collected {
  uint32_t page;
  uint64_t sequence;
  std::vector<uint8_t> data;
};

// The PCIe host side: collects every completion record written into any gateway page of the
// device. Polls in its own thread (start()) or in the caller's (poll_some()).
class DeviceModel {
 public:
  explicit DeviceModel(const char* device) : host_(simsym().host_open(device)) {
    CHECK(host_ != nullptr);
  }
  ~DeviceModel() {
    stop();
    if (host_ != nullptr) simsym().host_close(host_);
  }
  DeviceModel(const DeviceModel&) = delete;
  DeviceModel& operator=(const DeviceModel&) = delete;

  void start() {
    stop_.store(false);
    thread_ = std::thread([this] {
      unsigned idle = 0;
      while (!stop_.load(std::memory_order_acquire)) {
        if (poll_one()) {
          idle = 0;
        } else {
          ring_detail::backoff(std::min(idle++, 160u));
        }
      }
      while (poll_one()) {
      }
    });
  }
  void stop() {
    stop_.store(true, std::memory_order_release);
    if (thread_.joinable()) thread_.join();
  }
  // Polls in the calling thread (the model thread must not run) up to `max` records.
  size_t poll_some(size_t max) {
    size_t n = 0;
    while (n < max && poll_one()) ++n;
    return n;
  }
  bool wait_for(size_t total, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (count_.load(std::memory_order_acquire) < total) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(200us);
    }
    return true;
  }
  size_t count() const { return count_.load(std::memory_order_acquire); }
  // After stop(): everything collected so far, and the host's own checks.
  std::vector<Collected> take() {
    std::lock_guard<std::mutex> l(mu_);
    return std::move(got_);
  }
  m5a_sim_host_stats host_stats() {
    m5a_sim_host_stats s{};
    CHECK(simsym().host_stats(host_, &s) == 0);
    return s;
  }
  bool poll_failed() const { return poll_error_.load() != 0; }

 private:
  bool poll_one() {
    if (host_ == nullptr) return false;
    uint8_t buf[4096 + 16];
    m5a_sim_completion info{};
    const ssize_t n = simsym().host_poll(host_, buf, sizeof buf, &info);
    if (n < 0) {
      poll_error_.store(int(-n));
      return false;
    }
    if (n == 0) return false;
    {
      std::lock_guard<std::mutex> l(mu_);
      got_.push_back(Collected{info.page_id, info.sequence, std::vector<uint8_t>(buf, buf + n)});
    }
    count_.fetch_add(1, std::memory_order_release);
    return true;
  }

  m5a_sim_host* host_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<size_t> count_{0};
  std::atomic<int> poll_error_{0};
  std::mutex mu_;
  std::vector<Collected> got_;
};

// Every record valid (no tear), from page `page` with consecutive per-page sequence numbers from
// 0, and per producer exactly sequences 0..per_producer-1 in order (no loss, no duplicate).
void verify(const std::vector<Collected>& got, uint32_t page, uint32_t producers,
            uint32_t per_producer, size_t max) {
  CHECK(got.size() == size_t(producers) * per_producer);
  std::vector<uint32_t> next(producers, 0);
  size_t torn = 0, misplaced = 0, out_of_order = 0, bad_seq = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const Collected& c = got[i];
    if (c.page != page) ++misplaced;
    if (c.sequence != i) ++bad_seq;
    const Parsed p = parse_record(c.data, max);
    if (!p.ok || p.producer >= producers) {
      ++torn;
      continue;
    }
    if (p.seq != next[p.producer]) ++out_of_order;
    next[p.producer] = p.seq + 1;
  }
  CHECK(torn == 0);
  CHECK(misplaced == 0);
  CHECK(bad_seq == 0);
  CHECK(out_of_order == 0);
  for (uint32_t k = 0; k < producers; ++k) CHECK(next[k] == per_producer);
  if (torn + misplaced + bad_seq + out_of_order != 0)
    std::fprintf(stderr, "verify: %zu torn, %zu misplaced, %zu bad page sequence, %zu out of order\n",
                 torn, misplaced, bad_seq, out_of_order);
}

GatewayOptions loop_opts(size_t ring_slots = 1024, size_t batch_max = 64,
                         std::chrono::nanoseconds drain = 10s) {
  GatewayOptions o;
  o.ring_slots = ring_slots;
  o.batch_max = batch_max;
  o.drain_timeout = drain;
  return o;
}

// ---------------------------------------------------------------- tests
void many_producers() {
  auto ctx = Context::open(kBig, Backend::sim);
  const uint32_t per = kTsan ? 1500 : 20000;
  for (uint32_t producers : {1u, 2u, 4u}) {
    auto var = Var::alloc(ctx, true);
    CHECK(var->length() == 65536);
    DeviceModel model(kBig);
    model.start();
    auto gw = Gateway::open(var, make_layout("sim"), loop_opts(256, 32));
    CHECK(std::string(gw->layout_name()) == "sim");
    CHECK(gw->max_record() == 64 - 8);
    CHECK(!gw->direct());
    const size_t max = gw->max_record();
    std::atomic<uint32_t> refused{0};
    std::vector<std::thread> threads;
    for (uint32_t k = 0; k < producers; ++k) {
      threads.emplace_back([&, k] {
        // Odd producers post batches of up to 7 records, even ones post one record at a time.
        if (k % 2 == 0) {
          for (uint32_t s = 0; s < per; ++s) {
            auto r = make_record(k, s, max);
            if (!gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(10s))) refused.fetch_add(1);
          }
          return;
        }
        for (uint32_t s = 0; s < per;) {
          const uint32_t n = std::min<uint32_t>(7, per - s);
          std::vector<uint8_t> buf;
          std::vector<uint32_t> off, len;
          for (uint32_t i = 0; i < n; ++i) {
            auto r = make_record(k, s + i, max);
            off.push_back(uint32_t(buf.size()));
            len.push_back(uint32_t(r.size()));
            buf.insert(buf.end(), r.begin(), r.end());
          }
          if (gw->post_batch(buf.data(), off.data(), len.data(), n, mlx5tlp::Deadline::after(10s)) != n) refused.fetch_add(1);
          s += n;
        }
      });
    }
    for (auto& t : threads) t.join();
    CHECK(refused.load() == 0);
    const uint64_t total = uint64_t(producers) * per;
    CHECK(gw->flush(mlx5tlp::Deadline::after(10s)));
    GatewayStats st = gw->stats();
    CHECK(st.posted == total);
    CHECK(st.written == total);
    CHECK(st.lost == 0);
    CHECK(st.batches >= 1 && st.batches <= st.written);
    CHECK(st.max_batch >= 1 && st.max_batch <= 32);
    CHECK(model.wait_for(total, 20s));
    gw->close();
    CHECK(gw->closed());
    model.stop();
    CHECK(!model.poll_failed());
    auto got = model.take();
    verify(got, var->page_id(), producers, per, max);
    const m5a_sim_host_stats hs = model.host_stats();
    CHECK(hs.bad_records == 0);
    CHECK(hs.completions == total);
    st = gw->stats();
    CHECK(st.posted == total && st.written == total && st.lost == 0);
    var->free();
  }
  ctx->close();
}

void direct_mode() {
  auto ctx = Context::open(kBig, Backend::sim);
  auto var = Var::alloc(ctx, true);
  DeviceModel model(kBig);
  model.start();
  GatewayOptions o;
  o.direct = true;
  o.batch_max = 16;
  auto gw = Gateway::open(var, nullptr, o);  // default layout on the software device: sim
  CHECK(gw->direct());
  CHECK(std::string(gw->layout_name()) == "sim");
  const size_t max = gw->max_record();
  const uint32_t n = kTsan ? 600 : 3000;
  uint32_t s = 0;
  for (; s < n / 2; ++s) {
    auto r = make_record(0, s, max);
    CHECK(gw->write(r.data(), r.size(), mlx5tlp::Deadline::after(5s)));
  }
  while (s < n) {  // batches of 50: more than batch_max, so several doorbells per call
    const uint32_t k = std::min<uint32_t>(50, n - s);
    std::vector<uint8_t> buf;
    std::vector<uint32_t> off, len;
    for (uint32_t i = 0; i < k; ++i) {
      auto r = make_record(0, s + i, max);
      off.push_back(uint32_t(buf.size()));
      len.push_back(uint32_t(r.size()));
      buf.insert(buf.end(), r.begin(), r.end());
    }
    CHECK(gw->write_batch(buf.data(), off.data(), len.data(), k, mlx5tlp::Deadline::after(5s)) == k);
    s += k;
  }
  CHECK(gw->flush(mlx5tlp::Deadline::after(0s)));  // direct writes are in the page when write() returns
  GatewayStats st = gw->stats();
  CHECK(st.posted == n && st.written == n && st.lost == 0);
  CHECK(st.max_batch >= 1 && st.max_batch <= 16);
  // Loop-mode calls on a direct gateway are refused.
  const uint8_t rec[16] = {1};
  CHECK_THROWS_KIND(gw->post(rec, sizeof rec, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument, EINVAL);
  const uint32_t off0 = 0, len16 = 16;
  CHECK_THROWS_KIND(gw->post_batch(rec, &off0, &len16, 1, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument, EINVAL);
  CHECK(model.wait_for(n, 20s));
  gw->close();
  model.stop();
  auto got = model.take();
  verify(got, var->page_id(), 1, n, max);
  CHECK(model.host_stats().bad_records == 0);
  var->free();
  ctx->close();
}

// A direct gateway is for one thread at a time: a second thread's write while the first is
// inside write_batch (waiting for device credits) is refused with EBUSY, not interleaved.
void direct_concurrent_use_refused() {
  auto ctx = Context::open(kSmall, Backend::sim);
  auto var = Var::alloc(ctx, true);
  GatewayOptions o;
  o.direct = true;
  auto gw = Gateway::open(var, make_layout("sim"), o);
  const size_t max = gw->max_record();
  CHECK(max == 248);
  const uint32_t n = 40;  // more than the 15 slots of the page: the writer waits for credits
  std::vector<uint8_t> buf;
  std::vector<uint32_t> off, len;
  for (uint32_t i = 0; i < n; ++i) {
    auto r = make_record(0, i, max);
    off.push_back(uint32_t(buf.size()));
    len.push_back(uint32_t(r.size()));
    buf.insert(buf.end(), r.begin(), r.end());
  }
  std::atomic<size_t> written{0};
  std::thread first([&] { written = gw->write_batch(buf.data(), off.data(), len.data(), n, mlx5tlp::Deadline::after(20s)); });
  // Wait until the first writer is inside, stuck on credits (nobody consumes yet).
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (gw->stats().credit_waits == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  CHECK(gw->stats().credit_waits > 0);
  CHECK(gw->stats().written == kSmallSlots);
  const auto r = make_record(1, 0, max);
  CHECK_THROWS_KIND(gw->write(r.data(), r.size(), mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument, EBUSY);
  // Now the device consumes: the first writer finishes everything.
  DeviceModel model(kSmall);
  model.start();
  first.join();
  CHECK(written.load() == n);
  CHECK(model.wait_for(n, 10s));
  model.stop();
  verify(model.take(), var->page_id(), 1, n, max);
  // Once the first writer is out, another thread may write.
  std::thread second([&] { CHECK(gw->write(r.data(), r.size(), mlx5tlp::Deadline::after(0s))); });
  second.join();
  CHECK(gw->stats().written == n + 1);
  CHECK(model.poll_some(10) == 1);
  gw->close();
  var->free();
  ctx->close();
}

void argument_and_ownership_errors() {
  auto ctx = Context::open(kSmall, Backend::sim);
  auto var = Var::alloc(ctx, true);
  auto virtio = Var::alloc(ctx, false);
  CHECK_THROWS_KIND(Gateway::open(virtio, nullptr, {}), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(make_layout("nope"), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(make_layout("raw_tlp:abc"), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(make_layout("raw_tlp:0"), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(make_layout(""), ErrorKind::invalid_argument, EINVAL);
  // raw_tlp slots must be multiples of 64 dividing the page.
  CHECK_THROWS_KIND(Gateway::open(var, make_layout("raw_tlp:100"), {}), ErrorKind::invalid_argument,
                    EINVAL);
  CHECK_THROWS_KIND(Gateway::open(var, make_layout("raw_tlp:8192"), {}), ErrorKind::invalid_argument,
                    EINVAL);
  GatewayOptions zero;
  zero.batch_max = 0;
  CHECK_THROWS_KIND(Gateway::open(var, nullptr, zero), ErrorKind::invalid_argument, EINVAL);
  CHECK(var->mappings() == 0);  // failed opens leave nothing mapped (and no page lock)

  auto gw = Gateway::open(var, nullptr, loop_opts(64));
  const size_t max = gw->max_record();
  std::vector<uint8_t> big(max + 1, 0xab);
  // Oversize and zero-length records, every entry point.
  CHECK_THROWS_KIND(gw->post(big.data(), max + 1, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(gw->post(big.data(), 0, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument, EINVAL);
  const uint32_t offs[3] = {0, 0, 0};
  const uint32_t lens_big[3] = {16, uint32_t(max + 1), 16};
  const uint32_t lens_zero[3] = {16, 0, 16};
  CHECK_THROWS_KIND(gw->post_batch(big.data(), offs, lens_big, 3, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument,
                    EINVAL);
  CHECK_THROWS_KIND(gw->post_batch(big.data(), offs, lens_zero, 3, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument,
                    EINVAL);
  CHECK(gw->stats().posted == 0);  // a refused batch queues none of its records
  // Direct-mode calls on a loop gateway are refused.
  CHECK_THROWS_KIND(gw->write(big.data(), 16, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(gw->write_batch(big.data(), offs, lens_zero, 1, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_argument,
                    EINVAL);
  CHECK(gw->post(big.data(), max, mlx5tlp::Deadline::after(1s)));  // exactly max_record is fine

  // One committer per page: a second gateway (any layout, any mode, another context) is EBUSY.
  CHECK_THROWS_ERRNO(Gateway::open(var, nullptr, {}), EBUSY);
  GatewayOptions d;
  d.direct = true;
  CHECK_THROWS_ERRNO(Gateway::open(var, make_layout("raw_tlp"), d), EBUSY);
  auto peer = Context::import_fd(ctx->cmd_fd(), Backend::sim);
  auto raw = var->export_raw();
  auto imp = Var::import(peer, raw.data(), raw.size(), true);
  CHECK_THROWS_ERRNO(Gateway::open(imp, nullptr, {}), EBUSY);
  // Other pages are independent.
  auto other = Var::alloc(ctx, true);
  auto gw2 = Gateway::open(other, nullptr, {});
  gw2->close();

  // The Var cannot be freed under its gateway.
  CHECK_THROWS_KIND(var->free(), ErrorKind::invalid_argument, EBUSY);
  CHECK(!var->closed());
  DeviceModel model(kSmall);
  CHECK(gw->flush(mlx5tlp::Deadline::after(5s)));  // the page has credits: the record is in it
  CHECK(gw->stats().written == 1);
  gw->close();
  gw->close();   // idempotent
  CHECK(model.poll_some(10) == 1);
  CHECK(gw->stats().written == 1 && gw->stats().lost == 0);
  // Use after close.
  CHECK_THROWS_KIND(gw->post(big.data(), 16, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_handle, EBADF);
  CHECK_THROWS_KIND(gw->post_batch(big.data(), offs, lens_big, 1, mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_handle,
                    EBADF);
  CHECK_THROWS_KIND(gw->flush(mlx5tlp::Deadline::after(0s)), ErrorKind::invalid_handle, EBADF);
  // After close: the page takes a new gateway (another context too), continuing its sequence.
  auto again = Gateway::open(imp, nullptr, {});
  const auto rec = make_record(0, 0, max);
  CHECK(again->post(rec.data(), rec.size(), mlx5tlp::Deadline::after(1s)));
  CHECK(again->flush(mlx5tlp::Deadline::after(5s)));
  CHECK(model.poll_some(10) == 1);
  again->close();
  imp->unimport();
  peer->close();
  CHECK(var->mappings() == 0);
  var->free();  // now fine
  virtio->free();
  other->free();
  // A Context closes its gateways first (newest first), then frees the VARs: no error.
  auto v3 = Var::alloc(ctx, true);
  auto g3 = Gateway::open(v3, nullptr, {});
  ctx->close();
  CHECK(g3->closed() && v3->closed());
}

// A device that stops consuming: post(timeout) reports a full ring, close() gives up after
// drain_timeout with resource_exhausted/ETIMEDOUT and counts the records it could not write.
void back_pressure_and_lost() {
  auto ctx = Context::open(kSmall, Backend::sim);
  auto var = Var::alloc(ctx, true);
  const size_t ring = 16;
  auto gw = Gateway::open(var, nullptr, loop_opts(ring, 64, 200ms));
  const size_t max = gw->max_record();
  uint32_t seq = 0;
  // Fill the page (15 credits) and the ring (16) with nobody consuming.
  size_t accepted = 0;
  for (int i = 0; i < 1000; ++i) {
    auto r = make_record(0, seq, max);
    if (!gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(0s))) {
      // The writer may still be moving records into the page: settle, then retry once.
      std::this_thread::sleep_for(20ms);
      if (!gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(0s))) break;
    }
    ++seq;
    ++accepted;
  }
  CHECK(accepted == kSmallSlots + ring);
  GatewayStats st = gw->stats();
  CHECK(st.posted == accepted);
  CHECK(st.written == kSmallSlots);
  CHECK(st.credit_waits > 0);
  const uint64_t fw_before = st.full_waits;
  CHECK(fw_before >= 1);
  // One timed post on a full ring: false after about the timeout; it counts as ONE full wait.
  auto r = make_record(0, seq, max);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(!gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(50ms)));
  const auto waited = std::chrono::steady_clock::now() - t0;
  CHECK(waited >= 45ms);
  CHECK(waited < 5s);
  // (GatewayStats::full_waits: "posts that found the ring full and waited".)
  const uint64_t fw_after = gw->stats().full_waits;
  CHECK(fw_after == fw_before + 1);
  if (fw_after != fw_before + 1)
    std::fprintf(stderr, "one timed post on a full ring moved full_waits from %llu to %llu\n",
                 static_cast<unsigned long long>(fw_before), static_cast<unsigned long long>(fw_after));
  const uint32_t offs[2] = {0, uint32_t(r.size())};
  const uint32_t lens[2] = {uint32_t(r.size()), uint32_t(r.size())};
  std::vector<uint8_t> two(r);
  two.insert(two.end(), r.begin(), r.end());
  CHECK(gw->post_batch(two.data(), offs, lens, 2, mlx5tlp::Deadline::after(0s)) == 0);
  CHECK(!gw->flush(mlx5tlp::Deadline::after(30ms)));  // the ring's records are not in the page
  // The device consumes a few: credits come back, the writer moves ring records into the page,
  // and posting works again.
  {
    DeviceModel model(kSmall);
    CHECK(model.poll_some(5) == 5);
    CHECK(gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(5s)));
    ++seq;
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (gw->stats().written < kSmallSlots + 5 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(1ms);
    CHECK(gw->stats().written == kSmallSlots + 5);
  }  // the model detaches and nobody consumes again
  st = gw->stats();
  const uint64_t posted = st.posted;
  CHECK(posted == accepted + 1);
  CHECK_THROWS_KIND(gw->close(), ErrorKind::resource_exhausted, ETIMEDOUT);
  CHECK(gw->closed());
  st = gw->stats();
  CHECK(st.lost > 0);
  CHECK(st.posted == posted);
  CHECK(st.written + st.lost == st.posted);
  CHECK(st.written == kSmallSlots + 5);
  CHECK(var->mappings() == 0);  // a failed drain still unmaps and unlocks the page
  gw->close();                  // closed: idempotent, no second report
  // The page is free for a new gateway; the device then collects what was written, in order.
  auto gw2 = Gateway::open(var, nullptr, loop_opts(ring, 64, 5s));
  {
    DeviceModel model(kSmall);
    model.start();
    CHECK(model.wait_for(kSmallSlots, 5s));
    auto fresh = make_record(1, 0, max);
    CHECK(gw2->post(fresh.data(), fresh.size(), mlx5tlp::Deadline::after(5s)));
    CHECK(gw2->flush(mlx5tlp::Deadline::after(5s)));
    CHECK(model.wait_for(kSmallSlots + 1, 5s));
    gw2->close();
    model.stop();
    auto got = model.take();
    CHECK(got.size() == kSmallSlots + 1);
    for (size_t i = 0; i < got.size(); ++i) {
      CHECK(got[i].sequence == 5 + i);
      const Parsed p = parse_record(got[i].data, max);
      CHECK(p.ok);
      if (i + 1 < got.size()) CHECK(p.producer == 0 && p.seq == 5 + i);
      else CHECK(p.producer == 1 && p.seq == 0);
    }
    CHECK(model.host_stats().bad_records == 0);
  }
  var->free();
  ctx->close();
}

// flush() returns once records are in the page; close() without flush drains all of them.
void flush_and_close_drain() {
  auto ctx = Context::open(kBig, Backend::sim);
  auto var = Var::alloc(ctx, true);
  {
    auto gw = Gateway::open(var, nullptr, loop_opts(1024, 64));
    const size_t max = gw->max_record();
    // No device model yet: 500 records fit in the page's 1022 slots.
    for (uint32_t s = 0; s < 500; ++s) {
      auto r = make_record(0, s, max);
      CHECK(gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(5s)));
    }
    CHECK(gw->flush(mlx5tlp::Deadline::after(10s)));
    CHECK(gw->stats().written == 500);
    // The page holds them, published: the model reads all 500 without the gateway's help.
    DeviceModel model(kBig);
    CHECK(model.poll_some(1000) == 500);
    verify(model.take(), var->page_id(), 1, 500, max);
    gw->close();
  }
  // Post and close at once, many times: everything accepted is drained, nothing is lost.
  DeviceModel model(kBig);
  model.start();
  const int rounds = kTsan ? 20 : 100;
  const uint32_t per = 40;
  uint64_t expected = 0;
  int close_errors = 0;
  uint64_t lost_total = 0;
  for (int round = 0; round < rounds; ++round) {
    auto gw = Gateway::open(var, nullptr, loop_opts(64, 8));
    const size_t max = gw->max_record();
    for (uint32_t s = 0; s < per; ++s) {
      auto r = make_record(uint32_t(round), s, max);
      CHECK(gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(5s)));
    }
    if (round % 2 == 1) {  // idle writer: post one more right before close
      std::this_thread::sleep_for(1ms);
      auto r = make_record(uint32_t(round), per, max);
      CHECK(gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(5s)));
      ++expected;
    }
    try {
      gw->close();
    } catch (const Error& e) {
      ++close_errors;
      if (close_errors == 1) std::fprintf(stderr, "round %d: close threw: %s\n", round, e.what());
    }
    expected += per;
    const GatewayStats st = gw->stats();
    lost_total += st.lost;
    CHECK(st.lost == 0);
    CHECK(st.written == st.posted);
  }
  CHECK(close_errors == 0);
  CHECK(model.wait_for(expected - lost_total, 20s));
  model.stop();
  auto got = model.take();
  CHECK(got.size() == expected);
  std::map<uint32_t, uint32_t> next;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const Parsed p = parse_record(got[i].data, 56);
    if (!p.ok || p.seq != next[p.producer]) ++bad;
    next[p.producer] = p.seq + 1;
    if (got[i].sequence != 500 + i) ++bad;
  }
  CHECK(bad == 0);
  CHECK(model.host_stats().bad_records == 0);
  var->free();
  ctx->close();
}

// close() right after one post, the writer caught at varying points of its idle loop, with a
// device model that has credits to spare: the record must be written, never reported lost.
void close_right_after_post() {
  auto ctx = Context::open(kBig, Backend::sim);
  auto var = Var::alloc(ctx, true);
  DeviceModel model(kBig);
  model.start();
  const int rounds = kTsan ? 150 : 4000;
  int failed_closes = 0;
  uint64_t lost = 0;
  for (int round = 0; round < rounds; ++round) {
    GatewayOptions o = loop_opts(16, 64, 5s);
    auto gw = Gateway::open(var, nullptr, o);
    if (round % 4 == 3) {
      std::this_thread::sleep_for(200us);  // the writer idles (spins, maybe parks)
    } else {
      for (volatile int spin = 0; spin < (round % 200) * 50; ++spin) {
      }
    }
    auto r = make_record(0, uint32_t(round), gw->max_record());
    CHECK(gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(5s)));
    try {
      gw->close();
    } catch (const Error& e) {
      if (++failed_closes == 1)
        std::fprintf(stderr, "close right after post, round %d: %s\n", round, e.what());
    }
    lost += gw->stats().lost;
  }
  CHECK(failed_closes == 0);
  CHECK(lost == 0);
  if (failed_closes != 0)
    std::fprintf(stderr, "%d of %d closes reported %llu lost record(s) with credits available\n",
                 failed_closes, rounds, static_cast<unsigned long long>(lost));
  CHECK(model.wait_for(size_t(rounds) - lost, 20s));
  model.stop();
  const auto got = model.take();
  CHECK(got.size() == size_t(rounds));
  var->free();
  ctx->close();
}

// The provisional hardware layout: each record in PCIe wire order at slot k * slot_size
// (rotating), zero-padded to whole 64-byte chunks, nothing else in the page touched.
void raw_tlp_layout() {
  auto ctx = Context::open(kSmall, Backend::sim);
  auto var = Var::alloc(ctx, true);
  Mapping view = var->map(PROT_READ | PROT_WRITE);
  auto* page = static_cast<uint8_t*>(view.data());
  std::memset(page, 0xee, view.size());
  // A CplD (3DW header + 1 DW): fmt/type 0x4a, length 1, completer 0x0100, byte count 4,
  // requester 0x0200, tag 0x11, lower address 0; data 0xdeadbeef, in wire (big-endian) order.
  const uint8_t cpld[16] = {0x4a, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x04,
                            0x02, 0x00, 0x11, 0x00, 0xde, 0xad, 0xbe, 0xef};
  {
    auto gw = Gateway::open(var, make_layout("raw_tlp:512"), loop_opts(64));
    CHECK(std::string(gw->layout_name()) == "raw_tlp");
    CHECK(gw->max_record() == 512);
    std::vector<std::vector<uint8_t>> recs;
    for (uint8_t k = 0; k < 3; ++k) {
      std::vector<uint8_t> r(cpld, cpld + 12);
      r.resize(12 + 4 * (k + 1));  // 16, 20, 24 bytes: two of them end mid-word
      for (size_t i = 12; i < r.size(); ++i) r[i] = uint8_t(0xa0 + k * 16 + i);
      r[10] = uint8_t(0x20 + k);  // tag
      recs.push_back(r);
      CHECK(gw->post(r.data(), r.size(), mlx5tlp::Deadline::after(1s)));
    }
    CHECK(gw->flush(mlx5tlp::Deadline::after(5s)));
    for (size_t k = 0; k < recs.size(); ++k) {
      const uint8_t* slot = page + k * 512;
      CHECK(std::memcmp(slot, recs[k].data(), recs[k].size()) == 0);
      // Whole 64-byte chunks, zero-padded (as rdma-core's mmio_memcpy_x64), nothing beyond.
      const size_t padded = (recs[k].size() + 63) / 64 * 64;
      for (size_t i = recs[k].size(); i < padded; ++i) CHECK(slot[i] == 0);
      CHECK(slot[padded] == 0xee);  // nothing written past the record's last chunk
    }
    CHECK(page[3 * 512] == 0xee);
    const GatewayStats st = gw->stats();
    CHECK(st.written == 3 && st.batches == 3);  // one doorbell (store fence) per record
    gw->close();
  }
  {
    // Direct mode, 64-byte slots: 64 slots in 4 KiB; record 65 wraps to slot 0.
    GatewayOptions o;
    o.direct = true;
    auto gw = Gateway::open(var, make_layout("raw_tlp:64"), o);
    CHECK(gw->max_record() == 64);
    for (uint32_t k = 0; k < 65; ++k) {
      uint8_t r[16];
      std::memcpy(r, cpld, 16);
      r[12] = uint8_t(k);
      CHECK(gw->write(r, sizeof r, mlx5tlp::Deadline::after(0s)));
    }
    CHECK(page[0 * 64 + 12] == 64);  // overwritten by the 65th record
    CHECK(page[1 * 64 + 12] == 1);
    CHECK(page[63 * 64 + 12] == 63);
    CHECK(std::memcmp(page + 63 * 64, cpld, 12) == 0);
    CHECK(gw->stats().written == 65);
    gw->close();
  }
  view.reset();
  var->free();
  ctx->close();
}

}  // namespace

int main() {
  char dir[] = "/tmp/mlx5tlp-gw-test-XXXXXX";
  if (mkdtemp(dir) == nullptr) return 2;
  setenv("MLX5TLP_SIM_DIR", dir, 1);
  try {
    m5a_sim_device_config big{};
    big.tlp = 1;
    big.gw_pages = 4;
    big.gw_log_stride = 4;  // 64 KiB pages
    big.virtio_pages = 2;
    big.gw_slot_size = 64;
    CHECK(simsym().create_device(kBig, &big) == 0);
    m5a_sim_device_config small{};
    small.tlp = 1;
    small.gw_pages = 4;
    small.virtio_pages = 2;
    small.gw_slot_size = 256;
    CHECK(simsym().create_device(kSmall, &small) == 0);

    const auto t0 = std::chrono::steady_clock::now();
    many_producers();
    direct_mode();
    direct_concurrent_use_refused();
    argument_and_ownership_errors();
    back_pressure_and_lost();
    flush_and_close_drain();
    close_right_after_post();
    raw_tlp_layout();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("test_gateway: %.2f s%s\n", secs, kTsan ? " (TSan, scaled down)" : "");

    CHECK(simsym().remove_device(kBig) == 0);    // no context or host leaked
    CHECK(simsym().remove_device(kSmall) == 0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  std::string cmd = std::string("rm -rf ") + dir;
  if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", dir);
  return mlx5tlp_test::finish("test_gateway");
}
