// bench_ring — records/s through mlx5tlp::Ring (lock-free) vs mlx5tlp::MutexRing (the same ring
// code with every operation under one std::mutex), for 1, 2 and 4 producer threads plus one
// consumer thread, with single pushes and with batches. Prints ONE JSON object on stdout.
//
//   bench_ring [--quick] [--records N] [--runs N]
//
// Method: per configuration one warm-up run per ring, then `runs` measured runs with the two
// rings alternating (so machine noise hits both alike); each reports the median. A run times
// from releasing the producers until the consumer has taken every record; the consumer checks
// the count and a checksum over every record so nothing is optimised away or lost.
// Two thread placements: "os" (the scheduler decides; producer and consumer may share a CPU and
// then run one after the other) and "pinned" (consumer on the first allowed CPU, producers
// round-robin on the others: producers and consumer really run in parallel).
#include "bench_util.hpp"
#include "mlx5tlp/ring.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/utsname.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

using namespace mlx5tlp_bench;

namespace {

constexpr std::size_t kRecordBytes = 32;
constexpr std::size_t kSlotBytes = 32;
constexpr std::size_t kCapacity = 1024;
constexpr std::size_t kBatch = 16;

// Waiting policy of both producers (ring full) and the consumer (ring empty): spin, then yield.
// No sleeping: a sleep would measure the scheduler's timer slack rather than the ring.
inline void wait_step(unsigned i) noexcept { mlx5tlp::ring_detail::backoff(std::min(i, 127u)); }

struct Run {
  double seconds = 0;
  bool ok = false;
};

std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0)
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus;
}

