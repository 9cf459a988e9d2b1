#include "mlx5tlp/flat_json.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "mlx5tlp/error.hpp"

namespace mlx5tlp::json {

namespace {

class Parser {
 public:
  explicit Parser(std::string_view s) : s_(s) {}

  Object object() {
    if (s_.size() > kMaxBytes)
      fail("the text is " + std::to_string(s_.size()) + " bytes, at most " +
           std::to_string(kMaxBytes));
    ws();
    expect('{', "an object ('{')");
    Object out;
    ws();
    if (peek() == '}') {
      ++i_;
    } else {
      for (;;) {
        ws();
        if (peek() != '"') fail("a field name (a string)");
        std::string key = string();
        ws();
        expect(':', "':' after a field name");
        ws();
        Value v = value();
        if (out.size() >= kMaxFields)
          fail("more than " + std::to_string(kMaxFields) + " fields");
        if (!out.emplace(std::move(key), std::move(v)).second) fail("a duplicate field name");
        ws();
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect('}', "',' or '}'");
        break;
      }
    }
    ws();
    if (i_ != s_.size()) fail("the end of the text after the object");
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& want) const {
    throw Error(ErrorKind::invalid_argument, "parse control message", EBADMSG,
                "not a flat JSON object: expected " + want + " at byte " + std::to_string(i_));
  }
  int peek() const { return i_ < s_.size() ? static_cast<unsigned char>(s_[i_]) : -1; }
  void expect(char c, const char* want) {
    if (peek() != static_cast<unsigned char>(c)) fail(want);
    ++i_;
  }
  void ws() {
    while (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r') ++i_;
  }
  void literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) fail("a JSON value");
    i_ += word.size();
  }

  Value value() {
    Value v;
    switch (peek()) {
      case '"':
        v.kind = Value::Kind::string;
        v.string = string();
        return v;
      case 't':
        literal("true");
        v.kind = Value::Kind::boolean;
        v.boolean = true;
        return v;
      case 'f':
        literal("false");
        v.kind = Value::Kind::boolean;
        return v;
      case 'n':
        literal("null");
        return v;
      case '{':
      case '[':
        fail("a string, number, true, false or null (nested objects and arrays are refused)");
      default:
        return number();
    }
  }

  // RFC 8259 §6: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
  Value number() {
    const size_t start = i_;
    bool integral = true;
    if (peek() == '-') ++i_;
    if (peek() == '0') {
      ++i_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++i_;
    } else {
      fail("a JSON value");
    }
    if (peek() == '.') {
      integral = false;
      ++i_;
      if (!(peek() >= '0' && peek() <= '9')) fail("a digit after '.'");
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (!(peek() >= '0' && peek() <= '9')) fail("a digit in the exponent");
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    // strtoll/strtod need a terminated copy; the number is short (bounded by the text).
    const std::string text(s_.substr(start, i_ - start));
    Value v;
    if (integral) {
      errno = 0;
      char* end = nullptr;
      const long long n = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end == text.c_str() + text.size()) {
        v.kind = Value::Kind::integer;
        v.integer = n;
        v.real = static_cast<double>(n);
        return v;
      }
    }
    v.kind = Value::Kind::real;
    v.real = std::strtod(text.c_str(), nullptr);
    if (!std::isfinite(v.real)) fail("a finite number");
    return v;
  }

  unsigned hex4() {
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      const int c = peek();
      unsigned d;
      if (c >= '0' && c <= '9') d = unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') d = unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = unsigned(c - 'A' + 10);
      else fail("four hex digits after \\u");
      u = u << 4 | d;
      ++i_;
    }
    return u;
  }

  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | cp >> 6);
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | cp >> 12);
      out += char(0x80 | (cp >> 6 & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | cp >> 18);
      out += char(0x80 | (cp >> 12 & 0x3F));
      out += char(0x80 | (cp >> 6 & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    expect('"', "'\"'");
    std::string out;
    for (;;) {
      const int c = peek();
      if (c < 0) fail("the closing '\"' of a string");
      ++i_;
      if (c == '"') return out;
      if (c < 0x20) {
        --i_;
        fail("no raw control character inside a string");
      }
      if (c != '\\') {
        out += char(c);
        continue;
      }
      const int e = peek();
      ++i_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("no lone low surrogate in \\u escapes");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (peek() != '\\') fail("a low surrogate after a high one");
            ++i_;
            if (peek() != 'u') fail("a low surrogate after a high one");
            ++i_;
            const unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("a low surrogate after a high one");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default:
          --i_;
          fail("a valid escape after '\\'");
      }
    }
  }

  std::string_view s_;
  size_t i_ = 0;
};

}  // namespace

Object parse_flat_object(std::string_view text) { return Parser(text).object(); }

std::string quote(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      out += "\\u00";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    } else {
      out += ch;
    }
  }
  out += '"';
  return out;
}

}  // namespace mlx5tlp::json
