// bench_gateway: the default ring under CPU contention (ring_contended_records_per_s) and the CPU
// use of idle gateways.
#pragma once

#include <sys/mman.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench_sim.hpp"
#include "bench_util.hpp"
#include "mlx5tlp/gateway.hpp"
#include "mlx5tlp/gateway_layout.hpp"
#include "mlx5tlp/var.hpp"

namespace mlx5tlp_bench {

// ------------------------------------------------------------ the default ring, contended
// ring_contended_records_per_s: the DEFAULT gateway (1024-slot ring, batch_max 64) into a
// raw_tlp:64 page, 2 producer threads posting 32-record batches with no deadline, while two
// busy-loop threads compete for this machine's CPUs. Blocked producers and the idle writer must
// be woken promptly rather than sleep (the landed code fell from ~90 M to ~1 M records/s here).
struct ContendedRow {
  bool busy;
  double records_per_s;
  std::vector<double> runs;
  uint64_t producer_sleeps, writer_parks;
};

inline ContendedRow bench_contended(const std::shared_ptr<Context>& ctx, bool busy, uint64_t total,
                             int runs, bool* ok) {
  auto var = Var::alloc(ctx, true);
  auto gw = Gateway::open(var, make_layout("raw_tlp:64"), GatewayOptions{});
  const Records r(kBatchRecords);
  auto once = [&] {
    std::atomic<bool> go{false}, stop{false};
    std::vector<std::thread> hogs;
    for (int h = 0; busy && h < 2; ++h)
      hogs.emplace_back([&stop] {
        volatile uint64_t x = 0;
        while (!stop.load(std::memory_order_relaxed)) x = x + 1;
      });
    std::vector<std::thread> ts;
    for (unsigned p = 0; p < 2; ++p)
      ts.emplace_back([&, p] {
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        const uint64_t mine = total / 2 + (p == 0 ? total % 2 : 0);
        uint64_t done = 0;
        size_t at = 0;
        while (done < mine) {
          const size_t k = size_t(std::min<uint64_t>(std::min(kPostBatch, kBatchRecords - at), mine - done));
          if (gw->post_batch(r.buf.data(), r.off.data() + at, r.len.data() + at, k, Deadline::never()) != k)
            *ok = false;
          done += k;
          at = (at + k) % kBatchRecords;
        }
      });
    const auto t0 = Clock::now();
    go.store(true, std::memory_order_release);
    for (auto& t : ts) t.join();
    if (!gw->flush(Deadline::after(std::chrono::seconds(60)))) *ok = false;
    const double rate = double(total) / seconds_since(t0);
    stop.store(true);
    for (auto& h : hogs) h.join();
    return rate;
  };
  once();  // warm-up
  const GatewayStats before = gw->stats();
  ContendedRow row{busy, 0, {}, 0, 0};
  for (int i = 0; i < runs; ++i) row.runs.push_back(once());
  const GatewayStats s = gw->stats();
  row.records_per_s = median(row.runs);
  row.producer_sleeps = s.producer_sleeps - before.producer_sleeps;
  row.writer_parks = s.writer_parks - before.writer_parks;
  if (s.posted != s.written || s.lost != 0) *ok = false;
  gw->close();
  var->free();
  return row;
}

// ------------------------------------------------------------ idle CPU
// CPU time (user + system, getrusage of the whole process) used while 4 gateways are open and
// idle (each wrote one record first, so its writer ran and then went idle), over `seconds`.
inline double idle_cpu_percent(const std::shared_ptr<Context>& ctx, double seconds, bool* ok) {
  std::vector<std::shared_ptr<Var>> vars;
  std::vector<std::shared_ptr<Gateway>> gws;
  const Records r(1);
  for (int i = 0; i < 4; ++i) {
    vars.push_back(Var::alloc(ctx, true));
    gws.push_back(Gateway::open(vars.back(), make_layout("raw_tlp:64"), GatewayOptions{}));
    if (!gws.back()->post(r.buf.data(), kRecordBytes, Deadline::never()) ||
        !gws.back()->flush(Deadline::after(std::chrono::seconds(10))))
      *ok = false;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // past every idle spin
  auto cpu = [] {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
           double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
  };
  const double c0 = cpu();
  const auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  const double pct = (cpu() - c0) / seconds_since(t0) * 100.0;
  for (auto& g : gws) g->close();
  for (auto& v : vars) v->free();
  return pct;
}

}  // namespace mlx5tlp_bench
