#include "mlx5tlp/gateway_layout.hpp"

#include <cerrno>
#include <cstring>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp {

void GatewayLayout::write_batch(const uint8_t* buf, const uint32_t* offsets,
                                const uint32_t* lengths, size_t n) noexcept {
  const bool batched = batched_doorbell();
  for (size_t i = 0; i < n; ++i) {
    write(buf + offsets[i], lengths[i]);
    if (!batched) doorbell();
  }
  if (batched && n != 0) doorbell();
}

void SimRingLayout::attach(uint8_t* page, size_t length) {
  // acquire: the device wrote the geometry before the magic (release).
  const uint32_t magic = __atomic_load_n(reinterpret_cast<uint32_t*>(page + kMagicOff),
                                         __ATOMIC_ACQUIRE);
  uint32_t ver = 0;
  std::memcpy(&ver, page + kVersion, 4);
  std::memcpy(&count_, page + kCount, 4);
  slot_size_ = ver >> 16;
  if (magic != kMagic || (ver & 0xffff) != 1 || slot_size_ < 16 || slot_size_ % 8 != 0 ||
      count_ == 0 || kSlots + size_t(count_) * slot_size_ > length)
    throw Error(ErrorKind::invalid_argument, "attach gateway layout 'sim'", EINVAL,
                "the page is not a software-device TLP gateway page (use the layout of the "
                "device you run on)");
  page_ = page;
  // Continue from what an earlier gateway on this page published.
  produced_ = __atomic_load_n(reinterpret_cast<uint64_t*>(page + kDoorbell), __ATOMIC_RELAXED);
  next_slot_ = uint32_t(produced_ % count_);
}

size_t SimRingLayout::credits() noexcept {
  // acquire: the device model's copy-out of a slot happens-before we overwrite it.
  const uint64_t consumed =
      __atomic_load_n(reinterpret_cast<uint64_t*>(page_ + kConsumer), __ATOMIC_ACQUIRE);
  const uint64_t in_flight = produced_ - consumed;
  return in_flight >= count_ ? 0 : size_t(count_ - in_flight);
}

void SimRingLayout::write(const uint8_t* record, size_t len) noexcept {
  auto* slot = reinterpret_cast<volatile uint64_t*>(page_ + kSlots + size_t(next_slot_) * slot_size_);
  slot[0] = uint64_t(len);  // u32 length, u32 zero: one 8-byte store
  copy_to_device(slot + 1, record, len);
  ++produced_;
  if (++next_slot_ == count_) next_slot_ = 0;
}

void SimRingLayout::write_batch(const uint8_t* buf, const uint32_t* offsets,
                                const uint32_t* lengths, size_t n) noexcept {
  for (size_t i = 0; i < n; ++i) SimRingLayout::write(buf + offsets[i], lengths[i]);
  if (n != 0) doorbell();
}

void SimRingLayout::doorbell() noexcept {
  // The slot stores must reach the page before the doorbell says they are there.
  store_fence();
  // release: pairs with the device model's acquire load of the doorbell; a single 64-bit store.
  __atomic_store_n(reinterpret_cast<uint64_t*>(page_ + kDoorbell), produced_, __ATOMIC_RELEASE);
}

void RawTlpLayout::attach(uint8_t* page, size_t length) {
  if (slot_size_ == 0 || slot_size_ % 64 != 0 || length % slot_size_ != 0)
    throw Error(ErrorKind::invalid_argument, "attach gateway layout 'raw_tlp'", EINVAL,
                "slot size " + std::to_string(slot_size_) +
                    " must be a multiple of 64 dividing the page length " + std::to_string(length));
  page_ = page;
  slots_ = length / slot_size_;
}

void RawTlpLayout::write(const uint8_t* record, size_t len) noexcept {
  auto* dst = reinterpret_cast<volatile uint64_t*>(page_ + next_ * slot_size_);
  copy_to_device(dst, record, len);  // wire order is the TLP's byte order: copied as is
  if (++next_ == slots_) next_ = 0;
}

void RawTlpLayout::write_batch(const uint8_t* buf, const uint32_t* offsets,
                               const uint32_t* lengths, size_t n) noexcept {
  for (size_t i = 0; i < n; ++i) {
    RawTlpLayout::write(buf + offsets[i], lengths[i]);
    store_fence();  // provisional: publish each record before the next one starts
  }
}

std::unique_ptr<GatewayLayout> make_layout(const std::string& spec) {
  if (spec == "sim") return std::make_unique<SimRingLayout>();
  if (spec == "raw_tlp") return std::make_unique<RawTlpLayout>();
  if (spec.rfind("raw_tlp:", 0) == 0) {
    char* end = nullptr;
    const unsigned long n = std::strtoul(spec.c_str() + 8, &end, 10);
    if (end != nullptr && *end == '\0' && n > 0) return std::make_unique<RawTlpLayout>(n);
  }
  throw Error(ErrorKind::invalid_argument, "gateway layout", EINVAL,
              "unknown layout '" + spec + "' (expected 'sim' or 'raw_tlp[:<slot bytes>]')");
}

}  // namespace mlx5tlp
