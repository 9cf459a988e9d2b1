/*
 * A stand-in for libibverbs + libmlx5 that misbehaves in exactly the ways rdma-core may, for
 * tests/test_loader_fake.py (built there with the system C compiler; never shipped).
 *
 * - mlx5dv_is_supported() returns bool false the way a compiler may: only the low byte of the
 *   return register is defined (0), the upper bytes are garbage. A caller that declares it
 *   `int` reads non-zero, i.e. "is mlx5" (the defect of issue 10 A1).
 * - ibv_import_device() follows $FAKE_RDMA_IMPORT: "closed" plays a failure after the fd
 *   matched a device (libibverbs closes the fd, as mlx5_import_context -> mlx5_uninit_context
 *   does) and then lets "another thread" be given the same fd number; "nomatch" plays a fd
 *   that matches no device (ENODEV, fd untouched). fake_rdma_reused_fd() tells the test which
 *   number was reused, so it can check nobody closed that fd a second time.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct fake_device {
	void *ops_[2];
	int node_type;
	int transport_type;
	char name[64];
	char dev_name[64];
	char dev_path[256];
	char ibdev_path[256];
};

static struct fake_device device0 = {.name = "fake0"};
static struct fake_device *list0[2] = {&device0, NULL};
static int reused_fd = -1;

struct fake_device **ibv_get_device_list(int *num_devices)
{
	if (num_devices)
		*num_devices = 1;
	return list0;
}

void ibv_free_device_list(struct fake_device **list) { (void)list; }

const char *ibv_get_device_name(struct fake_device *device) { return device->name; }

unsigned long long ibv_get_device_guid(struct fake_device *device)
{
	(void)device;
	return 0;
}

void *ibv_open_device(struct fake_device *device)
{
	(void)device;
	errno = ENOSYS;
	return NULL;
}

int ibv_close_device(void *context)
{
	(void)context;
	return 0;
}

void *ibv_import_device(int cmd_fd)
{
	const char *mode = getenv("FAKE_RDMA_IMPORT");
	if (mode != NULL && strcmp(mode, "closed") == 0) {
		close(cmd_fd);
		reused_fd = open("/dev/null", O_RDONLY | O_CLOEXEC); /* lowest free: cmd_fd again */
		errno = EIO;
		return NULL;
	}
	errno = ENODEV;
	return NULL;
}

void *mlx5dv_open_device(struct fake_device *device, void *attr)
{
	(void)device;
	(void)attr;
	errno = ENOSYS;
	return NULL;
}

int fake_rdma_reused_fd(void) { return reused_fd; }

/* bool false with garbage above the low byte of the return register. */
#if defined(__x86_64__)
__asm__(".text\n.globl mlx5dv_is_supported\n.type mlx5dv_is_supported,@function\n"
	"mlx5dv_is_supported:\n\tmovl $0x5a5a5a00, %eax\n\tret\n"
	".size mlx5dv_is_supported, .-mlx5dv_is_supported\n");
#elif defined(__aarch64__)
__asm__(".text\n.globl mlx5dv_is_supported\n.type mlx5dv_is_supported,%function\n"
	"mlx5dv_is_supported:\n\tmov w0, #0x5a00\n\tmovk w0, #0x5a5a, lsl #16\n\tret\n"
	".size mlx5dv_is_supported, .-mlx5dv_is_supported\n");
#else
#error "fake_rdma.c: x86_64 or aarch64 only"
#endif
