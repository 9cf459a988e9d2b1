// SimRequestSource: the software device's request channels as a RequestSource.
//
// take() claims across its channels round robin (each claim: a few atomic loads and one CAS in
// the shared state, no system call), then, when nothing is there, polls for `spin` and then
// blocks in mlx5tlp_sim_function_wait (a shared futex the host's push wakes).
#include "mlx5tlp/request_source.hpp"

#include <cerrno>
#include <string>

#include "mlx5tlp/error.hpp"
#include "mlx5tlp/sim_abi.h"

namespace mlx5tlp {

namespace {

[[noreturn]] void sim_fail(const SimSymbols& s, const char* op, int err) {
  char why[512] = {0};
  if (s.last_error != nullptr) s.last_error(why, sizeof why);
  throw_errno(op, err, false, why);
}

}  // namespace

SimRequestSource::SimRequestSource(std::shared_ptr<Context> ctx, uint32_t channels, size_t batch_max,
                                   std::chrono::nanoseconds spin)
    : ctx_(std::move(ctx)), sym_(nullptr), mask_(channels), batch_max_(batch_max), spin_(spin) {
  if (!ctx_) throw Error(ErrorKind::invalid_argument, "open request source", EINVAL, "no context");
  if (ctx_->backend() != Backend::sim)
    throw Error(ErrorKind::invalid_argument, "open request source", EINVAL,
                "the sim request source needs a software-device context, not " +
                    std::string(to_string(ctx_->backend())) +
                    " (how requests reach software on mlx5 hardware is not public)");
  if (channels == 0 || channels > 0xff)
    throw Error(ErrorKind::invalid_argument, "open request source", EINVAL,
                "channels: mask " + std::to_string(channels) + " must name channels 0..7 (bit c: channel c)");
  if (batch_max == 0 || batch_max > 1024)
    throw Error(ErrorKind::invalid_argument, "open request source", EINVAL,
                "batch_max: " + std::to_string(batch_max) + " is not 1..1024");
  sym_ = &ctx_->lib().sym().sim;
  ctx_->lib().need(sym_->function_claim, "mlx5tlp_sim_function_claim");
  ctx_->lib().need(sym_->function_wait, "mlx5tlp_sim_function_wait");
  ctx_->lib().need(sym_->function_mark_progress, "mlx5tlp_sim_function_mark_progress@" M5A_SIM_VERSION_NODE_1_1);
  ctx_->lib().need(sym_->function_note_logged, "mlx5tlp_sim_function_note_logged@" M5A_SIM_VERSION_NODE_1_2);
  buf_.resize(batch_max_ * kMaxRequest);
}

size_t SimRequestSource::claim_some(m5a_ibv_context* raw, Request* out, size_t n, bool recover) {
  if (n > batch_max_) n = batch_max_;
  size_t got = 0;
  uint32_t idle = 0;  // channels in a row that had nothing
  for (uint32_t c = next_channel_; got < n && idle < 8; c = (c + 1) & 7) {
    if ((mask_ >> c & 1u) == 0) {
      ++idle;
      continue;
    }
    uint8_t* slot = buf_.data() + got * kMaxRequest;
    m5a_sim_claim_info info{};
    const ssize_t len = recover ? sym_->function_recover(raw, c, slot, kMaxRequest, &info)
                                : sym_->function_claim(raw, c, slot, kMaxRequest, &info);
    if (len < 0) sim_fail(*sym_, recover ? "recover request" : "claim request", int(-len));
    if (len == 0) {
      ++idle;
      continue;
    }
    idle = 0;
    Request& r = out[got++];
    r.tlp = slot;
    r.len = uint32_t(len);
    r.channel = c;
    r.claim = info.claim;
    r.flags = 0;
    if (info.flags & M5A_SIM_CLAIM_REDELIVERED) r.flags |= kRequestRedelivered;
    if (info.flags & M5A_SIM_CLAIM_MARKED) r.flags |= kRequestMarked;
    if (info.flags & M5A_SIM_CLAIM_PUBLISHED) r.flags |= kRequestPublished;
    if (info.flags & M5A_SIM_CLAIM_PAGE_GONE) r.flags |= kRequestPageGone;
    if (info.flags & M5A_SIM_CLAIM_PARTIAL) r.flags |= kRequestPartial;
    if (info.flags & M5A_SIM_CLAIM_LOGGED) r.flags |= kRequestLogged;
    r.mark_page = info.page_id;
    r.mark_seq = info.seq;
    r.progress = info.progress;
    next_channel_ = (c + 1) & 7;  // the next take starts after the last channel served
  }
  return got;
}

size_t SimRequestSource::take(Request* out, size_t n, Deadline deadline) {
  if (n == 0) return 0;
  const auto spin_until = Deadline::after(spin_).earliest(deadline);
  for (;;) {
    // acquire: pairs with wake()'s release (nothing to publish; the flag is the message).
    if (woken_.exchange(false, std::memory_order_acq_rel)) return 0;
    {
      Context::Use u(*ctx_);
      const size_t got = claim_some(u.get(), out, n, false);
      if (got != 0) return got;
      if (!spin_until.expired()) continue;
      if (deadline.expired()) return 0;
      const auto left = deadline.remaining();
      const int64_t ns = left < kWaitCap ? left.count() : std::chrono::nanoseconds(kWaitCap).count();
      // Blocking point: a shared futex the host's push (or wake()) wakes; at most kWaitCap.
      const int rc = sym_->function_wait(u.get(), mask_, ns);
      if (rc != 0 && rc != ETIMEDOUT) sim_fail(*sym_, "wait for requests", rc);
    }
  }
}

// One claim operation of the device, fn(raw context, channel, claim) -> 0 or an errno: EBADF
// once the context was closed (Context::Use throws then; these are called from noexcept lane
// code that maps any non-zero to "stale").
template <typename Fn>
int SimRequestSource::on_claim(const Request& r, Fn&& fn) noexcept {
  try {
    Context::Use u(*ctx_);
    return fn(u.get(), r.channel, r.claim);
  } catch (...) {
    return EBADF;
  }
}

int SimRequestSource::mark(const Request& r, uint32_t page_id, uint64_t seq, uint32_t before,
                           uint32_t after) noexcept {
  return on_claim(r, [&](m5a_ibv_context* c, uint32_t ch, uint64_t claim) {
    return sym_->function_mark_progress(c, ch, claim, page_id, seq, before, after);
  });
}

int SimRequestSource::retire(const Request& r) noexcept { return on_claim(r, sym_->function_retire); }

int SimRequestSource::note_logged(const Request& r) noexcept {
  return on_claim(r, sym_->function_note_logged);
}

size_t SimRequestSource::recover(Request* out, size_t n) {
  Context::Use u(*ctx_);
  return claim_some(u.get(), out, n, true);
}

void SimRequestSource::wake() noexcept {
  woken_.store(true, std::memory_order_release);  // release: seen by take()'s exchange
  try {
    Context::Use u(*ctx_);
    sym_->function_wake(u.get());
  } catch (...) {
    // A closed context: take() fails on its own next call.
  }
}

}  // namespace mlx5tlp
