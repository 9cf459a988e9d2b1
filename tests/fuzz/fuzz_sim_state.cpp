// libFuzzer target: validation of the software device's persisted state (cpp/sim/validate.cpp).
//
// The state file is written by other processes and outlives them, so every byte of it is
// hostile input. The base is a real fresh state, made at start-up by the device's own creator
// (create_device() in a private directory) with tests/fuzz/make_corpus.py's configuration; the
// input is a list of patches applied to it: <u32 offset (mod the state size)><u16 length><bytes>
// (LE), so a small input reaches any field of the 2.4 MB state (the seeds turn the fresh state
// into a used one: contexts, TLP and VirtIO VARs, a UMEM).
// Properties: validate_state() returns 0 or EPROTO with a message naming the state file and
// never reads outside the state (ASan) or divides by zero / overflows (UBSan); a state it
// accepts is safe to use: every VAR's pages lie inside the BAR file, page tables and objects
// agree both ways, no two objects hold one page, every queued request has a possible length.
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "channel.hpp"
#include "device_map.hpp"
#include "fuzz_check.hpp"
#include "last_error.hpp"
#include "state.hpp"

using namespace mlx5tlp::sim;

namespace {

uint8_t* g_base = nullptr;  // the fresh state
uint8_t* g_work = nullptr;  // patched copy (restored after every input)
size_t g_bar_len = 0;

m5a_sim_device_config fuzz_config() {
  m5a_sim_device_config c{};
  c.tlp = 1;
  c.gw_pages = 8;
  c.gw_log_stride = 0;
  c.virtio_pages = 16;
  c.gw_slot_size = 256;
  c.flags = 0;
  c.gw_bar_offset = 0x200000;
  c.node_guid = 0x0002C90300FEED01ull;
  return c;
}

void make_base() {
  char dir[] = "/tmp/mlx5tlp-fuzz-state-XXXXXX";
  FUZZ_CHECK(mkdtemp(dir) != nullptr, "mkdtemp: %s", std::strerror(errno));
  setenv("MLX5TLP_SIM_DIR", dir, 1);
  const m5a_sim_device_config cfg = fuzz_config();
  FUZZ_CHECK(create_device("fuzzseed", cfg) == 0, "create_device: %s", last_error());
  const std::string dev = std::string(dir) + "/fuzzseed";
  FILE* f = std::fopen((dev + "/state").c_str(), "rb");
  FUZZ_CHECK(f != nullptr, "open state");
  const size_t size = (sizeof(DeviceState) + 63) / 64 * 64;
  g_base = static_cast<uint8_t*>(std::aligned_alloc(64, size));
  g_work = static_cast<uint8_t*>(std::aligned_alloc(64, size));
  FUZZ_CHECK(std::fread(g_base, 1, sizeof(DeviceState), f) == sizeof(DeviceState), "read state");
  std::fclose(f);
  std::memcpy(g_work, g_base, sizeof(DeviceState));
  g_bar_len = bar_size(cfg);
  unlink((dev + "/state").c_str());
  unlink((dev + "/bar").c_str());
  rmdir(dev.c_str());
  rmdir(dir);
  const auto& st = *reinterpret_cast<const DeviceState*>(g_base);
  FUZZ_CHECK(validate_state(st, g_bar_len, "base") == 0, "the fresh state is refused: %s", last_error());
}

void check_accepted(const DeviceState& st) {
  const m5a_sim_device_config& cfg = st.cfg;
  const uint64_t stride = uint64_t(4096) << cfg.gw_log_stride;
  FUZZ_CHECK(cfg.gw_pages <= kMaxGwPages && cfg.virtio_pages <= kMaxVirtioPages, "page counts %u/%u",
             cfg.gw_pages, cfg.virtio_pages);
  for (uint32_t i = 0; i < kMaxObjects; ++i) {
    const Object& o = st.obj[i];
    if (o.kind == ObjKind::tlp_var || o.kind == ObjKind::virtio_var) {
      FUZZ_CHECK(o.length != 0 && o.aux + o.length <= g_bar_len && o.aux + o.length > o.aux,
                 "obj[%u] maps [0x%llx, +0x%x) of a 0x%zx-byte BAR", i,
                 static_cast<unsigned long long>(o.aux), o.length, g_bar_len);
    }
    if (o.kind == ObjKind::tlp_var)
      FUZZ_CHECK(o.id < cfg.gw_pages && st.gw[o.id].owner.load() == i + 1, "obj[%u] TLP page %u", i, o.id);
    if (o.kind == ObjKind::virtio_var)
      FUZZ_CHECK(o.id < cfg.virtio_pages && st.virtio_owner[o.id] == i + 1, "obj[%u] VirtIO page %u", i, o.id);
    if (o.kind == ObjKind::tlp_var) FUZZ_CHECK(o.aux % stride == 0, "obj[%u] unaligned page", i);
  }
  for (uint32_t p = 0; p < kMaxGwPages; ++p) {
    const uint32_t owner = st.gw[p].owner.load();
    if (owner == 0 || owner == kPageDraining) continue;
    FUZZ_CHECK(p < cfg.gw_pages && owner <= kMaxObjects && st.obj[owner - 1].kind == ObjKind::tlp_var &&
                   st.obj[owner - 1].id == p,
               "gw[%u].owner %u", p, owner);
  }
  for (uint32_t ch = 0; ch < kChannels; ++ch)
    for (uint32_t i = 0; i < kRequestSlots; ++i)
      if (slot_state(st.chan[ch].word[i].load()) != kSlotFree)
        FUZZ_CHECK(st.chan[ch].slot[i].len >= 12 && st.chan[ch].slot[i].len <= kRequestMax,
                   "chan[%u].slot[%u].len %u", ch, i, st.chan[ch].slot[i].len);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  make_base();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  struct Range {
    size_t off, len;
  };
  Range applied[256];
  size_t n = 0;
  for (size_t at = 0; at + 6 <= size && n < 256;) {
    uint32_t off;
    uint16_t len;
    std::memcpy(&off, data + at, 4);
    std::memcpy(&len, data + at + 4, 2);
    at += 6;
    size_t o = off % sizeof(DeviceState);
    size_t l = len;
    if (l > size - at) l = size - at;
    if (l > sizeof(DeviceState) - o) l = sizeof(DeviceState) - o;
    std::memcpy(g_work + o, data + at, l);
    applied[n++] = Range{o, l};
    at += l;
  }
  clear_error();
  const auto& st = *reinterpret_cast<const DeviceState*>(g_work);
  const int rc = validate_state(st, g_bar_len, "fuzz/state");
  if (rc == 0) {
    check_accepted(st);
  } else {
    FUZZ_CHECK(rc == EPROTO, "validate_state returned %d", rc);
    FUZZ_CHECK(std::strstr(last_error(), "state file 'fuzz/state' is damaged") != nullptr,
               "refusal without the file's name: %s", last_error());
  }
  for (size_t i = 0; i < n; ++i) std::memcpy(g_work + applied[i].off, g_base + applied[i].off, applied[i].len);
  return 0;
}
