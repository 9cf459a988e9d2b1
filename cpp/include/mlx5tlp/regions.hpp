// mlx5tlp/regions.hpp — what answers a BAR access: memory, a register file, or a callback.
//
// A Region is a range [offset, offset + size) of one BAR (0..5, or 6 for the Expansion ROM).
// The engine decodes a memory / I/O request to (bar, offset), finds the one region containing
// the whole access, and calls it; an access no region contains entirely is the engine's
// Unsupported Request. Accesses carry DW-granular ranges with the TLP's byte enables: reads
// return the whole DW range (the completion builder picks the enabled bytes), writes change
// only the enabled bytes.
//
//   MemoryRegion    bytes in caller memory or a memfd (MAP_SHARED: other processes see and
//                   change them); served in native code, no lock, no allocation.
//   RegisterRegion  a register file: per register offset, width (1/2/4/8), reset value and
//                   access (ro, rw, rw1c, wo). Registers without hooks are served natively;
//                   a register with a read or write hook is "hooked": its accesses go to the
//                   engine's BatchHandler (the Python bindings: one GIL acquisition per batch).
//   CallbackRegion  every access goes to the BatchHandler, in batches; a read may be answered
//                   in the call or deferred and completed later from any thread.
//
// Thread-safety: regions are shared by every engine lane. MemoryRegion bytes are plain shared
// memory (concurrent accesses to the same bytes race as they would on a device; no tearing
// guarantee beyond what memcpy gives). RegisterRegion serialises its register state with a
// spin-free mutex per region (registers are not a throughput path). Counters are kept by the
// engine per lane, not here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "mlx5tlp/sigbus_guard.hpp"
#include "mlx5tlp/unique_fd.hpp"

namespace mlx5tlp {

enum class RegionKind : uint8_t { memory = 0, registers = 1, callback = 2 };
const char* region_kind_name(RegionKind k) noexcept;

class Region {
 public:
  Region(RegionKind kind, std::string name, int bar, uint64_t offset, uint64_t size);
  virtual ~Region() = default;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  RegionKind kind() const noexcept { return kind_; }
  const std::string& name() const noexcept { return name_; }
  int bar() const noexcept { return bar_; }
  uint64_t offset() const noexcept { return offset_; }
  uint64_t size() const noexcept { return size_; }
  bool contains(uint64_t off, uint64_t len) const noexcept {
    return off >= offset_ && len <= size_ && off - offset_ <= size_ - len;
  }

  // Whether the access [off, off + len) (region-relative) must go to the BatchHandler.
  virtual bool batched(uint64_t off, uint32_t len) const noexcept = 0;
  // Native accesses (batched() false). `off` is region-relative and DW aligned; `len` a
  // multiple of 4. Reads fill out[0, len); return false for a Completer Abort.
  virtual bool read(uint64_t off, uint32_t len, uint8_t* out) noexcept = 0;
  virtual void write(uint64_t off, const uint8_t* data, uint32_t len, uint8_t first_be,
                     uint8_t last_be) noexcept = 0;
  // Whether the file behind the region's mapping was truncated under it (SIGBUS guard hit,
  // sigbus_guard.hpp): its bytes are gone, reads are answered Completer Abort, writes are
  // dropped. Always false for memory the region does not map from an unsealed file.
  virtual bool backing_lost() const noexcept { return false; }

 private:
  RegionKind kind_;
  std::string name_;
  int bar_;
  uint64_t offset_, size_;
};

// Bytes i of data[0, len) (DW-granular: len a multiple of 4) that a write's byte enables allow.
inline bool byte_enabled(size_t i, size_t len, uint8_t first_be, uint8_t last_be) noexcept {
  if (i < 4) return (first_be >> i & 1u) != 0;
  if (i >= len - 4 && len > 4) return (last_be >> (i - (len - 4)) & 1u) != 0;
  return true;
}

class MemoryRegion final : public Region {
 public:
  // Caller memory: `base` (size bytes) must outlive the region.
  MemoryRegion(std::string name, int bar, uint64_t offset, uint64_t size, uint8_t* base);
  // A new memfd of `size` bytes (zeroed), mapped MAP_SHARED; fd() shares it with other
  // processes (they mmap it and see every write the host makes).
  static std::unique_ptr<MemoryRegion> create_memfd(std::string name, int bar, uint64_t offset,
                                                    uint64_t size);
  // An existing memfd / file of at least `size` bytes (dup()ed: the caller keeps its fd).
  // Unless the file is sealed against shrinking (F_SEAL_SHRINK), the mapping is registered
  // with the SIGBUS guard: if another process truncates the file while it is served, the
  // region becomes backing_lost() instead of the process dying of SIGBUS.
  static std::unique_ptr<MemoryRegion> map_fd(std::string name, int bar, uint64_t offset,
                                              uint64_t size, int fd);
  ~MemoryRegion() override;

