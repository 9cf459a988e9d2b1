// mlx5tlp/sha256.hpp — SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104) for the control
// protocol's message MACs, so the core needs no crypto library (the wheel gains no NEEDED
// entry). No table is indexed by data or key bytes, and MACs are compared with digest_equal,
// whose time does not depend on where they differ.
//
// Thread-safety: value types; one thread per object.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace mlx5tlp::crypto {

using Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256() noexcept { reset(); }
  void reset() noexcept;
  void update(const void* data, size_t len) noexcept;
  void update(std::string_view s) noexcept { update(s.data(), s.size()); }
  // The digest of everything given since reset(); the object is reset afterwards.
  Digest finish() noexcept;

  static Digest of(std::string_view s) noexcept {
    Sha256 h;
    h.update(s);
    return h.finish();
  }

 private:
  void block(const uint8_t* p) noexcept;
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t bytes_ = 0;
};

class HmacSha256 {
 public:
  explicit HmacSha256(std::string_view key) noexcept;
  void update(const void* data, size_t len) noexcept { inner_.update(data, len); }
  void update(std::string_view s) noexcept { inner_.update(s); }
  Digest finish() noexcept;

  static Digest of(std::string_view key, std::string_view msg) noexcept {
    HmacSha256 h(key);
    h.update(msg);
    return h.finish();
  }

 private:
  Sha256 inner_;
  uint8_t opad_[64];
};

// Compares two MACs in time independent of where they differ.
bool digest_equal(const uint8_t* a, const uint8_t* b, size_t n) noexcept;

}  // namespace mlx5tlp::crypto
