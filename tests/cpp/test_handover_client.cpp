// The operator client's building blocks: SHA-256 against FIPS 180-4's examples, HMAC-SHA256
// against RFC 4231 §4, the flat JSON parser's refusals, and request()'s own errors (argument
// checks, no primary, a primary that never answers or hangs up). The exchange with a real
// primary is tests/test_handover_client.py.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "check.hpp"
#include "mlx5tlp/flat_json.hpp"
#include "mlx5tlp/handover_client.hpp"
#include "mlx5tlp/sha256.hpp"
#include "mlx5tlp/unique_fd.hpp"

using mlx5tlp::Deadline;
using mlx5tlp::ErrorKind;
using mlx5tlp::UniqueFd;
namespace crypto = mlx5tlp::crypto;
namespace json = mlx5tlp::json;
using namespace std::chrono_literals;

static std::string hex(const crypto::Digest& d) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (const uint8_t b : d) {
    s += kHex[b >> 4];
    s += kHex[b & 0xF];
  }
  return s;
}

static void test_sha256() {
  // FIPS 180-4 examples (NIST CSRC "SHA256.pdf", "SHA2_Additional.pdf").
  CHECK(hex(crypto::Sha256::of("")) ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(hex(crypto::Sha256::of("abc")) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(hex(crypto::Sha256::of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces so that updates straddle block boundaries.
  crypto::Sha256 h;
  const std::string chunk(997, 'a');
  size_t left = 1000000;
  while (left > 0) {
    const size_t n = left < chunk.size() ? left : chunk.size();
    h.update(chunk.data(), n);
    left -= n;
  }
  CHECK(hex(h.finish()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // finish() resets: the object hashes afresh.
  h.update("abc");
  CHECK(hex(h.finish()) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // Lengths around the padding boundary (55, 56, 64 bytes) agree between one and many updates.
  for (size_t n : {55u, 56u, 63u, 64u, 65u, 119u, 120u}) {
    const std::string s(n, 'x');
    crypto::Sha256 split;
    for (const char c : s) split.update(&c, 1);
    CHECK(split.finish() == crypto::Sha256::of(s));
  }
}

static void test_hmac() {
  // RFC 4231 §4.2-4.8 (test case 5, a truncated MAC, does not apply).
  CHECK(hex(crypto::HmacSha256::of(std::string(20, '\x0b'), "Hi There")) ==
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  CHECK(hex(crypto::HmacSha256::of("Jefe", "what do ya want for nothing?")) ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  CHECK(hex(crypto::HmacSha256::of(std::string(20, '\xaa'), std::string(50, '\xdd'))) ==
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe");
  std::string key4;
  for (int i = 1; i <= 25; ++i) key4 += char(i);
  CHECK(hex(crypto::HmacSha256::of(key4, std::string(50, '\xcd'))) ==
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
  CHECK(hex(crypto::HmacSha256::of(std::string(131, '\xaa'),
                                   "Test Using Larger Than Block-Size Key - Hash Key First")) ==
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  CHECK(hex(crypto::HmacSha256::of(
            std::string(131, '\xaa'),
            "This is a test using a larger than block-size key and a larger than block-size "
            "data. The key needs to be hashed before being used by the HMAC algorithm.")) ==
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2");
  const crypto::Digest a = crypto::HmacSha256::of("k", "m"), b = crypto::HmacSha256::of("k", "n");
  CHECK(crypto::digest_equal(a.data(), a.data(), a.size()));
  CHECK(!crypto::digest_equal(a.data(), b.data(), a.size()));
}

static void test_json_accepts() {
  // What Python's json.dumps(..., separators=(",", ":")) sends, with its \u escapes.
  const json::Object o = json::parse_flat_object(
      R"( {"t":"error","errno":125,"message":"caf\u00e9 \"x\"\\\n\ud83d\ude00","neg":-7,)"
      R"("r":1.5e3,"big":123456789012345678901,"ok":true,"no":false,"nil":null,"e":""} )");
  CHECK(o.size() == 10);
  CHECK(o.at("t").kind == json::Value::Kind::string && o.at("t").string == "error");
  CHECK(o.at("errno").kind == json::Value::Kind::integer && o.at("errno").integer == 125);
  CHECK(o.at("message").string == "caf\xc3\xa9 \"x\"\\\n\xf0\x9f\x98\x80");
  CHECK(o.at("neg").integer == -7);
  CHECK(o.at("r").kind == json::Value::Kind::real && o.at("r").real == 1500.0);
  CHECK(o.at("big").kind == json::Value::Kind::real && o.at("big").real > 1e20);
  CHECK(o.at("ok").boolean && o.at("ok").kind == json::Value::Kind::boolean);
  CHECK(!o.at("no").boolean && o.at("nil").kind == json::Value::Kind::null);
  CHECK(json::parse_flat_object("{}").empty());
  // quote() round-trips through the parser.
  const std::string odd = std::string("a\"b\\c\x01\n", 8) + "\xc3\xa9";
  CHECK(json::parse_flat_object("{\"k\":" + json::quote(odd) + "}").at("k").string == odd);
}

static void test_json_refuses() {
  const char* bad[] = {
      "",                       // nothing
      "[]",                     // not an object
      "\"x\"",                  // not an object
      "{\"a\":{}}",             // nested object
      "{\"a\":[1]}",            // array
      "{\"a\":1}x",             // trailing bytes
      "{\"a\":1,\"a\":2}",      // duplicate field
      "{\"a\":1,}",             // trailing comma
      "{a:1}",                  // unquoted name
      "{\"a\" 1}",              // no colon
      "{\"a\":\"x}",            // unterminated string
      "{\"a\":\"\\q\"}",        // bad escape
      "{\"a\":\"\\u12\"}",      // short \u
      "{\"a\":\"\\udc00\"}",    // lone low surrogate
      "{\"a\":\"\\ud800x\"}",   // high surrogate without its low half
      "{\"a\":\"\x01\"}",       // raw control character
      "{\"a\":01}",             // leading zero
      "{\"a\":1.}",             // no fraction digits
      "{\"a\":-}",              // sign only
      "{\"a\":1e}",             // no exponent digits
      "{\"a\":1e999}",          // not finite
      "{\"a\":tru}",            // truncated literal
      "{\"a\":NaN}",            // not JSON
      "{\"a\":1",               // unterminated object
  };
  for (const char* text : bad)
    CHECK_THROWS_KIND(json::parse_flat_object(text), ErrorKind::invalid_argument, EBADMSG);
  std::string many = "{";
  for (size_t i = 0; i <= json::kMaxFields; ++i)
    many += (i ? ",\"" : "\"") + std::to_string(i) + "\":0";
  many += "}";
  CHECK_THROWS_KIND(json::parse_flat_object(many), ErrorKind::invalid_argument, EBADMSG);
  try {
    json::parse_flat_object("{\"a\":[1]}");
  } catch (const mlx5tlp::Error& e) {
    CHECK(std::strstr(e.what(), "nested objects and arrays are refused") != nullptr);
    CHECK(std::strstr(e.what(), "byte 5") != nullptr);
  }
}

// A listening socket at a fresh path whose peer (this test) never answers.
struct Listener {
  std::string path;
  UniqueFd fd;
  explicit Listener(const char* tag) {
    path = "/tmp/mlx5tlp-hoc-" + std::to_string(::getpid()) + "-" + tag;
    ::unlink(path.c_str());
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    CHECK(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    CHECK(::listen(fd.get(), 4) == 0);
  }
  ~Listener() { ::unlink(path.c_str()); }
};

static void test_request_errors() {
  namespace ho = mlx5tlp::handover;
  const std::string key(32, 'k');
  CHECK_THROWS_KIND(ho::request("/nonexistent", key, "reboot", Deadline::after(1s)),
                    ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(ho::request("/nonexistent", "short", "status", Deadline::after(1s)),
                    ErrorKind::invalid_argument, EINVAL);
  CHECK_THROWS_KIND(ho::request(std::string(200, 'p'), key, "status", Deadline::after(1s)),
                    ErrorKind::invalid_argument, EINVAL);
  // Nobody listens: retried until the deadline, then ENOENT (no such socket file).
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_ERRNO(ho::request("/tmp/mlx5tlp-hoc-none-" + std::to_string(::getpid()), key,
                                 "status", Deadline::after(100ms)),
                     ENOENT);
  CHECK(std::chrono::steady_clock::now() - t0 >= 100ms);
  {
    // Accepted by the kernel's backlog, never answered: ETIMEDOUT at the deadline.
    Listener l("silent");
    CHECK_THROWS_ERRNO(ho::request(l.path, key, "status", Deadline::after(200ms)), ETIMEDOUT);
  }
  {
    // A primary that hangs up on our HELLO refused it (the Python primary does so on a bad MAC).
    Listener l("hangup");
    std::thread peer([&] {
      UniqueFd c(::accept(l.fd.get(), nullptr, nullptr));
      char buf[512];
      (void)!::read(c.get(), buf, sizeof buf);
    });
    CHECK_THROWS_ERRNO(ho::request(l.path, key, "status", Deadline::after(5s)), EACCES);
    peer.join();
  }
  // A peer uid we do not allow is refused before anything is signed.
  {
    Listener l("uid");
    ho::RequestOptions only_other;
    only_other.allow_uids = {::getuid() + 12345};
    CHECK_THROWS_ERRNO(ho::request(l.path, key, "status", Deadline::after(1s), only_other),
                       EACCES);
  }
}

int main() {
  test_sha256();
  test_hmac();
  test_json_accepts();
  test_json_refuses();
  test_request_errors();
  return mlx5tlp_test::finish("test_handover_client");
}
