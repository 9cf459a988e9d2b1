// The device model: device management, the PCIe host that sends requests to the emulated
// function, and the collector that reads every completion written into any gateway page.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>

#include "state.hpp"

using namespace mlx5tlp::sim;

// ------------------------------------------------------------------ device management
M5A_EXPORT int mlx5tlp_sim_create_device(const char* name, const m5a_sim_device_config* cfg) {
  if (name == nullptr) return EINVAL;
  m5a_sim_device_config c = cfg != nullptr ? *cfg : default_config(name);
  if (c.node_guid == 0) c.node_guid = default_config(name).node_guid;
  if (c.gw_slot_size == 0) c.gw_slot_size = 256;
  return create_device(name, c);
}

M5A_EXPORT int mlx5tlp_sim_query_device(const char* name, m5a_sim_device_config* cfg,
                                        m5a_sim_device_stats* stats) {
  if (name == nullptr) return EINVAL;
  auto d = DeviceMap::get(name);
  if (!d) return errno;
  Locked lock(*d);
  if (!lock.ok()) return EIO;
  d->collect();
  const DeviceState* st = d->st();
  if (cfg != nullptr) *cfg = st->cfg;
  if (stats != nullptr) {
    *stats = m5a_sim_device_stats{};
    for (const auto& s : st->ctx) stats->contexts += s.live;
    for (const auto& o : st->obj) {
      stats->tlp_vars += o.kind == ObjKind::tlp_var;
      stats->virtio_vars += o.kind == ObjKind::virtio_var;
      stats->umems += o.kind == ObjKind::umem;
      stats->devx_objs += o.kind == ObjKind::devx_obj;
    }
    stats->gw_pages_free = st->cfg.gw_pages - stats->tlp_vars;
    stats->virtio_pages_free = st->cfg.virtio_pages - stats->virtio_vars;
    for (const auto& ch : st->chan)
      stats->requests_pending += uint32_t(ch.head.load(std::memory_order_acquire) -
                                          ch.tail.load(std::memory_order_acquire));
    stats->reclaimed = st->reclaimed;
  }
  return 0;
}

M5A_EXPORT int mlx5tlp_sim_remove_device(const char* name) {
  if (name == nullptr) return EINVAL;
  auto d = DeviceMap::get(name);
  if (!d) return errno;
  int hfd = open((d->dir() + "/host.lock").c_str(), O_RDWR | O_CLOEXEC);
  if (hfd >= 0 && flock(hfd, LOCK_EX | LOCK_NB) != 0) {
    close(hfd);
    return EBUSY;  // a device model is attached
  }
  Locked lock(*d);
  d->collect();
  for (const auto& s : d->st()->ctx) {
    if (s.live != 0) {
      if (hfd >= 0) close(hfd);
      return EBUSY;  // a context is still open somewhere
    }
  }
  // The device's files: state, bar, host.lock and the gateways' page locks (gw<N>.lock).
  if (DIR* dir = opendir(d->dir().c_str())) {
    while (dirent* e = readdir(dir))
      if (e->d_name[0] != '.') unlinkat(dirfd(dir), e->d_name, 0);
    closedir(dir);
  }
  int rc = rmdir(d->dir().c_str()) == 0 ? 0 : errno;
  if (hfd >= 0) close(hfd);
  return rc;
}

M5A_EXPORT int mlx5tlp_sim_device_dir(char* buf, size_t len) {
  std::string root = device_root();
  if (buf == nullptr || len <= root.size()) return ENAMETOOLONG;
  std::memcpy(buf, root.c_str(), root.size() + 1);
  return 0;
}

