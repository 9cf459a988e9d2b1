#include "mlx5tlp/regions.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "mlx5tlp/capabilities.hpp"
#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

namespace {

using pci::hex;

[[noreturn]] void region_error(const std::string& name, const std::string& what) {
  throw Error(ErrorKind::invalid_argument, "define region", EINVAL, "region '" + name + "': " + what);
}

// A new memfd of `size` zero bytes whose size is sealed (memfd_create(2) MFD_ALLOW_SEALING,
// fcntl(2) "File Sealing"): F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL. A handover successor
// maps these fds (docs/handover.md); once sealed nobody can truncate them, so no process
// mapping one can be made to fault with SIGBUS, and a receiver can check it (F_GET_SEALS).
// Whether nobody can shrink the file: F_GET_SEALS answers EINVAL for a file that cannot
// carry seals (fcntl(2)), which is then as unsealed.
bool shrink_sealed(int fd) noexcept {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  return seals >= 0 && (seals & F_SEAL_SHRINK) != 0;
}

// The mapping [p, p + len) of `what` under the SIGBUS guard (sigbus_guard.hpp), or an error:
// a full guard table is ENOSPC (ResourceExhaustedError), not a silently unguarded mapping.
SigbusGuard guard(void* p, size_t len, const std::string& what) {
  SigbusGuard g = SigbusGuard::add(p, len, PROT_READ | PROT_WRITE);
  if (g.active()) return g;
  if (errno == ENOSPC)
    throw Error(ErrorKind::resource_exhausted, "guard " + what + " against truncation", ENOSPC,
                "all " + std::to_string(SigbusGuard::kSlots) + " SIGBUS guard slots of this process "
                "are in use (one per mapped file that is not sealed against shrinking)");
  throw_errno("install the SIGBUS guard for " + what, errno_or_eio(), false, "sigaction");
}

UniqueFd sealed_memfd(const std::string& name, uint64_t size, const std::string& what) {
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) throw_errno(what, errno_or_eio(), false, "memfd_create");
  if (::ftruncate(fd.get(), off_t(size)) != 0)
    throw_errno(what, errno_or_eio(), false, "ftruncate to " + std::to_string(size));
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    throw_errno(what, errno_or_eio(), false, "fcntl(F_ADD_SEALS)");
  return fd;
}

}  // namespace

const char* region_kind_name(RegionKind k) noexcept {
  switch (k) {
    case RegionKind::memory: return "memory";
    case RegionKind::registers: return "registers";
    case RegionKind::callback: return "callback";
  }
  return "?";
}

const char* reg_access_name(RegAccess a) noexcept {
  switch (a) {
    case RegAccess::ro: return "ro";
    case RegAccess::rw: return "rw";
    case RegAccess::rw1c: return "rw1c";
    case RegAccess::wo: return "wo";
  }
  return "?";
}

Region::Region(RegionKind kind, std::string name, int bar, uint64_t offset, uint64_t size)
    : kind_(kind), name_(std::move(name)), bar_(bar), offset_(offset), size_(size) {
  if (bar < 0 || bar > 6) region_error(name_, "bar: " + std::to_string(bar) + " is not 0..5 or 6 (Expansion ROM)");
  if (size == 0 || size % 4 != 0) region_error(name_, "size: " + std::to_string(size) + " is not a positive multiple of 4");
  if (offset % 4 != 0) region_error(name_, "offset: " + hex(offset) + " is not DW aligned");
  if (offset + size < offset) region_error(name_, "offset + size overflows");
}

// ---------------------------------------------------------------- memory

MemoryRegion::MemoryRegion(std::string name, int bar, uint64_t offset, uint64_t size, uint8_t* base)
    : MemoryRegion(std::move(name), bar, offset, size, base, UniqueFd(), 0, SigbusGuard()) {
  if (base == nullptr) region_error(this->name(), "buffer: no memory");
}

