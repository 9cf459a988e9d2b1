// The gateway's lifecycle (open -> closing -> draining -> closed) and its blocking points:
// close() ends within the drain timeout while producers and flushers are blocked with no
// deadline; an idle writer parks once and stays parked (no periodic wake-ups); the writer waits
// for sim-device credits on the shared futex of the fixed interface (writer_waiting at 0x48,
// the consumer index at 0x40); the provisional raw_tlp layout's two store paths write the same
// bytes; raw_tlp pages are mapped write-only. Runs plain, under ASan and under TSan (no fork).
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
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

constexpr const char* kDev = "gwlife";  // 4 KiB pages, 256-byte sim slots: 15 slots
constexpr size_t kSlots = (4096 - 0x80) / 256;

const SimSymbols& simsym() { return Library::get(Backend::sim)->sym().sim; }

template <class P>
bool eventually(P&& pred, std::chrono::seconds limit = 20s) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// True while thread `tid` of this process sleeps in futex(2) (the blocking point under test):
// the first field of /proc/self/task/<tid>/syscall is the number of the syscall it is in.
bool in_futex(pid_t tid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/syscall", int(tid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return false;
  long nr = -1;
  const bool ok = std::fscanf(f, "%ld", &nr) == 1;
  std::fclose(f);
  return ok && nr == SYS_futex;
}

GatewayOptions opts(size_t ring, std::chrono::nanoseconds drain) {
  GatewayOptions o;
  o.ring_slots = ring;
  o.drain_timeout = drain;
  return o;
}

// Issue 10 C1 / F2: close() with producers blocked in post(never) and post_batch(never) on a
// full ring whose device takes nothing, and a flusher blocked in flush(never): every one of
// them is woken; the producers fail with invalid_handle/EBADF ("the gateway was closed"), the
// flusher returns false, close() reports the undeliverable records, and it all ends.
void close_with_blocked_producers_and_flushers() {
  auto ctx = Context::open(kDev, Backend::sim);
  auto var = Var::alloc(ctx, true);
  auto gw = Gateway::open(var, make_layout("sim"), opts(16, 300ms));
  CHECK(gw->state() == GatewayState::open);
  const std::vector<uint8_t> rec(40, 0x5a);
  size_t accepted = 0;
  while (gw->post(rec.data(), rec.size(), Deadline::after(20ms))) ++accepted;
  CHECK(accepted == kSlots + 16);  // the page's 15 slots and the ring's 16
  std::atomic<int> post_errno{0}, batch_errno{0}, flush_result{-1};
  std::atomic<int> post_kind{-1};
  std::thread poster([&] {
    try {
      gw->post(rec.data(), rec.size(), Deadline::never());
    } catch (const Error& e) {
      post_kind = int(e.kind());
      post_errno = e.error_number();
    }
  });
  std::thread batcher([&] {
    const uint32_t off[3] = {0, 0, 0}, len[3] = {40, 40, 40};
    try {
      gw->post_batch(rec.data(), off, len, 3, Deadline::never());
    } catch (const Error& e) {
      batch_errno = e.error_number();
    }
  });
  std::atomic<pid_t> flusher_tid{0};
  std::thread flusher([&] {
    flusher_tid = pid_t(::syscall(SYS_gettid));
    flush_result = gw->flush(Deadline::never()) ? 1 : 0;
  });
  // Both producers asleep on the full ring, and the flusher asleep, before we close.
  CHECK(eventually([&] { return gw->stats().producer_sleeps >= 2; }));
  CHECK(eventually([&] { return flusher_tid.load() != 0 && in_futex(flusher_tid.load()); }));
  std::atomic<bool> closed{false};
  int close_errno = 0;
  std::thread closer([&] {
    try {
      gw->close();
    } catch (const Error& e) {
      close_errno = e.error_number();
    }
    closed = true;
  });
  CHECK(eventually([&] { return closed.load(); }, 30s));  // before the fix: never
  if (!closed.load()) {
    std::fprintf(stderr, "close() hangs with blocked producers\n");
    std::abort();
  }
  closer.join();
  poster.join();
  batcher.join();
  flusher.join();
  CHECK(close_errno == ETIMEDOUT);
  CHECK(post_kind.load() == int(ErrorKind::invalid_handle) && post_errno.load() == EBADF);
  CHECK(batch_errno.load() == EBADF);
  CHECK(flush_result.load() == 0);
  const GatewayStats st = gw->stats();
  CHECK(gw->state() == GatewayState::closed);
  CHECK(st.written == kSlots && st.lost == 16 && st.posted == accepted);
  CHECK(var->mappings() == 0);
  CHECK_THROWS_KIND(gw->post(rec.data(), rec.size(), Deadline::poll()), ErrorKind::invalid_handle, EBADF);
  // close(drain) with a short limit: a second gateway, same full page: the override is used.
  auto gw2 = Gateway::open(var, make_layout("sim"), opts(16, std::chrono::hours(1)));
  while (gw2->post(rec.data(), rec.size(), Deadline::after(20ms))) {
  }
  CHECK_THROWS_ERRNO(gw2->close(50ms), ETIMEDOUT);  // not the hour
  CHECK(gw2->stats().lost == 16);
  var->free();
  ctx->close();
}

