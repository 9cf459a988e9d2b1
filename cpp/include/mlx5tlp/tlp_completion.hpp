// mlx5tlp/tlp_completion.hpp — completions for decoded non-posted requests.
//
// Rules from the PCIe Base Specification: §2.2.9 "Completion Rules" (Completion header fields,
// Byte Count and Lower Address for non-memory completions) and §2.3.1.1 "Data Return for Read
// Requests" (Byte Count / Lower Address calculation from the byte enables, splitting a read
// into several completions at the Read Completion Boundary, Max_Payload_Size).
//
// Nothing here allocates or throws; completions are written into caller-provided memory.
// Thread-safety: pure functions over caller-owned memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "mlx5tlp/tlp.hpp"

namespace mlx5tlp::tlp {

struct CompletionParams {
  uint16_t completer_id = 0;
  uint16_t max_payload = 256;  // Max_Payload_Size in bytes: power of two, 128..4096
  uint16_t rcb = 64;           // Read Completion Boundary in bytes: 64 or 128
  uint8_t status = 0;          // CplStatus: SC, UR, CRS (Configuration Requests only) or CA
};

// Most completions one request can produce (a 4 KiB read split at every 64-byte boundary).
inline constexpr size_t kMaxCompletions = 4096 / 64 + 1;

// Byte Count of a whole memory read (§2.3.1.1, byte enables table): from the first enabled
// byte of the first DW to the last enabled byte of the last DW; 1 for a zero-length read.
uint16_t read_byte_count(const Tlp& req) noexcept;
// Byte offset (0..3) of the first enabled byte in the first DW (0 when First DW BE is 0000b).
uint8_t first_enabled_offset(const Tlp& req) noexcept;
// Bytes of `data` the completion(s) for `req` with `status` need: Length * 4 for an SC read
// (MRd, MRdLk, IORd, CfgRd0, CfgRd1), 0 otherwise.
size_t completion_data_bytes(const Tlp& req, uint8_t status) noexcept;

// Completion headers for `req` into out[0, *count) (payload pointers point into `data`).
// `data` holds the request's whole DW-aligned range (completion_data_bytes() bytes) as read
// from the target. Memory read data is split so that every completion except the last ends on
// an RCB-aligned address, each payload is at most max_payload bytes, and each Byte Count is
// the number of bytes still to be returned. Returns Status::no_completion for posted requests
// and completions, and the request's own validation failure if it breaks a field rule.
Status plan_completions(const Tlp& req, const uint8_t* data, size_t data_len,
                        const CompletionParams& p, Tlp* out, size_t cap, size_t* count) noexcept;

// plan_completions() then encode() of each completion, back to back, into out[0, out_cap).
// ends[i] is the end offset (exclusive) of completion i; *count completions, *out_len bytes.
Status build_completions(const Tlp& req, const uint8_t* data, size_t data_len,
                         const CompletionParams& p, uint8_t* out, size_t out_cap,
                         size_t* out_len, uint32_t* ends, size_t ends_cap,
                         size_t* count) noexcept;

// ---- bulk: many requests in one call (the gateway path) ----
//
// Input: request TLPs concatenated back to back (each sized by record_size()). Data: for every
// request whose header is a read (MRd, MRdLk, IORd, CfgRd0/1) and whose completion status is
// SC, Length * 4 bytes (Length from its header), concatenated in request order; a read that is
// rejected still consumes its share so that later requests stay aligned.

struct BulkSizes {
  size_t requests = 0;         // records in the input
  size_t max_completions = 0;  // upper bound on completions
  size_t max_bytes = 0;        // upper bound on output bytes
};
// Walk the input and size the output. truncated_header / truncated_payload when the input
// does not end on a record boundary; bad_rcb for a bad rcb.
Status bulk_measure(const uint8_t* reqs, size_t len, const CompletionParams& p,
                    BulkSizes* out) noexcept;

struct BulkOutput {
  uint8_t* buf = nullptr;            // >= max_bytes bytes: completions back to back
  size_t buf_cap = 0;
  uint32_t* offsets = nullptr;       // >= max_completions + 1: completion k is
  size_t offsets_cap = 0;            //   buf[offsets[k], offsets[k + 1])
  uint32_t* request_first = nullptr; // requests + 1: request i's completions are
                                     //   [request_first[i], request_first[i + 1])
  uint8_t* errors = nullptr;         // requests: Status per request (ok, or why none was built)
  size_t requests_cap = 0;           // entries of errors (request_first holds one more)
  size_t completions = 0;            // results
  size_t bytes = 0;
  size_t data_used = 0;
};
// Build completions for every request. `statuses` (nullable) gives one CplStatus per request
// (n_statuses must equal the request count), else p.status applies to all. MWr requests
// produce nothing with errors[i] == ok; other requests that get no completion record the
// reason in errors[i] and produce nothing. Whole-call failures: the measure failures,
// field_out_of_range (statuses count), data_length_mismatch (data not exactly consumed),
// output_too_small (every output write is bounded by its capacity, so input that changed
// since bulk_measure cannot overflow a buffer sized from it).
Status bulk_build(const uint8_t* reqs, size_t len, const uint8_t* data, size_t data_len,
                  const uint8_t* statuses, size_t n_statuses, const CompletionParams& p,
                  BulkOutput* out) noexcept;

// Owned output storage for bulk_build, sized from bulk_measure. The codec itself never
// allocates; this is the convenience for callers that do not manage their own buffers.
// Reuse one across calls: bind() only grows the vectors.
struct BulkStorage {
  std::vector<uint8_t> buf;
  std::vector<uint32_t> offsets, request_first;
  std::vector<uint8_t> errors;

