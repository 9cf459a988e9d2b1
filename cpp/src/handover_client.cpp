#include "mlx5tlp/handover_client.hpp"

#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

#include "mlx5tlp/error.hpp"
#include "mlx5tlp/sha256.hpp"
#include "mlx5tlp/unique_fd.hpp"

namespace mlx5tlp::handover {

namespace {

// share.py's framing: "<8sHHI" (magic, version, fd count, payload count), then one u32 LE
// length per payload, then the payloads; fds ride in SCM_RIGHTS.
constexpr char kMagic[8] = {'M', 'L', 'X', '5', 'F', 'D', 'S', '\0'};
constexpr uint16_t kVersion = 1;
constexpr size_t kPrefix = 16;
constexpr uint32_t kMaxPayloads = 256;
constexpr size_t kMaxPayloadBytes = size_t(1) << 20;
constexpr int kMaxFds = 8;  // wire._MAX_FDS
// wire.py's MAC: label || direction || receiver's nonce || seq (u64 LE) || per part len+bytes.
constexpr std::string_view kLabel = "mlx5tlp-handover-1";
constexpr size_t kNonce = 16;
constexpr size_t kMac = 32;
using Nonce = std::array<uint8_t, kNonce>;

[[noreturn]] void fail(int err, const std::string& what, const std::string& detail) {
  throw Error(kind_for_errno(err, false), what, err, detail);
}

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out += char(v >> (8 * i) & 0xFF);
}

uint64_t get_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

std::string hex(const uint8_t* p, size_t n) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += kHex[p[i] >> 4];
    s += kHex[p[i] & 0xF];
  }
  return s;
}

bool unhex(const std::string& s, Nonce& out) {
  if (s.size() != 2 * kNonce) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    unsigned d;
    if (c >= '0' && c <= '9') d = unsigned(c - '0');
    else if (c >= 'a' && c <= 'f') d = unsigned(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') d = unsigned(c - 'A' + 10);
    else return false;
    out[i / 2] = uint8_t(i % 2 ? (out[i / 2] | d) : d << 4);
  }
  return true;
}

// Waits for `events` on `fd` until `deadline`; ETIMEDOUT naming `what` once it passes.
void wait_for(int fd, short events, const Deadline& deadline, const char* what) {
  for (;;) {
    pollfd p{fd, events, 0};
    timespec ts{};
    const bool bounded = deadline.remaining_timespec(&ts);
    const int n = ::ppoll(&p, 1, bounded ? &ts : nullptr, nullptr);
    if (n > 0) return;
    if (n == 0) fail(ETIMEDOUT, what, "the deadline passed");
    if (errno != EINTR) fail(errno_or_eio(), what, "ppoll on the control socket");
  }
}

UniqueFd connect_primary(const std::string& path, const Deadline& deadline) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    throw Error(ErrorKind::invalid_argument, "handover request", EINVAL,
                "control socket path must be 1.." + std::to_string(sizeof addr.sun_path - 1) +
                    " bytes, got " + std::to_string(path.size()));
  std::memcpy(addr.sun_path, path.data(), path.size());
  // A successor may be between unlink and bind: retry like standby.connect() does.
  long pause_ns = 100000;
  for (;;) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) fail(errno_or_eio(), "socket", "AF_UNIX stream socket");
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0)
      return fd;
    const int err = errno;
    if (err == EINTR) continue;
    if ((err != ECONNREFUSED && err != ENOENT && err != EAGAIN) || deadline.expired())
      fail(err, "connect", "no primary listens at '" + path + "'");
    const long left = long(std::min<int64_t>(deadline.remaining().count(), pause_ns));
    const timespec ts{0, left};
    ::nanosleep(&ts, nullptr);
    pause_ns = std::min<long>(pause_ns * 2, 20000000);
  }
}

void check_peer(int fd, const RequestOptions& options) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    fail(errno_or_eio(), "getsockopt(SO_PEERCRED)", "the primary's credentials");
  const uid_t self = ::getuid();
  const bool ok = options.allow_uids.empty()
                      ? cred.uid == self
                      : std::find(options.allow_uids.begin(), options.allow_uids.end(),
                                  cred.uid) != options.allow_uids.end();
  if (!ok)
    fail(EACCES, "handover request",
         "the primary's uid " + std::to_string(cred.uid) + " (pid " + std::to_string(cred.pid) +
             ") is not allowed");
}

// One authenticated operator connection (wire.Wire as a client).
class Connection {
 public:
  Connection(UniqueFd fd, std::string_view key) : fd_(std::move(fd)), key_(key) {
    if (::getrandom(nonce_.data(), nonce_.size(), 0) != ssize_t(nonce_.size()))
      fail(errno_or_eio(), "getrandom", "the connection nonce");
  }

