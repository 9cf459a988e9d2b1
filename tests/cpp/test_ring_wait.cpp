// Tests of how producers of a full ring block and are woken (mlx5tlp::RoomWaiters, ring_wait.hpp):
// they sleep on a futex instead of polling, the consumer wakes them only when someone waits,
// shutdown() ends every wait, and a threaded stress of blocking producers against a consumer
// that stops and starts never loses a wake-up (a lost one hangs: a watchdog reports it).
// Run plain, under ASan and under TSan.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "check.hpp"
#include "mlx5tlp/ring.hpp"

namespace {

using namespace std::chrono_literals;
using mlx5tlp::Deadline;
using mlx5tlp::PushStatus;

// Waits (polling, test side only) until pred() holds; false after 20 s.
template <class P>
bool eventually(P&& pred) {
  const auto until = std::chrono::steady_clock::now() + 20s;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// Aborts the test program if it is still running after `limit` (a lost wake-up hangs).
struct Watchdog {
  std::atomic<bool> done{false};
  std::thread t;
  explicit Watchdog(std::chrono::seconds limit, const char* what) {
    t = std::thread([this, limit, what] {
      const auto until = std::chrono::steady_clock::now() + limit;
      while (!done.load()) {
        if (std::chrono::steady_clock::now() >= until) {
          std::fprintf(stderr, "watchdog: %s still running after %llds (lost wake-up?)\n", what,
                       static_cast<long long>(limit.count()));
          std::abort();
        }
        std::this_thread::sleep_for(10ms);
      }
    });
  }
  ~Watchdog() {
    done.store(true);
    t.join();
  }
};

template <class R>
void blocked_producer_sleeps_and_is_woken() {
  R r(2, 8);
  const uint64_t v = 1;
  CHECK(r.try_push(&v, 8) && r.try_push(&v, 8));
  CHECK(r.stats().sleeps == 0 && r.stats().wakes == 0);
  // Nobody waits: consuming costs no wake-up.
  CHECK(r.consume(1, [](const uint8_t*, uint32_t) {}) == 1);
  CHECK(r.try_push(&v, 8));
  CHECK(r.stats().wakes == 0);
  std::atomic<int> result{-1};
  std::thread producer([&] { result = int(r.push_wait(&v, 8, Deadline::never())); });
  // The producer goes to sleep in the kernel (it does not poll: the count of its futex waits
  // stays at one while the ring stays full).
  CHECK(eventually([&] { return r.stats().sleeps >= 1; }));
  std::this_thread::sleep_for(50ms);
  CHECK(r.stats().sleeps == 1);
  CHECK(result.load() == -1);
  CHECK(r.consume(1, [](const uint8_t*, uint32_t) {}) == 1);  // frees a slot: wakes it
  producer.join();
  CHECK(result.load() == int(PushStatus::pushed));
  CHECK(r.stats().wakes >= 1);
  CHECK(r.stats().full_waits == 1 && r.stats().push_timeouts == 0);
  CHECK(r.peek_published() == 2);
}

template <class R>
void shutdown_wakes_every_waiter() {
  R r(4, 8);
  const uint64_t v = 2;
  for (int i = 0; i < 4; ++i) CHECK(r.try_push(&v, 8));
  std::vector<uint8_t> buf(8 * 4, 0);
  const uint32_t off[4] = {0, 8, 16, 24}, len[4] = {8, 8, 8, 8};
  std::atomic<int> single{-1}, batch_why{-1};
  std::atomic<size_t> batch_done{99};
  std::thread a([&] { single = int(r.push_wait(&v, 8, Deadline::never())); });
  std::thread b([&] {
    PushStatus why = PushStatus::pushed;
    batch_done = r.push_batch(buf.data(), off, len, 4, Deadline::never(), &why);
    batch_why = int(why);
  });
  CHECK(eventually([&] { return r.stats().sleeps >= 2; }));
  CHECK(!r.is_shut_down());
  r.shutdown();
  a.join();
  b.join();
  CHECK(single.load() == int(PushStatus::shut_down));
  CHECK(batch_why.load() == int(PushStatus::shut_down) && batch_done.load() == 0);
  // After shutdown a blocking push that would have to wait returns at once; one with room
  // still works (the owner decides what it accepts), and the consumer keeps consuming.
  CHECK(r.push_wait(&v, 8, Deadline::never()) == PushStatus::shut_down);
  CHECK(r.consume(4, [](const uint8_t*, uint32_t) {}) == 4);
  CHECK(r.push_wait(&v, 8, Deadline::never()) == PushStatus::pushed);
}

template <class R>
void timed_wait_and_partial_batch() {
  R r(4, 8);
  std::vector<uint8_t> buf(8 * 6, 7);
  const uint32_t off[6] = {0, 8, 16, 24, 32, 40}, len[6] = {8, 8, 8, 8, 8, 8};
  PushStatus why = PushStatus::pushed;
  // 6 records into 4 slots, nobody consuming: a prefix of 4, then the deadline.
  CHECK(r.push_batch(buf.data(), off, len, 6, Deadline::after(20ms), &why) == 4);
  CHECK(why == PushStatus::timed_out);
  CHECK(r.stats().push_timeouts == 1);
  // A past deadline: exactly one attempt, no sleep.
  const uint64_t sleeps = r.stats().sleeps;
  CHECK(r.push_wait(buf.data(), 8, Deadline::poll()) == PushStatus::timed_out);
  CHECK(r.stats().sleeps == sleeps);
  // A consumer thread makes room record by record: the blocked batch completes.
  std::thread consumer([&] {
    for (int got = 0; got < 6;) {
      got += int(r.consume(1, [](const uint8_t*, uint32_t) {}));
      std::this_thread::sleep_for(2ms);
    }
  });
  CHECK(r.push_batch(buf.data(), off, len, 2, Deadline::never(), &why) == 2);
  CHECK(why == PushStatus::pushed);
  consumer.join();
  CHECK(r.empty());
}

// Producers that always block (push/push_batch with no deadline) against a consumer that runs
// in bursts and pauses: every record arrives once, in per-producer order, and no producer is
// left asleep (the watchdog aborts on a lost wake-up).
template <class R>
void stress(unsigned producers, uint64_t per_producer) {
  R ring(8, 16);
  Watchdog dog(std::chrono::seconds(240), "ring wait stress");
  std::vector<std::thread> ts;
  for (unsigned p = 0; p < producers; ++p) {
    ts.emplace_back([&, p] {
      std::mt19937 rng(7 + p);
      uint64_t seq = 0;
      while (seq < per_producer) {
        if (rng() % 2 == 0) {
          const uint64_t rec[2] = {p, seq};
          CHECK(ring.push_wait(rec, sizeof rec, Deadline::never()) == PushStatus::pushed);
          ++seq;
        } else {
          const size_t k = std::min<uint64_t>(1 + rng() % 12, per_producer - seq);
          uint64_t buf[24];
          uint32_t off[12], len[12];
          for (size_t i = 0; i < k; ++i) {
            buf[2 * i] = p;
            buf[2 * i + 1] = seq + i;
            off[i] = uint32_t(16 * i);
            len[i] = 16;
          }
          PushStatus why = PushStatus::timed_out;
          CHECK(ring.push_batch(reinterpret_cast<const uint8_t*>(buf), off, len, k,
                                Deadline::never(), &why) == k);
          CHECK(why == PushStatus::pushed);
          seq += k;
        }
      }
    });
  }
  std::vector<uint64_t> next(producers, 0);
  uint64_t got = 0, bad = 0;
  std::mt19937 rng(3);
  while (got < producers * per_producer) {
    const size_t n = ring.consume(1 + rng() % 8, [&](const uint8_t* d, uint32_t l) {
      uint64_t rec[2];
      if (l != sizeof rec) {
        ++bad;
        return;
      }
      std::memcpy(rec, d, sizeof rec);
      if (rec[0] >= producers || rec[1] != next[rec[0]]) ++bad;
      else ++next[rec[0]];
    });
    got += n;
    if (rng() % 64 == 0) std::this_thread::sleep_for(100us);  // let every producer fall asleep
    else if (n == 0) std::this_thread::yield();
  }
  for (auto& t : ts) t.join();
  CHECK(bad == 0);
  for (unsigned p = 0; p < producers; ++p) CHECK(next[p] == per_producer);
  CHECK(ring.stats().sleeps > 0 && ring.stats().wakes > 0);  // the wait path was exercised
}

}  // namespace

int main() {
  blocked_producer_sleeps_and_is_woken<mlx5tlp::Ring>();
  blocked_producer_sleeps_and_is_woken<mlx5tlp::MutexRing>();
  shutdown_wakes_every_waiter<mlx5tlp::Ring>();
  shutdown_wakes_every_waiter<mlx5tlp::MutexRing>();
  timed_wait_and_partial_batch<mlx5tlp::Ring>();
  const uint64_t per = MLX5TLP_TEST_TSAN ? 4000 : 40000;
  for (unsigned producers : {1u, 2u, 4u}) stress<mlx5tlp::Ring>(producers, per);
  stress<mlx5tlp::MutexRing>(2, per / 4);
  return mlx5tlp_test::finish("test_ring_wait");
}
