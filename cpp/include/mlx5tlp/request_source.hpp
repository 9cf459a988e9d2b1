// mlx5tlp/request_source.hpp — where an emulated function's request TLPs come from.
//
// The engine (engine.hpp) takes requests from a RequestSource in batches, answers them through
// a Gateway (completions), and tells the source what became of each one:
//   take(out, n, deadline)  blocks (futex, never a sleep loop) until at least one request is
//                           there, the deadline passes, or wake() is called; fills up to n.
//   mark(r, page_id, seq, before, after)
//                           "the first `before` bytes of the answer to r are published; the
//                           first `after` (kProgressAll: all of it) once gateway page page_id's
//                           doorbell count reaches seq" — called before that doorbell is rung,
//                           again before each doorbell of an answer the page cannot hold at
//                           once (the unit is the engine's: bytes of the read's DW range);
//   retire(r)               r is finished (answered, or posted and handled): it is gone;
//   recover(out, n)         the requests a dead predecessor claimed and did not retire, each
//                           exactly once, with its mark (a successor calls it before it writes
//                           to the predecessor's gateway pages, see docs/sim.md).
// A request stays claimed from take() until retire(): if the process dies in between, the next
// claimer gets it again (flag kRedelivered), so nothing is lost and — with the mark — nothing
// is answered twice.
//
// This is one of the two seams where the non-public parts of mlx5 TLP emulation plug in (the
// other is GatewayLayout, for where completions go). How request TLPs reach software on real
// mlx5 hardware is not public: NVIDIA's DOCA wraps it in its TLP channel API. No hardware
// source ships; SimRequestSource reads the software device's request channels, whose
// claim/mark/retire protocol is the software device's own (docs/sim.md, "Request channels").
//
// Ownership: a source owns the buffer its requests point into; a Request's bytes are valid
// until the next take() or recover() on the same source. Thread-safety: one thread calls
// take/recover/mark/retire (the engine lane that owns the source); wake() from any thread.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "mlx5tlp/context.hpp"
#include "mlx5tlp/deadline.hpp"

namespace mlx5tlp {

// Request::flags
inline constexpr uint32_t kRequestRedelivered = 1u << 0;  // a dead claimer's request, now ours
inline constexpr uint32_t kRequestMarked = 1u << 1;       // it marked it answered (mark_page/seq)
inline constexpr uint32_t kRequestPublished = 1u << 2;    // ...and that answer reached the host
inline constexpr uint32_t kRequestPageGone = 1u << 3;     // ...but the page was freed since
inline constexpr uint32_t kRequestPartial = 1u << 4;      // ...part of it did: Request::progress
inline constexpr uint32_t kRequestLogged = 1u << 5;       // it logged the request's error (note_logged)
inline constexpr uint32_t kProgressAll = 0xffffffffu;     // mark(): the whole answer

struct Request {
  const uint8_t* tlp = nullptr;  // the request TLP (into the source's buffer)
  uint32_t len = 0;
  uint32_t channel = 0;          // the source's queue it came from
  uint64_t claim = 0;            // the source's id for mark/retire
  uint32_t flags = 0;            // kRequest*
  uint32_t mark_page = 0;        // a redelivered request's mark
  uint64_t mark_seq = 0;
  uint32_t progress = 0;         // a marked one's answer the host has for certain (mark units)
};

class RequestSource {
 public:
  virtual ~RequestSource() = default;
  virtual const char* name() const noexcept = 0;
  // Blocks until a request is there (returns how many it put into out[0, n)), the deadline
  // passes or wake() was called (returns 0). Throws Error for a source that failed.
  virtual size_t take(Request* out, size_t n, Deadline deadline) = 0;
  // 0 or an errno: ESTALE (the request was discarded meanwhile — a new host epoch), EPERM,
  // EINVAL (before > after). A new mark replaces the previous one atomically.
  virtual int mark(const Request& r, uint32_t page_id, uint64_t seq, uint32_t before,
                   uint32_t after) noexcept = 0;
  virtual int retire(const Request& r) noexcept = 0;
  // Records that the error `r` caused was logged (PCIe Base 6.x §6.2.5: one detection, one
  // log and one Message), so that a successor it is redelivered to (kRequestLogged) does not
  // log it again. 0 or an errno as mark(); ENOTSUP for a source that cannot carry it (its
  // redeliveries are then logged again: at least once, never lost).
  virtual int note_logged(const Request& r) noexcept {
    (void)r;
    return ENOTSUP;
  }
  // Every request a dead claimer left, now ours (flag kRedelivered), up to n; 0 when none.
  virtual size_t recover(Request* out, size_t n) = 0;
  // Makes a blocked (or the next) take() return 0 soon. Any thread; may wake other waiters of
  // the same device too (they look and wait again).
  virtual void wake() noexcept = 0;
};

// The software device's request channels (mlx5tlp_sim_function_claim / _mark / _retire /
// _recover, blocking in mlx5tlp_sim_function_wait). `channels`: bit c takes channel c.
// `batch_max`: most requests one take() returns (its buffer is preallocated: batch_max *
// 4112 bytes). `spin`: how long take() polls before it blocks in the futex (latency at low
// load against CPU when idle). Errors: Error(invalid_argument) for an empty/out-of-range
// channel mask or a context of another backend.
class SimRequestSource final : public RequestSource {
 public:
  SimRequestSource(std::shared_ptr<Context> ctx, uint32_t channels, size_t batch_max = 64,
                   std::chrono::nanoseconds spin = std::chrono::microseconds(20));
  const char* name() const noexcept override { return "sim"; }
  size_t take(Request* out, size_t n, Deadline deadline) override;
  int mark(const Request& r, uint32_t page_id, uint64_t seq, uint32_t before,
           uint32_t after) noexcept override;
  int retire(const Request& r) noexcept override;
  int note_logged(const Request& r) noexcept override;
  size_t recover(Request* out, size_t n) override;
  void wake() noexcept override;

  uint32_t channels() const noexcept { return mask_; }
  static constexpr size_t kMaxRequest = 16 + 4096;  // 4DW header + 1024 DW
  // How long one futex wait lasts at most: claims of dead claimers are not announced, so an
  // idle source looks for them this often.
  static constexpr std::chrono::milliseconds kWaitCap{50};

 private:
  size_t claim_some(m5a_ibv_context* raw, Request* out, size_t n, bool recover);
  template <typename Fn>
  int on_claim(const Request& r, Fn&& fn) noexcept;

  std::shared_ptr<Context> ctx_;
  const SimSymbols* sym_;
  uint32_t mask_;
  size_t batch_max_;
  std::chrono::nanoseconds spin_;
  std::vector<uint8_t> buf_;
  uint32_t next_channel_ = 0;
  std::atomic<bool> woken_{false};
};

}  // namespace mlx5tlp
