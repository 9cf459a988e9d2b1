/*
 * ABI conformance: our own declarations (mlx5tlp/abi.h, mlx5tlp/abi_functions.h) against the
 * system's rdma-core headers. Built wherever <infiniband/mlx5dv.h> exists (CI installs Debian's
 * libibverbs-dev, rdma-core 44; tests/test_abi_constants.py also builds it against any header
 * trees named in MLX5TLP_RDMA_INCLUDE, e.g. rdma-core v63.0's). Every check is a compile-time
 * assertion; the program only reports what it checked.
 *
 * Structs: ours must be a PREFIX of upstream's (each field we declare at the same offset with
 * the same size, our struct no larger), because upstream may append members in later releases
 * (mlx5dv_context_attr gained `fds` in rdma-core 61) and we only read the fields we declare or
 * pass comp_mask = 0 (see abi.h).
 * Functions: the prototype of every function the loader resolves, return and parameter types,
 * is compared with the system's (with our struct tags mapped to upstream's).
 */
#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#include <stddef.h>
#include <stdio.h>

#include "mlx5tlp/abi.h"

#define MEMBER_SIZE(type, m) sizeof(((struct type *)0)->m)
/* Our field `om` is upstream's `tm`: same offset, same size. */
#define SAME_FIELD(ours, theirs, om, tm)                                                    \
	_Static_assert(offsetof(struct ours, om) == offsetof(struct theirs, tm),            \
		       "offset of " #theirs "." #tm);                                       \
	_Static_assert(MEMBER_SIZE(ours, om) == MEMBER_SIZE(theirs, tm), "size of " #theirs "." #tm)
/* Ours is no larger than upstream's: a prefix, never a read or write past the real struct. */
#define PREFIX_OF(ours, theirs) \
	_Static_assert(sizeof(struct ours) <= sizeof(struct theirs), "sizeof " #theirs " (prefix)")
#define SAME_CONST(ours, theirs) _Static_assert((long long)(ours) == (long long)(theirs), #theirs)

PREFIX_OF(m5a_ibv_device, ibv_device);
SAME_FIELD(m5a_ibv_device, ibv_device, node_type, node_type);
SAME_FIELD(m5a_ibv_device, ibv_device, transport_type, transport_type);
SAME_FIELD(m5a_ibv_device, ibv_device, name, name);
SAME_FIELD(m5a_ibv_device, ibv_device, dev_name, dev_name);
SAME_FIELD(m5a_ibv_device, ibv_device, dev_path, dev_path);
SAME_FIELD(m5a_ibv_device, ibv_device, ibdev_path, ibdev_path);

PREFIX_OF(m5a_ibv_context, ibv_context);
SAME_FIELD(m5a_ibv_context, ibv_context, device, device);
SAME_FIELD(m5a_ibv_context, ibv_context, ops_, ops);
SAME_FIELD(m5a_ibv_context, ibv_context, cmd_fd, cmd_fd);
SAME_FIELD(m5a_ibv_context, ibv_context, async_fd, async_fd);
SAME_FIELD(m5a_ibv_context, ibv_context, num_comp_vectors, num_comp_vectors);
SAME_FIELD(m5a_ibv_context, ibv_context, mutex, mutex);
SAME_FIELD(m5a_ibv_context, ibv_context, abi_compat, abi_compat);

/* 16 bytes before rdma-core 61, 24 since (`fds` at 16): ours is the 16-byte prefix. */
PREFIX_OF(m5a_mlx5dv_context_attr, mlx5dv_context_attr);
SAME_FIELD(m5a_mlx5dv_context_attr, mlx5dv_context_attr, flags, flags);
SAME_FIELD(m5a_mlx5dv_context_attr, mlx5dv_context_attr, comp_mask, comp_mask);

PREFIX_OF(m5a_mlx5dv_var, mlx5dv_var);
SAME_FIELD(m5a_mlx5dv_var, mlx5dv_var, page_id, page_id);
SAME_FIELD(m5a_mlx5dv_var, mlx5dv_var, length, length);
SAME_FIELD(m5a_mlx5dv_var, mlx5dv_var, mmap_off, mmap_off);
SAME_FIELD(m5a_mlx5dv_var, mlx5dv_var, comp_mask, comp_mask);

PREFIX_OF(m5a_mlx5dv_devx_umem, mlx5dv_devx_umem);
SAME_FIELD(m5a_mlx5dv_devx_umem, mlx5dv_devx_umem, umem_id, umem_id);

/* Enum return types are read as int (abi.h). */
_Static_assert(sizeof(enum ibv_fork_status) == sizeof(int), "sizeof enum ibv_fork_status");

/* Every prototype in abi_functions.h against the system's. */
#define M5A_STRUCT(tag) struct tag
#define M5A_ENUM(tag) enum tag
#define SAME_PROTOTYPE(ret, name, params)                                          \
	_Static_assert(__builtin_types_compatible_p(__typeof__(&name), ret(*) params), \
		       "prototype (return or parameter types) of " #name);
#define M5A_FUNCTION SAME_PROTOTYPE
#ifdef MLX5TLP_HAVE_EXPORT_SIZES
#define M5A_FUNCTION_63 SAME_PROTOTYPE
#else
#define M5A_FUNCTION_63(ret, name, params)
#endif
#include "mlx5tlp/abi_functions.h"

#ifdef MLX5TLP_ABI_NEGATIVE_CHECK
/* tests/test_abi_constants.py builds with this defined and expects the build to FAIL: the
 * declaration this project once had must be caught by the checks above. */
SAME_PROTOTYPE(int, mlx5dv_is_supported, (struct ibv_device * device))
#endif

#ifdef MLX5TLP_HAVE_EXPORT_SIZES
PREFIX_OF(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes);
SAME_FIELD(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes, var_attrs_size, var_attrs_size);
SAME_FIELD(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes, devx_umem_attrs_size,
	   devx_umem_attrs_size);
SAME_FIELD(m5a_mlx5dv_export_sizes, mlx5dv_export_sizes, devx_obj_attrs_size,
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
	printf("abi_conformance: struct prefixes (ibv_device, ibv_context, mlx5dv_context_attr "
	       "%zu of %zu bytes, mlx5dv_var, mlx5dv_devx_umem%s), the prototypes of every "
	       "resolved function%s and constants match the system headers\n",
	       sizeof(struct m5a_mlx5dv_context_attr), sizeof(struct mlx5dv_context_attr),
#ifdef MLX5TLP_HAVE_EXPORT_SIZES
	       ", mlx5dv_export_sizes", " (MLX5_1.27 family included)"
#else
	       "", " (this rdma-core < 63 has no MLX5_1.27 family to compare)"
#endif
	);
	return 0;
}