  BulkOutput bind(const BulkSizes& sz) {
    if (buf.size() < sz.max_bytes) buf.resize(sz.max_bytes);
    if (offsets.size() < sz.max_completions + 1) offsets.resize(sz.max_completions + 1);
    if (request_first.size() < sz.requests + 1) request_first.resize(sz.requests + 1);
    if (errors.size() < sz.requests) errors.resize(sz.requests);
    BulkOutput o;
    o.buf = buf.data();
    o.buf_cap = buf.size();
    o.offsets = offsets.data();
    o.offsets_cap = offsets.size();
    o.request_first = request_first.data();
    o.errors = errors.data();
    o.requests_cap = errors.size();
    return o;
  }
};

// ---- fused: completions written straight into the caller's record slots ----
//
// Two passes over the same input (the Gateway's post_completions path, gateway.hpp): bulk_plan
// checks everything and counts every request's completions without writing any, so that a
// caller can refuse the whole call before anything is published; bulk_emit_request then
// encodes one planned request's completions into caller-provided slots. The input format and
// every check are those of bulk_build: for a request bulk_build answers, the bytes of its
// completions are identical. Plain memory reads (MRd / MRdLk, 3DW or 4DW, no prefix or
// digest, SC) take a direct path that encodes from the header bytes without decode(); every
// other request goes through decode() / plan_completions() / encode().

// Reusable scratch for bulk_plan (bind() only grows it; allocation-free across calls once big
// enough). ends[i]: completions of requests [0, i); errors[i]: Status per request (ok, or why
// it gets none).
struct BulkPlan {
  std::vector<uint32_t> ends;
  std::vector<uint8_t> errors;
  size_t requests = 0;
  size_t completions = 0;   // ends[requests]
  size_t bad = 0;           // requests with errors[i] != ok
  size_t first_bad = 0;     // the first of them (valid when bad != 0)
  size_t longest = 0;       // bytes of the longest completion
  size_t longest_request = 0;  // a request that has it
  size_t most = 0;          // most completions of one request
  size_t most_request = 0;  // a request that has that many

  // Room for the requests `input_bytes` of input can hold (a request is at least 12 bytes).
  void reserve_for(size_t input_bytes) {
    const size_t n = input_bytes / 12 + 1;
    if (ends.size() < n + 1) ends.resize(n + 1);
    if (errors.size() < n) errors.resize(n);
  }
};

// Plans `reqs` (with `data`, `statuses` as for bulk_build). Whole-call failures are bulk_build's
// (bad parameters, truncated input, statuses count, data not consumed exactly), and leave
// the plan's counts 0 (output_too_small: reserve_for(len) was not called); a single request's problem is recorded in plan->errors and counted in
// plan->bad. Nothing else is written.
Status bulk_plan(const uint8_t* reqs, size_t len, const uint8_t* data, size_t data_len,
                 const uint8_t* statuses,
                 size_t n_statuses, const CompletionParams& p, BulkPlan* plan) noexcept;

// Encodes the completions of the request at rec[0, avail) (the rest of the input) that
// bulk_plan accepted (errors[i] == ok), under `p` with that request's status, taking its data
// share from data[0, data_avail) (the rest of the data), into out[k] (each at least `cap`
// bytes; k < the planned count) and their lengths into lens[k]. *rec_len and *share_len
// receive the request's record size and data share, to step to the next request. Returns the
// count written: 0 for a request without completions (MWr), or when the input no longer
// matches its plan (it can only if the caller changed it between the passes).
size_t bulk_emit_request(const uint8_t* rec, size_t avail, const uint8_t* data,
                         size_t data_avail, const CompletionParams& p, uint8_t* const* out,
                         size_t cap, uint32_t* lens, size_t* rec_len,
                         size_t* share_len) noexcept;

// Record size and data share (as bulk_plan charges them) of the request at rec[0, avail)
// under `status`: for stepping over a request that bulk_plan refused.
void bulk_extent(const uint8_t* rec, size_t avail, uint8_t status, size_t* rec_len,
                 size_t* share_len) noexcept;

// The bytes of `data` the request record `rec` (TLP prefixes included) takes under `status`:
// Length * 4 for a read under SC, else 0 (what bulk_build charges, also to rejected reads).
size_t bulk_data_share(const uint8_t* rec, uint8_t status) noexcept;

}  // namespace mlx5tlp::tlp
