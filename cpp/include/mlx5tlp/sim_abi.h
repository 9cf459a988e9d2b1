/*
 * mlx5tlp/sim_abi.h — the extra C entry points of the software device libmlx5tlp_sim.so.
 *
 * Beside the rdma-core subset (same names, same symbol versions), the software device exports
 * these functions under the version node MLX5TLP_SIM_1.0: device management, the "kernel"
 * mmap handler, and the device model that plays the PCIe host; MLX5TLP_SIM_1.1 (which inherits
 * 1.0) adds marks with progress (mlx5tlp_sim_function_mark_progress); MLX5TLP_SIM_1.2 (which
 * inherits 1.1) notes on a claim that its error was logged (mlx5tlp_sim_function_note_logged).
 * The core resolves them through the same loader (they are null for the rdma backend, and a
 * 1.1 or 1.2 symbol is null in a library that lacks its node).
 *
 * Return conventions: int functions return 0 or a positive errno value; pointer functions
 * return NULL and set errno; ssize_t functions return a length, 0 for "nothing", or -errno.
 * API stability: internal to mlx5tlp; versioned by the node name.
 */
#ifndef MLX5TLP_SIM_ABI_H
#define MLX5TLP_SIM_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "mlx5tlp/abi.h"

#ifdef __cplusplus
extern "C" {
#endif

#define M5A_SIM_VERSION_NODE "MLX5TLP_SIM_1.0"
#define M5A_SIM_VERSION_NODE_1_1 "MLX5TLP_SIM_1.1"
#define M5A_SIM_VERSION_NODE_1_2 "MLX5TLP_SIM_1.2"
#define M5A_SIM_DEFAULT_DEVICE "mlx5_sim0"

struct m5a_sim_device_config {
	uint32_t tlp;           /* tlp_device_emulation_manager: 0 or 1 */
	uint32_t gw_pages;      /* tlp_rsp_gw_num_pages: 1..15 (4-bit PRM field) */
	uint32_t gw_log_stride; /* log_tlp_rsp_gw_page_stride: page stride = 4096 << v, 0..4 */
	uint32_t virtio_pages;  /* VirtIO doorbell VAR pages: 0..256 */
	uint32_t gw_slot_size;  /* gateway ring slot size in bytes: power of two, 64..1024 */
	uint32_t flags;         /* M5A_SIM_DEV_*: kernel/firmware variants to emulate */
	uint64_t gw_bar_offset; /* tlp_rsp_gw_pages_bar_offset */
	uint64_t node_guid;     /* 0: derived from the device name */
};

/* Device flags: which kernel / firmware the device behaves like (errnos as the real ones). */
enum {
	/* The device has no VAR support at all: every mlx5dv_alloc_var -> EPROTONOSUPPORT. */
	M5A_SIM_DEV_NO_VAR = 1u << 0,
	/* The kernel does not know the VAR alloc flags attribute (MLX5_IB_ATTR_VAR_OBJ_ALLOC_FLAGS):
	 * mlx5dv_alloc_var(MLX5DV_VAR_ALLOC_FLAG_TLP) -> EPROTONOSUPPORT; VirtIO VARs still work. */
	M5A_SIM_DEV_NO_VAR_FLAGS_ATTR = 1u << 1,
};

struct m5a_sim_device_stats {
	uint32_t contexts;      /* live contexts (an fd open somewhere) */
	uint32_t tlp_vars;      /* allocated TLP gateway pages */
	uint32_t virtio_vars;   /* allocated VirtIO VAR pages */
	uint32_t umems;
	uint32_t devx_objs;
	uint32_t gw_pages_free;
	uint32_t virtio_pages_free;
	uint32_t requests_pending; /* host requests not yet taken by the function */
	uint64_t reclaimed;     /* objects reclaimed from dead contexts since creation */
	uint32_t requests_claimed; /* requests claimed and not yet retired */
	uint32_t gw_pages_draining; /* freed gateway pages whose records the host still collects */
	uint64_t host_epoch;    /* device models attached since creation */
	uint64_t stale_requests;    /* requests discarded by new host epochs and resets */
	uint64_t stale_completions; /* unconsumed completion records discarded (epochs, resets) */
};

/* One completion record collected by the device model. */
struct m5a_sim_completion {
	uint32_t page_id;  /* gateway page it was written to */
	uint32_t length;   /* bytes of TLP in `data` */
	uint64_t sequence; /* per-page record number, starting at 0 for each allocation */
};

/* What the device model checked so far. */
struct m5a_sim_host_stats {
	uint64_t requests;        /* requests sent */
	uint64_t completions;     /* completion records collected */
	uint64_t retired;         /* non-posted requests fully answered */
	uint64_t outstanding;     /* non-posted requests still waiting */
	uint64_t errors;          /* completions that failed a check (see last_error) */
	uint64_t unexpected;      /* completions matching no outstanding request */
	uint64_t bad_records;     /* slots with an impossible length / ring overruns */
	uint64_t status_ur, status_ca, status_crs;
	char last_error[160];
	uint64_t epoch;             /* this host's epoch (1 for the first host of the device) */
	uint64_t stale_requests;    /* requests of a previous host discarded when this one attached */
	uint64_t stale_completions; /* unconsumed completion records discarded when it attached */
	uint64_t interrupts;        /* Memory Writes from the function (its MSI-X messages) */
};

/* Request claims (mlx5tlp_sim_function_claim). A claim belongs to the calling process's claimer
 * session on the device (not to the context: standbys sharing a context are separate
 * claimers). A session dies with its process; its unretired claims are then redelivered,
 * exactly once each, to the next claimer of that channel. */
struct m5a_sim_claim_info {
	uint64_t claim;   /* claim id: pass it to mark / retire */
	uint32_t flags;   /* M5A_SIM_CLAIM_* */
	uint32_t length;  /* request bytes copied into the buffer */
	uint32_t page_id; /* the mark (if M5A_SIM_CLAIM_MARKED): the answer was written to this */
	uint32_t progress;/* gateway page and is published once its doorbell count reaches seq;
			     progress: how much of it the host has for certain, in the marker's
			     units (mark_progress): `after` if the doorbell reached seq, else
			     `before`; M5A_SIM_PROGRESS_ALL: all of it (was `reserved`, always 0,
			     before MLX5TLP_SIM_1.1) */
	uint64_t seq;
};

/* mark_progress: the whole answer. */
#define M5A_SIM_PROGRESS_ALL 0xffffffffu

enum {
	M5A_SIM_CLAIM_REDELIVERED = 1u << 0, /* a dead claimer's claim, now the caller's */
	M5A_SIM_CLAIM_MARKED = 1u << 1,      /* the dead claimer marked it answered: page_id, seq */
	M5A_SIM_CLAIM_PUBLISHED = 1u << 2,   /* ...and that page's doorbell had reached seq when the
						claim was redelivered: the answer reached the host;
						retire without answering. Exact when the page had one
						writer (the dead claimer) and the successor took every
						redelivery (recover until 0) before writing to it. */
	M5A_SIM_CLAIM_PAGE_GONE = 1u << 3,   /* ...but that page was freed (or reallocated) since */
	M5A_SIM_CLAIM_PARTIAL = 1u << 4,     /* ...and part of the answer reached the host
						(0 < progress < ALL): answer only the rest (1.1) */
	M5A_SIM_CLAIM_LOGGED = 1u << 5,      /* the dead claimer logged the request's error
						(note_logged): do not log it again (1.2) */
};

/* What mlx5tlp_sim_reset_device discarded. */
struct m5a_sim_reset_result {
	uint32_t requests;    /* queued requests */
	uint32_t claims;      /* claimed, unretired requests */
	uint32_t completions; /* unconsumed completion records of freed (draining) pages */
	uint32_t pages;       /* draining gateway pages returned to the pool */
	uint32_t faults;      /* injected faults still armed */
	uint32_t reserved;
	uint64_t objects;     /* objects of closed contexts reclaimed */
};

/* ---- The native load generator (mlx5tlp_sim_host_load) ----
 * An open-loop PCIe host: it sends memory reads and writes to the emulated function at a target
 * rate with a bounded window of outstanding reads, and checks every completion in native code
 * (no Python per TLP): data against the expected contents of the address range, byte count,
 * lower address, tag, requester and completer IDs, status, payload size against
 * Max_Payload_Size and splits on Read Completion Boundaries (PCIe Base Specification, 2.2.9 and
 * 2.3.1.1). Latency is measured per read from its send (and from its scheduled send time) to
 * its last completion. */
enum {
	M5A_SIM_LOAD_READ = 0,  /* a Memory Read Request (non-posted: a tag of the window) */
	M5A_SIM_LOAD_WRITE = 1, /* a Memory Write Request (posted: no completion) */
};
#define M5A_SIM_LOAD_MAX_OPS 8
#define M5A_SIM_LOAD_MAX_RANGES 16
#define M5A_SIM_LOAD_MAX_WINDOW 512   /* 8 channels x 64 requests; > 256 uses 10-bit tags */
#define M5A_SIM_LOAD_MAX_BYTES ((uint64_t)1 << 30) /* all ranges together (private copy) */

struct m5a_sim_load_op {
	uint32_t kind;   /* M5A_SIM_LOAD_READ or _WRITE */
	uint32_t size;   /* bytes, 1..4096 (writes: whole DWs, 4..4096) */
	uint32_t align;  /* address alignment, a power of two 1..4096 (0: the size rounded up to a
			    power of two, at most 4096); below 4 exercises byte enables */
	uint32_t weight; /* relative frequency, >= 1 */
};

struct m5a_sim_load_range {
	uint64_t address;        /* bus address (an assigned BAR address + offset) */
	uint64_t size;           /* bytes, >= the largest op */
	const uint8_t *expected; /* the range's contents when the load starts: copied at start (the
				    generator applies its own writes to its copy) */
};

struct m5a_sim_load_spec {
	uint32_t struct_size;   /* sizeof(struct m5a_sim_load_spec) */
	uint32_t nops;          /* 1..M5A_SIM_LOAD_MAX_OPS */
	struct m5a_sim_load_op ops[M5A_SIM_LOAD_MAX_OPS];
	uint32_t nranges;       /* 1..M5A_SIM_LOAD_MAX_RANGES */
	uint32_t window;        /* outstanding reads, 1..M5A_SIM_LOAD_MAX_WINDOW */
	const struct m5a_sim_load_range *ranges;
	double rate;            /* requests/s offered (open loop); 0: as fast as the window allows */
	uint64_t count;         /* requests to send; 0: until duration_ns */
	uint64_t duration_ns;   /* sending time; 0: until count (one of them must be set) */
	uint64_t timeout_ns;    /* a read unanswered this long after its send is an error */
	uint32_t channels;      /* request channels to use, 1..8 */
	uint16_t requester_id;  /* the host's Requester ID */
	uint16_t completer_id;  /* the function's Completer ID (checked unless check_completer 0) */
	uint32_t check_completer;
	uint32_t max_payload;   /* the function's Max_Payload_Size: 128..4096, power of two */
	uint32_t rcb;           /* its Read Completion Boundary: 64 or 128 */
	uint32_t reserved;
	uint64_t seed;          /* address / data / op choice (xorshift); 0 picks 1 */
};

enum {
	M5A_SIM_LOAD_ERR_DATA = 0,     /* payload differs from the expected contents */
	M5A_SIM_LOAD_ERR_BYTE_COUNT,   /* Byte Count is not the bytes still to be returned */
	M5A_SIM_LOAD_ERR_LOWER_ADDRESS,/* Lower Address does not follow the data returned */
	M5A_SIM_LOAD_ERR_TAG,          /* requester ID + tag of no outstanding read (unexpected) */
	M5A_SIM_LOAD_ERR_COMPLETER,    /* Completer ID differs */
	M5A_SIM_LOAD_ERR_STATUS,       /* a status other than Successful Completion */
	M5A_SIM_LOAD_ERR_FORMAT,       /* not a CplD, payload length vs record length, data on a
					  failed completion */
	M5A_SIM_LOAD_ERR_SPLIT,        /* payload above Max_Payload_Size, or a non-final completion
					  not ending on an RCB boundary */
	M5A_SIM_LOAD_ERR_TIMEOUT,      /* no (complete) answer within timeout_ns */
	M5A_SIM_LOAD_ERR_RECORD,       /* a garbage record in a gateway page (bad length, index) */
	M5A_SIM_LOAD_ERR_KINDS
};
#define M5A_SIM_LOAD_FIRST_ERRORS 4

struct m5a_sim_load_result {
	uint32_t struct_size;   /* sizeof(struct m5a_sim_load_result) */
	uint32_t nfirst;        /* entries of first_errors used */
	uint64_t sent;          /* requests sent (reads + writes) */
	uint64_t reads, writes;
	uint64_t flush_reads;   /* 4-byte reads after each channel's last write (not in sent):
				   when the run returns, every write it sent has been applied */
	uint64_t completed;     /* reads fully and correctly answered */
	uint64_t completions;   /* completion records collected */
	uint64_t interrupts;    /* Memory Write records (MSI-X messages): not completions */
	uint64_t bytes_read;    /* payload bytes checked */
	uint64_t errors;        /* sum of errors_by_kind */
	uint64_t errors_by_kind[M5A_SIM_LOAD_ERR_KINDS];
	uint64_t late;          /* sends that happened more than 1 ms after their scheduled time */
	uint64_t elapsed_ns;    /* first send to last completion */
	uint64_t cpu_ns;        /* CPU time of the host thread (CLOCK_THREAD_CPUTIME_ID) */
	double achieved_rps;    /* requests sent / elapsed */
	/* read latency, send -> last completion (ns): percentiles from a log-linear histogram
	   (1/32-octave buckets: within ~3%) */
	uint64_t lat_min_ns, lat_p50_ns, lat_p90_ns, lat_p99_ns, lat_p999_ns, lat_max_ns;
	double lat_mean_ns;
	/* the same from the scheduled send time (open loop: includes waiting for the window) */
	uint64_t sched_p50_ns, sched_p99_ns, sched_p999_ns, sched_max_ns;
	char first_errors[M5A_SIM_LOAD_FIRST_ERRORS][160];
};

struct m5a_sim_host;

/* Device management */
typedef int (*m5a_sim_create_device_fn)(const char *name, const struct m5a_sim_device_config *cfg);
typedef int (*m5a_sim_remove_device_fn)(const char *name);
typedef int (*m5a_sim_query_device_fn)(const char *name, struct m5a_sim_device_config *cfg,
				       struct m5a_sim_device_stats *stats);
typedef int (*m5a_sim_device_dir_fn)(char *buf, size_t len);

/* Fault injection: the next `count` calls of `op` on `device` (from any process) fail with `err`
 * and leave the object alive, as a kernel/firmware refusal does. `op` is one of
 * "umem_dereg", "devx_obj_destroy", "devx_obj_query", "devx_obj_modify", "devx_obj_create".
 * count 0 clears the fault. For EREMOTEIO on commands with an outbox, the outbox carries
 * status 0x05 (BAD_RESOURCE_STATE) and syndrome 0x5a5a0000 | count-left. */
typedef int (*m5a_sim_inject_fault_fn)(const char *device, const char *op, int err,
				       uint32_t count);
/* Reset a device no one is attached to: discard queued and claimed requests and unconsumed
 * completions, clear injected faults, reclaim every object (contexts must all be closed and no
 * device model attached: else EBUSY). `out` (may be NULL) receives what was discarded. */
typedef int (*m5a_sim_reset_device_fn)(const char *name, struct m5a_sim_reset_result *out);
/* The object identity an import cannot get from rdma-core (upstream's *_import asks the kernel
 * nothing): does `imported` (what mlx5dv_var_import / _devx_umem_import / _devx_obj_import
 * returned on `ctx`; kind 1 VAR, 2 UMEM, 3 DEVX object) still name the object it was exported
 * from? The kernel hands out the lowest free handle, so a stale buffer's handle may name a newer
 * object. 0: the live object at that handle has the recorded identity (VAR: page, length and
 * mmap offset; UMEM: umem_id; DEVX: object id and type). ENOENT: nothing has that handle.
 * ESTALE: the handle names another object (of the kind: other identity; or of another kind),
 * or (VAR) nothing, while the recorded mmap offset is a live page: a rewritten buffer.
 * EINVAL: bad arguments. A VAR page freed and allocated again with the same handle is the same
 * identity: not detectable. */
typedef int (*m5a_sim_import_check_fn)(struct m5a_ibv_context *ctx, int kind, const void *imported);
/* Why the calling thread's last failing software-device call failed (path, field, limit):
 * copies it NUL-terminated into buf (truncated to len) and returns its full length. */
typedef size_t (*m5a_sim_last_error_fn)(char *buf, size_t len);

/* Device model (PCIe host side). One host per device at a time (EBUSY otherwise). */
typedef struct m5a_sim_host *(*m5a_sim_host_open_fn)(const char *device);
typedef void (*m5a_sim_host_close_fn)(struct m5a_sim_host *host);
typedef int (*m5a_sim_host_send_fn)(struct m5a_sim_host *host, uint32_t channel,
				    const void *tlp, size_t len);
typedef ssize_t (*m5a_sim_host_poll_fn)(struct m5a_sim_host *host, void *buf, size_t len,
					struct m5a_sim_completion *info);

typedef int (*m5a_sim_host_stats_fn)(struct m5a_sim_host *host, struct m5a_sim_host_stats *out);
/* Run the load generator on the calling thread until `count` requests were sent or
 * `duration_ns` elapsed, then until every read is answered or timed out. The host must have no
 * outstanding requests of its own (EBUSY). Completions that fail a check are counted by kind in
 * `out` (the first few described), not returned as an error. 0, EINVAL (a bad spec field: see
 * mlx5tlp_sim_last_error), EBUSY, ENOMEM. Not thread-safe (one host, one thread). */
typedef int (*m5a_sim_host_load_fn)(struct m5a_sim_host *host, const struct m5a_sim_load_spec *spec,
				    struct m5a_sim_load_result *out);

/* Emulated function side: take the next request TLP the host sent on `channel` (claim and
 * retire in one call: at most once). Returns its length, 0 if none, -ENOBUFS if `len` is too
 * small (the request stays queued), -EINVAL. */
typedef ssize_t (*m5a_sim_function_poll_fn)(struct m5a_ibv_context *ctx, uint32_t channel,
					    void *buf, size_t len);
/* Claim the next request: redelivered claims of dead claimers first, then fresh ones in
 * order. Returns its length (info filled), 0 if none, -ENOBUFS, -EINVAL, -EUSERS (no free
 * claimer session). The request stays claimed until retired. */
typedef ssize_t (*m5a_sim_function_claim_fn)(struct m5a_ibv_context *ctx, uint32_t channel,
					     void *buf, size_t len, struct m5a_sim_claim_info *info);
/* Only redelivered claims of dead claimers, looking for them now (claim looks about once a
 * millisecond per process). A successor calls it until it returns 0 before it writes to the
 * dead claimer's gateway pages, so that every M5A_SIM_CLAIM_PUBLISHED is judged against the
 * doorbell the dead claimer left. Returns as claim (0: none). */
typedef ssize_t (*m5a_sim_function_recover_fn)(struct m5a_ibv_context *ctx, uint32_t channel,
					       void *buf, size_t len, struct m5a_sim_claim_info *info);
/* Record that the answer to `claim` is published once gateway page `page_id`'s doorbell count
 * reaches `seq` (call it before ringing that doorbell). 0, EINVAL (no such page), ESTALE (the
 * claim was retired or discarded by a new host epoch), EPERM (another claimer's claim). */
typedef int (*m5a_sim_function_mark_fn)(struct m5a_ibv_context *ctx, uint32_t channel,
					uint64_t claim, uint32_t page_id, uint64_t seq);
/* MLX5TLP_SIM_1.1. The same for an answer published by several doorbells (more completions
 * than the page holds): "the first `before` units of the answer are published already; the
 * first `after` (M5A_SIM_PROGRESS_ALL: all of it) once `page_id`'s doorbell count reaches
 * `seq`". Call it before each doorbell. A redelivered claim reports `after` or `before` in
 * m5a_sim_claim_info.progress, PUBLISHED only for all of it, PARTIAL for part. The previous mark
 * stays whole until this one is complete (two records, one CAS selects), so a claimer killed
 * while re-marking leaves the older, still true, progress. mark() is mark_progress(0, ALL).
 * 0, EINVAL (no such page; before > after, or before == ALL), ESTALE, EPERM. A redelivered
 * claim whose mark record is damaged or left from another claim is dropped: claim / recover
 * return -EPROTO (mlx5tlp_sim_last_error names channel, slot and record). */
typedef int (*m5a_sim_function_mark_progress_fn)(struct m5a_ibv_context *ctx, uint32_t channel,
						 uint64_t claim, uint32_t page_id, uint64_t seq,
						 uint32_t before, uint32_t after);
/* MLX5TLP_SIM_1.2. Record on `claim` that the error its request caused was logged (the
 * function's error logging in configuration space, PCIe Base 6.x §6.2.5: status bits, Header
 * Log, the error Message): a successor it is redelivered to sees M5A_SIM_CLAIM_LOGGED and does
 * not log — or signal — the same detection again. Call it right after logging (a claimer
 * killed in between leaves the claim unnoted: logged again, never lost). Marks keep it; one
 * CAS on the claim's word, no system call. 0, ESTALE, EPERM. */
typedef int (*m5a_sim_function_note_logged_fn)(struct m5a_ibv_context *ctx, uint32_t channel,
					       uint64_t claim);
/* Retire a claim (its slot returns to the host). 0, ESTALE, EPERM. */
typedef int (*m5a_sim_function_retire_fn)(struct m5a_ibv_context *ctx, uint32_t channel,
					  uint64_t claim);

/* Block until one of the channels in `channel_mask` (bit c: channel c) may hold a request, until
 * mlx5tlp_sim_function_wake, or for at most `timeout_ns` (< 0: no limit). A shared futex on the
 * device's request wake-up word: no polling, no sleeping. 0 (look now; may be spurious),
 * ETIMEDOUT, EINVAL. Claims of dead claimers are not announced: bound the wait to find them. */
typedef int (*m5a_sim_function_wait_fn)(struct m5a_ibv_context *ctx, uint32_t channel_mask,
					int64_t timeout_ns);
/* Wake every function blocked in mlx5tlp_sim_function_wait on the device. 0, EINVAL. */
typedef int (*m5a_sim_function_wake_fn)(struct m5a_ibv_context *ctx);

#ifdef __cplusplus
}  /* extern "C" */