  int fd() const { return fd_.get(); }

  // Signs and sends {<fields_json>,"t":type,"nonce":ours}; `fields_json` is "" or "k":v,...
  void send(std::string_view type, const std::string& fields_json, const Deadline& deadline) {
    std::string body = "{" + fields_json + (fields_json.empty() ? "" : ",") +
                       "\"t\":" + json::quote(type) + ",\"nonce\":\"" +
                       hex(nonce_.data(), nonce_.size()) + "\"}";
    // HELLO cannot know the primary's nonce yet: wire.py binds it to zeros.
    const crypto::Digest mac = sign("C>S", have_peer_ ? peer_nonce_ : Nonce{}, send_seq_++, body);
    std::string msg(kMagic, sizeof kMagic);
    put_le(msg, kVersion, 2);
    put_le(msg, 0, 2);  // no fds
    put_le(msg, 1, 4);  // one payload: mac || body
    put_le(msg, kMac + body.size(), 4);
    msg.append(reinterpret_cast<const char*>(mac.data()), mac.size());
    msg += body;
    size_t off = 0;
    while (off < msg.size()) {
      wait_for(fd_.get(), POLLOUT, deadline, "send to the primary");
      const ssize_t n =
          ::send(fd_.get(), msg.data() + off, msg.size() - off, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n >= 0) off += size_t(n);
      else if (errno != EAGAIN && errno != EINTR)
        fail(errno_or_eio(), "send to the primary", "control message");
    }
  }

  // Receives and checks one message; an "error" message is thrown with the primary's errno.
  Reply recv(const Deadline& deadline, bool first) {
    uint8_t prefix[kPrefix];
    if (!read(prefix, sizeof prefix, deadline, first))
      fail(EACCES, "handover request",
           "the primary closed the connection instead of welcoming us: it refused our HELLO "
           "(another key, or our uid is not allowed)");
    if (std::memcmp(prefix, kMagic, sizeof kMagic) != 0) bad("bad message magic");
    if (get_le(prefix + 8, 2) != kVersion)
      bad("unsupported message version " + std::to_string(get_le(prefix + 8, 2)));
    const uint64_t nfds = get_le(prefix + 10, 2), npayloads = get_le(prefix + 12, 4);
    if (nfds > kMaxFds) bad("the message declares " + std::to_string(nfds) + " fds");
    if (npayloads < 1 || npayloads > kMaxPayloads)
      bad("the message declares " + std::to_string(npayloads) + " payloads, want 1.." +
          std::to_string(kMaxPayloads));
    std::vector<uint8_t> lens(size_t(npayloads) * 4);
    read(lens.data(), lens.size(), deadline, false);
    std::vector<size_t> sizes;
    size_t total = 0;
    for (size_t i = 0; i < npayloads; ++i) {
      sizes.push_back(size_t(get_le(lens.data() + 4 * i, 4)));
      total += sizes.back();  // each is < 2^32: no overflow before the check
      if (total > kMaxPayloadBytes) bad("the message declares more than 1 MiB of payloads");
    }
    std::string data(total, '\0');
    read(reinterpret_cast<uint8_t*>(data.data()), total, deadline, false);
    if (fds_received_ != nfds)
      bad("the message declares " + std::to_string(nfds) + " fds but " +
          std::to_string(fds_received_) + " arrived");
    fds_received_ = 0;
    if (sizes[0] <= kMac) bad("a control message without a signed body");
    const std::string_view all(data);
    const std::string_view mac = all.substr(0, kMac), body = all.substr(kMac, sizes[0] - kMac);

    Reply r;
    r.fields = json::parse_flat_object(body);
    const auto t = r.fields.find("t"), n = r.fields.find("nonce");
    Nonce peer{};
    if (t == r.fields.end() || t->second.kind != json::Value::Kind::string ||
        n == r.fields.end() || n->second.kind != json::Value::Kind::string ||
        !unhex(n->second.string, peer))
      bad("the body lacks its type \"t\" or a 16-byte hex \"nonce\"");
    r.type = t->second.string;
    crypto::HmacSha256 h = mac_prefix("S>C", nonce_, recv_seq_);
    size_t pos = 0;
    for (const size_t sz : sizes) {
      const std::string_view part =
          pos == 0 ? body : all.substr(pos, sz);  // payload 0 is covered without its MAC
      add_part(h, part);
      pos += sz;
    }
    const crypto::Digest want = h.finish();
    if (!crypto::digest_equal(reinterpret_cast<const uint8_t*>(mac.data()), want.data(), kMac))
      fail(EACCES, "handover request",
           "the primary's " + json::quote(r.type) +
               " failed its HMAC check (another key, a forgery, or a replay)");
    if (have_peer_ && peer != peer_nonce_)
      bad("the primary's nonce changed mid-connection (a spliced replay)");
    peer_nonce_ = peer;
    have_peer_ = true;
    ++recv_seq_;
    if (r.type == "error") {
      const auto e = r.fields.find("errno"), m = r.fields.find("message");
      const int err = e != r.fields.end() && e->second.kind == json::Value::Kind::integer &&
                              e->second.integer > 0 && e->second.integer < 4096
                          ? int(e->second.integer)
                          : EPROTO;
      fail(err, "handover request",
           "the primary refused: " +
               (m != r.fields.end() && m->second.kind == json::Value::Kind::string
                    ? m->second.string
                    : std::string("?")));
    }
    return r;
  }