MemoryRegion::MemoryRegion(std::string name, int bar, uint64_t offset, uint64_t size, uint8_t* base,
                           UniqueFd fd, size_t map_len, SigbusGuard guard)
    : Region(RegionKind::memory, std::move(name), bar, offset, size), base_(base), fd_(std::move(fd)),
      map_len_(map_len), guard_(std::move(guard)) {}

MemoryRegion::~MemoryRegion() {
  // Unregister first: once unmapped the address may be reused by another mapping, which the
  // SIGBUS handler must never replace with zero pages.
  guard_.reset();
  if (map_len_ != 0) ::munmap(base_, map_len_);
}

std::unique_ptr<MemoryRegion> MemoryRegion::create_memfd(std::string name, int bar, uint64_t offset,
                                                         uint64_t size) {
  UniqueFd fd = sealed_memfd("mlx5tlp-region-" + name, size, "create memory region '" + name + "'");
  return map_fd(std::move(name), bar, offset, size, fd.get());
}

std::unique_ptr<MemoryRegion> MemoryRegion::map_fd(std::string name, int bar, uint64_t offset,
                                                   uint64_t size, int fd) {
  if (size == 0 || size % 4 != 0) region_error(name, "size: " + std::to_string(size) + " is not a positive multiple of 4");
  struct stat st{};
  if (::fstat(fd, &st) != 0) throw_errno("map memory region '" + name + "'", errno_or_eio(), false, "fstat");
  if (!S_ISREG(st.st_mode) || uint64_t(st.st_size) < size)
    region_error(name, "buffer: fd " + std::to_string(fd) + " is not a regular file/memfd of at least " +
                           std::to_string(size) + " bytes");
  UniqueFd own(::fcntl(fd, F_DUPFD_CLOEXEC, 3));
  if (!own) throw_errno("map memory region '" + name + "'", errno_or_eio(), false, "dup");
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, own.get(), 0);
  if (p == MAP_FAILED) throw_errno("map memory region '" + name + "'", errno_or_eio(), false, "mmap");
  try {
    // A file someone can still shrink (a spec's `shared` file, an application's memfd): a
    // truncation while serving must cost the region its bytes, not the process its life.
    SigbusGuard g = shrink_sealed(own.get()) ? SigbusGuard() : guard(p, size, "memory region '" + name + "'");
    return std::unique_ptr<MemoryRegion>(new MemoryRegion(std::move(name), bar, offset, size,
                                                          static_cast<uint8_t*>(p), std::move(own), size,
                                                          std::move(g)));
  } catch (...) {
    ::munmap(p, size);  // the guard (if any) was released by the unwinding first
    throw;
  }
}

bool MemoryRegion::read(uint64_t off, uint32_t len, uint8_t* out) noexcept {
  std::memcpy(out, base_ + off, len);
  // Checked after the copy: a copy that faulted on a truncated file finished on zero pages,
  // which are not the region's bytes. Completer Abort (PCIe Base §2.3.1: the Completer cannot
  // complete the request) rather than zeros presented as data.
  return !guard_.lost();
}

void MemoryRegion::write(uint64_t off, const uint8_t* data, uint32_t len, uint8_t first_be,
                         uint8_t last_be) noexcept {
  if (len == 0 || guard_.lost()) return;  // nothing left to write to: dropped
  uint8_t* dst = base_ + off;
  const bool full_first = (first_be & 0xf) == 0xf;
  const bool full_last = len <= 4 || (last_be & 0xf) == 0xf;
  if (full_first && full_last) {
    std::memcpy(dst, data, len);
    return;
  }
  for (uint32_t i = 0; i < 4 && i < len; ++i)
    if ((first_be >> i & 1u) != 0) dst[i] = data[i];
  if (len > 8) std::memcpy(dst + 4, data + 4, len - 8);
  if (len > 4)
    for (uint32_t i = 0; i < 4; ++i)
      if ((last_be >> i & 1u) != 0) dst[len - 4 + i] = data[len - 4 + i];
}

// ---------------------------------------------------------------- registers

