// bench_gateway: direct-mode Gateway::write_batch against a raw store loop (direct_vs_raw_store).
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

// ------------------------------------------------------------ direct mode vs raw stores
// What a program writing the page itself does, putting the same bytes where raw_tlp:64 puts
// them: each 32-byte record as one zero-padded 64-byte chunk per slot, then a store fence. Two
// store paths, as the layout has: eight aligned 8-byte stores, or one MOVDIR64B of the chunk
// (through a zero-padded local buffer, as the layout does for a partial chunk). Indices advance
// with compare-and-wrap: no division per record.
enum class Raw { store8, store64, store8_nofence };

inline void movdir64b(uint8_t* dst, const uint8_t* src) noexcept {
#if defined(__x86_64__)
  asm volatile("movdir64b (%1), %0" : : "r"(dst), "r"(src) : "memory");
#else
  (void)dst;
  (void)src;
#endif
}

template <Raw Path>
inline void raw_store_loop(uint8_t* page, size_t slots, const Records& r, uint64_t total) {
  const size_t n = r.off.size();
  size_t rec = 0, slot = 0;
  alignas(64) uint8_t chunk[64] = {};
  for (uint64_t i = 0; i < total; ++i) {
    const uint8_t* src = r.buf.data() + r.off[rec];
    uint8_t* dst = page + slot * kRawSlot;
    if (Path == Raw::store64) {
      std::memcpy(chunk, src, kRecordBytes);
      movdir64b(dst, chunk);
    } else {
      auto* d = reinterpret_cast<volatile uint64_t*>(dst);
      for (size_t w = 0; w < 8; ++w) {
        uint64_t x = 0;
        if (w < kRecordBytes / 8) std::memcpy(&x, src + w * 8, 8);
        d[w] = x;
      }
    }
    if (Path != Raw::store8_nofence) store_fence();
    if (++rec == n) rec = 0;
    if (++slot == slots) slot = 0;
  }
}

struct DirectResult {
  std::string path;  // the gateway's store path (raw_tlp's run-time choice)
  std::vector<double> gw, raw, gw8, raw8, raw_nofence;
  bool ok = true;
};

inline DirectResult bench_direct(const std::shared_ptr<Context>& ctx, uint64_t total, int runs) {
  auto var = Var::alloc(ctx, true);
  DirectResult res;
  {
    Mapping m = var->map(PROT_READ | PROT_WRITE);  // the same page, mapped a second time
    auto* page = static_cast<uint8_t*>(m.data());
    const size_t slots = m.size() / kRawSlot;
    const Records r(kBatchRecords);
    const bool has64 = cpu_store64() != nullptr;
    auto run_gw = [&](const char* spec) {
      GatewayOptions o;
      o.direct = true;
      o.batch_max = 64;
      auto gw = Gateway::open(var, make_layout(std::string("raw_tlp:64") + spec), o);
      if (res.path.empty()) res.path = gw->store_path();
      const auto t0 = Clock::now();
      uint64_t done = 0;
      while (done < total) {
        const size_t k = static_cast<size_t>(std::min<uint64_t>(kBatchRecords, total - done));
        const size_t w = gw->write_batch(r.buf.data(), r.off.data(), r.len.data(), k,
                                         Deadline::after(std::chrono::seconds(10)));
        if (w != k) res.ok = false;
        done += k;
      }
      const double rate = double(total) / seconds_since(t0);
      // Check the gateway really wrote: one more batch from slot `total % slots`.
      std::memset(page, 0xee, m.size());
      const size_t start = size_t(total % slots), k = std::min<size_t>(16, slots - start);
      gw->write_batch(r.buf.data(), r.off.data(), r.len.data(), k, Deadline::poll());
      for (size_t i = 0; i < k; ++i) {
        const uint8_t* slot = page + (start + i) * kRawSlot;
        if (std::memcmp(slot, r.buf.data() + r.off[i], kRecordBytes) != 0) res.ok = false;
        for (size_t b = kRecordBytes; b < kRawSlot; ++b)
          if (slot[b] != 0) res.ok = false;
      }
      gw->close();
      return rate;
    };
    auto run_raw = [&](Raw path) {
      const auto t0 = Clock::now();
      if (path == Raw::store64) raw_store_loop<Raw::store64>(page, slots, r, total);
      else if (path == Raw::store8) raw_store_loop<Raw::store8>(page, slots, r, total);
      else raw_store_loop<Raw::store8_nofence>(page, slots, r, total);
      return double(total) / seconds_since(t0);
    };
    run_gw("");  // warm-up (page faults, caches, branch predictors); learns the store path
    // The raw loop uses the same store instruction as the gateway's automatic choice.
    const Raw same = has64 && res.path != "store8" ? Raw::store64 : Raw::store8;
    run_raw(same);
    run_raw(Raw::store8);
    run_gw(":store8");
    for (int i = 0; i < runs; ++i) {  // alternate, so noise hits every contender alike
      res.raw.push_back(run_raw(same));
      res.gw.push_back(run_gw(""));
      res.raw8.push_back(run_raw(Raw::store8));
      res.gw8.push_back(run_gw(":store8"));
      res.raw_nofence.push_back(run_raw(Raw::store8_nofence));
    }
  }
  var->free();
  return res;
}

}  // namespace mlx5tlp_bench