// ------------------------------------------------------------------ request channels
namespace {

// Bounded MPMC queue with per-slot sequence stamps, shared between processes.
int channel_push(RequestChannel& ch, const void* data, size_t len) {
  uint64_t pos = ch.head.load(std::memory_order_relaxed);
  for (;;) {
    RequestSlot& s = ch.slots[pos % kRequestSlots];
    // acquire: the consumer's release of this slot (its copy-out) happens before we overwrite.
    const uint64_t seq = s.seq.load(std::memory_order_acquire);
    const int64_t diff = int64_t(seq) - int64_t(pos);
    if (diff == 0) {
      // relaxed: the CAS only claims the slot; publication is the seq store below.
      if (ch.head.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) break;
    } else if (diff < 0) {
      return EAGAIN;  // full
    } else {
      pos = ch.head.load(std::memory_order_relaxed);
    }
  }
  RequestSlot& s = ch.slots[pos % kRequestSlots];
  std::memcpy(s.data, data, len);
  s.len = uint32_t(len);
  s.seq.store(pos + 1, std::memory_order_release);  // release: publishes len and data
  return 0;
}

ssize_t channel_pop(RequestChannel& ch, void* buf, size_t len) {
  uint64_t pos = ch.tail.load(std::memory_order_relaxed);
  for (;;) {
    RequestSlot& s = ch.slots[pos % kRequestSlots];
    const uint64_t seq = s.seq.load(std::memory_order_acquire);  // acquire: see len and data
    const int64_t diff = int64_t(seq) - int64_t(pos + 1);
    if (diff == 0) {
      if (s.len > len) return -ENOBUFS;  // leave it queued for a caller with a bigger buffer
      if (ch.tail.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) break;
    } else if (diff < 0) {
      return 0;  // empty
    } else {
      pos = ch.tail.load(std::memory_order_relaxed);
    }
  }
  RequestSlot& s = ch.slots[pos % kRequestSlots];
  const uint32_t n = s.len;
  std::memcpy(buf, s.data, n);
  s.seq.store(pos + kRequestSlots, std::memory_order_release);  // release: slot free again
  return ssize_t(n);
}

// Just enough TLP decoding to match completions to requests (full codec: mlx5tlp/tlp.hpp).
struct Hdr {
  uint8_t fmt, type;
  uint32_t length;  // DWs
  uint16_t rid;     // requester id
  uint16_t tag;     // 10-bit
};

Hdr common(const uint8_t* p) {
  Hdr h{};
  h.fmt = p[0] >> 5;
  h.type = p[0] & 0x1f;
  h.length = ((p[2] & 0x3u) << 8) | p[3];
  if (h.length == 0) h.length = 1024;
  return h;
}

uint16_t tag10(const uint8_t* p, uint8_t tag_byte) {
  return uint16_t(((p[1] & 0x80u) << 2) | ((p[1] & 0x08u) << 5) | tag_byte);
}

int lowest_bit(unsigned be) { return be == 0 ? 0 : __builtin_ctz(be); }
int highest_bit(unsigned be) { return be == 0 ? 3 : 31 - __builtin_clz(be); }

struct Outstanding {
  bool memory;         // MRd: byte counts split; IO/Cfg: a single completion with BC 4
  bool expects_data;   // a read
  uint32_t remaining;  // bytes still to be returned
  uint32_t next_la;    // expected lower address (7 bits) of the next completion
};

}  // namespace

struct m5a_sim_host {
  std::shared_ptr<DeviceMap> dev;
  int lock_fd = -1;
  uint32_t next_page = 0;
  std::map<uint32_t, Outstanding> outstanding;  // key: requester id << 16 | tag
  m5a_sim_host_stats stats{};

  void fail(const char* fmt, uint32_t a, uint32_t b, uint32_t c) {
    ++stats.errors;
    std::snprintf(stats.last_error, sizeof stats.last_error, fmt, a, b, c);
  }
  void track_request(const uint8_t* p, size_t len);
  void check_completion(const uint8_t* p, size_t len);
};

void m5a_sim_host::track_request(const uint8_t* p, size_t len) {
  ++stats.requests;
  if (len < 12) return;
  Hdr h = common(p);
  const bool has_data = h.fmt & 0x2;
  const uint16_t rid = get_be16(p + 4);
  const uint16_t tag = tag10(p, p[6]);
  const unsigned first_be = p[7] & 0xf, last_be = p[7] >> 4;
  Outstanding o{};
  if (h.type == 0x00 || h.type == 0x01) {  // MRd / MRdLk (MWr is posted: nothing to track)
    if (has_data) return;
    o.memory = true;
    o.expects_data = true;
    uint64_t addr = (h.fmt & 0x1) ? ((uint64_t(get_be32(p + 8)) << 32) | get_be32(p + 12))
                                  : get_be32(p + 8);
    addr &= ~uint64_t(3);
    if (h.length == 1) {
      o.remaining = first_be == 0 ? 1 : uint32_t(highest_bit(first_be) - lowest_bit(first_be) + 1);
    } else {
      o.remaining = h.length * 4 - uint32_t(lowest_bit(first_be)) - uint32_t(3 - highest_bit(last_be));
    }
    o.next_la = uint32_t(addr + uint32_t(lowest_bit(first_be))) & 0x7f;
  } else if (h.type == 0x02 || h.type == 0x04 || h.type == 0x05) {  // IO, Cfg0, Cfg1
    o.expects_data = !has_data;
    o.remaining = 4;
  } else {
    return;  // posted or a message
  }
  outstanding[(uint32_t(rid) << 16) | tag] = o;
  stats.outstanding = outstanding.size();
}