namespace mlx5tlp {
struct SimSymbols {
	m5a_sim_mmap_fn mmap = nullptr;
	m5a_sim_create_device_fn create_device = nullptr;
	m5a_sim_remove_device_fn remove_device = nullptr;
	m5a_sim_query_device_fn query_device = nullptr;
	m5a_sim_device_dir_fn device_dir = nullptr;
	m5a_sim_host_open_fn host_open = nullptr;
	m5a_sim_host_close_fn host_close = nullptr;
	m5a_sim_host_send_fn host_send = nullptr;
	m5a_sim_host_poll_fn host_poll = nullptr;
	m5a_sim_host_stats_fn host_stats = nullptr;
	m5a_sim_host_load_fn host_load = nullptr;
	m5a_sim_function_poll_fn function_poll = nullptr;
	m5a_sim_inject_fault_fn inject_fault = nullptr;
	m5a_sim_reset_device_fn reset_device = nullptr;
	m5a_sim_function_claim_fn function_claim = nullptr;
	m5a_sim_function_recover_fn function_recover = nullptr;
	m5a_sim_function_mark_fn function_mark = nullptr;
	m5a_sim_function_mark_progress_fn function_mark_progress = nullptr;  /* 1.1 */
	m5a_sim_function_retire_fn function_retire = nullptr;
	m5a_sim_function_note_logged_fn function_note_logged = nullptr;  /* 1.2 */
	m5a_sim_last_error_fn last_error = nullptr;
	m5a_sim_function_wait_fn function_wait = nullptr;
	m5a_sim_function_wake_fn function_wake = nullptr;
	m5a_sim_import_check_fn import_check = nullptr;
};
}  // namespace mlx5tlp
#endif

#endif /* MLX5TLP_SIM_ABI_H */