RegisterRegion::RegisterRegion(std::string name, int bar, uint64_t offset, uint64_t size,
                               std::vector<RegisterSpec> registers, int fd)
    : Region(RegionKind::registers, std::move(name), bar, offset, size), regs_(std::move(registers)) {
  for (size_t i = 0; i < regs_.size(); ++i) {
    const RegisterSpec& r = regs_[i];
    const std::string f = "registers[" + std::to_string(i) + "]";
    if (r.width != 1 && r.width != 2 && r.width != 4 && r.width != 8)
      region_error(this->name(), f + ".width: " + std::to_string(r.width) + " is not 1, 2, 4 or 8");
    if (r.offset % r.width != 0)
      region_error(this->name(), f + ".offset: " + hex(r.offset) + " is not aligned to its width " + std::to_string(r.width));
    if (uint64_t(r.offset) + r.width > size)
      region_error(this->name(), f + ".offset: " + hex(r.offset) + " + width runs past the region's " + std::to_string(size) + " bytes");
    if (r.width < 8 && (r.reset >> (8 * r.width)) != 0)
      region_error(this->name(), f + ".reset: " + hex(r.reset) + " does not fit " + std::to_string(r.width) + " bytes");
    if (r.width < 8 && (r.reserved >> (8 * r.width)) != 0)
      region_error(this->name(), f + ".reserved: " + hex(r.reserved) + " does not fit " + std::to_string(r.width) + " bytes");
    if ((r.reset & r.reserved) != 0)
      region_error(this->name(), f + ".reset: " + hex(r.reset) + " sets reserved bits " + hex(r.reset & r.reserved));
  }
  std::vector<size_t> order(regs_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return regs_[a].offset < regs_[b].offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const RegisterSpec& a = regs_[order[k - 1]];
    const RegisterSpec& b = regs_[order[k]];
    if (a.offset + a.width > b.offset)
      region_error(this->name(), "registers[" + std::to_string(order[k]) + "].offset: " + hex(b.offset) +
                                     " overlaps register '" + a.name + "'");
  }
  std::vector<RegisterSpec> sorted;
  sorted.reserve(regs_.size());
  for (size_t i : order) sorted.push_back(regs_[i]);
  regs_ = std::move(sorted);
  const size_t need = std::max<size_t>(regs_.size(), 1) * sizeof(uint64_t);
  const std::string what = "register file of region '" + this->name() + "'";
  if (fd < 0) {
    fd_ = sealed_memfd("mlx5tlp-registers-" + this->name(), need, "create " + what);
  } else {
    struct stat st{};
    if (::fstat(fd, &st) != 0) throw_errno("adopt " + what, errno_or_eio(), false, "fstat");
    if (!S_ISREG(st.st_mode) || uint64_t(st.st_size) < need)
      region_error(this->name(), "register file fd " + std::to_string(fd) + " is not a memfd of at least " +
                                     std::to_string(need) + " bytes (8 per register)");
    fd_ = UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 3));
    if (!fd_) throw_errno("adopt " + what, errno_or_eio(), false, "dup");
  }
  void* p = ::mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
  if (p == MAP_FAILED) throw_errno("map " + what, errno_or_eio(), false, "mmap");
  values_ = static_cast<uint64_t*>(p);
  map_len_ = need;
  // Our own memfds are sealed; an adopted one may not be (see MemoryRegion::map_fd). The
  // destructor does not run if this throws: unmap here.
  if (!shrink_sealed(fd_.get())) {
    try {
      guard_ = guard(p, need, what);
    } catch (...) {
      ::munmap(p, need);
      throw;
    }
  }
  if (fd < 0) {
    reset();
    return;
  }
  // Adopted: keep the predecessor's values; a value wider than its register reads as its width.
  for (size_t i = 0; i < regs_.size(); ++i)
    if (regs_[i].width < 8) values_[i] &= (uint64_t(1) << (8 * regs_[i].width)) - 1;
}

RegisterRegion::~RegisterRegion() {
  guard_.reset();  // before the munmap, as in ~MemoryRegion
  if (values_ != nullptr) ::munmap(values_, map_len_);
}

