// The device model against hostile gateway pages and lost owners:
// - another process scribbles over a page's header, slots and indexes: the model neither
//   crashes nor reads out of bounds (AddressSanitizer in tests/test_native.py), counts the
//   garbage in bad_records, and still collects the valid records written afterwards;
// - delivered means delivered: records published but not consumed survive free, exit and
//   SIGKILL of their writer (the page drains), and are collected exactly once;
// - the model wakes a writer that futex-waits for credits (writer_waiting at 0x48).
#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <atomic>
#include <climits>
#include <random>
#include <thread>

#include "sim_util.hpp"

using namespace simtest;

namespace {

constexpr const char* kDev = "hostile";

size_t poll_all(m5a_sim_host* h, std::vector<std::vector<uint8_t>>* out = nullptr) {
  size_t n = 0;
  uint8_t buf[4096];
  m5a_sim_completion info{};
  for (;;) {
    const ssize_t got = ss().host_poll(h, buf, sizeof buf, &info);
    CHECK(got >= 0);
    if (got <= 0) break;
    if (out != nullptr) out->emplace_back(buf, buf + got);
    ++n;
  }
  return n;
}

m5a_sim_host_stats host_stats(m5a_sim_host* h) {
  m5a_sim_host_stats s{};
  ss().host_stats(h, &s);
  return s;
}

void scribbled_pages() {
  make_device(kDev, config(3, 0, 2));
  m5a_ibv_context* c = open_raw(kDev);
  m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
  m5a_mlx5dv_var* w = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
  m5a_sim_host* h = ss().host_open(kDev);
  // Another process that maps the pages writes garbage everywhere, many times over.
  pid_t pid = fork();
  if (pid == 0) {
    std::mt19937_64 rng(99);
    for (m5a_mlx5dv_var* var : {v, w}) {
      auto* p = static_cast<uint8_t*>(map_page(c, var));
      for (int round = 0; round < 200; ++round) {
        const uint32_t zero = 0, huge = 0xffffffffu;
        std::memcpy(p + kSlotCount, round % 2 ? &zero : &huge, 4);  // was SIGFPE / OOB
        const uint32_t ver = 1 | (0xfff0u << 16);                   // slot size 65520
        std::memcpy(p + 0x0c, &ver, 4);
        p[8] = uint8_t(rng());                                       // the magic
        for (int k = 0; k < 64; ++k) p[kSlots + rng() % (var->length - kSlots)] = uint8_t(rng());
        const uint32_t len = round % 3 == 0 ? 0x7fffffffu : uint32_t(rng() % 300);
        std::memcpy(p + kSlots + (round % 15) * 256, &len, 4);
        __atomic_store_n(reinterpret_cast<uint64_t*>(p + kConsumer), rng(), __ATOMIC_RELAXED);
        __atomic_store_n(reinterpret_cast<uint64_t*>(p + kDoorbell),
                         round % 4 == 0 ? rng() : uint64_t(round), __ATOMIC_RELEASE);
        // The model polls between the scribbles (from the parent).
        usleep(100);
      }
    }
    _exit(0);
  }
  size_t collected = 0;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) != pid) collected += poll_all(h);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  collected += poll_all(h);
  const m5a_sim_host_stats s = host_stats(h);
  CHECK(s.bad_records > 0);
  std::printf("scribbled pages: %llu bad records counted, %zu garbage records collected as such\n",
              (unsigned long long)s.bad_records, collected);
  // After the garbage, a writer that starts over on the page is heard again: the model resyncs
  // to the doorbell it sees, so records published past it are collected intact.
  void* p = map_page(c, v);
  const uint32_t count = (4096 - 0x80) / 256;
  std::memcpy(static_cast<uint8_t*>(p) + kSlotCount, &count, 4);
  const uint64_t base = load64(p, kDoorbell);
  const uint64_t resync = base + 1000;
  ring(p, resync);  // resynchronised: at once if ahead, once it stays if behind (garbage)
  for (int i = 0; i < 3; ++i) poll_all(h);
  const auto req = cfgrd0(7, 7);
  CHECK(ss().host_send(h, 0, req.data(), req.size()) == 0);
  ring(p, write_slot(p, 256, cpld_for(req.data())));
  std::vector<std::vector<uint8_t>> got;
  CHECK(poll_all(h, &got) == 1);
  CHECK(got.size() == 1 && got[0] == cpld_for(req.data()));
  CHECK(host_stats(h).retired == 1);
  munmap(p, v->length);
  sym().mlx5dv_free_var(v);
  sym().mlx5dv_free_var(w);
  ss().host_close(h);
  sym().ibv_close_device(c);
}

