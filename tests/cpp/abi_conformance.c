/*
 * ABI conformance: our own declarations (mlx5tlp/abi.h) against the system's rdma-core
 * headers. Built only where <infiniband/mlx5dv.h> exists (CI installs libibverbs-dev). Every
 * check is a compile-time assertion; the program only reports what it checked.
 */
#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#include <stddef.h>
#include <stdio.h>

#include "mlx5tlp/abi.h"

#define SAME_SIZE(ours, theirs) \
	_Static_assert(sizeof(struct ours) == sizeof(struct theirs), "sizeof " #theirs)
#define SAME_OFFSET(ours, theirs, om, tm) \
	_Static_assert(offsetof(struct ours, om) == offsetof(struct theirs, tm), #theirs "." #tm)
#define SAME_CONST(ours, theirs) _Static_assert((ours) == (theirs), #theirs)

SAME_SIZE(m5a_ibv_device, ibv_device);
SAME_OFFSET(m5a_ibv_device, ibv_device, node_type, node_type);
SAME_OFFSET(m5a_ibv_device, ibv_device, transport_type, transport_type);
SAME_OFFSET(m5a_ibv_device, ibv_device, name, name);
SAME_OFFSET(m5a_ibv_device, ibv_device, dev_name, dev_name);
SAME_OFFSET(m5a_ibv_device, ibv_device, dev_path, dev_path);
SAME_OFFSET(m5a_ibv_device, ibv_device, ibdev_path, ibdev_path);

SAME_SIZE(m5a_ibv_context, ibv_context);
SAME_OFFSET(m5a_ibv_context, ibv_context, device, device);
SAME_OFFSET(m5a_ibv_context, ibv_context, ops_, ops);
SAME_OFFSET(m5a_ibv_context, ibv_context, cmd_fd, cmd_fd);
SAME_OFFSET(m5a_ibv_context, ibv_context, async_fd, async_fd);
SAME_OFFSET(m5a_ibv_context, ibv_context, num_comp_vectors, num_comp_vectors);
SAME_OFFSET(m5a_ibv_context, ibv_context, mutex, mutex);
SAME_OFFSET(m5a_ibv_context, ibv_context, abi_compat, abi_compat);

SAME_SIZE(m5a_mlx5dv_context_attr, mlx5dv_context_attr);
SAME_OFFSET(m5a_mlx5dv_context_attr, mlx5dv_context_attr, flags, flags);
SAME_OFFSET(m5a_mlx5dv_context_attr, mlx5dv_context_attr, comp_mask, comp_mask);

SAME_SIZE(m5a_mlx5dv_var, mlx5dv_var);
SAME_OFFSET(m5a_mlx5dv_var, mlx5dv_var, page_id, page_id);
SAME_OFFSET(m5a_mlx5dv_var, mlx5dv_var, length, length);
SAME_OFFSET(m5a_mlx5dv_var, mlx5dv_var, mmap_off, mmap_off);
SAME_OFFSET(m5a_mlx5dv_var, mlx5dv_var, comp_mask, comp_mask);

SAME_SIZE(m5a_mlx5dv_devx_umem, mlx5dv_devx_umem);
SAME_OFFSET(m5a_mlx5dv_devx_umem, mlx5dv_devx_umem, umem_id, umem_id);

#ifdef MLX5TLP_HAVE_EXPORT_SIZES
SAME_SIZE(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes);
SAME_OFFSET(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes, var_attrs_size, var_attrs_size);
SAME_OFFSET(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes, devx_umem_attrs_size,
	    devx_umem_attrs_size);
SAME_OFFSET(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes, devx_obj_attrs_size,
	    devx_obj_attrs_size);
SAME_CONST(M5A_MLX5DV_VAR_ALLOC_FLAG_TLP, MLX5DV_VAR_ALLOC_FLAG_TLP);
#endif

SAME_CONST(M5A_MLX5DV_CONTEXT_FLAGS_DEVX, MLX5DV_CONTEXT_FLAGS_DEVX);
SAME_CONST(M5A_IBV_ACCESS_LOCAL_WRITE, IBV_ACCESS_LOCAL_WRITE);
SAME_CONST(M5A_IBV_ACCESS_REMOTE_WRITE, IBV_ACCESS_REMOTE_WRITE);
SAME_CONST(M5A_IBV_ACCESS_REMOTE_READ, IBV_ACCESS_REMOTE_READ);
SAME_CONST(M5A_IBV_FORK_DISABLED, IBV_FORK_DISABLED);
SAME_CONST(M5A_IBV_FORK_ENABLED, IBV_FORK_ENABLED);
SAME_CONST(M5A_IBV_FORK_UNNEEDED, IBV_FORK_UNNEEDED);
SAME_CONST(M5A_SYSFS_NAME_MAX, IBV_SYSFS_NAME_MAX);
SAME_CONST(M5A_SYSFS_PATH_MAX, IBV_SYSFS_PATH_MAX);

int main(void)
{
#ifdef MLX5TLP_HAVE_EXPORT_SIZES
	puts("abi_conformance: ibv_device, ibv_context, mlx5dv_context_attr, mlx5dv_var, "
	     "mlx5dv_devx_umem, mlx5dv_export_sizes and constants match the system headers");
#else
	puts("abi_conformance: ibv_device, ibv_context, mlx5dv_context_attr, mlx5dv_var, "
	     "mlx5dv_devx_umem and constants match the system headers; this rdma-core (< 63) "
	     "has no mlx5dv_export_sizes / MLX5DV_VAR_ALLOC_FLAG_TLP to compare");
#endif
	return 0;
}
