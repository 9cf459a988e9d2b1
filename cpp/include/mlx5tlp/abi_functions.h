/*
 * mlx5tlp/abi_functions.h — the prototype of every rdma-core function the loader resolves,
 * as one X-macro list (deliberately no include guard: it is expanded more than once).
 *
 * The includer defines
 *   M5A_STRUCT(tag)                  the struct type for an rdma-core struct tag,
 *   M5A_ENUM(tag)                    the type for an rdma-core enum tag,
 *   M5A_FUNCTION(ret, name, params)  what to make of each prototype,
 *   M5A_FUNCTION_63(ret, name, params)  the same for the rdma-core >= 63 (MLX5_1.27) family.
 * mlx5tlp/abi.h maps the tags to our m5a_ copies and makes the m5a_<name>_fn typedefs the
 * loader uses; tests/cpp/abi_conformance.c maps them to the real tags and checks each against
 * the system prototype with __builtin_types_compatible_p, so a return or parameter type that
 * differs from rdma-core's (as `int mlx5dv_is_supported` once did) fails to compile; the
 * software device declares each function from this list, so its definitions must match too.
 *
 * Prototypes as in rdma-core v63.0 libibverbs/verbs.h and providers/mlx5/mlx5dv.h. __be64 is
 * written as its LP64 Linux type (linux/types.h: __u64 = unsigned long long).
 */

/* libibverbs */
M5A_FUNCTION(M5A_STRUCT(ibv_device) **, ibv_get_device_list, (int *num_devices))
M5A_FUNCTION(void, ibv_free_device_list, (M5A_STRUCT(ibv_device) **list))
M5A_FUNCTION(const char *, ibv_get_device_name, (M5A_STRUCT(ibv_device) *device))
M5A_FUNCTION(unsigned long long, ibv_get_device_guid, (M5A_STRUCT(ibv_device) *device))
M5A_FUNCTION(M5A_STRUCT(ibv_context) *, ibv_open_device, (M5A_STRUCT(ibv_device) *device))
M5A_FUNCTION(int, ibv_close_device, (M5A_STRUCT(ibv_context) *context))
M5A_FUNCTION(M5A_STRUCT(ibv_context) *, ibv_import_device, (int cmd_fd))
M5A_FUNCTION(M5A_ENUM(ibv_fork_status), ibv_is_fork_initialized, (void))

/* libmlx5 */
M5A_FUNCTION(bool, mlx5dv_is_supported, (M5A_STRUCT(ibv_device) *device))
M5A_FUNCTION(M5A_STRUCT(ibv_context) *, mlx5dv_open_device,
	     (M5A_STRUCT(ibv_device) *device, M5A_STRUCT(mlx5dv_context_attr) *attr))
M5A_FUNCTION(M5A_STRUCT(mlx5dv_var) *, mlx5dv_alloc_var,
	     (M5A_STRUCT(ibv_context) *context, uint32_t flags))
M5A_FUNCTION(void, mlx5dv_free_var, (M5A_STRUCT(mlx5dv_var) *dv_var))
M5A_FUNCTION(M5A_STRUCT(mlx5dv_devx_umem) *, mlx5dv_devx_umem_reg,
	     (M5A_STRUCT(ibv_context) *context, void *addr, size_t size, uint32_t access))
M5A_FUNCTION(int, mlx5dv_devx_umem_dereg, (M5A_STRUCT(mlx5dv_devx_umem) *umem))
M5A_FUNCTION(M5A_STRUCT(mlx5dv_devx_obj) *, mlx5dv_devx_obj_create,
	     (M5A_STRUCT(ibv_context) *context, const void *in, size_t inlen, void *out,
	      size_t outlen))
M5A_FUNCTION(int, mlx5dv_devx_obj_query,
	     (M5A_STRUCT(mlx5dv_devx_obj) *obj, const void *in, size_t inlen, void *out,
	      size_t outlen))
M5A_FUNCTION(int, mlx5dv_devx_obj_modify,
	     (M5A_STRUCT(mlx5dv_devx_obj) *obj, const void *in, size_t inlen, void *out,
	      size_t outlen))
M5A_FUNCTION(int, mlx5dv_devx_obj_destroy, (M5A_STRUCT(mlx5dv_devx_obj) *obj))
M5A_FUNCTION(int, mlx5dv_devx_general_cmd,
	     (M5A_STRUCT(ibv_context) *context, const void *in, size_t inlen, void *out,
	      size_t outlen))

/* libmlx5, rdma-core >= 63 (symbol version MLX5_1.27) */
M5A_FUNCTION_63(void, _mlx5dv_get_export_sizes,
		(M5A_STRUCT(mlx5dv_export_sizes) *sizes, size_t sizes_len))
M5A_FUNCTION_63(int, mlx5dv_var_export, (M5A_STRUCT(mlx5dv_var) *dv_var, void *data))
M5A_FUNCTION_63(M5A_STRUCT(mlx5dv_var) *, mlx5dv_var_import,
		(M5A_STRUCT(ibv_context) *context, void *data))
M5A_FUNCTION_63(void, mlx5dv_var_unimport, (M5A_STRUCT(mlx5dv_var) *dv_var))
M5A_FUNCTION_63(int, mlx5dv_devx_umem_export, (M5A_STRUCT(mlx5dv_devx_umem) *umem, void *data))
M5A_FUNCTION_63(M5A_STRUCT(mlx5dv_devx_umem) *, mlx5dv_devx_umem_import,
		(M5A_STRUCT(ibv_context) *context, void *data))
M5A_FUNCTION_63(void, mlx5dv_devx_umem_unimport, (M5A_STRUCT(mlx5dv_devx_umem) *umem))
M5A_FUNCTION_63(int, mlx5dv_devx_obj_export, (M5A_STRUCT(mlx5dv_devx_obj) *obj, void *data))
M5A_FUNCTION_63(M5A_STRUCT(mlx5dv_devx_obj) *, mlx5dv_devx_obj_import,
		(M5A_STRUCT(ibv_context) *context, void *data))
M5A_FUNCTION_63(void, mlx5dv_devx_obj_unimport, (M5A_STRUCT(mlx5dv_devx_obj) *obj))