void pin_self(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// pin: empty = no pinning; else pin[0] for the consumer, the rest round-robin for producers.
template <class R>
Run run_once(unsigned producers, bool batch, uint64_t records, const std::vector<int>& pin) {
  R ring(kCapacity, kSlotBytes);
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  uint64_t expect_sum = 0;
  for (unsigned p = 0; p < producers; ++p) {
    const uint64_t first = records * p / producers, last = records * (p + 1) / producers;
    for (uint64_t s = first; s < last; ++s) expect_sum += s;
    const int cpu = pin.size() > 1 ? pin[1 + p % (pin.size() - 1)] : -1;
    threads.emplace_back([&ring, &go, batch, first, last, cpu] {
      pin_self(cpu);
      uint8_t buf[kBatch * kRecordBytes] = {};
      uint32_t off[kBatch], len[kBatch];
      for (std::size_t i = 0; i < kBatch; ++i) {
        off[i] = static_cast<uint32_t>(i * kRecordBytes);
        len[i] = kRecordBytes;
      }
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      uint64_t s = first;
      while (s < last) {
        const std::size_t k = batch ? static_cast<std::size_t>(std::min<uint64_t>(kBatch, last - s)) : 1;
        for (std::size_t i = 0; i < k; ++i) {
          const uint64_t v = s + i;
          std::memcpy(buf + off[i], &v, sizeof v);
        }
        std::size_t done = 0;
        for (unsigned w = 0; done < k; ++w) {
          const std::size_t n = batch ? ring.try_push_batch(buf, off + done, len + done, k - done)
                                      : (ring.try_push(buf, kRecordBytes) ? 1 : 0);
          done += n;
          if (n == 0) wait_step(w);
        }
        s += k;
      }
    });
  }
  uint64_t got = 0, sum = 0;
  double seconds = 0;
  std::thread consumer([&] {
    pin_self(pin.empty() ? -1 : pin[0]);
    const auto t0 = std::chrono::steady_clock::now();
    go.store(true, std::memory_order_release);
    for (unsigned idle = 0; got < records;) {
      const std::size_t n = ring.consume(kCapacity, [&sum](const uint8_t* d, uint32_t l) {
        uint64_t v;
        std::memcpy(&v, d, sizeof v);
        sum += v + (l - kRecordBytes);
      });
      got += n;
      if (n == 0) wait_step(idle++); else idle = 0;
    }
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  consumer.join();
  for (auto& t : threads) t.join();
  return {seconds, got == records && sum == expect_sum};
}

// Context for reading the numbers: total spin-loop throughput of 2 threads over that of 1.
// About 2 with two independent cores; about 1 when the two CPUs share one core (SMT siblings)
// or the host time-slices them.
double two_thread_speedup(double seconds) {
  auto spin = [seconds](unsigned n) {
    std::atomic<bool> stop{false};
    std::vector<uint64_t> counts(n * 8, 0);
    std::vector<std::thread> ts;
    for (unsigned i = 0; i < n; ++i)
      ts.emplace_back([&stop, &counts, i] {
        uint64_t x = 0;
        while (!stop.load(std::memory_order_relaxed)) ++x;
        counts[i * 8] = x;
      });
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    stop.store(true);
    for (auto& t : ts) t.join();
    uint64_t total = 0;
    for (uint64_t c : counts) total += c;
    return static_cast<double>(total);
  };
  const double one = spin(1);
  return one > 0 ? spin(2) / one : 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  uint64_t records = 0;
  int runs = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--records" && i + 1 < argc) {
      records = std::strtoull(argv[++i], nullptr, 10);
    } else if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--records N] [--runs N]\n", argv[0]);
      return 2;
    }
  }
  if (records == 0) records = quick ? 40000 : 400000;
  if (runs <= 0) runs = quick ? 3 : 7;

  struct utsname u {};
  uname(&u);
  const std::vector<int> cpus = allowed_cpus();
  const double speedup = two_thread_speedup(quick ? 0.05 : 0.2);
  std::string rows;
  bool all_ok = true;
  const auto start = std::chrono::steady_clock::now();
  for (const bool pinned : {false, true}) {
    if (pinned && cpus.size() < 2) continue;
    const std::vector<int> pin = pinned ? cpus : std::vector<int>{};
    for (const bool batch : {false, true}) {
      for (const unsigned producers : {1u, 2u, 4u}) {
        run_once<mlx5tlp::Ring>(producers, batch, records, pin);  // warm-up (page faults, caches)
        run_once<mlx5tlp::MutexRing>(producers, batch, records, pin);
        std::vector<double> lf, mx;
        for (int r = 0; r < runs; ++r) {
          const Run a = run_once<mlx5tlp::Ring>(producers, batch, records, pin);
          const Run b = run_once<mlx5tlp::MutexRing>(producers, batch, records, pin);
          all_ok = all_ok && a.ok && b.ok;
          lf.push_back(static_cast<double>(records) / a.seconds);
          mx.push_back(static_cast<double>(records) / b.seconds);
        }
        const double lfm = median(lf), mxm = median(mx);
        char row[320];
        std::snprintf(row, sizeof row,
                      "%s    {\"placement\": \"%s\", \"mode\": \"%s\", \"producers\": %u, "
                      "\"lockfree_records_per_s\": %.0f, \"mutex_records_per_s\": %.0f, "
                      "\"ratio_lockfree_over_mutex\": %.2f,\n",
                      rows.empty() ? "" : ",\n", pinned ? "pinned" : "os", batch ? "batch" : "single",
                      producers, lfm, mxm, lfm / mxm);
        rows += row;
        rows += "     \"lockfree_runs\": " + json_array(lf) + ",\n     \"mutex_runs\": " + json_array(mx) + "}";
      }
    }
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::printf("{\n  \"benchmark\": \"ring\",\n");
  std::printf("  \"machine\": {\"arch\": \"%s\", \"cpus\": %u, \"allowed_cpus\": %zu, "
              "\"compiler\": \"%s\", \"two_thread_spin_speedup\": %.2f},\n",
              u.machine, std::thread::hardware_concurrency(), cpus.size(), compiler().c_str(), speedup);
  std::printf("  \"parameters\": {\"record_bytes\": %zu, \"slot_bytes\": %zu, \"capacity\": %zu, "
              "\"batch_records\": %zu, \"records_per_run\": %llu, \"consumer_threads\": 1},\n",
              kRecordBytes, kSlotBytes, kCapacity, kBatch, static_cast<unsigned long long>(records));
  std::printf("  \"method\": {\"warmup_runs\": 1, \"runs\": %d, \"statistic\": \"median\", "
              "\"order\": \"lockfree and mutex runs alternate\", \"timer\": \"steady_clock, producers "
              "released -> consumer has every record\", \"wait_policy\": \"64 pause spins then yield\", "
              "\"placements\": \"os = scheduler decides; pinned = consumer alone on the first CPU, "
              "producers round-robin on the others\", \"quick\": %s},\n",
              runs, quick ? "true" : "false");
  std::printf("  \"results\": [\n%s\n  ],\n", rows.c_str());
  std::printf("  \"verified\": %s,\n  \"total_seconds\": %.2f\n}\n", all_ok ? "true" : "false", total);
  return all_ok ? 0 : 1;
}
