// mlx5tlp/flat_json.hpp — the one JSON shape of the control protocol: a flat object.
//
// The primary's messages (docs/handover.md) are one JSON object whose values are strings,
// numbers, true/false or null. parse_flat_object() reads exactly that and refuses anything
// else — nested objects or arrays, duplicate keys, trailing bytes, bad escapes or UTF-16
// surrogates, numbers that are not JSON numbers, more than kMaxFields fields or nesting —
// with Error(invalid_argument, EBADMSG) naming what and where. It never reads past the input.
//
// Thread-safety: value types and pure functions.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>

namespace mlx5tlp::json {

struct Value {
  enum class Kind { null, boolean, integer, real, string };
  Kind kind = Kind::null;
  bool boolean = false;
  int64_t integer = 0;  // Kind::integer: the value; a JSON integer outside int64 is Kind::real
  double real = 0.0;    // Kind::real (and Kind::integer, converted)
  std::string string;   // Kind::string, UTF-8
};

using Object = std::map<std::string, Value>;

constexpr size_t kMaxFields = 256;
constexpr size_t kMaxBytes = 1 << 20;

// Parses `text` as one flat JSON object (RFC 8259 syntax, whitespace allowed).
Object parse_flat_object(std::string_view text);

// `s` as a JSON string literal (quotes included; control characters, '"' and '\\' escaped;
// other bytes copied, so UTF-8 stays UTF-8).
std::string quote(std::string_view s);

}  // namespace mlx5tlp::json