  uint8_t* data() const noexcept { return base_; }
  int fd() const noexcept { return fd_.get(); }  // -1 for caller memory

  bool batched(uint64_t, uint32_t) const noexcept override { return false; }
  bool read(uint64_t off, uint32_t len, uint8_t* out) noexcept override;
  void write(uint64_t off, const uint8_t* data, uint32_t len, uint8_t first_be,
             uint8_t last_be) noexcept override;
  bool backing_lost() const noexcept override { return guard_.lost(); }
  bool guarded() const noexcept { return guard_.active(); }

 private:
  MemoryRegion(std::string name, int bar, uint64_t offset, uint64_t size, uint8_t* base,
               UniqueFd fd, size_t map_len, SigbusGuard guard);
  uint8_t* base_;
  UniqueFd fd_;
  size_t map_len_ = 0;  // > 0: we mmap()ed it
  SigbusGuard guard_;   // reset in the destructor before the munmap
};

enum class RegAccess : uint8_t { ro = 0, rw = 1, rw1c = 2, wo = 3 };
const char* reg_access_name(RegAccess a) noexcept;

struct RegisterSpec {
  std::string name;
  uint32_t offset = 0;  // region-relative, aligned to width
  uint8_t width = 4;    // bytes: 1, 2, 4 or 8
  uint64_t reset = 0;
  RegAccess access = RegAccess::rw;
  uint64_t reserved = 0;    // bits that read 0 and ignore host writes (RsvdP/RsvdZ, §7.4)
  bool read_hook = false;   // reads go to the BatchHandler (which returns the value)
  bool write_hook = false;  // writes go to the BatchHandler (after the register is updated)
};

class RegisterRegion final : public Region {
 public:
  // Validates the registers (width, alignment, inside the region, no overlaps): throws
  // Error(invalid_argument) naming "registers[i].<field>".
  // The values live in a memfd (MAP_SHARED), so that they survive this process for a
  // successor (docs/handover.md): value k (registers in offset order) is a little-endian u64
  // at byte 8k. `fd` < 0: a new memfd, every register at its reset value; else an existing
  // memfd of at least 8 * registers bytes (dup()ed) whose values are kept (each masked to its
  // register's width) — a successor adopting its predecessor's register file.
  RegisterRegion(std::string name, int bar, uint64_t offset, uint64_t size,
                 std::vector<RegisterSpec> registers, int fd = -1);
  ~RegisterRegion() override;
  RegisterRegion(const RegisterRegion&) = delete;
  RegisterRegion& operator=(const RegisterRegion&) = delete;
  int fd() const noexcept { return fd_.get(); }  // the values' memfd (owned by the region)

  const std::vector<RegisterSpec>& registers() const noexcept { return regs_; }
  // Index of the register at region-relative `off`, or -1.
  int find(uint64_t off) const noexcept;
  uint64_t value(size_t index) const noexcept;
  // Device-side update (the function's own logic): bypasses the access rules.
  void set_value(size_t index, uint64_t v) noexcept;
  void reset() noexcept;

  // A hooked register in the range (reads: a read hook; writes go native first then the hook).
  bool batched(uint64_t off, uint32_t len) const noexcept override;
  bool read(uint64_t off, uint32_t len, uint8_t* out) noexcept override;
  void write(uint64_t off, const uint8_t* data, uint32_t len, uint8_t first_be,
             uint8_t last_be) noexcept override;
  bool has_write_hook(uint64_t off, uint32_t len) const noexcept;
  bool has_read_hook(uint64_t off, uint32_t len) const noexcept;
  // An adopted fd that is not sealed against shrinking is guarded like MemoryRegion::map_fd.
  bool backing_lost() const noexcept override { return guard_.lost(); }

 private:
  std::vector<RegisterSpec> regs_;      // sorted by offset
  UniqueFd fd_;
  uint64_t* values_ = nullptr;  // MAP_SHARED on fd_: one u64 per register
  size_t map_len_ = 0;
  SigbusGuard guard_;  // reset in the destructor before the munmap
  mutable std::mutex mu_;  // blocking point: brief, never held while calling out
};

class CallbackRegion final : public Region {
 public:
  // `deadline_us`: how long a deferred read may wait for its answer before the engine answers
  // Completer Abort; 0: the function's Completion Timeout range maximum (Device Control 2).
  CallbackRegion(std::string name, int bar, uint64_t offset, uint64_t size, uint32_t deadline_us = 0);
  uint32_t deadline_us() const noexcept { return deadline_us_; }
  bool batched(uint64_t, uint32_t) const noexcept override { return true; }
  bool read(uint64_t, uint32_t, uint8_t*) noexcept override { return false; }
  void write(uint64_t, const uint8_t*, uint32_t, uint8_t, uint8_t) noexcept override {}

 private:
  uint32_t deadline_us_;
};

}  // namespace mlx5tlp
