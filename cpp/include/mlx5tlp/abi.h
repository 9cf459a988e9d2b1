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

/* struct mlx5dv_context_attr (mlx5dv.h) */
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

/* Function types, named after the rdma-core function. */
typedef struct m5a_ibv_device **(*m5a_ibv_get_device_list_fn)(int *num_devices);
typedef void (*m5a_ibv_free_device_list_fn)(struct m5a_ibv_device **list);
typedef const char *(*m5a_ibv_get_device_name_fn)(struct m5a_ibv_device *device);
typedef uint64_t (*m5a_ibv_get_device_guid_fn)(struct m5a_ibv_device *device); /* __be64 */
typedef struct m5a_ibv_context *(*m5a_ibv_open_device_fn)(struct m5a_ibv_device *device);
typedef int (*m5a_ibv_close_device_fn)(struct m5a_ibv_context *context);
typedef struct m5a_ibv_context *(*m5a_ibv_import_device_fn)(int cmd_fd);
typedef int (*m5a_ibv_is_fork_initialized_fn)(void);

typedef int (*m5a_mlx5dv_is_supported_fn)(struct m5a_ibv_device *device); /* bool */
typedef struct m5a_ibv_context *(*m5a_mlx5dv_open_device_fn)(
	struct m5a_ibv_device *device, struct m5a_mlx5dv_context_attr *attr);
typedef struct m5a_mlx5dv_var *(*m5a_mlx5dv_alloc_var_fn)(struct m5a_ibv_context *ctx,
							 uint32_t flags);
typedef void (*m5a_mlx5dv_free_var_fn)(struct m5a_mlx5dv_var *var);
typedef struct m5a_mlx5dv_devx_umem *(*m5a_mlx5dv_devx_umem_reg_fn)(
	struct m5a_ibv_context *ctx, void *addr, size_t size, uint32_t access);
typedef int (*m5a_mlx5dv_devx_umem_dereg_fn)(struct m5a_mlx5dv_devx_umem *umem);
typedef struct m5a_mlx5dv_devx_obj *(*m5a_mlx5dv_devx_obj_create_fn)(
	struct m5a_ibv_context *ctx, const void *in, size_t inlen, void *out, size_t outlen);
typedef int (*m5a_mlx5dv_devx_obj_cmd_fn)(struct m5a_mlx5dv_devx_obj *obj, const void *in,
					   size_t inlen, void *out, size_t outlen);
typedef int (*m5a_mlx5dv_devx_obj_destroy_fn)(struct m5a_mlx5dv_devx_obj *obj);
typedef int (*m5a_mlx5dv_devx_general_cmd_fn)(struct m5a_ibv_context *ctx, const void *in,
					       size_t inlen, void *out, size_t outlen);

/* rdma-core >= 63 (symbol version MLX5_1.27) */
typedef void (*m5a_mlx5dv_get_export_sizes_fn)(struct m5a_mlx5dv_export_sizes *sizes,
					      size_t sizes_len);
typedef int (*m5a_mlx5dv_var_export_fn)(struct m5a_mlx5dv_var *var, void *data);
typedef struct m5a_mlx5dv_var *(*m5a_mlx5dv_var_import_fn)(struct m5a_ibv_context *ctx,
							  void *data);
typedef void (*m5a_mlx5dv_var_unimport_fn)(struct m5a_mlx5dv_var *var);
typedef int (*m5a_mlx5dv_devx_umem_export_fn)(struct m5a_mlx5dv_devx_umem *umem, void *data);
typedef struct m5a_mlx5dv_devx_umem *(*m5a_mlx5dv_devx_umem_import_fn)(
	struct m5a_ibv_context *ctx, void *data);
typedef void (*m5a_mlx5dv_devx_umem_unimport_fn)(struct m5a_mlx5dv_devx_umem *umem);
typedef int (*m5a_mlx5dv_devx_obj_export_fn)(struct m5a_mlx5dv_devx_obj *obj, void *data);
typedef struct m5a_mlx5dv_devx_obj *(*m5a_mlx5dv_devx_obj_import_fn)(
	struct m5a_ibv_context *ctx, void *data);
typedef void (*m5a_mlx5dv_devx_obj_unimport_fn)(struct m5a_mlx5dv_devx_obj *obj);

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