// A direct-mode writer waiting for credits is cut short by close() from another thread.
void close_wakes_direct_writer() {
  auto ctx = Context::open(kDev, Backend::sim);
  auto var = Var::alloc(ctx, true);
  GatewayOptions o;
  o.direct = true;
  auto gw = Gateway::open(var, make_layout("sim"), o);
  std::vector<uint8_t> buf(40 * 30, 1);
  std::vector<uint32_t> off(30), len(30, 40);
  for (uint32_t i = 0; i < 30; ++i) off[i] = i * 40;
  std::atomic<long> wrote{-1};
  std::thread w([&] { wrote = long(gw->write_batch(buf.data(), off.data(), len.data(), 30, Deadline::never())); });
  CHECK(eventually([&] { return gw->stats().credit_waits > 0; }));
  gw->close();
  w.join();
  CHECK(wrote.load() == long(kSlots));  // what fitted, then the close ended the wait
  CHECK(gw->closed() && var->mappings() == 0);
  var->free();
  ctx->close();
}

// Issue 10 C3: an idle writer parks (futex, untimed) and is not woken again until a post: the
// number of parks does not grow while nothing is posted (the old writer woke every 5 ms).
void idle_writer_parks_and_is_woken_by_post() {
  auto ctx = Context::open(kDev, Backend::sim);
  auto var = Var::alloc(ctx, true);
  auto gw = Gateway::open(var, make_layout("raw_tlp:256"), opts(64, 1s));
  const std::vector<uint8_t> rec(32, 3);
  CHECK(gw->post(rec.data(), rec.size(), Deadline::never()));
  CHECK(gw->flush(Deadline::never()));
  // Settle: the writer parked after the post (it may also have parked once before it). The
  // old writer never settled: it woke, spun and re-parked every 5 ms.
  uint64_t parks = ~uint64_t{0};
  CHECK(eventually([&] {
    const uint64_t now = gw->stats().writer_parks;
    const bool settled = now == parks && now >= 1;
    parks = now;
    if (!settled) std::this_thread::sleep_for(50ms);
    return settled;
  }));
  std::this_thread::sleep_for(200ms);  // idle: 40 wake-ups of the old 5 ms timed wait
  CHECK(gw->stats().writer_parks == parks);
  for (int i = 0; i < 20; ++i) {  // each post after a park wakes the writer
    CHECK(eventually([&] { return gw->stats().writer_parks >= parks + uint64_t(i); }));
    CHECK(gw->post(rec.data(), rec.size(), Deadline::never()));
    CHECK(gw->flush(Deadline::after(20s)));
  }
  CHECK(gw->stats().written == 21);
  CHECK(gw->stats().writer_parks >= parks + 19);  // parked after (nearly) every post
  gw->close();
  var->free();
  ctx->close();
}