void m5a_sim_host::check_completion(const uint8_t* p, size_t len) {
  ++stats.completions;
  if (len < 12) return fail("completion of %u bytes is shorter than a header (%u%u)", uint32_t(len), 0, 0);
  Hdr h = common(p);
  if (h.type != 0x0a && h.type != 0x0b)
    return fail("record type 0x%x fmt %u is not a completion (%u)", h.type, h.fmt, 0);
  const bool with_data = h.fmt & 0x2;
  const uint8_t status = p[6] >> 5;
  uint32_t bc = ((p[6] & 0xfu) << 8) | p[7];
  if (bc == 0) bc = 4096;
  const uint16_t rid = get_be16(p + 8);
  const uint16_t tag = tag10(p, p[10]);
  const uint32_t la = p[11] & 0x7f;
  auto it = outstanding.find((uint32_t(rid) << 16) | tag);
  if (it == outstanding.end()) {
    ++stats.unexpected;
    return fail("unexpected completion: requester %04x tag %u (%u)", rid, tag, 0);
  }
  Outstanding& o = it->second;
  bool done = false;
  if (status != 0) {
    stats.status_ur += status == 1;
    stats.status_crs += status == 2;
    stats.status_ca += status == 4;
    if (with_data) fail("status %u completion carries data (rid %04x tag %u)", status, rid, tag);
    done = true;  // UR/CA/CRS end the request
  } else if (!o.memory) {
    if (bc != 4 || la != 0 || with_data != o.expects_data || (with_data && h.length != 1))
      fail("IO/config completion: byte count %u lower address %u data %u (want 4, 0, read)",
           bc, la, with_data);
    done = true;
  } else {
    if (!with_data) return fail("memory read completion without data (tag %u)%u%u", tag, 0, 0);
    if (bc != o.remaining)
      fail("byte count %u, expected %u remaining (tag %u)", bc, o.remaining, tag);
    if (la != o.next_la) fail("lower address %u, expected %u (tag %u)", la, o.next_la, tag);
    const uint32_t lead = la & 3;
    const uint32_t bytes = h.length * 4 - lead < bc ? h.length * 4 - lead : bc;
    if (h.length * 4 > bc + lead + 3 + 3)
      fail("payload of %u DW exceeds the %u bytes remaining (tag %u)", h.length, bc, tag);
    if (len < 12 + size_t(h.length) * 4)
      fail("record of %u bytes too short for %u DW of payload (tag %u)", uint32_t(len), h.length, tag);
    o.remaining = bc > bytes ? bc - bytes : 0;
    o.next_la = (la + bytes) & 0x7f;
    done = o.remaining == 0;
  }
  if (done) {
    outstanding.erase(it);
    ++stats.retired;
  }
  stats.outstanding = outstanding.size();
}

M5A_EXPORT m5a_sim_host* mlx5tlp_sim_host_open(const char* device) {
  auto d = DeviceMap::get(device != nullptr ? device : M5A_SIM_DEFAULT_DEVICE);
  if (!d) return nullptr;
  int fd = open((d->dir() + "/host.lock").c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return nullptr;
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    close(fd);
    errno = EBUSY;  // one device model per device: it owns the gateway consumer indexes
    return nullptr;
  }
  auto h = std::make_unique<m5a_sim_host>();
  h->dev = std::move(d);
  h->lock_fd = fd;
  return h.release();
}

