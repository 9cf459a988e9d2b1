// bench_gateway — the TLP response gateway (mlx5tlp::Gateway) on the software device.
// Prints ONE JSON object on stdout.
//
//   bench_gateway [--quick] [--runs N]
//
// Three measurements, each one warm-up run then the median of `runs` measured runs:
//
//  direct_vs_raw_store  Direct-mode Gateway::write_batch() of pre-built 32-byte records into a
//                       "raw_tlp:64" page, against a hand-written store loop putting the same
//                       records into the same page (a second mapping of it) at the same slot
//                       offsets the way the layout does: four aligned 8-byte stores, then a store
//                       fence, per record. Runs alternate (raw, gateway, raw, ...) so machine
//                       noise hits both alike. For context, the same loop without the fence.
//  loop                 Doorbell-loop throughput into a "raw_tlp:64" page with 1 and 2 producer
//                       threads, each posting pre-built records with post_batch() (32 at a
//                       time) or post() (one at a time); timed from releasing the producers until
//                       flush() returns (every record is in the page).
//  latency              Post-to-visible latency on a "sim" layout page: the main thread plays
//                       both the producer and the PCIe host (the device model of the software
//                       device). Per sample: the host sends a 5-DW memory read and the function
//                       side takes it (untimed); then t0, post() of its 32-byte completion,
//                       host polling until the model has collected it, t1. The model checks every
//                       completion against its request, so a wrong record shows up as an error.
//                       Two threads only (this one and the gateway's writer): on a 2-CPU machine
//                       neither waits for a CPU.
//
// The software device lives in a private directory (a fresh mkdtemp() under $TMPDIR unless
// MLX5TLP_SIM_DIR is set) and is removed at the end. The sim library is found next to this
// program, in its parent directory (the installed package layout: mlx5tlp/bin/..), or through
// MLX5TLP_SIM_LIB.
#include <limits.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench_contended.hpp"
#include "bench_direct.hpp"
#include "bench_sim.hpp"
#include "bench_util.hpp"
#include "mlx5tlp/context.hpp"
#include "mlx5tlp/error.hpp"
#include "mlx5tlp/gateway.hpp"
#include "mlx5tlp/gateway_layout.hpp"
#include "mlx5tlp/tlp.hpp"
#include "mlx5tlp/var.hpp"

using namespace mlx5tlp;
using namespace mlx5tlp_bench;