long futex_wake_shared(void* addr) {
  return ::syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// The fixed writer/device-model interface of the sim page (docs/ring.md): while the writer
// waits for credits it has writer_waiting (u32 at 0x48) set; a "device model" — this test,
// through a second mapping — stores the consumer index (u64 at 0x40), sees writer_waiting and
// does FUTEX_WAKE on page + 0x40; the writer then writes the next records.
void sim_credit_wait_interface() {
  auto ctx = Context::open(kDev, Backend::sim);
  auto var = Var::alloc(ctx, true);
  Mapping view = var->map(PROT_READ | PROT_WRITE);
  auto* page = static_cast<uint8_t*>(view.data());
  auto* consumer = reinterpret_cast<uint64_t*>(page + 0x40);
  auto* waiting = reinterpret_cast<uint32_t*>(page + 0x48);
  auto gw = Gateway::open(var, make_layout("sim"), opts(64, 1s));
  const std::vector<uint8_t> rec(40, 9);
  for (size_t i = 0; i < kSlots + 10; ++i) CHECK(gw->post(rec.data(), rec.size(), Deadline::never()));
  CHECK(eventually([&] { return gw->stats().written == kSlots; }));
  CHECK(eventually([&] { return __atomic_load_n(waiting, __ATOMIC_ACQUIRE) == 1; }));
  for (uint64_t c = 1; c <= 10; ++c) {
    // The device model: store the consumer index, full fence, then wake if the writer waits.
    __atomic_store_n(consumer, c, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(waiting, __ATOMIC_RELAXED) != 0) futex_wake_shared(consumer);
    CHECK(eventually([&] { return gw->stats().written == kSlots + c; }));
  }
  CHECK(gw->flush(Deadline::after(20s)));
  CHECK(gw->stats().credit_waits > 0);
  gw->close();
  CHECK(__atomic_load_n(waiting, __ATOMIC_ACQUIRE) == 0);  // cleared on the way out
  view.reset();
  var->free();  // the page is re-initialised at the next allocation
  ctx->close();
}

// Issue 10 A10: raw_tlp writes whole 64-byte chunks; the 64-byte-store path (MOVDIR64B/ST64B,
// chosen at run time) and the 8-byte fallback leave identical page bytes. A4: raw_tlp maps the
// page write-only, the sim layout read-write.
void raw_tlp_store_paths() {
  auto ctx = Context::open(kDev, Backend::sim);
  auto var = Var::alloc(ctx, true);
  Mapping view = var->map(PROT_READ | PROT_WRITE);
  auto* page = static_cast<uint8_t*>(view.data());
  const char* cpu = cpu_store64();
  std::printf("test_gateway_lifecycle: this CPU's 64-byte store: %s\n", cpu ? cpu : "none");
  {
    // On the software device the page is ordinary memory: the automatic path is store8 (a
    // 64-byte direct store to DRAM is slow and forms no TLP); explicit store64 is honoured.
    auto gw = Gateway::open(var, make_layout("raw_tlp:256"), opts(64, 1s));
    CHECK(std::string(gw->store_path()) == "store8");
    CHECK(gw->page_prot() == PROT_WRITE);
    gw->close();
    if (cpu != nullptr) {
      auto g64 = Gateway::open(var, make_layout("raw_tlp:256:store64"), opts(64, 1s));
      CHECK(std::string(g64->store_path()) == cpu);
      g64->close();
    }
  }
  {
    // On device memory (the rdma backend) the automatic choice is the CPU's 64-byte store, and
    // $MLX5TLP_STORE64=0 forces the fallback.
    alignas(64) static uint8_t mem[4096];
    RawTlpLayout automatic(256);
    automatic.set_device_memory(true);
    automatic.attach(mem, sizeof mem);
    CHECK(std::string(automatic.store_path()) == (cpu ? cpu : "store8"));
    setenv("MLX5TLP_STORE64", "0", 1);
    RawTlpLayout off(256);
    off.set_device_memory(true);
    CHECK(std::string(off.store_path()) == "store8");
    unsetenv("MLX5TLP_STORE64");
    RawTlpLayout forced(256, StorePath::store8);
    forced.set_device_memory(true);
    CHECK(std::string(forced.store_path()) == "store8");
  }
  {
    auto gw = Gateway::open(var, make_layout("sim"), opts(64, 1s));
    CHECK(gw->page_prot() == (PROT_READ | PROT_WRITE));
    CHECK(std::string(gw->store_path()) == "store8");
    gw->close();
  }
  if (cpu == nullptr) CHECK_THROWS_ERRNO(make_layout("raw_tlp:256:store64"), ENOTSUP);
  // Records of 1..140 bytes (partial words, partial chunks, several chunks), unaligned sources.
  std::vector<uint8_t> buf(1 + 140 * 141 / 2 + 140);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = uint8_t(i * 37 + 11);
  std::vector<uint32_t> off, len;
  for (uint32_t l = 1, at = 1; l <= 140; at += l, ++l) {
    off.push_back(at);
    len.push_back(l);
  }
  auto run = [&](const char* spec) {
    std::memset(page, 0xee, view.size());
    GatewayOptions o;
    o.direct = true;
    auto gw = Gateway::open(var, make_layout(spec), o);
    for (size_t i = 0; i < off.size(); i += 16) {  // 16 records per 4 KiB page, one page each
      const size_t k = std::min<size_t>(16, off.size() - i);
      std::memset(page, 0xee, view.size());
      CHECK(gw->write_batch(buf.data(), off.data() + i, len.data() + i, k, Deadline::poll()) == k);
      for (size_t r = 0; r < k; ++r) {
        const uint8_t* slot = page + r * 256;
        const size_t n = len[i + r], padded = (n + 63) / 64 * 64;
        CHECK(std::memcmp(slot, buf.data() + off[i + r], n) == 0);
        for (size_t b = n; b < padded; ++b) CHECK(slot[b] == 0);
        for (size_t b = padded; b < 256; ++b) CHECK(slot[b] == 0xee);
      }
    }
    std::vector<uint8_t> last(page, page + view.size());
    gw->close();
    return last;
  };
  const auto fallback = run("raw_tlp:256:store8");
  if (cpu != nullptr) CHECK(run("raw_tlp:256:store64") == fallback);
  CHECK(run("raw_tlp:256") == fallback);
  view.reset();
  var->free();
  ctx->close();
}

}  // namespace

int main() {
  char dir[] = "/tmp/mlx5tlp-gwlife-XXXXXX";
  if (mkdtemp(dir) == nullptr) return 2;
  setenv("MLX5TLP_SIM_DIR", dir, 1);
  try {
    m5a_sim_device_config cfg{};
    cfg.tlp = 1;
    cfg.gw_pages = 4;
    cfg.virtio_pages = 0;
    cfg.gw_slot_size = 256;
    CHECK(simsym().create_device(kDev, &cfg) == 0);
    close_with_blocked_producers_and_flushers();
    close_wakes_direct_writer();
    idle_writer_parks_and_is_woken_by_post();
    sim_credit_wait_interface();
    raw_tlp_store_paths();
    CHECK(simsym().remove_device(kDev) == 0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  std::string cmd = std::string("rm -rf ") + dir;
  if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", dir);
  return mlx5tlp_test::finish("test_gateway_lifecycle");
}
