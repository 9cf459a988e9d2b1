/*
 * mlx5tlp/abi.h — our own declarations of the rdma-core ABI subset mlx5tlp uses.
 *
 * Why our own: `pip install .` must work on a machine without rdma-core headers, and the
 * core resolves every function at run time (dlopen/dlvsym), so it never includes
 * <infiniband/verbs.h> or <infiniband/mlx5dv.h>. Every name carries the `m5a_` prefix so
 * that tests/cpp/abi_conformance.c can include these declarations beside the real headers
 * and check sizeof/offsetof of each struct against them.
 *
 * Only the members we read are meaningful; the rest are kept as padding of the exact size.
 * Layouts are those of rdma-core on LP64 Linux (x86_64, aarch64), which is all we support.
 *
 * API stability: internal. The layouts follow rdma-core's public ABI, which is stable.
 */
#ifndef MLX5TLP_ABI_H
#define MLX5TLP_ABI_H

#include <pthread.h>
#ifndef __cplusplus
#include <stdbool.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { M5A_SYSFS_NAME_MAX = 64, M5A_SYSFS_PATH_MAX = 256 };

/* struct ibv_device (verbs.h). Two private ops pointers precede the public fields. */
struct m5a_ibv_device {
	void *ops_[2];
	int node_type;
	int transport_type;
	char name[M5A_SYSFS_NAME_MAX];
	char dev_name[M5A_SYSFS_NAME_MAX];
	char dev_path[M5A_SYSFS_PATH_MAX];
	char ibdev_path[M5A_SYSFS_PATH_MAX];
};

/* struct ibv_context (verbs.h). ibv_context_ops is 32 function pointers we never call. */
struct m5a_ibv_context {
	struct m5a_ibv_device *device;
	void *ops_[32];
	int cmd_fd;
	int async_fd;
	int num_comp_vectors;
	pthread_mutex_t mutex;
	void *abi_compat;
};

/*
 * struct mlx5dv_context_attr (mlx5dv.h): a PREFIX of upstream's. rdma-core >= 61 appends
 * `struct ibv_fd_arr *fds` (24 bytes in all); older releases end after comp_mask (16 bytes).
 * Passing our 16 bytes to any of them is safe because we always set comp_mask = 0: libmlx5
 * reads `fds` only when comp_mask has MLX5DV_CONTEXT_ATTR_MASK_FD_ARRAY, so it never reads
 * past our struct. tests/cpp/abi_conformance.c checks each of our fields' offset and size
 * and that our size is <= upstream's, against old and new headers alike.
 */
struct m5a_mlx5dv_context_attr {
	uint32_t flags;
	uint64_t comp_mask;
};

/* struct mlx5dv_var (mlx5dv.h) */
struct m5a_mlx5dv_var {
	uint32_t page_id;
	uint32_t length;
	off_t mmap_off;
	uint64_t comp_mask;
};

/* struct mlx5dv_devx_umem (mlx5dv.h) */
struct m5a_mlx5dv_devx_umem {
	uint32_t umem_id;
};

/* struct mlx5dv_devx_obj is opaque in mlx5dv.h. */
struct m5a_mlx5dv_devx_obj;

/* struct mlx5dv_export_sizes (mlx5dv.h, rdma-core >= 63) */
struct m5a_mlx5dv_export_sizes {
	uint32_t var_attrs_size;
	uint32_t devx_umem_attrs_size;
	uint32_t devx_obj_attrs_size;
};

/* Constants (mlx5dv.h, mlx5_api.h, verbs.h). Pinned by tests/test_abi_constants.py. */
enum {
	M5A_MLX5DV_CONTEXT_FLAGS_DEVX = 1 << 0,
	M5A_MLX5DV_VAR_ALLOC_FLAG_TLP = 1 << 0,
	M5A_IBV_ACCESS_LOCAL_WRITE = 1 << 0,
	M5A_IBV_ACCESS_REMOTE_WRITE = 1 << 1,
	M5A_IBV_ACCESS_REMOTE_READ = 1 << 2,
	M5A_IBV_FORK_DISABLED = 0,
	M5A_IBV_FORK_ENABLED = 1,
	M5A_IBV_FORK_UNNEEDED = 2,
};

/*
 * Function types, named after the rdma-core function: m5a_<name>_fn for every prototype in
 * mlx5tlp/abi_functions.h (which tests/cpp/abi_conformance.c checks against the system's).
 * rdma-core's enum return types are read as int: an enum of small non-negative values is
 * returned in the same register, and the conformance test checks its size.
 */
#define M5A_STRUCT(tag) struct m5a_##tag
#define M5A_ENUM(tag) int
#define M5A_FUNCTION(ret, name, params) typedef ret(*m5a_##name##_fn) params;
#define M5A_FUNCTION_63 M5A_FUNCTION
#include "mlx5tlp/abi_functions.h"
#undef M5A_FUNCTION_63
#undef M5A_FUNCTION
#undef M5A_ENUM
#undef M5A_STRUCT

/* Shorter names the core uses: query and modify share one shape; the export-sizes entry point
 * is the symbol behind the header inline mlx5dv_get_export_sizes(). */
typedef m5a_mlx5dv_devx_obj_query_fn m5a_mlx5dv_devx_obj_cmd_fn;
typedef m5a__mlx5dv_get_export_sizes_fn m5a_mlx5dv_get_export_sizes_fn;

/*
 * The software device's "kernel mmap handler": validates that `offset` belongs to a live
 * VAR of `ctx` (as the kernel's mmap handler does) and then mmap()s ctx->cmd_fd there.
 * Only libmlx5tlp_sim.so has it; with real rdma-core the core calls mmap(2) directly and
 * the kernel does the check.
 */
typedef void *(*m5a_sim_mmap_fn)(struct m5a_ibv_context *ctx, size_t length, int prot,
				 int flags, off_t offset);

#ifdef __cplusplus
}
#endif

#endif /* MLX5TLP_ABI_H */
