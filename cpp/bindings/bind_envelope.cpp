// The accept-only fast path of mlx5tlp.envelope.open_envelope (unkeyed envelopes): one pass in
// C++ over every check the Python reference makes, for the export + import hot path. It only
// ever accepts: on any failed check it returns None and the caller runs the Python reference,
// which reports the failure with its documented message in its documented order
// (docs/export-format.md). tests/test_envelope.py compares both on mutated envelopes.
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>

#include "bind.hpp"
#include "boundary.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {
namespace {

constexpr size_t kHeader = 40;  // "<8sHHIIHHHBBIQ"
constexpr uint16_t kFormatVersion = 1;
constexpr uint32_t kFlagTlpVar = 1;
constexpr uint8_t kOptKeyed = 1;
constexpr uint32_t kMaxString = 255;

// zlib's CRC-32 (reflected, polynomial 0xEDB88320), as Python's zlib.crc32.
const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> t = [] {
    std::array<uint32_t, 256> out{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      out[i] = c;
    }
    return out;
  }();
  return t;
}

uint32_t crc32(const uint8_t* p, size_t n) {
  const auto& t = crc_table();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint16_t le16(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }
uint32_t le32(const uint8_t* p) { return uint32_t(le16(p)) | uint32_t(le16(p + 2)) << 16; }
uint64_t le64(const uint8_t* p) { return uint64_t(le32(p)) | uint64_t(le32(p + 4)) << 32; }

bool field_is(const uint8_t* p, size_t len, const std::string& want) {
  return len == want.size() && std::memcmp(p, want.data(), len) == 0;
}

}  // namespace

void bind_envelope(py::module_& m) {
  m.def("envelope_accept", [](const py::object& blob, uint32_t expected_kind, uint32_t raw_size,
                              const py::bytes& name, uint64_t node_guid, const py::bytes& backend,
                              const py::bytes& version) -> py::object {
    const BufferView v(blob, "blob");
    const std::string want_name = name, want_backend = backend, want_version = version;
    const uint8_t* d = v.data();
    const size_t n = v.size();
    if (n < kHeader || std::memcmp(d, "MLX5TLP\0", 8) != 0) return py::none();
    const uint16_t format = le16(d + 8), kind = le16(d + 10);
    const uint32_t flags = le32(d + 12), raw_len = le32(d + 16);
    const uint32_t name_len = le16(d + 20), backend_len = le16(d + 22), ver_len = le16(d + 24);
    const uint8_t options = d[26];
    if (format != kFormatVersion || options != 0 || d[27] != 0 || le32(d + 28) != 0)
      return py::none();  // other versions, unknown or keyed options, reserved bits
    if (name_len > kMaxString || backend_len > kMaxString || ver_len > kMaxString) return py::none();
    const size_t crc_at = kHeader + name_len + backend_len + ver_len + size_t(raw_len);
    if (n != crc_at + 4 || crc32(d, crc_at) != le32(d + crc_at)) return py::none();
    if (kind < 1 || kind > 3 || kind != expected_kind) return py::none();
    if ((flags & ~kFlagTlpVar) != 0 || ((flags & kFlagTlpVar) && kind != 1)) return py::none();
    if (raw_len != raw_size || le64(d + 32) != node_guid) return py::none();
    const uint8_t* s = d + kHeader;
    if (!field_is(s, name_len, want_name) || !field_is(s + name_len, backend_len, want_backend) ||
        !field_is(s + name_len + backend_len, ver_len, want_version))
      return py::none();
    const char* raw = reinterpret_cast<const char*>(s + name_len + backend_len + ver_len);
    return py::make_tuple(flags, py::bytes(raw, raw_len));
  }, py::arg("blob"), py::arg("expected_kind"), py::arg("raw_size"), py::arg("name"),
     py::arg("node_guid"), py::arg("backend"), py::arg("version"),
     "(flags, raw) of an unkeyed envelope that passes every check of open_envelope, else None.");
}

}  // namespace mlx5tlp::bind
