#include "mlx5tlp/context.hpp"

#include <endian.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>

#include "mlx5tlp/error.hpp"
#include "mlx5tlp/unique_fd.hpp"

namespace mlx5tlp {

namespace {

constexpr uint16_t kQueryHcaCap = 0x100;
constexpr uint16_t kCapGeneral = 0x0;
constexpr uint16_t kCapTlpEmulation = 0x2a;
constexpr size_t kCapOffset = 0x10;           // capability bytes follow the outbox header
constexpr size_t kQueryOutLen = 0x10 + 0x1000;

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

// A field of `width` bits at PRM bit offset `bit` (from the MSB of the first big-endian DW,
// as laid out by mlx5_ifc.h). Fields used here never span two DWs.
uint32_t prm_field(const uint8_t* cap, unsigned bit, unsigned width) {
  const uint32_t dw = be32(cap + (bit / 32) * 4);
  const unsigned shift = 32 - (bit % 32) - width;
  return width == 32 ? dw : (dw >> shift) & ((1u << width) - 1);
}

std::vector<uint8_t> query_cap_cmd(uint16_t cap_type) {
  std::vector<uint8_t> in(16, 0);
  in[0] = uint8_t(kQueryHcaCap >> 8);
  in[1] = uint8_t(kQueryHcaCap & 0xff);
  const uint16_t op_mod = uint16_t((cap_type << 1) | 1);  // bit 0: current values
  in[6] = uint8_t(op_mod >> 8);
  in[7] = uint8_t(op_mod & 0xff);
  return in;
}

std::string names_of(const std::vector<DeviceInfo>& devs) {
  std::string s;
  for (const auto& d : devs) s += (s.empty() ? "" : ", ") + d.name;
  return s.empty() ? "none" : s;
}

}  // namespace

void throw_devx(const char* operation, int err, const uint8_t* out, size_t outlen,
                bool on_handle) {
  if (err == EREMOTEIO && out != nullptr && outlen >= 8) {
    char detail[96];
    std::snprintf(detail, sizeof detail, "firmware status 0x%02x, syndrome 0x%08x", out[0],
                  be32(out + 4));
    Error e(ErrorKind::devx_command, operation, err, detail);
    e.fw_status = out[0];
    e.syndrome = be32(out + 4);
    throw e;
  }
  throw_errno(operation, err, on_handle);
}

Context::Context(std::shared_ptr<const Library> lib, m5a_ibv_context* raw, bool imported)
    : lib_(std::move(lib)), raw_(raw), imported_(imported) {
  if (raw->device != nullptr) {
    name_ = raw->device->name;
    if (lib_->sym().ibv_get_device_guid != nullptr)
      guid_ = be64toh(lib_->sym().ibv_get_device_guid(raw->device));
  }
}

std::shared_ptr<Context> Context::open(const std::string& name, Backend backend) {
  auto lib = Library::get(backend);
  const Symbols& s = lib->sym();
  auto open_dv = lib->need(s.mlx5dv_open_device, "mlx5dv_open_device");
  auto get_list = lib->need(s.ibv_get_device_list, "ibv_get_device_list");
  std::vector<DeviceInfo> devs = list_devices(*lib);
  const DeviceInfo* pick = nullptr;
  for (const auto& d : devs)
    if ((name.empty() && d.mlx5) || d.name == name) {
      pick = &d;
      break;
    }
  if (pick == nullptr) {
    std::string what = name.empty() ? "no mlx5 device" : "no device named '" + name + "'";
    throw Error(ErrorKind::device_not_found, "open device", ENODEV,
                what + " on backend " + to_string(backend) + " (devices: " + names_of(devs) + ")");
  }
  if (!pick->mlx5)  // a DV call on a non-mlx5 context can crash (ucx #3039): refuse first
    throw Error(ErrorKind::not_supported, "open device", EOPNOTSUPP,
                "'" + pick->name + "' is not an mlx5 device (mlx5dv_is_supported is false)");

  int n = 0;
  m5a_ibv_device** list = get_list(&n);
  if (list == nullptr) throw_errno("ibv_get_device_list", errno_or_eio(), false);
  m5a_ibv_context* raw = nullptr;
  int err = ENODEV;
  for (int i = 0; i < n; ++i) {
    if (pick->name != s.ibv_get_device_name(list[i])) continue;
    m5a_mlx5dv_context_attr attr{};
    attr.flags = M5A_MLX5DV_CONTEXT_FLAGS_DEVX;
    errno = 0;
    raw = open_dv(list[i], &attr);
    err = errno_or_eio();
    break;
  }
  s.ibv_free_device_list(list);
  if (raw == nullptr) {
    // The software device says which path, field or limit is the cause.
    char why[512] = "";
    if (s.sim.last_error != nullptr) s.sim.last_error(why, sizeof why);
    throw_errno("mlx5dv_open_device(" + pick->name + ", DEVX)", err, false, why);
  }
  return std::shared_ptr<Context>(new Context(std::move(lib), raw, false));
}

std::shared_ptr<Context> Context::import_fd(int fd, Backend backend) {
  auto lib = Library::get(backend);
  auto import = lib->need(lib->sym().ibv_import_device, "ibv_import_device");
  const std::string what = "fd " + std::to_string(fd) + " is not a device context's command fd";
  // ibv_import_device takes ownership of the fd it is given (ibv_close_device closes it), so
  // give it a duplicate and leave the caller's fd to the caller.
  UniqueFd dup_fd(fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!dup_fd) throw_errno("dup(cmd_fd)", errno_or_eio(), true);
  // libibverbs' own first check (v63 libibverbs/device.c: fstat, S_ISCHR, else EINVAL), done
  // here so that an EINVAL from the call below can only come after the device matched. The
  // software device's command fd is its regular `bar` file.
  struct stat st {};
  const bool right_type = fstat(dup_fd.get(), &st) == 0 &&
                          (backend == Backend::sim ? S_ISREG(st.st_mode) : S_ISCHR(st.st_mode));
  if (!right_type) throw_errno("ibv_import_device", EINVAL, true, what);
  errno = 0;
  m5a_ibv_context* raw = import(dup_fd.get());
  if (raw == nullptr) {
    const int err = errno_or_eio();
    // Once the fd matched a device it belongs to the import, which closes it when a later
    // step fails (mlx5_import_context -> mlx5_uninit_context -> close): closing it again
    // could close an fd another thread has just been given the same number. Before a match
    // (ENODEV: no device has this fd's cdev; EOPNOTSUPP: the provider cannot import) the fd
    // is still ours.
    if (err != ENODEV && err != EOPNOTSUPP) (void)dup_fd.release();
    throw_errno("ibv_import_device", err, true, what);
  }
  (void)dup_fd.release();  // the imported context owns it; ibv_close_device closes it
  return std::shared_ptr<Context>(new Context(std::move(lib), raw, true));
}

Context::~Context() {
  if (raw_ != nullptr) lib_->sym().ibv_close_device(raw_);
}

void Context::adopt(const std::shared_ptr<Child>& child, const Use& creating) {
  (void)creating;  // proof that the caller holds the shared lock close() waits for
  std::lock_guard<std::mutex> l(children_mu_);
  // Drop entries of children already gone so the list stays as long as the live set.
  std::vector<std::weak_ptr<Child>> keep;
  keep.reserve(children_.size() + 1);
  for (auto& w : children_)
    if (!w.expired()) keep.push_back(std::move(w));
  keep.push_back(child);
  children_.swap(keep);
}

size_t Context::open_children() {
  std::lock_guard<std::mutex> l(children_mu_);
  size_t n = 0;
  for (auto& w : children_)
    if (auto c = w.lock(); c && !c->closed()) ++n;
  return n;
}

void Context::close() {
  std::lock_guard<std::mutex> one(close_mu_);
  {
    // Waits for every call in flight, allocations included (they adopt their object under
    // their Use); from here on new calls fail, so the snapshot below is complete.
    std::unique_lock<std::shared_mutex> l(mu_);
    if (raw_ == nullptr) return;
    closing_ = true;
  }
  std::vector<std::shared_ptr<Child>> live;
  {
    std::lock_guard<std::mutex> l(children_mu_);
    for (auto& w : children_)
      if (auto c = w.lock()) live.push_back(std::move(c));
    children_.clear();
  }
  // Newest first, as a stack unwinds; each child's close is idempotent.
  std::vector<std::shared_ptr<Child>> stuck;
  std::string why;
  std::optional<Error> first_error;
  for (auto it = live.rbegin(); it != live.rend(); ++it) {
    try {
      (*it)->close();
    } catch (const Error& e) {
      // Released anyway (its kernel object was already gone: ENOENT) is not a failure of
      // close(); one that is still alive (EBUSY, EREMOTEIO, still mapped, ...) is.
      if ((*it)->closed()) continue;
      stuck.push_back(*it);
      why += (why.empty() ? "" : "; ") + (*it)->describe() + " (" + e.what() + ")";
      if (!first_error) first_error.emplace(e);
    }
  }
  if (!stuck.empty()) {
    {
      std::lock_guard<std::mutex> l(children_mu_);
      for (auto it = stuck.rbegin(); it != stuck.rend(); ++it) children_.push_back(*it);
    }
    {
      std::unique_lock<std::shared_mutex> l(mu_);
      closing_ = false;
    }
    Error e(first_error->kind(), "close context '" + name_ + "'", first_error->error_number(),
            std::to_string(stuck.size()) + " object(s) could not be released and stay open, "
            "as does the context (release them, or call close() again): " + why);
    e.fw_status = first_error->fw_status;
    e.syndrome = first_error->syndrome;
    throw e;
  }
  std::unique_lock<std::shared_mutex> l(mu_);
  lib_->sym().ibv_close_device(raw_);
  raw_ = nullptr;
  closing_ = false;
}

bool Context::closed() const {
  std::shared_lock<std::shared_mutex> l(mu_);
  return raw_ == nullptr;
}

Context::Use::Use(const Context& c, Purpose purpose) : lock_(c.mu_), raw_(c.raw_) {
  if (raw_ == nullptr)
    throw Error(ErrorKind::invalid_handle, "use context", EBADF, "the context is closed");
  if (c.closing_ && purpose != release)
    throw Error(ErrorKind::invalid_handle, "use context", EBADF, "the context is closing");
}

int Context::cmd_fd() const { return Use(*this).get()->cmd_fd; }

std::vector<uint8_t> Context::general_cmd(const uint8_t* in, size_t inlen, size_t outlen) {
  auto cmd = lib_->need(lib_->sym().mlx5dv_devx_general_cmd, "mlx5dv_devx_general_cmd");
  Use u(*this);
  std::vector<uint8_t> out(outlen, 0);
  int rc = cmd(u.get(), in, inlen, out.data(), outlen);
  if (rc != 0) throw_devx("mlx5dv_devx_general_cmd", rc > 0 ? rc : errno_or_eio(), out.data(),
                          outlen, false);
  return out;
}

TlpCaps Context::query_tlp_caps() {
  TlpCaps caps;
  auto gen = query_cap_cmd(kCapGeneral);
  auto out = general_cmd(gen.data(), gen.size(), kQueryOutLen);
  // cmd_hca_cap.tlp_device_emulation_manager: bit 0x398 (mlx5_ifc.h)
  caps.supported = prm_field(out.data() + kCapOffset, 0x398, 1) != 0;
  if (!caps.supported) return caps;
  auto tlp = query_cap_cmd(kCapTlpEmulation);
  out = general_cmd(tlp.data(), tlp.size(), kQueryOutLen);
  const uint8_t* cap = out.data() + kCapOffset;  // tlp_dev_emu_capabilities
  caps.gw_log_stride = prm_field(cap, 0x33, 5);  // log_tlp_rsp_gw_page_stride
  caps.gw_num_pages = prm_field(cap, 0x10c, 4);  // tlp_rsp_gw_num_pages
  caps.gw_bar_offset = (uint64_t(prm_field(cap, 0x1c0, 32)) << 32) | prm_field(cap, 0x1e0, 32);
  caps.gw_page_stride = uint64_t(4096) << caps.gw_log_stride;
  return caps;
}

uint32_t Context::export_size(ObjectKind kind) const {
  auto sizes_fn = lib_->need(lib_->sym().mlx5dv_get_export_sizes, "_mlx5dv_get_export_sizes");
  m5a_mlx5dv_export_sizes s{};
  sizes_fn(&s, sizeof s);  // the header's inline mlx5dv_get_export_sizes passes sizeof too
  switch (kind) {
    case ObjectKind::var: return s.var_attrs_size;
    case ObjectKind::umem: return s.devx_umem_attrs_size;
    case ObjectKind::devx_obj: return s.devx_obj_attrs_size;
  }
  return 0;
}

}  // namespace mlx5tlp
