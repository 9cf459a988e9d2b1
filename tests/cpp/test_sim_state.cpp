// A damaged state file is refused with EPROTO naming the file and the field, never a crash:
// targeted corruptions of each checked field, then a fuzz loop that mutates random bytes of a
// used device's state file and drives every entry point on the result (under AddressSanitizer
// in tests/test_native.py: any out-of-bounds access fails the run).
#include <sys/wait.h>

#include <cstddef>
#include <random>

#include "../../cpp/sim/state.hpp"  // white-box: the layout whose fields are corrupted
#include "sim_util.hpp"

using namespace simtest;
using mlx5tlp::sim::DeviceState;

namespace {

std::string state_path(const char* dev) { return std::string(getenv("MLX5TLP_SIM_DIR")) + "/" + dev + "/state"; }

std::vector<uint8_t> read_state(const char* dev) {
  std::vector<uint8_t> b(sizeof(DeviceState));
  const int fd = open(state_path(dev).c_str(), O_RDONLY);
  CHECK(fd >= 0 && pread(fd, b.data(), b.size(), 0) == ssize_t(b.size()));
  close(fd);
  return b;
}

void write_state(const char* dev, const std::vector<uint8_t>& b) {
  const int fd = open(state_path(dev).c_str(), O_WRONLY);
  CHECK(fd >= 0 && pwrite(fd, b.data(), b.size(), 0) == ssize_t(b.size()));
  close(fd);
}

// A device whose state is `pristine` with `mutate` applied; returns query_device's result.
int open_mutated(const char* dev, const std::vector<uint8_t>& pristine,
                 void (*mutate)(DeviceState&)) {
  make_device(dev, config(4, 0, 4));
  std::vector<uint8_t> b = pristine;
  mutate(*reinterpret_cast<DeviceState*>(b.data()));
  write_state(dev, b);
  return ss().query_device(dev, nullptr, nullptr);
}

struct Case {
  const char* dev;
  void (*mutate)(DeviceState&);
  const char* field;  // must appear in the error text
};

void targeted(const std::vector<uint8_t>& pristine) {
  using namespace mlx5tlp::sim;
  const Case cases[] = {
      {"c_magic", [](DeviceState& s) { s.magic ^= 1; }, "magic"},
      {"c_version", [](DeviceState& s) { s.version = 9; }, "layout version is 9"},
      // A version-2 file has one mark record per slot, without progress: refused, not misread.
      {"c_v2", [](DeviceState& s) { s.version = 2; }, "layout version is 2; this library reads version 3"},
      {"c_size", [](DeviceState& s) { s.state_size = 12; }, "state_size"},
      {"c_pages0", [](DeviceState& s) { s.cfg.gw_pages = 0; }, "gw_pages"},
      {"c_slot0", [](DeviceState& s) { s.cfg.gw_slot_size = 0; }, "slot_size"},  // was SIGFPE
      {"c_stride", [](DeviceState& s) { s.cfg.gw_log_stride = 9; }, "gw_log_stride"},
      {"c_flags", [](DeviceState& s) { s.cfg.flags = 0x80; }, "device flags"},
      {"c_bar", [](DeviceState& s) { s.cfg.virtio_pages = 200; }, "bar file"},  // pages beyond the BAR
      {"c_ctx", [](DeviceState& s) { s.ctx[3].live = 7; }, "ctx[3].live"},
      {"c_kind", [](DeviceState& s) { s.obj[5].kind = ObjKind(42); }, "obj[5].kind"},
      {"c_page", [](DeviceState& s) {
         s.obj[0].kind = ObjKind::tlp_var;
         s.obj[0].id = 99;
       }, "obj[0] is TLP page 99"},
      {"c_overlap", [](DeviceState& s) {  // two objects on one page
         for (int i = 0; i < 2; ++i) {
           s.obj[i].kind = ObjKind::tlp_var;
           s.obj[i].id = 1;
           s.obj[i].length = 4096;
           s.obj[i].aux = 4096;
           s.obj[i].handle = uint32_t(i);
         }
         s.gw[1].owner.store(1);
       }, "page table gives to entry 0"},
      {"c_owner", [](DeviceState& s) { s.gw[2].owner.store(500); }, "gw[2].owner"},
      {"c_handles", [](DeviceState& s) {
         for (int i = 0; i < 2; ++i) {
           s.obj[i].kind = ObjKind::umem;
           s.obj[i].handle = 7;
         }
       }, "share handle 7"},
      {"c_data", [](DeviceState& s) {
         s.obj[9].kind = ObjKind::devx_obj;
         s.obj[9].data_len = 100000;
       }, "obj[9].data_len"},
      {"c_tail", [](DeviceState& s) { s.chan[2].tail.store(s.chan[2].head.load() + 5); }, "chan[2].tail"},
      {"c_word", [](DeviceState& s) { s.chan[1].word[3].store(uint64_t(7) << 32 | 3); }, "chan[1].word[3]"},
      {"c_wpos", [](DeviceState& s) { s.chan[0].word[4].store(5); }, "chan[0].word[4]"},
      {"c_len", [](DeviceState& s) {
         s.chan[0].word[0].store(uint64_t(1) << 32 | 0);  // READY(0)
         s.chan[0].slot[0].len = 100000;
       }, "chan[0].slot[0].len"},
      {"c_fault", [](DeviceState& s) { s.faults[1] = Fault{0, 3}; }, "faults[1].err"},
  };
  for (const Case& c : cases) {
    const int rc = open_mutated(c.dev, pristine, c.mutate);
    const std::string why = last_error();
    CHECK(rc == EPROTO);
    const bool named = why.find(state_path(c.dev)) != std::string::npos && why.find(c.field) != std::string::npos;
    CHECK(named);
    if (rc != EPROTO || !named) std::fprintf(stderr, "%s: rc %d: %s\n", c.dev, rc, why.c_str());
    // And every other entry point refuses it the same way.
    CHECK(open_raw(c.dev) == nullptr && errno == EPROTO);
    CHECK(ss().host_open(c.dev) == nullptr && errno == EPROTO);
  }
  // A truncated state file (another layout) is refused before it is mapped.
  make_device("c_short", config(4, 0, 4));
  CHECK(truncate(state_path("c_short").c_str(), 4096) == 0);
  CHECK(ss().query_device("c_short", nullptr, nullptr) == EPROTO);
  CHECK(last_error().find("4096 bytes") != std::string::npos);
}

// Drives a device that opened despite the mutation: nothing may crash or read out of bounds.
void exercise(const char* dev) {
  m5a_sim_device_stats st{};
  ss().query_device(dev, nullptr, &st);
  m5a_sim_host* h = ss().host_open(dev);
  m5a_ibv_context* c = open_raw(dev);
  if (c != nullptr) {
    m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
    if (v != nullptr) {
      void* p = ss().mmap(c, v->length, PROT_READ | PROT_WRITE, MAP_SHARED, v->mmap_off);
      if (p != MAP_FAILED) {
        ring(p, write_slot(p, 256, cpld_for(cfgrd0(1, 1).data())));
        munmap(p, v->length);
      }
    }
    uint8_t buf[8192];
    m5a_sim_claim_info info{};
    for (uint32_t ch = 0; ch < 8; ++ch) {
      ssize_t n = ss().function_claim(c, ch, buf, sizeof buf, &info);
      if (n > 0) {
        ss().function_mark(c, ch, info.claim, 0, 1);
        ss().function_retire(c, ch, info.claim);
      }
      ss().function_poll(c, ch, buf, sizeof buf);
    }
    if (v != nullptr) sym().mlx5dv_free_var(v);
  }
  if (h != nullptr) {
    uint8_t buf[8192];
    m5a_sim_completion info{};
    for (int i = 0; i < 64 && ss().host_poll(h, buf, sizeof buf, &info) != 0; ++i) {
    }
    const auto req = cfgrd0(2, 2);
    ss().host_send(h, 0, req.data(), req.size());
    ss().host_close(h);
  }
  if (c != nullptr) sym().ibv_close_device(c);
  m5a_sim_reset_result r{};
  ss().reset_device(dev, &r);
}

void fuzz(const std::vector<uint8_t>& pristine, unsigned iterations) {
  std::mt19937_64 rng(0x5eed5eedull);
  const size_t tables = offsetof(DeviceState, chan);
  const size_t chan_heads = tables + sizeof(mlx5tlp::sim::RequestChannel);
  unsigned opened = 0, refused = 0, other = 0;
  for (unsigned it = 0; it < iterations; ++it) {
    char dev[32];
    std::snprintf(dev, sizeof dev, "fz%u", it);
    make_device(dev, config(4, 0, 4));
    std::vector<uint8_t> b = pristine;
    const unsigned flips = 1 + unsigned(rng() % 8);
    for (unsigned f = 0; f < flips; ++f) {
      // Mostly the tables and the first channel's indexes and words: that is where bytes mean
      // indexes, sizes and states.
      const unsigned where = unsigned(rng() % 4);
      const size_t span = where < 2 ? tables : where == 2 ? chan_heads : b.size();
      const size_t off = rng() % span;
      b[off] = where == 3 ? uint8_t(rng()) : uint8_t(b[off] ^ (1u << (rng() % 8)));
    }
    write_state(dev, b);
    const int rc = ss().query_device(dev, nullptr, nullptr);
    if (rc == 0) {
      ++opened;
      exercise(dev);
    } else if (rc == EPROTO) {
      ++refused;
      CHECK(last_error().find("state file") != std::string::npos);
    } else {
      ++other;
      std::fprintf(stderr, "fuzz %u: unexpected errno %d: %s\n", it, rc, last_error().c_str());
    }
    rmtree(std::string(getenv("MLX5TLP_SIM_DIR")) + "/" + dev);
  }
  CHECK(other == 0);
  CHECK(opened > 0 && refused > 0);  // both outcomes were exercised
  std::printf("state fuzz: %u mutated state files, %u opened and exercised, %u refused\n",
              iterations, opened, refused);
}

}  // namespace