namespace {

constexpr uint16_t kRequester = 0x0100, kCompleter = 0x0200;

// ------------------------------------------------------------ doorbell loop throughput
struct LoopRow {
  unsigned producers;
  bool batch;
  double records_per_s;
  std::vector<double> runs;
  uint64_t full_waits;
};

LoopRow bench_loop(const std::shared_ptr<Context>& ctx, unsigned producers, bool batch,
                   uint64_t total, int runs, bool* ok) {
  auto var = Var::alloc(ctx, true);
  GatewayOptions o;
  o.ring_slots = 4096;
  o.batch_max = 64;
  auto gw = Gateway::open(var, make_layout("raw_tlp:" + std::to_string(kRawSlot)), o);
  const Records r(kBatchRecords);
  auto once = [&] {
    std::atomic<bool> go{false};
    std::vector<std::thread> ts;
    for (unsigned p = 0; p < producers; ++p) {
      const uint64_t mine = total * (p + 1) / producers - total * p / producers;
      ts.emplace_back([&, mine] {
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        uint64_t done = 0;
        size_t at = 0;
        const auto forever = mlx5tlp::Deadline::after(std::chrono::seconds(60));
        while (done < mine) {
          if (batch) {
            const size_t k = static_cast<size_t>(std::min<uint64_t>(
                std::min(kPostBatch, kBatchRecords - at), mine - done));
            if (gw->post_batch(r.buf.data(), r.off.data() + at, r.len.data() + at, k, forever) != k)
              *ok = false;
            done += k;
            at = (at + k) % kBatchRecords;
          } else {
            if (!gw->post(r.buf.data() + r.off[at], kRecordBytes, forever)) *ok = false;
            ++done;
            at = (at + 1) % kBatchRecords;
          }
        }
      });
    }
    const auto t0 = Clock::now();
    go.store(true, std::memory_order_release);
    for (auto& t : ts) t.join();
    if (!gw->flush(mlx5tlp::Deadline::after(std::chrono::seconds(60)))) *ok = false;
    return double(total) / seconds_since(t0);
  };
  once();  // warm-up
  const GatewayStats before = gw->stats();
  LoopRow row{producers, batch, 0, {}, 0};
  for (int i = 0; i < runs; ++i) row.runs.push_back(once());
  const GatewayStats s = gw->stats();
  row.records_per_s = median(row.runs);
  row.full_waits = s.full_waits - before.full_waits;
  if (s.posted != s.written || s.lost != 0) *ok = false;
  gw->close();
  var->free();
  return row;
}

// ------------------------------------------------------------ post-to-visible latency
struct LatencyResult {
  std::vector<double> us;  // sorted
  uint64_t host_errors = 0, completions = 0, retired = 0;
  std::string last_error;
};

LatencyResult bench_latency(const std::shared_ptr<Context>& ctx, const SimDevice& dev,
                            size_t samples, size_t warmup) {
  const SimSymbols& sim = dev.lib->sym().sim;
  auto var = Var::alloc(ctx, true);
  GatewayOptions o;
  o.ring_slots = 1024;
  o.batch_max = 64;
  auto gw = Gateway::open(var, make_layout("sim"), o);
  m5a_sim_host* host = sim.host_open(dev.name.c_str());
  if (host == nullptr) throw std::runtime_error("open the device model: " + std::string(std::strerror(errno)));
  struct HostCloser {
    const SimSymbols& s;
    m5a_sim_host* h;
    ~HostCloser() { s.host_close(h); }
  } closer{sim, host};

  // A 5-DW memory read and its single CplD (byte count 20, lower address 0): 32 bytes.
  uint8_t payload[20];
  for (size_t i = 0; i < sizeof payload; ++i) payload[i] = uint8_t(0xa0 + i);
  auto encode = [](const tlp::Tlp& t, uint8_t* out, size_t cap) {
    size_t w = 0;
    if (tlp::encode(t, out, cap, &w) != tlp::Status::ok) throw std::runtime_error("tlp encode");
    return w;
  };
  uint8_t req[32], cpl[64], got[4096];
  LatencyResult res;
  std::vector<double> us;
  us.reserve(samples);
  const m5a_ibv_context* raw_ctx = nullptr;
  {
    Context::Use use(*ctx);
    raw_ctx = use.get();
  }
  for (size_t i = 0; i < warmup + samples; ++i) {
    tlp::Tlp r;
    r.kind = tlp::Kind::MRd;
    r.length = 5;
    r.requester_id = kRequester;
    r.tag = uint16_t(i & 0xff);
    r.first_be = 0xf;
    r.last_be = 0xf;
    r.address = 0x10000 + (i % 64) * 64;
    const size_t rl = encode(r, req, sizeof req);
    if (sim.host_send(host, 0, req, rl) != 0) throw std::runtime_error("host send");
    // The emulated function takes the request (else the channel fills up).
    if (sim.function_poll(const_cast<m5a_ibv_context*>(raw_ctx), 0, got, sizeof got) <= 0)
      throw std::runtime_error("function poll");
    tlp::Tlp c;
    c.kind = tlp::Kind::CplD;
    c.length = 5;
    c.requester_id = kRequester;
    c.completer_id = kCompleter;
    c.tag = r.tag;
    c.byte_count = 20;
    c.lower_address = uint8_t(r.address & 0x7f);
    c.data = payload;
    c.data_len = sizeof payload;
    const size_t cl = encode(c, cpl, sizeof cpl);
    if (cl != kRecordBytes) throw std::runtime_error("completion is not 32 bytes");

    const auto t0 = Clock::now();
    if (!gw->post(cpl, cl, mlx5tlp::Deadline::after(std::chrono::seconds(10)))) throw std::runtime_error("post");
    m5a_sim_completion info{};
    ssize_t n = 0;
    while ((n = sim.host_poll(host, got, sizeof got, &info)) == 0) {
    }
    const auto t1 = Clock::now();
    if (n < 0) throw std::runtime_error("host poll");
    if (i >= warmup) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  m5a_sim_host_stats hs{};
  sim.host_stats(host, &hs);
  res.host_errors = hs.errors + hs.bad_records + hs.unexpected;
  res.completions = hs.completions;
  res.retired = hs.retired;
  res.last_error = hs.last_error;
  gw->close();
  var->free();
  std::sort(us.begin(), us.end());
  res.us = std::move(us);
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int runs = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--runs N]\n", argv[0]);
      return 2;
    }
  }
  if (runs <= 0) runs = quick ? 3 : 7;
  const uint64_t direct_records = quick ? (1u << 19) : (1u << 22);
  const uint64_t loop_records = quick ? (1u << 17) : (1u << 20);
  const size_t lat_samples = quick ? 10000 : 100000;
  const size_t lat_warmup = quick ? 500 : 2000;

  struct utsname u{};
  uname(&u);
  const auto start = Clock::now();
  try {
    locate_sim_library();
    SimDevice dev;
    auto ctx = Context::open(dev.name, Backend::sim);
    bool ok = true;

    const DirectResult d = bench_direct(ctx, direct_records, runs);
    ok = ok && d.ok;
    const double gw_rate = median(d.gw), raw_rate = median(d.raw), nofence = median(d.raw_nofence);
    const double gw8_rate = median(d.gw8), raw8_rate = median(d.raw8);

    const uint64_t contended_records = quick ? (1u << 18) : (1u << 21);
    const ContendedRow quiet = bench_contended(ctx, false, contended_records, runs, &ok);
    const ContendedRow busy = bench_contended(ctx, true, contended_records, runs, &ok);
    const double idle_seconds = quick ? 0.5 : 3.0;
    const double idle_pct = idle_cpu_percent(ctx, idle_seconds, &ok);

    std::vector<LoopRow> rows;
    for (const bool batch : {true, false})
      for (const unsigned producers : {1u, 2u})
        rows.push_back(bench_loop(ctx, producers, batch, batch ? loop_records : loop_records / 4,
                                  runs, &ok));

    const LatencyResult lat = bench_latency(ctx, dev, lat_samples, lat_warmup);
    ok = ok && lat.host_errors == 0 && lat.retired == lat_samples + lat_warmup;
    ctx->close();
    const double total = seconds_since(start);

    std::printf("{\n  \"benchmark\": \"gateway\",\n");
    std::printf("  \"machine\": {\"arch\": \"%s\", \"cpus\": %u, \"compiler\": \"%s\"},\n",
                u.machine, std::thread::hardware_concurrency(), json_escape(compiler()).c_str());
    std::printf("  \"parameters\": {\"record_bytes\": %zu, \"raw_tlp_slot_bytes\": %zu, "
                "\"page_bytes\": 65536, \"sim_slot_bytes\": 64, \"prebuilt_records\": %zu, "
                "\"direct_records_per_run\": %llu, \"loop_records_per_run\": %llu, "
                "\"loop_post_batch\": %zu, \"loop_ring_slots\": 4096, \"batch_max\": 64, "
                "\"latency_samples\": %zu, \"latency_warmup\": %zu},\n",
                kRecordBytes, kRawSlot, kBatchRecords,
                static_cast<unsigned long long>(direct_records),
                static_cast<unsigned long long>(loop_records), kPostBatch, lat_samples, lat_warmup);
    std::printf("  \"method\": {\"warmup_runs\": 1, \"runs\": %d, \"statistic\": \"median\", "
                "\"timer\": \"steady_clock\", \"direct\": \"raw and gateway runs alternate; same "
                "page, second mapping; raw = the same bytes the layout writes (each record one "
                "zero-padded 64-byte chunk, with the gateway's store path: MOVDIR64B or 8 aligned "
                "8-byte stores) + store fence per record at the raw_tlp:64 slot offsets, "
                "compare-and-wrap indices (no division per record)\", \"contended\": \"default "
                "gateway (ring 1024, batch_max 64), raw_tlp:64, 2 producers post_batch(32, no "
                "deadline), released -> flush() returned; ring_contended with 2 busy-loop threads "
                "running meanwhile\", \"idle\": \"getrusage(RUSAGE_SELF) user+system over the "
                "interval / wall time, 4 open idle gateways\", \"loop\": \"producers released -> "
                "flush() returned; the single-post rows post a quarter of the records\", "
                "\"latency\": \"one record in flight; t0 before post(), t1 when the sim host's "
                "poll returns it; main thread is producer and host, plus the writer thread\", "
                "\"quick\": %s},\n",
                runs, quick ? "true" : "false");
    std::printf("  \"direct_vs_raw_store\": {\"store_path\": \"%s\", \"direct_records_per_s\": %.0f, "
                "\"raw_store_records_per_s\": %.0f, \"ratio\": %.3f, "
                "\"direct_store8_records_per_s\": %.0f, \"raw_store8_records_per_s\": %.0f, "
                "\"ratio_store8\": %.3f, \"raw_store8_nofence_records_per_s\": %.0f,\n"
                "    \"direct_runs\": %s, \"raw_store_runs\": %s, \"direct_store8_runs\": %s, "
                "\"raw_store8_runs\": %s},\n",
                d.path.c_str(), gw_rate, raw_rate, gw_rate / raw_rate, gw8_rate, raw8_rate,
                gw8_rate / raw8_rate, nofence, json_array(d.gw).c_str(), json_array(d.raw).c_str(),
                json_array(d.gw8).c_str(), json_array(d.raw8).c_str());
    for (const ContendedRow* c : {&quiet, &busy})
      std::printf("  \"%s\": {\"records_per_s\": %.0f, \"busy_loops\": %d, \"ring_slots\": 1024, "
                  "\"producers\": 2, \"post_batch\": %zu, \"producer_sleeps\": %llu, "
                  "\"writer_parks\": %llu, \"runs\": %s},\n",
                  c->busy ? "ring_contended" : "ring_uncontended", c->records_per_s,
                  c->busy ? 2 : 0, kPostBatch, static_cast<unsigned long long>(c->producer_sleeps),
                  static_cast<unsigned long long>(c->writer_parks), json_array(c->runs).c_str());
    std::printf("  \"idle\": {\"gateways\": 4, \"seconds\": %.1f, \"cpu_percent\": %.3f},\n",
                idle_seconds, idle_pct);
    std::printf("  \"loop\": [\n");
    for (size_t i = 0; i < rows.size(); ++i) {
      const LoopRow& r = rows[i];
      std::printf("    {\"producers\": %u, \"mode\": \"%s\", \"records_per_s\": %.0f, "
                  "\"full_waits\": %llu, \"runs\": %s}%s\n",
                  r.producers, r.batch ? "batch" : "single", r.records_per_s,
                  static_cast<unsigned long long>(r.full_waits), json_array(r.runs).c_str(),
                  i + 1 < rows.size() ? "," : "");
    }
    std::printf("  ],\n");
    std::printf("  \"latency\": {\"samples\": %zu, \"min_us\": %.3f, \"p50_us\": %.3f, "
                "\"p90_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f, \"max_us\": %.3f, "
                "\"host_completions\": %llu, \"host_errors\": %llu, \"host_last_error\": \"%s\"},\n",
                lat.us.size(), lat.us.empty() ? 0.0 : lat.us.front(), percentile(lat.us, 50),
                percentile(lat.us, 90), percentile(lat.us, 99), percentile(lat.us, 99.9),
                lat.us.empty() ? 0.0 : lat.us.back(),
                static_cast<unsigned long long>(lat.completions),
                static_cast<unsigned long long>(lat.host_errors), json_escape(lat.last_error).c_str());
    std::printf("  \"verified\": %s,\n  \"total_seconds\": %.2f\n}\n", ok ? "true" : "false", total);
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("{\"benchmark\": \"gateway\", \"error\": \"%s\"}\n", json_escape(e.what()).c_str());
    return 1;
  }
}
