// mlx5tlp/handover_client.hpp — the operator's side of the control socket, for native callers.
//
// request() does what mlx5tlp.handover.request() does in Python, on the same wire protocol
// (docs/handover.md): connect the primary's UNIX stream socket (retrying while nobody listens,
// as a successor may be binding it), check the primary's SO_PEERCRED uid, send HELLO with a
// fresh 16-byte nonce, check the WELCOME's HMAC-SHA256 (bound to our nonce, seq 0), send the
// REQUEST (bound to the primary's nonce, seq 1) and return the checked reply's fields.
//
// Errors are mlx5tlp::Error with the errno:
//   EINVAL     unknown action, key shorter than kMinKeyBytes, path too long;
//   ENOENT / ECONNREFUSED   no primary listens at `path` until the deadline;
//   ENOENT     (from the primary) no standby is connected and ready for "handover";
//   ECANCELED  the handover rolled back (the old primary serves again);
//   EACCES     the primary's uid is not allowed, its reply failed the HMAC check, or it closed
//              the connection instead of welcoming us (it refuses a HELLO under another key);
//   EBADMSG    a malformed message (framing, body, nonce, sequence);
//   ETIMEDOUT  the deadline passed; any other errno the primary sends or a socket call fails.
//
// Thread-safety: request() shares nothing between calls; call it from any thread.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

#include "mlx5tlp/deadline.hpp"
#include "mlx5tlp/flat_json.hpp"

namespace mlx5tlp::handover {

constexpr size_t kMinKeyBytes = 16;  // wire.MIN_KEY_BYTES

struct Reply {
  std::string type;     // "status", "stopped" or "handed-over"
  json::Object fields;  // all of the body's fields, including "t" and "nonce"

  // The integer field `name`; Error(EBADMSG) naming it when missing or not an integer.
  int64_t integer(const std::string& name) const;
};

struct RequestOptions {
  // uids the primary may run as; empty: only our own (the Python side's default).
  std::vector<uid_t> allow_uids;
};

// Sends one operator request ("handover", "stop" or "status") to the primary at `path`,
// signed with `key` (bytes), and returns its answer once it arrives, all before `deadline`.
// "handover" returns fields generation (the new one) and successor (its pid) once committed.
Reply request(const std::string& path, std::string_view key, std::string_view action,
              Deadline deadline, const RequestOptions& options = {});

}  // namespace mlx5tlp::handover