int main() {
  ScratchDir dir;
  try {
    // A used device: objects in the tables, requests queued and claimed, a page with records.
    make_device("base", config(4, 0, 4));
    m5a_ibv_context* c = open_raw("base");
    m5a_sim_host* h = ss().host_open("base");
    m5a_mlx5dv_var* v = sym().mlx5dv_alloc_var(c, M5A_MLX5DV_VAR_ALLOC_FLAG_TLP);
    void* p = map_page(c, v);
    ring(p, write_slot(p, 256, cpld_for(cfgrd0(1, 1).data())));
    uint8_t in[16] = {0x0a, 0, 0, 0, 0, 0, 0, 0x42}, out[16];
    m5a_mlx5dv_devx_obj* obj = sym().mlx5dv_devx_obj_create(c, in, sizeof in, out, sizeof out);
    for (uint8_t t = 0; t < 5; ++t) {
      const auto r = cfgrd0(1, t);
      ss().host_send(h, 0, r.data(), r.size());
    }
    uint8_t buf[4096];
    m5a_sim_claim_info info{};
    CHECK(ss().function_claim(c, 0, buf, sizeof buf, &info) > 0);
    const std::vector<uint8_t> pristine = read_state("base");
    targeted(pristine);
    fuzz(pristine, MLX5TLP_TEST_ASAN ? 150 : 300);
    munmap(p, v->length);
    sym().mlx5dv_free_var(v);
    sym().mlx5dv_devx_obj_destroy(obj);
    ss().host_close(h);
    sym().ibv_close_device(c);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    ++mlx5tlp_test::failures();
  }
  return mlx5tlp_test::finish("test_sim_state");
}
