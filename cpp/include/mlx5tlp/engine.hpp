// mlx5tlp/engine.hpp — serves an emulated PCIe function: requests in, completions out.
//
// One Engine per function. It has one lane per gateway page: a thread that is that page's one
// committer, taking requests from its RequestSource in batches and doing, per batch:
//   take -> decode (tlp::decode) -> route -> region / config space / MSI-X -> build completions
//   (tlp::build_completions, Max_Payload_Size and RCB from the function's config space) ->
//   mark each answered request in the source -> write the batch to the gateway (one doorbell)
//   -> retire.
// No allocation, lock or system call per request on the native paths (memory regions, plain
// registers, config reads): buffers are preallocated per lane; the function model is read
// through a per-lane snapshot of configuration space that is refreshed when a configuration
// write (any lane, or the device side) bumps a generation counter. Idle lanes block in the
// source (a futex), never sleep.
//
// Routing (PCIe Base 6.x):
//   MRd / MWr      decode_memory: a BAR hit with Memory Space Enable set (and D0) -> the MSI-X
//                  table / PBA (Function::msix_*) or the one region containing the access; else
//                  Unsupported Request (§7.5.1.1.3 Table 7-4; posted writes get no completion,
//                  they are counted as unsupported). MWr: posted, no completion (§2.2.7).
//   IORd / IOWr    decode_io the same way; both non-posted (a Cpl for IOWr).
//   CfgRd0/CfgWr0  the Function's configuration space (one DW, First DW BE); the function
//                  captures its Bus and Device Numbers from every CfgWr0 it completes
//                  (§2.2.6.2) and uses them as Completer ID. A function number other than 0 is
//                  not this single-function device: UR.
//   CfgRd1/CfgWr1  UR: an Endpoint is not a bridge (§7.3.3: Type 1 requests are for bridges).
//   MRdLk          UR with a CplLk: "Locked Memory Read Requests ... an Endpoint ... must treat
//                  as UR" (§2.3.1, Request Handling Rules; only Legacy Endpoints lock).
//   Msg / MsgD     accepted and counted (posted, no completion).
//   Cpl*           an Unexpected Completion (the function issues no requests but MSI-X
//                  writes): discarded and counted (§2.3.2).
//   malformed      no completion (a Malformed TLP is a fatal error, §2.3.1), counted.
//   poisoned (EP)  writes (MWr, IOWr, CfgWr) are discarded, never applied (§2.7.2.2): UR (a
//                  Cpl for IOWr/CfgWr; MWr is posted: counted in unsupported_posted too).
// Hooked registers and callback regions go to the BatchHandler (the Python bindings) once per
// batch; a callback read that is not answered in the call is deferred: it stays claimed in the
// source until Engine::complete_deferred() / fail_deferred() from any thread, or until its
// deadline, when the engine answers Completer Abort and counts it as expired.
//
// Lifecycle: start() -> running; pause() -> lanes stop taking requests and finish what they
// hold (written to the page: the direct-mode gateway write returns once the records are in
// the page and the doorbell rung); deferred requests stay deferred and can still be
// answered. resume(). stop(): lanes end; deferred requests still open are answered CA.
// release_gateways() (paused only) closes every lane's gateway (its page committer lock goes:
// a successor may open them), reattach_gateways() opens new ones on the same pages.
//
// Thread-safety: all public methods from any thread (start/pause/resume/stop/release/
// reattach serialised by one control mutex). The Engine must outlive nothing: it joins its
// lanes in stop() and in its destructor.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mlx5tlp/function.hpp"
#include "mlx5tlp/gateway.hpp"
#include "mlx5tlp/regions.hpp"
#include "mlx5tlp/request_source.hpp"
#include "mlx5tlp/tlp.hpp"

