/*
 * mlx5tlp/sim_abi.h — the extra C entry points of the software device libmlx5tlp_sim.so.
 *
 * Beside the rdma-core subset (same names, same symbol versions), the software device exports
 * these functions under the version node MLX5TLP_SIM_1.0: device management, the "kernel"
 * mmap handler, and the device model that plays the PCIe host. The core resolves them through
 * the same loader (they are null for the rdma backend).
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
	uint32_t reserved;/* gateway page and is published once its doorbell count reaches seq */
	uint64_t seq;
};

enum {
	M5A_SIM_CLAIM_REDELIVERED = 1u << 0, /* a dead claimer's claim, now the caller's */
	M5A_SIM_CLAIM_MARKED = 1u << 1,      /* the dead claimer marked it answered: page_id, seq */
	M5A_SIM_CLAIM_PUBLISHED = 1u << 2,   /* ...and that page's doorbell had reached seq when the
						claim was redelivered: the answer reached the host;
						retire without answering. Exact when the page had one
						writer (the dead claimer) and the successor took every
						redelivery (recover until 0) before writing to it. */
	M5A_SIM_CLAIM_PAGE_GONE = 1u << 3,   /* ...but that page was freed (or reallocated) since */
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
	m5a_sim_function_poll_fn function_poll = nullptr;
	m5a_sim_inject_fault_fn inject_fault = nullptr;
	m5a_sim_reset_device_fn reset_device = nullptr;
	m5a_sim_function_claim_fn function_claim = nullptr;
	m5a_sim_function_recover_fn function_recover = nullptr;
	m5a_sim_function_mark_fn function_mark = nullptr;
	m5a_sim_function_retire_fn function_retire = nullptr;
	m5a_sim_last_error_fn last_error = nullptr;
	m5a_sim_function_wait_fn function_wait = nullptr;
	m5a_sim_function_wake_fn function_wake = nullptr;
};
}  // namespace mlx5tlp
#endif

#endif /* MLX5TLP_SIM_ABI_H */