// A writer publishes `n` records and then leaves in the way `how` says.
enum class Leave { free_var, exit, sigkill };

void delivered_means_delivered(Leave how) {
  m5a_sim_host* h = ss().host_open(kDev);
  CHECK(h != nullptr);
  const m5a_sim_device_stats before = stats(kDev);
  constexpr int n = 10;  // < 15 slots: all published without the model consuming
  for (int i = 0; i < n; ++i) {
    const auto req = cfgrd0(9, uint8_t(i));
    CHECK(ss().host_send(h, 0, req.data(), req.size()) == 0);
  }
  int ready[2];
  CHECK(pipe(ready) == 0);
  pid_t pid = fork();
  if (pid == 0) {
    m5a_ibv_context* c = open_raw(kDev);
    m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
    void* p = map_page(c, v);
    uint64_t produced = 0;
    uint8_t buf[4096];
    for (int i = 0; i < n; ++i) {
      if (ss().function_poll(c, 0, buf, sizeof buf) != 12) _exit(2);
      produced = write_slot(p, 256, cpld_for(buf));
      ring(p, produced);  // "flush() reported it written"
    }
    munmap(p, v->length);
    if (how == Leave::free_var) sym().mlx5dv_free_var(v);
    if (how != Leave::sigkill) {
      sym().ibv_close_device(c);
      _exit(0);
    }
    char ok = 'y';
    if (write(ready[1], &ok, 1) != 1) _exit(3);
    for (;;) pause();
  }
  if (how == Leave::sigkill) {
    char ok;
    CHECK(read(ready[0], &ok, 1) == 1);
    kill(pid, SIGKILL);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  close(ready[0]);
  close(ready[1]);
  // The context is gone: the device reclaims the page, which keeps its records for the model.
  const m5a_sim_device_stats mid = stats(kDev);
  CHECK(mid.tlp_vars == before.tlp_vars && mid.gw_pages_draining == before.gw_pages_draining + 1);
  CHECK(mid.gw_pages_free == before.gw_pages_free - 1);
  std::vector<std::vector<uint8_t>> got;
  CHECK(poll_all(h, &got) == size_t(n));
  const m5a_sim_host_stats s = host_stats(h);
  CHECK(s.retired == uint64_t(n) && s.unexpected == 0 && s.errors == 0 && s.outstanding == 0);
  if (s.retired != uint64_t(n) || s.errors != 0)
    std::fprintf(stderr, "leave %d: got %zu, retired %llu, errors %llu (%s), bad %llu\n", int(how),
                 got.size(), (unsigned long long)s.retired, (unsigned long long)s.errors, s.last_error,
                 (unsigned long long)s.bad_records);
  // Drained: scrubbed and back in the pool.
  const m5a_sim_device_stats after = stats(kDev);
  CHECK(after.gw_pages_draining == before.gw_pages_draining && after.gw_pages_free == before.gw_pages_free);
  ss().host_close(h);
}

// A model that attaches while a freed page still holds records for its predecessor discards
// them and says how many; so does reset.
void epoch_discards_draining() {
  m5a_sim_host* h = ss().host_open(kDev);
  m5a_ibv_context* c = open_raw(kDev);
  m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
  void* p = map_page(c, v);
  uint64_t produced = 0;
  for (int i = 0; i < 4; ++i) produced = write_slot(p, 256, cpld_for(cfgrd0(1, uint8_t(i)).data())), ring(p, produced);
  munmap(p, v->length);
  sym().mlx5dv_free_var(v);
  CHECK(stats(kDev).gw_pages_draining == 1);
  ss().host_close(h);
  h = ss().host_open(kDev);
  CHECK(host_stats(h).stale_completions == 4);
  CHECK(stats(kDev).gw_pages_draining == 0 && stats(kDev).stale_completions >= 4);
  CHECK(poll_all(h) == 0);
  // Freed with no model attached: nobody would collect them, so the page is scrubbed at once.
  ss().host_close(h);
  v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
  p = map_page(c, v);
  ring(p, write_slot(p, 256, cpld_for(cfgrd0(1, 1).data())));
  munmap(p, v->length);
  sym().mlx5dv_free_var(v);
  CHECK(stats(kDev).gw_pages_draining == 0);
  sym().ibv_close_device(c);
}

// A writer out of credits sets writer_waiting and futex-waits on the consumer index; each
// consumer store of the model wakes it.
void wakes_waiting_writer() {
  m5a_sim_host* h = ss().host_open(kDev);
  m5a_ibv_context* c = open_raw(kDev);
  m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
  auto* p = static_cast<uint8_t*>(map_page(c, v));
  uint64_t produced = 0;
  for (int i = 0; i < 15; ++i) produced = write_slot(p, 256, cpld_for(cfgrd0(1, uint8_t(i)).data()));
  ring(p, produced);  // the ring is full: no credits
  std::atomic<int> result{-2};
  std::atomic<pid_t> tid{0};
  std::thread writer([&] {
    tid.store(pid_t(syscall(SYS_gettid)));
    auto* consumer = reinterpret_cast<uint32_t*>(p + kConsumer);
    __atomic_store_n(reinterpret_cast<uint32_t*>(p + kWriterWaiting), 1u, __ATOMIC_SEQ_CST);
    const uint32_t seen = __atomic_load_n(consumer, __ATOMIC_SEQ_CST);
    timespec ts{30, 0};  // a bound so a broken wake fails the test instead of hanging it
    const long rc = syscall(SYS_futex, consumer, FUTEX_WAIT, seen, &ts, nullptr, 0);
    result.store(rc == 0 ? 0 : errno);
    __atomic_store_n(reinterpret_cast<uint32_t*>(p + kWriterWaiting), 0u, __ATOMIC_SEQ_CST);
  });
  // Wait until the writer sleeps in the kernel (state S in /proc), then consume one record.
  bool asleep = false;
  for (int i = 0; i < 5000 && !asleep; ++i) {
    if (tid.load() != 0) {
      char path[64], line[512] = "";
      std::snprintf(path, sizeof path, "/proc/self/task/%d/stat", int(tid.load()));
      if (FILE* f = std::fopen(path, "r")) {
        if (std::fgets(line, sizeof line, f) != nullptr) {
          const char* close_paren = std::strrchr(line, ')');
          asleep = close_paren != nullptr && close_paren[1] == ' ' && close_paren[2] == 'S';
        }
        std::fclose(f);
      }
    }
    if (!asleep) usleep(1000);
  }
  CHECK(asleep);
  uint8_t buf[4096];
  m5a_sim_completion info{};
  CHECK(ss().host_poll(h, buf, sizeof buf, &info) > 0);
  writer.join();
  CHECK(result.load() == 0);  // woken by the consumer store, not timed out
  poll_all(h);
  munmap(p, v->length);
  sym().mlx5dv_free_var(v);
  sym().ibv_close_device(c);
  ss().host_close(h);
}

}  // namespace

int main() {
  ScratchDir dir;
  try {
    scribbled_pages();
    delivered_means_delivered(Leave::free_var);
    delivered_means_delivered(Leave::exit);
    delivered_means_delivered(Leave::sigkill);
    epoch_discards_draining();
    wakes_waiting_writer();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  return mlx5tlp_test::finish("test_sim_host");
}
