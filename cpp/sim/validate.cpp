// Validation of a persisted device state before anything trusts it.
//
// The state file is written by other processes (and survives them): every field that is later
// used as an index, a size or a divisor is checked here against the others, so a damaged file
// is refused with EPROTO naming the file and the field instead of crashing (SIGSEGV, SIGFPE)
// or handing out overlapping pages. Fields changed lock-free while the device runs (channel
// words, consumer counts) are checked here only for what stays invariant, and again where used.
#include <algorithm>
#include <cstdarg>
#include <tuple>
#include <cinttypes>
#include <cstdio>
#include <string>
#include <vector>

#include "channel.hpp"
#include "device_map.hpp"

namespace mlx5tlp::sim {

namespace {

struct Checker {
  const std::string& path;
  int bad(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
};

int Checker::bad(const char* fmt, ...) {
  char what[256];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  return fail(EPROTO, "state file '%s' is damaged: %s (remove the device directory)", path.c_str(), what);
}

int check_objects(const DeviceState& st, const m5a_sim_device_config& cfg, Checker& c) {
  const uint64_t stride = uint64_t(4096) << cfg.gw_log_stride;
  struct Key {
    uint32_t slot, gen, handle, index;
  };
  std::vector<Key> keys;
  for (uint32_t i = 0; i < kMaxObjects; ++i) {
    const Object& o = st.obj[i];
    if (o.kind == ObjKind::none) continue;
    if (uint32_t(o.kind) > kLastKind) return c.bad("obj[%u].kind is %u", i, uint32_t(o.kind));
    if (o.ctx_slot >= kMaxContexts) return c.bad("obj[%u].ctx_slot is %u (max %u)", i, o.ctx_slot, kMaxContexts - 1);
    if (o.data_len > kObjDataMax) return c.bad("obj[%u].data_len is %u (max %u)", i, o.data_len, kObjDataMax);
    if (o.kind == ObjKind::tlp_var) {
      if (o.id >= cfg.gw_pages) return c.bad("obj[%u] is TLP page %u of %u", i, o.id, cfg.gw_pages);
      if (o.length != stride) return c.bad("obj[%u].length is %u, the page stride %" PRIu64, i, o.length, stride);
      if (o.aux != o.id * stride) return c.bad("obj[%u].mmap_off is 0x%" PRIx64 ", page %u is at 0x%" PRIx64, i, o.aux, o.id, o.id * stride);
      const uint32_t owner = st.gw[o.id].owner.load(std::memory_order_relaxed);  // locked
      if (owner != i + 1)
        return c.bad("obj[%u] holds TLP page %u, which the page table gives to entry %" PRId64, i,
                     o.id, int64_t(owner) - 1);  // -1: free; 64-bit: any u32 owner fits
    } else if (o.kind == ObjKind::virtio_var) {
      if (o.id >= cfg.virtio_pages) return c.bad("obj[%u] is VirtIO page %u of %u", i, o.id, cfg.virtio_pages);
      if (o.length != kVirtioPageSize) return c.bad("obj[%u].length is %u, not %u", i, o.length, kVirtioPageSize);
      const uint64_t off = stride * cfg.gw_pages + uint64_t(o.id) * kVirtioPageSize;
      if (o.aux != off) return c.bad("obj[%u].mmap_off is 0x%" PRIx64 ", VirtIO page %u is at 0x%" PRIx64, i, o.aux, o.id, off);
      if (st.virtio_owner[o.id] != i + 1)
        return c.bad("obj[%u] holds VirtIO page %u, which the page table gives to entry %" PRId64,
                     i, o.id, int64_t(st.virtio_owner[o.id]) - 1);
    }
    keys.push_back(Key{o.ctx_slot, o.ctx_gen, o.handle, i});
  }
  std::sort(keys.begin(), keys.end(), [](const Key& a, const Key& b) {
    return std::tie(a.slot, a.gen, a.handle) < std::tie(b.slot, b.gen, b.handle);
  });
  for (size_t k = 1; k < keys.size(); ++k)
    if (keys[k].slot == keys[k - 1].slot && keys[k].gen == keys[k - 1].gen && keys[k].handle == keys[k - 1].handle)
      return c.bad("obj[%u] and obj[%u] share handle %u of context %u", keys[k - 1].index,
                   keys[k].index, keys[k].handle, keys[k].slot);
  return 0;
}

int check_pages(const DeviceState& st, const m5a_sim_device_config& cfg, Checker& c) {
  for (uint32_t p = 0; p < kMaxGwPages; ++p) {
    const uint32_t owner = st.gw[p].owner.load(std::memory_order_relaxed);  // under the lock
    if (owner == 0) continue;
    if (p >= cfg.gw_pages) return c.bad("gw[%u].owner is %u on a device of %u pages", p, owner, cfg.gw_pages);
    if (owner == kPageDraining) continue;
    if (owner > kMaxObjects) return c.bad("gw[%u].owner is %u (max %u)", p, owner, kMaxObjects);
    const Object& o = st.obj[owner - 1];
    if (o.kind != ObjKind::tlp_var || o.id != p)
      return c.bad("gw[%u].owner is entry %u, which is not that TLP page", p, owner - 1);
  }
  for (uint32_t p = 0; p < kMaxVirtioPages; ++p) {
    const uint32_t owner = st.virtio_owner[p];
    if (owner == 0) continue;
    if (p >= cfg.virtio_pages) return c.bad("virtio_owner[%u] is %u on a device of %u pages", p, owner, cfg.virtio_pages);
    if (owner > kMaxObjects) return c.bad("virtio_owner[%u] is %u (max %u)", p, owner, kMaxObjects);
    const Object& o = st.obj[owner - 1];
    if (o.kind != ObjKind::virtio_var || o.id != p)
      return c.bad("virtio_owner[%u] is entry %u, which is not that VirtIO page", p, owner - 1);
  }
  return 0;
}

int check_channels(const DeviceState& st, Checker& c) {
  for (uint32_t ch = 0; ch < kChannels; ++ch) {
    const RequestChannel& rc = st.chan[ch];
    // tail first: tail <= head holds at every instant and both only grow.
    const uint64_t tail = rc.tail.load(std::memory_order_acquire);
    const uint64_t head = rc.head.load(std::memory_order_acquire);
    if (tail > head) return c.bad("chan[%u].tail %" PRIu64 " is beyond head %" PRIu64, ch, tail, head);
    for (uint32_t i = 0; i < kRequestSlots; ++i) {
      const uint64_t w = rc.word[i].load(std::memory_order_acquire);  // acquire: with its slot
      const uint32_t state = slot_state(w);
      if (state > kSlotClaimed) return c.bad("chan[%u].word[%u] has state %u", ch, i, state);
      if (slot_pos32(w) % kRequestSlots != i)
        return c.bad("chan[%u].word[%u] is for position %u, which is another slot's", ch, i, slot_pos32(w));
      if (state == kSlotFree) continue;
      if (rc.slot[i].len < 12 || rc.slot[i].len > kRequestMax)
        return c.bad("chan[%u].slot[%u].len is %u (12..%u)", ch, i, rc.slot[i].len, kRequestMax);
      if (state == kSlotClaimed && slot_session(w) >= kMaxSessions)
        return c.bad("chan[%u].word[%u] names claimer session %u (max %u)", ch, i, slot_session(w), kMaxSessions - 1);
    }
  }
  return 0;
}

}  // namespace

int validate_state(const DeviceState& st, size_t bar_len, const std::string& path) {
  Checker c{path};
  // acquire: pairs with the creator's release of the magic (the state before it is complete).
  if (__atomic_load_n(&st.magic, __ATOMIC_ACQUIRE) != kStateMagic)
    return c.bad("magic is 0x%016" PRIx64 ", not 0x%016" PRIx64, st.magic, kStateMagic);
  if (st.version != kStateVersion)
    return c.bad("layout version is %u; this library reads version %u", st.version, kStateVersion);
  if (st.state_size != sizeof(DeviceState))
    return c.bad("state_size is %u, not %zu", st.state_size, sizeof(DeviceState));
  if (validate_config(st.cfg) != 0) {
    const std::string why = last_error();
    return c.bad("cfg: %s", why.c_str());
  }
  if (bar_size(st.cfg) != bar_len)
    return c.bad("the configuration needs a %zu-byte bar file; 'bar' has %zu bytes", bar_size(st.cfg), bar_len);
  for (uint32_t s = 0; s < kMaxContexts; ++s)
    if (st.ctx[s].live > 1) return c.bad("ctx[%u].live is %u", s, st.ctx[s].live);
  for (uint32_t f = 0; f < uint32_t(FaultOp::count); ++f)
    if (st.faults[f].count != 0 && (st.faults[f].err == 0 || st.faults[f].err > 4095))
      return c.bad("faults[%u].err is %u", f, st.faults[f].err);
  if (int rc = check_objects(st, st.cfg, c)) return rc;
  if (int rc = check_pages(st, st.cfg, c)) return rc;
  return check_channels(st, c);
}

}  // namespace mlx5tlp::sim
