// TLP codec benchmark: decode rate, per-request completion-build rate and bulk-build rate,
// in records per second. Prints one JSON object. `--quick` runs a smaller, shorter version.
#include <sys/utsname.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "mlx5tlp/tlp.hpp"
#include "mlx5tlp/tlp_completion.hpp"

using namespace mlx5tlp::tlp;

namespace {

// A request mix like a device's BAR sees: mostly 1-DW reads, some 16-DW reads, config reads,
// and posted writes.
std::vector<uint8_t> make_requests(size_t n, size_t* data_bytes) {
  std::vector<uint8_t> out;
  out.reserve(n * 20);
  *data_bytes = 0;
  uint8_t payload[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  for (size_t i = 0; i < n; ++i) {
    Tlp t;
    t.requester_id = 0x0100;
    t.tag = static_cast<uint16_t>(i & 1023);
    t.first_be = 0xF;
    switch (i % 8) {
      case 0: case 1: case 2: case 3:
        t.kind = Kind::MRd;
        t.length = 1;
        t.address = 0x10000 + (i % 1024) * 4;
        break;
      case 4: case 5:
        t.kind = Kind::MRd;
        t.length = 16;
        t.last_be = 0xF;
        t.address = 0x20000 + (i % 64) * 64;
        break;
      case 6:
        t.kind = Kind::CfgRd0;
        t.length = 1;
        t.dest_id = 0x0100;
        t.address = (i % 64) * 4;
        break;
      default:
        t.kind = Kind::MWr;
        t.length = 2;
        t.last_be = 0xF;
        t.address = 0x30000;
        t.data = payload;
        t.data_len = 8;
        break;
    }
    set_format(&t);
    *data_bytes += completion_data_bytes(t, 0);
    uint8_t buf[64];
    size_t w = 0;
    if (encode(t, buf, sizeof buf, &w) != Status::ok) std::abort();
    out.insert(out.end(), buf, buf + w);
  }
  return out;
}

template <typename F>
double median_seconds(int runs, F&& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return 2;
    }
  }
  const size_t n = quick ? 100000 : 1000000;
  const int runs = quick ? 3 : 7;
  size_t data_bytes = 0;
  const std::vector<uint8_t> reqs = make_requests(n, &data_bytes);
  std::vector<uint8_t> data(std::max<size_t>(data_bytes, 4096), 0x5a);

  // Decode: walk the stream, decode every record.
  volatile uint64_t sink = 0;
  const double t_decode = median_seconds(runs, [&] {
    uint64_t acc = 0;
    size_t off = 0;
    Tlp t;
    while (off < reqs.size()) {
      const size_t rec = record_size(reqs.data() + off, reqs.size() - off);
      if (decode(reqs.data() + off, rec, &t) == Status::ok) acc += t.address;
      off += rec;
    }
    sink = sink + acc;
  });

  // Per-request completion build (decode + build_completions) for the non-posted requests.
  std::vector<uint8_t> out(8192);
  uint32_t ends[kMaxCompletions];
  size_t built_requests = 0;
  const double t_build = median_seconds(runs, [&] {
    size_t off = 0;
    size_t used_data = 0;
    size_t count = 0;
    CompletionParams p;
    p.completer_id = 0x0200;
    Tlp t;
    while (off < reqs.size()) {
      const size_t rec = record_size(reqs.data() + off, reqs.size() - off);
      if (decode(reqs.data() + off, rec, &t) == Status::ok) {
        const size_t need = completion_data_bytes(t, 0);
        size_t len = 0;
        size_t nc = 0;
        if (build_completions(t, data.data() + used_data, need, p, out.data(), out.size(), &len,
                              ends, kMaxCompletions, &nc) == Status::ok)
          ++count;
        used_data += need;
      }
      off += rec;
    }
    built_requests = count;
  });

  // Bulk: the whole stream in one call.
  CompletionParams p;
  p.completer_id = 0x0200;
  BulkSizes sz;
  if (bulk_measure(reqs.data(), reqs.size(), p, &sz) != Status::ok) return 1;
  BulkStorage store;
  store.bind(sz);  // allocate outside the timed runs
  size_t bulk_completions = 0;
  const double t_bulk = median_seconds(runs, [&] {
    BulkOutput o = store.bind(sz);
    if (bulk_build(reqs.data(), reqs.size(), data.data(), data_bytes, nullptr, 0, p, &o) !=
        Status::ok)
      std::abort();
    bulk_completions = o.completions;
  });

  struct utsname u {};
  uname(&u);
  std::printf(
      "{\"benchmark\": \"tlp\", \"quick\": %s, \"records\": %zu, \"runs\": %d, "
      "\"decode_records_per_s\": %.0f, \"completion_build_requests_per_s\": %.0f, "
      "\"non_posted_requests\": %zu, \"bulk_build_records_per_s\": %.0f, "
      "\"bulk_completions\": %zu, \"machine\": \"%s\", \"cpu_count\": %u}\n",
      quick ? "true" : "false", n, runs, n / t_decode, built_requests / t_build,
      built_requests, n / t_bulk, bulk_completions, u.machine,
      std::thread::hardware_concurrency());
  return sink == 42 ? 3 : 0;  // keep `sink` alive
}
