// Device management entry points: create, remove, query, reset, fault injection, directory.
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <memory>

#include "channel.hpp"
#include "device_map.hpp"

using namespace mlx5tlp::sim;

namespace {

bool any_context(DeviceMap& d) {
  for (const auto& s : d.st()->ctx)
    if (s.live != 0) return true;
  return false;
}

struct FaultName {
  const char* name;
  FaultOp op;
};
constexpr FaultName kFaultNames[] = {
    {"umem_dereg", FaultOp::umem_dereg},         {"devx_obj_destroy", FaultOp::devx_obj_destroy},
    {"devx_obj_query", FaultOp::devx_obj_query}, {"devx_obj_modify", FaultOp::devx_obj_modify},
    {"devx_obj_create", FaultOp::devx_obj_create},
};

}  // namespace

M5A_EXPORT int mlx5tlp_sim_create_device(const char* name, const m5a_sim_device_config* cfg) {
  if (name == nullptr) return fail(EINVAL, "no device name");
  m5a_sim_device_config c = cfg != nullptr ? *cfg : default_config(name);
  if (c.node_guid == 0) c.node_guid = default_config(name).node_guid;
  if (c.gw_slot_size == 0) c.gw_slot_size = 256;
  const int rc = create_device(name, c);
  if (rc == 0) clear_error();
  return rc;
}

M5A_EXPORT int mlx5tlp_sim_query_device(const char* name, m5a_sim_device_config* cfg,
                                        m5a_sim_device_stats* stats) {
  if (name == nullptr) return fail(EINVAL, "no device name");
  auto d = DeviceMap::get(name);
  if (!d) return errno;
  Locked lock(*d);
  if (!lock.ok()) return errno;
  d->collect();
  const DeviceState* st = d->st();
  if (cfg != nullptr) *cfg = d->cfg();
  if (stats != nullptr) {
    *stats = m5a_sim_device_stats{};
    for (const auto& s : st->ctx) stats->contexts += s.live;
    for (const auto& o : st->obj) {
      stats->tlp_vars += o.kind == ObjKind::tlp_var;
      stats->virtio_vars += o.kind == ObjKind::virtio_var;
      stats->umems += o.kind == ObjKind::umem;
      stats->devx_objs += o.kind == ObjKind::devx_obj;
    }
    for (uint32_t p = 0; p < d->cfg().gw_pages; ++p)
      // relaxed: owners change under the device mutex, which we hold.
      stats->gw_pages_draining += st->gw[p].owner.load(std::memory_order_relaxed) == kPageDraining;
    stats->gw_pages_free = d->cfg().gw_pages - stats->tlp_vars - stats->gw_pages_draining;
    stats->virtio_pages_free = d->cfg().virtio_pages - stats->virtio_vars;
    for (const auto& ch : st->chan) {
      stats->requests_pending += channel_count(ch, kSlotReady);
      stats->requests_claimed += channel_count(ch, kSlotClaimed);
    }
    stats->reclaimed = st->reclaimed;
    stats->host_epoch = st->host_epoch;
    stats->stale_requests = st->stale_requests;
    stats->stale_completions = st->stale_completions;
  }
  return 0;
}

M5A_EXPORT int mlx5tlp_sim_remove_device(const char* name) {
  if (name == nullptr) return fail(EINVAL, "no device name");
  auto d = DeviceMap::get(name);
  if (!d) return errno;
  {
    Locked lock(*d);
    if (!lock.ok()) return errno;
    if (d->host_attached()) return fail(EBUSY, "a device model is attached to '%s'", name);
    d->collect();
    if (any_context(*d)) return fail(EBUSY, "'%s' still has open contexts", name);
    // The device's files: state, bar and the gateways' page locks (gw<N>.lock).
    const int dfd = fcntl(d->dir_fd(), F_DUPFD_CLOEXEC, 0);
    if (DIR* dir = dfd >= 0 ? fdopendir(dfd) : nullptr) {
      while (dirent* e = readdir(dir))
        if (e->d_name[0] != '.') unlinkat(dirfd(dir), e->d_name, 0);
      closedir(dir);
    } else if (dfd >= 0) {
      close(dfd);
    }
  }
  if (rmdir(d->dir().c_str()) != 0)
    return fail(errno, "cannot remove '%s': %s", d->dir().c_str(), std::strerror(errno));
  clear_error();
  return 0;
}

M5A_EXPORT int mlx5tlp_sim_reset_device(const char* name, m5a_sim_reset_result* out) {
  if (name == nullptr) return fail(EINVAL, "no device name");
  auto d = DeviceMap::get(name);
  if (!d) return errno;
  Locked lock(*d);
  if (!lock.ok()) return errno;
  if (d->host_attached()) return fail(EBUSY, "a device model is attached to '%s'", name);
  DeviceState* st = d->st();
  const uint64_t before = st->reclaimed;
  d->collect();
  if (any_context(*d)) return fail(EBUSY, "'%s' still has open contexts: close them first", name);
  m5a_sim_reset_result r{};
  r.objects = st->reclaimed - before;
  for (auto& ch : st->chan) channel_reset(ch, &r.requests, &r.claims);
  for (uint32_t p = 0; p < d->cfg().gw_pages; ++p) {
    if (st->gw[p].owner.load(std::memory_order_acquire) != kPageDraining) continue;  // locked
    const int64_t n = d->unconsumed(p);
    r.completions += n > 0 ? uint32_t(n) : 0;
    ++r.pages;
    d->scrub_gw_page(p);
  }
  for (auto& f : st->faults) {
    r.faults += f.count != 0;
    f = Fault{};
  }
  st->stale_requests += r.requests + r.claims;
  st->stale_completions += r.completions;
  if (out != nullptr) *out = r;
  clear_error();
  return 0;
}

M5A_EXPORT int mlx5tlp_sim_inject_fault(const char* device, const char* op, int err, uint32_t count) {
  if (device == nullptr || op == nullptr) return fail(EINVAL, "no device or operation");
  const FaultName* f = nullptr;
  for (const auto& n : kFaultNames)
    if (std::strcmp(n.name, op) == 0) f = &n;
  if (f == nullptr)
    return fail(EINVAL, "unknown operation '%s' (umem_dereg, devx_obj_destroy, devx_obj_query, "
                "devx_obj_modify, devx_obj_create)", op);
  if (count != 0 && (err <= 0 || err > 4095)) return fail(EINVAL, "errno %d is not a positive errno", err);
  auto d = DeviceMap::get(device);
  if (!d) return errno;
  Locked lock(*d);
  if (!lock.ok()) return errno;
  // The state file, not this process: the next call of `op` in any process fails.
  d->st()->faults[uint32_t(f->op)] = count == 0 ? Fault{} : Fault{uint32_t(err), count};
  clear_error();
  return 0;
}

M5A_EXPORT int mlx5tlp_sim_device_dir(char* buf, size_t len) {
  const std::string root = device_root();
  if (buf == nullptr || len <= root.size()) return ENAMETOOLONG;
  std::memcpy(buf, root.c_str(), root.size() + 1);
  return 0;
}
