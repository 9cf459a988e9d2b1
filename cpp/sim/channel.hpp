// Host->function request channels: a bounded ring per channel, one 64-bit state word per slot,
// with claims that survive the death of the claiming process (docs/sim.md, "Request channels").
//
// Word encoding (one atomic CAS changes a slot's whole state, so a process killed between any
// two instructions leaves every slot in a state someone can take over):
//   bits  0..31  position (low 32 bits) the slot holds or waits for; position % 64 = slot index
//   bits 32..35  state: FREE (waits for the host to fill `position`), READY, CLAIMED
//   bit  36      MARKED: the claimer recorded where its answer is published (slot mark_*)
//   bit  37      REDELIVERED: a dead claimer's claim, handed to another session
//   bit  38      MARK_SELECT: which of the slot's two mark records is the current one
//   bit  39      LOGGED: the claimer logged the error the request caused (note_logged)
//   bits 40..47  claimer session slot        (CLAIMED only)
//   bits 48..63  claimer session generation  (low 16 bits; CLAIMED only)
// The host is the only producer (one device model per device) and fills positions in order; a
// slot is reused only after its claim is retired, so a claim is never overwritten and a
// position's 32 low bits name it unambiguously within the one lap a slot can be behind.
#pragma once

#include <cstddef>
#include <cstdint>

#include "state.hpp"

namespace mlx5tlp::sim {

constexpr uint32_t kSlotFree = 0, kSlotReady = 1, kSlotClaimed = 2;
constexpr uint64_t kWordMarked = uint64_t(1) << 36;
constexpr uint64_t kWordRedelivered = uint64_t(1) << 37;
constexpr uint64_t kWordMarkSelect = uint64_t(1) << 38;
constexpr uint64_t kWordLogged = uint64_t(1) << 39;

inline uint32_t slot_pos32(uint64_t w) { return uint32_t(w); }
inline uint32_t slot_state(uint64_t w) { return uint32_t(w >> 32) & 0xf; }
inline uint32_t slot_session(uint64_t w) { return uint32_t(w >> 40) & 0xff; }
inline uint32_t slot_session_gen16(uint64_t w) { return uint32_t(w >> 48); }
inline uint64_t slot_word(uint64_t pos, uint32_t state) {
  return uint64_t(uint32_t(pos)) | (uint64_t(state) << 32);
}
inline uint64_t claimed_word(uint64_t pos, uint32_t session, uint32_t gen, uint64_t flags) {
  return slot_word(pos, kSlotClaimed) | flags | (uint64_t(session & 0xff) << 40) |
         (uint64_t(gen & 0xffff) << 48);
}
// The same claim, ignoring its flags.
inline bool same_claim(uint64_t a, uint64_t b) {
  const uint64_t flags = kWordMarked | kWordRedelivered | kWordMarkSelect | kWordLogged;
  return (a & ~flags) == (b & ~flags);
}

// Host side (one producer). EAGAIN when the slot for the next position is not yet retired.
int channel_push(RequestChannel& ch, const void* data, size_t len);
// The check word of a mark record for the claim at `pos` (FNV-1a over the position and the
// fields; not a MAC: it catches damage and records of another claim, not forgery).
uint32_t mark_check(uint64_t pos, const MarkRecord& m);
// A new epoch: every slot becomes FREE for the positions from the current head on; requests
// queued (*ready) or claimed (*claimed) in the previous epoch are discarded; their claims
// become stale. Safe against concurrent claimers (each slot changes by one CAS).
void channel_reset(RequestChannel& ch, uint32_t* ready, uint32_t* claimed);
// Requests waiting to be claimed / claimed and not yet retired.
uint32_t channel_count(const RequestChannel& ch, uint32_t state);

// Waking functions blocked in mlx5tlp_sim_function_wait (the req_wake word, state.hpp). The
// host calls request_pushed() after every successful push: a fence and one load, plus a CAS
// and a FUTEX_WAKE only when a function said it waits. Dekker pair with the waiter, which sets
// the flag, fences, then looks for READY slots before it sleeps: either the waiter sees the
// request or the pusher sees the flag.
constexpr uint32_t kReqWaiting = 1u << 31;
void request_pushed(DeviceState& st);
void wake_request_waiters(DeviceState& st);

}  // namespace mlx5tlp::sim