namespace mlx5tlp {

// One hooked-register or callback access handed to the BatchHandler.
struct BatchItem {
  Region* region = nullptr;
  uint32_t region_index = 0;
  uint64_t offset = 0;        // region-relative, DW aligned
  uint32_t len = 0;           // bytes (Length * 4)
  uint8_t first_be = 0, last_be = 0;
  tlp::Kind kind = tlp::Kind::MRd;  // MRd, MWr, IORd, IOWr
  bool write = false;
  uint16_t requester_id = 0, tag = 0;
  const uint8_t* data = nullptr;  // writes: the payload (valid during the call)
  uint8_t* out = nullptr;         // reads: len bytes to fill when answering in the call
  // Set by the handler:
  bool answered = false;          // reads: out holds the data (or status says why not)
  uint8_t status = 0;             // tlp::CplStatus: SC, UR or CA
  // A read left unanswered is deferred under this id (valid when the handler runs).
  uint64_t deferred_id = 0;
};

// Implemented by the Python bindings: one call per lane batch (one GIL acquisition).
class BatchHandler {
 public:
  virtual ~BatchHandler() = default;
  // Runs the hooks/callbacks for items[0, n) in request order; must not throw.
  virtual void run(BatchItem* items, size_t n) noexcept = 0;
};

struct EngineOptions {
  size_t batch = 32;              // requests per take at most (1..1024)
  size_t deferred_max = 1024;     // deferred requests per lane at most (more: answered CA)
  size_t trace_entries = 0;       // TLP trace ring per lane (0: no trace); a power of two
  uint16_t completer_id = 0;      // until the first CfgWr0 gives the Bus/Device Numbers
  // Optional, in caller (shared) memory: the captured Completer ID + 1 (0: none captured yet),
  // stored at every capture and read at construction, so that a successor process answers
  // with the Bus/Device Numbers its predecessor captured (§2.2.6.2; docs/handover.md).
  std::atomic<uint32_t>* completer_word = nullptr;
};

// What one lane (or, summed, the engine) did. Counters only grow.
struct RegionCounters {
  uint64_t reads = 0, writes = 0, read_bytes = 0, write_bytes = 0, batched = 0;
  bool backing_lost = false;  // Region::backing_lost(): its file was truncated while served
};
inline constexpr size_t kLatencyBuckets = 40;  // bucket b: [2^b, 2^(b+1)) ns; last: above

struct EngineStats {
  std::array<uint64_t, tlp::kKindCount> requests{};  // by tlp::Kind
  uint64_t batches = 0;
  uint64_t completions = 0;       // completion TLPs written
  uint64_t ur = 0, ca = 0;        // requests answered Unsupported Request / Completer Abort
  uint64_t unsupported_posted = 0;  // posted writes to nothing (UR, no completion: dropped)
  uint64_t malformed = 0;         // could not decode: no completion
  uint64_t poisoned = 0;          // poisoned (EP) writes discarded: UR (§2.7.2.2)
  uint64_t unexpected_completions = 0;
  uint64_t messages = 0;
  uint64_t redelivered = 0;       // requests a dead claimer left (recover / redelivery)
  uint64_t already_published = 0;  // ...whose answer had reached the host: retired only
  uint64_t partly_published = 0;   // ...whose answer had partly reached it: the rest answered
  uint64_t stale = 0;             // mark/retire found the request discarded (a new host epoch)
  uint64_t deferred = 0, deferred_completed = 0, deferred_expired = 0, deferred_outstanding = 0;
  uint64_t handler_batches = 0;   // BatchHandler calls
  uint64_t interrupts = 0;        // MSI-X messages written
  uint64_t config_writes = 0;
  // Error Messages (ERR_COR / ERR_NONFATAL / ERR_FATAL) the function's enables and masks
  // called for after logging an error (§6.2.5): not sent — this engine sends no error Messages.
  uint64_t err_cor_unsent = 0, err_nonfatal_unsent = 0, err_fatal_unsent = 0;
  // Errors of redelivered requests not logged again: their dead claimer had logged them
  // (kRequestLogged; PCIe Base 6.x §6.2.5, one detection, one log and Message).
  uint64_t errors_logged_before = 0;
  std::array<uint64_t, kLatencyBuckets> latency_ns_log2{};  // take -> in the page, per request
  std::vector<RegionCounters> regions;  // by region index
};

// A trace entry (64 bytes, little-endian in a dump; docs/engine.md "Trace format").
struct TraceEntry {
  uint64_t time_ns;     // CLOCK_MONOTONIC when the request was taken
  uint64_t address;     // memory / IO address; Cfg: register byte address
  uint32_t lane;
  uint16_t requester_id;
  uint16_t tag;
  uint16_t length_dw;
  uint8_t kind;         // tlp::Kind (0xff: malformed)
  uint8_t status;       // CplStatus answered; 0xfe: posted (no completion); 0xfd: deferred
  uint8_t first_be, last_be;
  uint8_t completions;  // completion TLPs written
  uint8_t region;       // region index + 1, 0: none
  uint32_t latency_ns;  // take -> in the page (saturating)
  uint8_t header[16];   // the request's header bytes as received
  uint8_t reserved[8];
};
static_assert(sizeof(TraceEntry) == 64, "the documented trace entry is 64 bytes");
inline constexpr uint32_t kTraceMagic = 0x5254354d;  // "M5TR"
inline constexpr uint16_t kTraceVersion = 1;

class Engine {
 public:
  // `state`: the function's state in caller memory (shared memory for handover), or nullptr
  // (the engine owns it); `adopt` keeps a predecessor's state there. Regions must lie inside
  // their BARs and not overlap each other or the MSI-X table/PBA: Error(invalid_argument)
  // naming the region. The sink delivers MSI-X messages (nullptr: the engine's own, which
  // writes them as MWr TLPs into lane 0's gateway page — the software device's host model
  // counts them; on hardware the mechanism is not public).
  Engine(std::shared_ptr<const pci::FunctionLayout> layout, std::vector<std::shared_ptr<Region>> regions,
         const EngineOptions& options = {}, pci::FunctionState* state = nullptr,
         pci::Function::Adopt adopt = pci::Function::Adopt::reset);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Before start(): one lane per gateway page. The gateway must be a direct-mode gateway (the
  // lane is its one writer) whose records hold a 128-byte completion payload.
  void add_lane(std::shared_ptr<Gateway> gateway, std::unique_ptr<RequestSource> source);
  // Before start(): a lane on `var`'s page whose gateway attach_gateways() opens later, so that
  // a successor builds its engine (buffers, source) while its predecessor still commits to
  // the pages, and opens only the gateways once they are released (docs/handover.md).
  void add_detached_lane(std::shared_ptr<Var> var, std::unique_ptr<RequestSource> source);
  // Before start(): open a direct gateway for every detached lane and spawn the lane threads,
  // parked until start() (which then only wakes them). Error(EBUSY) while another process
  // holds a page's committer lock; start() refuses a lane without a gateway.
  void attach_gateways();
  // Before start(): serve from `st` (a predecessor's, in shared memory: validated as
  // Function Adopt::keep) instead of the state the engine was built with, and keep the
  // captured Completer ID in `completer_word` (may be null). With add_detached_lane() and
  // attach_gateways() this lets a successor build everything while its predecessor still
  // serves, and adopt the state only once the predecessor has paused.
  void adopt_state(pci::FunctionState* st, std::atomic<uint32_t>* completer_word);
  void set_batch_handler(BatchHandler* handler) noexcept;  // before start()

  void start();
  // Stop taking requests, finish the ones taken; true once every lane is idle (false at the
  // deadline, the engine still pausing: call again or resume()).
  bool pause(Deadline deadline);
  // Paused, or still pausing after a pause() that timed out: serve again.
  void resume();
  void stop() noexcept;
  // Paused only: close every lane's gateway (a successor may then open the pages) /
  // open new direct gateways on the same VARs. Error(invalid_argument, EBUSY) otherwise.
  void release_gateways(std::chrono::nanoseconds drain_timeout);
  void reattach_gateways();
  // Paused only: wait until no deferred request is open — each answered by its region
  // (complete_deferred / fail_deferred from any thread) or, at its deadline, Completer Abort,
  // and published. A planned handover calls it before release_gateways(): a living process's
  // claims cannot move to a successor, so what it deferred must be finished here. True once
  // none is open, false at the deadline (still paused). Error(invalid_argument, EBUSY) if not
  // paused.
  bool drain_deferred(Deadline deadline);
  // CLOCK_MONOTONIC ns of the first request answered (in the page and retired) since the last
  // start() / resume() / reattach_gateways(), the earliest over the lanes; 0: none yet.
  uint64_t first_answer_ns() const noexcept;
  // Requests answered so far (the sum of stats().latency_ns_log2), without building the
  // stats: a planned handover's pause reads it.
  uint64_t answered() const noexcept;
  // Blocks until first_answer_ns() is not 0, the deadline passes or the engine is stopped
  // (stop() from another thread wakes it); returns it (0: none by the deadline / stopped). A successor's control thread waits here after start() so that the lanes,
  // not its own bookkeeping, get the CPU for the first answers of a handover.
  uint64_t wait_first_answer(Deadline deadline) const noexcept;
  const char* state() const noexcept;  // "created", "running", "paused", "stopped"
  // Lean taking (a pause is coming: a planned handover was asked for): each lane takes no more
  // requests than its gateway page can take now (at least one), instead of a whole batch, so
  // that a request it claimed waits in the lane only while the page is busy and the coming
  // pause() waits for the host to consume little. Cleared by start() and set_lean(false) (a
  // handover that rolls back clears it before resume()). Any thread; a hint: what was taken
  // is answered either way.
  void set_lean(bool on) noexcept;

  // Deferred reads (BatchItem::deferred_id): answer with data (exactly the read's len bytes)
  // or a status (UR/CA). 0, or ENOENT (unknown / already answered / expired), EINVAL (bad
  // length or status). Any thread.
  int complete_deferred(uint64_t id, const uint8_t* data, size_t len) noexcept;
  int fail_deferred(uint64_t id, uint8_t status) noexcept;

  EngineStats stats() const;
  size_t lanes() const noexcept;
  // The trace of every lane, oldest first per lane; written to `path` in the documented
  // format (throws Error naming the path). Returns the entries written.
  size_t trace_dump(const std::string& path) const;

  // The function model, serialised with the lanes' configuration and MSI-X accesses.
  uint32_t config_read(uint16_t dw_offset) const;
  void config_write(uint16_t dw_offset, uint32_t value, uint8_t byte_enables);  // as a CfgWr0
  void device_write(uint16_t offset, unsigned width, uint64_t value);  // the function's own update
  std::vector<uint8_t> config_bytes() const;
  pci::RaiseResult raise_msix(uint16_t vector) noexcept;
  bool msix_pending(uint16_t vector) const noexcept;
  uint16_t completer_id() const noexcept;
  const pci::FunctionLayout& layout() const noexcept;
  const std::vector<std::shared_ptr<Region>>& regions() const noexcept;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Reads a trace file written by Engine::trace_dump (throws Error naming the problem).
std::vector<TraceEntry> read_trace(const std::string& path);

}  // namespace mlx5tlp
