#include "mlx5tlp/config_space.hpp"

#include <cstring>

namespace mlx5tlp::pci {

ConfigTemplate::ConfigTemplate() noexcept {
  std::memset(init, 0, sizeof init);
  std::memset(wmask, 0, sizeof wmask);
  std::memset(w1cmask, 0, sizeof w1cmask);
  std::memset(cmask, 0xff, sizeof cmask);  // undefined bytes are reserved: read-only zero
  std::memset(used, 0, sizeof used);
}

void ConfigTemplate::set(uint16_t offset, unsigned width, uint64_t value, uint64_t wm,
                         uint64_t w1c) noexcept {
  store_le(init + offset, width, value);
  store_le(wmask + offset, width, wm);
  store_le(w1cmask + offset, width, w1c);
  store_le(cmask + offset, width, ~(wm | w1c));
  std::memset(used + offset, 1, width);
}

void ConfigTemplate::set_volatile(uint16_t offset, unsigned width, uint64_t bits) noexcept {
  store_le(cmask + offset, width, load_le(cmask + offset, width) & ~bits);
}

bool ConfigTemplate::is_free(uint16_t offset, uint32_t len) const noexcept {
  if (!ConfigSpace::in_range(offset, len)) return false;
  for (uint32_t i = 0; i < len; ++i)
    if (used[offset + i] != 0) return false;
  return true;
}

bool ConfigTemplate::claim(uint16_t offset, uint32_t len) noexcept {
  if (!is_free(offset, len)) return false;
  std::memset(used + offset, 1, len);
  return true;
}

uint64_t ConfigTemplate::get_init(uint16_t offset, unsigned width) const noexcept {
  return load_le(init + offset, width);
}

uint64_t ConfigTemplate::digest() const noexcept {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64
  auto mix = [&h](const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      h ^= p[i];
      h *= 0x100000001b3ull;
    }
  };
  mix(init, sizeof init);
  mix(wmask, sizeof wmask);
  mix(w1cmask, sizeof w1cmask);
  mix(cmask, sizeof cmask);
  return h;
}

void ConfigSpace::reset() noexcept { std::memcpy(b_, t_->init, kConfigSize); }

uint8_t ConfigSpace::write(uint16_t dw_offset, uint32_t value, uint8_t byte_enables) noexcept {
  uint8_t changed = 0;
  for (unsigned i = 0; i < 4; ++i) {
    if ((byte_enables & (1u << i)) == 0) continue;
    const unsigned o = dw_offset + i;
    const uint8_t v = uint8_t(value >> (8 * i));
    const uint8_t old = b_[o];
    uint8_t n = uint8_t((old & ~t_->wmask[o]) | (v & t_->wmask[o]));
    n = uint8_t(n & ~(v & t_->w1cmask[o]));
    b_[o] = n;
    if (n != old) changed = uint8_t(changed | (1u << i));
  }
  return changed;
}

bool ConfigSpace::check(const ConfigTemplate& t, const uint8_t* bytes,
                        ConfigMismatch* where) noexcept {
  for (uint32_t o = 0; o < kConfigSize; ++o) {
    const uint8_t c = t.cmask[o];
    if (((bytes[o] ^ t.init[o]) & c) == 0) continue;
    if (where != nullptr) {
      where->offset = uint16_t(o);
      where->expected = uint8_t(t.init[o] & c);
      where->found = uint8_t(bytes[o] & c);
      where->checked = c;
    }
    return false;
  }
  return true;
}

}  // namespace mlx5tlp::pci