 private:
  [[noreturn]] static void bad(const std::string& detail) {
    fail(EBADMSG, "handover request", "malformed control message: " + detail);
  }

  crypto::HmacSha256 mac_prefix(std::string_view dir, const Nonce& nonce, uint64_t seq) const {
    crypto::HmacSha256 h(key_);
    h.update(kLabel);
    h.update(dir);
    h.update(nonce.data(), nonce.size());
    std::string s;
    put_le(s, seq, 8);
    h.update(s);
    return h;
  }
  static void add_part(crypto::HmacSha256& h, std::string_view part) {
    std::string len;
    put_le(len, part.size(), 4);
    h.update(len);
    h.update(part);
  }
  crypto::Digest sign(std::string_view dir, const Nonce& nonce, uint64_t seq,
                      std::string_view body) const {
    crypto::HmacSha256 h = mac_prefix(dir, nonce, seq);
    add_part(h, body);
    return h.finish();
  }

  // Reads exactly n bytes. Returns false on EOF before the first byte when `eof_ok`; any other
  // EOF is ECONNRESET. fds that come along are closed at once (an operator takes none).
  bool read(uint8_t* p, size_t n, const Deadline& deadline, bool eof_ok) {
    size_t got = 0;
    while (got < n) {
      wait_for(fd_.get(), POLLIN, deadline, "receive from the primary");
      alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * kMaxFds)];
      iovec iov{p + got, n - got};
      msghdr mh{};
      mh.msg_iov = &iov;
      mh.msg_iovlen = 1;
      mh.msg_control = cbuf;
      mh.msg_controllen = sizeof cbuf;
      const ssize_t r = ::recvmsg(fd_.get(), &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        fail(errno_or_eio(), "receive from the primary", "control message");
      }
      for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          UniqueFd drop(fd);
        }
        fds_received_ += count;
      }
      if (mh.msg_flags & MSG_CTRUNC) bad("more fds than a control message may carry");
      if (r == 0) {
        if (got == 0 && eof_ok) return false;
        fail(ECONNRESET, "receive from the primary",
             "the primary closed the connection mid-message or before answering");
      }
      got += size_t(r);
    }
    return true;
  }

  UniqueFd fd_;
  std::string_view key_;
  Nonce nonce_{};
  Nonce peer_nonce_{};
  bool have_peer_ = false;
  uint64_t send_seq_ = 0;
  uint64_t recv_seq_ = 0;
  uint64_t fds_received_ = 0;
};

}  // namespace

int64_t Reply::integer(const std::string& name) const {
  const auto it = fields.find(name);
  if (it == fields.end() || it->second.kind != json::Value::Kind::integer)
    throw Error(ErrorKind::generic, "handover reply", EBADMSG,
                "the " + json::quote(type) + " reply has no integer field " + json::quote(name));
  return it->second.integer;
}

Reply request(const std::string& path, std::string_view key, std::string_view action,
              Deadline deadline, const RequestOptions& options) {
  if (action != "handover" && action != "stop" && action != "status")
    throw Error(ErrorKind::invalid_argument, "handover request", EINVAL,
                "action must be one of handover, stop, status, not " + json::quote(action));
  if (key.size() < kMinKeyBytes)
    throw Error(ErrorKind::invalid_argument, "handover request", EINVAL,
                "key must be at least " + std::to_string(kMinKeyBytes) + " bytes, got " +
                    std::to_string(key.size()));
  Connection c(connect_primary(path, deadline), key);
  // Before we sign anything: the peer must be a primary of an allowed uid.
  check_peer(c.fd(), options);
  c.send("hello", "\"role\":\"operator\",\"pid\":" + std::to_string(::getpid()), deadline);
  const Reply welcome = c.recv(deadline, true);
  if (welcome.type != "welcome")
    fail(EBADMSG, "handover request", "expected welcome, got " + json::quote(welcome.type));
  c.send("request", "\"action\":" + json::quote(action), deadline);
  return c.recv(deadline, false);
}

}  // namespace mlx5tlp::handover