M5A_EXPORT void mlx5tlp_sim_host_close(m5a_sim_host* host) {
  if (host == nullptr) return;
  std::unique_ptr<m5a_sim_host> h(host);
  close(h->lock_fd);
}

M5A_EXPORT int mlx5tlp_sim_host_send(m5a_sim_host* host, uint32_t channel, const void* tlp,
                                     size_t len) {
  if (host == nullptr || tlp == nullptr || channel >= kChannels || len < 12 || len > kRequestMax)
    return EINVAL;
  int rc = channel_push(host->dev->st()->chan[channel], tlp, len);
  if (rc == 0) host->track_request(static_cast<const uint8_t*>(tlp), len);
  return rc;
}

M5A_EXPORT ssize_t mlx5tlp_sim_host_poll(m5a_sim_host* host, void* buf, size_t len,
                                         m5a_sim_completion* info) {
  if (host == nullptr || buf == nullptr) return -EINVAL;
  DeviceMap& d = *host->dev;
  const uint32_t pages = d.st()->cfg.gw_pages;
  for (uint32_t n = 0; n < pages; ++n) {
    const uint32_t page = (host->next_page + n) % pages;
    uint8_t* base = d.bar() + size_t(page) * d.gw_stride();
    // acquire: the geometry written before the magic is visible once the magic is.
    if (__atomic_load_n(reinterpret_cast<uint32_t*>(base + gw::kMagicOff), __ATOMIC_ACQUIRE) !=
        gw::kMagic)
      continue;
    auto* doorbell = reinterpret_cast<uint64_t*>(base + gw::kDoorbell);
    auto* consumer = reinterpret_cast<uint64_t*>(base + gw::kConsumer);
    uint32_t ver, count;
    std::memcpy(&ver, base + gw::kVersionOff, 4);
    std::memcpy(&count, base + gw::kSlotCount, 4);
    const uint32_t slot_size = ver >> 16;
    // acquire: pairs with the writer's release (+ store fence) at the doorbell, so the slot
    // bytes written before the doorbell are visible here.
    const uint64_t produced = __atomic_load_n(doorbell, __ATOMIC_ACQUIRE);
    uint64_t consumed = __atomic_load_n(consumer, __ATOMIC_RELAXED);  // only we write it
    if (produced == consumed) continue;
    if (produced - consumed > count || produced < consumed) {
      ++host->stats.bad_records;
      host->fail("page %u: doorbell %u is more than a ring ahead of consumer %u", page,
                 uint32_t(produced), uint32_t(consumed));
      __atomic_store_n(consumer, produced, __ATOMIC_RELEASE);  // resynchronise
      continue;
    }
    const uint8_t* slot = base + gw::kSlots + size_t(consumed % count) * slot_size;
    uint32_t rec_len;
    std::memcpy(&rec_len, slot, 4);
    if (rec_len > slot_size - gw::kSlotHeader || rec_len == 0) {
      ++host->stats.bad_records;
      host->fail("page %u: record %u has impossible length %u", page, uint32_t(consumed), rec_len);
      __atomic_store_n(consumer, consumed + 1, __ATOMIC_RELEASE);
      continue;
    }
    if (rec_len > len) return -ENOBUFS;
    std::memcpy(buf, slot + gw::kSlotHeader, rec_len);
    if (info != nullptr) *info = m5a_sim_completion{page, rec_len, consumed};
    // release: our copy-out happens before the writer may reuse the slot (a credit returned).
    __atomic_store_n(consumer, consumed + 1, __ATOMIC_RELEASE);
    host->next_page = page + 1;  // round robin keeps one busy page from starving the others
    host->check_completion(static_cast<const uint8_t*>(buf), rec_len);
    return ssize_t(rec_len);
  }
  return 0;
}

M5A_EXPORT int mlx5tlp_sim_host_stats(m5a_sim_host* host, m5a_sim_host_stats* out) {
  if (host == nullptr || out == nullptr) return EINVAL;
  *out = host->stats;
  return 0;
}

M5A_EXPORT ssize_t mlx5tlp_sim_function_poll(m5a_ibv_context* context, uint32_t channel, void* buf,
                                             size_t len) {
  if (context == nullptr || buf == nullptr || channel >= kChannels) return -EINVAL;
  return channel_pop(sim_ctx(context)->dev->st()->chan[channel], buf, len);
}
