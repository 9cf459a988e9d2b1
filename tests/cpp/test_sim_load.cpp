// The native load generator (mlx5tlp_sim_host_load) from C++, without Python:
// - a function thread answers 4-byte memory reads by writing CplD records straight into its
//   gateway page (the sim layout) and slips a garbage record in every so often: every read is
//   checked and completed, and exactly the garbage is counted (errors_by_kind[RECORD]);
// - a completion with the wrong data is counted as a data error, once;
// - another process scribbles over the page while the generator reads it and nobody answers:
//   no crash, no out-of-bounds access (AddressSanitizer in tests/test_native.py), the reads
//   time out and the run ends;
// - a bad spec is refused with EINVAL and the field in last_error.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <random>
#include <thread>

#include "sim_util.hpp"

using namespace simtest;

namespace {

constexpr const char* kDev = "loadgen";
constexpr uint64_t kBase = 0xE0000000;
constexpr uint32_t kRange = 4096;
constexpr uint32_t kSlotSize = 256;

uint8_t expected(uint64_t addr) { return uint8_t(addr * 7 + 3); }

std::vector<uint8_t> image() {
  std::vector<uint8_t> v(kRange);
  for (uint32_t i = 0; i < kRange; ++i) v[i] = expected(kBase + i);
  return v;
}

m5a_sim_load_spec reads_spec(const m5a_sim_load_range& r, uint64_t count, uint64_t timeout_ns) {
  m5a_sim_load_spec s{};
  s.struct_size = sizeof s;
  s.nops = 1;
  s.ops[0] = m5a_sim_load_op{M5A_SIM_LOAD_READ, 4, 4, 1};
  s.nranges = 1;
  s.ranges = &r;
  s.window = 8;
  s.count = count;
  s.timeout_ns = timeout_ns;
  s.channels = 8;
  s.requester_id = 0x0000;
  s.completer_id = 0x0100;
  s.check_completer = 1;
  s.max_payload = 128;
  s.rcb = 64;
  s.seed = 7;
  return s;
}

// The CplD for a 1-DW memory read (PCIe Base 2.2.9: Byte Count 4 for a full DW, Lower Address
// the address's low 7 bits), with the data the read must see, `flip` XORed into its first byte.
std::vector<uint8_t> cpld(const uint8_t* req, uint8_t flip) {
  const uint64_t addr = (uint64_t(req[8]) << 24 | uint64_t(req[9]) << 16 | uint64_t(req[10]) << 8 | req[11]) & ~3ull;
  return {0x4a, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x04, req[4], req[5], req[6], uint8_t(addr & 0x7c),
          uint8_t(expected(addr) ^ flip), expected(addr + 1), expected(addr + 2), expected(addr + 3)};
}

// Answers every request until `stop`; every `garbage_every`-th answer is preceded by a record
// with an impossible length; answer number `bad_data` (if any) carries a flipped byte.
void serve(m5a_ibv_context* c, void* page, std::atomic<bool>* stop, uint32_t garbage_every,
           uint32_t bad_data, uint32_t* garbage) {
  const uint32_t count = (4096 - 0x80) / kSlotSize;
  uint8_t req[16 + 4096];
  uint32_t answered = 0;
  auto wait_credit = [&]() {
    while (load64(page, kDoorbell) - load64(page, kConsumer) >= count && !stop->load()) std::this_thread::yield();
  };
  while (!stop->load()) {
    bool any = false;
    for (uint32_t ch = 0; ch < 8; ++ch) {
      const ssize_t n = ss().function_poll(c, ch, req, sizeof req);
      CHECK(n >= 0);
      if (n <= 0) continue;
      any = true;
      CHECK(n == 12 && req[0] == 0x00);  // a 3DW MRd
      if (garbage_every != 0 && answered % garbage_every == garbage_every - 1) {
        wait_credit();
        auto* p = static_cast<uint8_t*>(page);
        const uint64_t produced = load64(page, kDoorbell);
        const uint32_t bad = 0x7fffffffu;
        std::memcpy(p + kSlots + size_t(produced % count) * kSlotSize, &bad, 4);
        ring(page, produced + 1);
        ++*garbage;
      }
      wait_credit();
      ring(page, write_slot(page, kSlotSize, cpld(req, answered == bad_data ? 0x40 : 0)));
      ++answered;
    }
    if (!any) std::this_thread::yield();
  }
}

void answered_in_cpp(uint32_t garbage_every, uint32_t bad_data) {
  m5a_ibv_context* c = open_raw(kDev);
  m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
  CHECK(v != nullptr);
  void* page = map_page(c, v);
  m5a_sim_host* h = ss().host_open(kDev);
  std::atomic<bool> stop{false};
  uint32_t garbage = 0;
  std::thread fn(serve, c, page, &stop, garbage_every, bad_data, &garbage);
  const std::vector<uint8_t> img = image();
  const m5a_sim_load_range r{kBase, kRange, img.data()};
  const m5a_sim_load_spec s = reads_spec(r, 1000, 5000000000ull);
  m5a_sim_load_result out{};
  out.struct_size = sizeof out;
  CHECK(ss().host_load(h, &s, &out) == 0);
  stop = true;
  fn.join();
  CHECK(out.sent == 1000 && out.reads == 1000 && out.writes == 0 && out.flush_reads == 0);
  CHECK(out.errors_by_kind[M5A_SIM_LOAD_ERR_RECORD] == garbage);
  const uint64_t bad = bad_data < 1000 ? 1 : 0;
  CHECK(out.errors_by_kind[M5A_SIM_LOAD_ERR_DATA] == bad);
  CHECK(out.errors == garbage + bad);
  CHECK(out.completed == 1000 - bad && out.completions == 1000);
  CHECK(out.bytes_read == 4000);
  CHECK(out.lat_min_ns > 0 && out.lat_min_ns <= out.lat_p50_ns && out.lat_p50_ns <= out.lat_p99_ns &&
        out.lat_p99_ns <= out.lat_max_ns);
  if (bad) CHECK(std::strstr(out.first_errors[0], "expected") != nullptr);
  m5a_sim_host_stats st{};
  ss().host_stats(h, &st);
  CHECK(st.requests == 1000 && st.bad_records == garbage && st.outstanding == 0);
  ss().host_close(h);
  munmap(page, v->length);
  sym().mlx5dv_free_var(v);
  sym().ibv_close_device(c);
}

void scribbled_while_loading() {
  m5a_ibv_context* c = open_raw(kDev);
  m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
  m5a_sim_host* h = ss().host_open(kDev);
  pid_t pid = fork();
  if (pid == 0) {
    std::mt19937_64 rng(5);
    auto* p = static_cast<uint8_t*>(map_page(c, v));
    for (int round = 0; round < 3000; ++round) {
      for (int k = 0; k < 32; ++k) p[kSlots + rng() % (v->length - kSlots)] = uint8_t(rng());
      const uint32_t len = round % 3 == 0 ? 0x7fffffffu : uint32_t(rng() % 300);
      std::memcpy(p + kSlots + (round % 15) * kSlotSize, &len, 4);
      __atomic_store_n(reinterpret_cast<uint64_t*>(p + kDoorbell), round % 4 == 0 ? rng() : uint64_t(round),
                       __ATOMIC_RELEASE);
      usleep(100);
    }
    _exit(0);
  }
  const std::vector<uint8_t> img = image();
  const m5a_sim_load_range r{kBase, kRange, img.data()};
  const m5a_sim_load_spec s = reads_spec(r, 100, 50000000ull);
  m5a_sim_load_result out{};
  out.struct_size = sizeof out;
  CHECK(ss().host_load(h, &s, &out) == 0);
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  // Nobody answers: reads time out (each tag then retired for the run) and the run ends. (A
  // garbage record that happens to name an outstanding tag fails that read instead.)
  CHECK(out.completed == 0 && out.sent >= 8 && out.sent <= 100);
  CHECK(out.errors_by_kind[M5A_SIM_LOAD_ERR_TIMEOUT] >= 1);
  CHECK(out.errors_by_kind[M5A_SIM_LOAD_ERR_RECORD] + out.errors_by_kind[M5A_SIM_LOAD_ERR_FORMAT] +
            out.errors_by_kind[M5A_SIM_LOAD_ERR_TAG] >
        0);
  std::printf("scribbled while loading: %llu errors (%llu garbage records)\n", (unsigned long long)out.errors,
              (unsigned long long)out.errors_by_kind[M5A_SIM_LOAD_ERR_RECORD]);
  ss().host_close(h);
  sym().mlx5dv_free_var(v);
  sym().ibv_close_device(c);
}

void bad_specs() {
  m5a_sim_host* h = ss().host_open(kDev);
  const std::vector<uint8_t> img = image();
  const m5a_sim_load_range r{kBase, kRange, img.data()};
  m5a_sim_load_result out{};
  out.struct_size = sizeof out;
  struct Case {
    const char* field;
    void (*mutate)(m5a_sim_load_spec&);
  };
  const Case cases[] = {
      {"struct_size", [](m5a_sim_load_spec& s) { s.struct_size = 8; }},
      {"ops", [](m5a_sim_load_spec& s) { s.nops = 0; }},
      {"size", [](m5a_sim_load_spec& s) { s.ops[0].size = 4097; }},
      {"align", [](m5a_sim_load_spec& s) { s.ops[0].align = 3; }},
      {"whole DWs", [](m5a_sim_load_spec& s) { s.ops[0] = m5a_sim_load_op{M5A_SIM_LOAD_WRITE, 6, 4, 1}; }},
      {"window", [](m5a_sim_load_spec& s) { s.window = 513; }},
      {"rate", [](m5a_sim_load_spec& s) { s.rate = -1; }},
      {"neither count nor duration", [](m5a_sim_load_spec& s) { s.count = 0; }},
      {"channels", [](m5a_sim_load_spec& s) { s.channels = 9; }},
      {"max_payload", [](m5a_sim_load_spec& s) { s.max_payload = 200; }},
      {"rcb", [](m5a_sim_load_spec& s) { s.rcb = 32; }},
      {"does not fit range", [](m5a_sim_load_spec& s) {
         static const uint8_t small_image[64] = {};
         static const m5a_sim_load_range small{kBase, sizeof small_image, small_image};
         s.ranges = &small;
         s.ops[0].size = 128;
       }},
  };
  for (const Case& k : cases) {
    m5a_sim_load_spec s = reads_spec(r, 1, 1000000);
    k.mutate(s);
    const int rc = ss().host_load(h, &s, &out);
    CHECK(rc == EINVAL);
    const std::string why = last_error();
    CHECK(why.find(k.field) != std::string::npos);
    if (why.find(k.field) == std::string::npos) std::fprintf(stderr, "%s: %s\n", k.field, why.c_str());
  }
  ss().host_close(h);
}

}  // namespace

int main() {
  ScratchDir dir;
  try {
    make_device(kDev, config(2, 0, 0, kSlotSize));
    answered_in_cpp(50, ~0u);
    answered_in_cpp(0, 500);
    scribbled_while_loading();
    bad_specs();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  return mlx5tlp_test::finish("test_sim_load");
}