int RegisterRegion::find(uint64_t off) const noexcept {
  // Registers are few and sorted: a binary search over their offsets.
  size_t lo = 0, hi = regs_.size();
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    const RegisterSpec& r = regs_[mid];
    if (off < r.offset) hi = mid;
    else if (off >= uint64_t(r.offset) + r.width) lo = mid + 1;
    else return int(mid);
  }
  return -1;
}

uint64_t RegisterRegion::value(size_t index) const noexcept {
  std::lock_guard<std::mutex> g(mu_);
  return index < regs_.size() ? values_[index] : 0;
}

void RegisterRegion::set_value(size_t index, uint64_t v) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  if (index >= regs_.size()) return;
  const unsigned w = regs_[index].width;
  values_[index] = w == 8 ? v : v & ((uint64_t(1) << (8 * w)) - 1);
}

void RegisterRegion::reset() noexcept {
  std::lock_guard<std::mutex> g(mu_);
  for (size_t i = 0; i < regs_.size(); ++i) values_[i] = regs_[i].reset;
}

bool RegisterRegion::has_read_hook(uint64_t off, uint32_t len) const noexcept {
  for (uint64_t o = off; o < off + len;) {
    const int i = find(o);
    if (i < 0) { ++o; continue; }
    if (regs_[size_t(i)].read_hook) return true;
    o = uint64_t(regs_[size_t(i)].offset) + regs_[size_t(i)].width;
  }
  return false;
}

bool RegisterRegion::has_write_hook(uint64_t off, uint32_t len) const noexcept {
  for (uint64_t o = off; o < off + len;) {
    const int i = find(o);
    if (i < 0) { ++o; continue; }
    if (regs_[size_t(i)].write_hook) return true;
    o = uint64_t(regs_[size_t(i)].offset) + regs_[size_t(i)].width;
  }
  return false;
}

bool RegisterRegion::batched(uint64_t off, uint32_t len) const noexcept {
  return has_read_hook(off, len) || has_write_hook(off, len);
}

bool RegisterRegion::read(uint64_t off, uint32_t len, uint8_t* out) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  for (uint32_t k = 0; k < len; ++k) {
    const int i = find(off + k);
    if (i < 0 || regs_[size_t(i)].access == RegAccess::wo) {
      out[k] = 0;  // unassigned bytes and write-only registers read as zero
      continue;
    }
    const unsigned byte = unsigned(off + k - regs_[size_t(i)].offset);
    out[k] = uint8_t(values_[size_t(i)] >> (8 * byte));
  }
  return !guard_.lost();  // as MemoryRegion::read: the values are gone, Completer Abort
}

void RegisterRegion::write(uint64_t off, const uint8_t* data, uint32_t len, uint8_t first_be,
                           uint8_t last_be) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  for (uint32_t k = 0; k < len; ++k) {
    if (!byte_enabled(k, len, first_be, last_be)) continue;
    const int i = find(off + k);
    if (i < 0) continue;  // writes to unassigned bytes are dropped
    const RegisterSpec& r = regs_[size_t(i)];
    const unsigned shift = 8 * unsigned(off + k - r.offset);
    const uint64_t mask = (uint64_t(0xff) << shift) & ~r.reserved;
    const uint64_t v = (uint64_t(data[k]) << shift) & mask;
    uint64_t& cur = values_[size_t(i)];
    switch (r.access) {
      case RegAccess::ro: break;
      case RegAccess::rw:
      case RegAccess::wo: cur = (cur & ~mask) | v; break;
      case RegAccess::rw1c: cur &= ~v; break;  // a 1 clears the bit, a 0 leaves it
    }
  }
}

// ---------------------------------------------------------------- callback

CallbackRegion::CallbackRegion(std::string name, int bar, uint64_t offset, uint64_t size, uint32_t deadline_us)
    : Region(RegionKind::callback, std::move(name), bar, offset, size), deadline_us_(deadline_us) {}

}  // namespace mlx5tlp
