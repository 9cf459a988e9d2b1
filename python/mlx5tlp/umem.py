"""DEVX UMEMs: user memory registered with the device."""

from __future__ import annotations

import mmap
import os
from typing import Optional

from mlx5tlp import _core, registry
from mlx5tlp._object import BytesLike, DeviceObject
from mlx5tlp.context import Context
from mlx5tlp.envelope import Kind

__all__ = ["ACCESS_LOCAL_WRITE", "ACCESS_REMOTE_READ", "ACCESS_REMOTE_WRITE", "Umem",
           "alloc_umem_buffer"]

# IBV_ACCESS_* (verbs.h), pinned by tests/test_abi_constants.py
ACCESS_LOCAL_WRITE = 1 << 0
ACCESS_REMOTE_WRITE = 1 << 1
ACCESS_REMOTE_READ = 1 << 2
_FORK_UNNEEDED = "unneeded"


def alloc_umem_buffer(size: int, *, fd: Optional[int] = None) -> mmap.mmap:
    """A page-aligned buffer for a UMEM, whole pages long.

    libmlx5 marks a registered range ``MADV_DONTFORK`` rounded out to whole pages, so a UMEM
    over ordinary heap memory can take neighbouring Python objects away from a forked child.
    A buffer from here shares its pages with nothing. With `fd` (e.g. from
    ``os.memfd_create``) the buffer is that file, so another process can map the same bytes:
    an imported UMEM carries the id, not the memory.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, not {size!r}")
    page = mmap.PAGESIZE
    length = (size + page - 1) // page * page
    if fd is None:
        return mmap.mmap(-1, length, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    if os.fstat(fd).st_size < length:
        os.ftruncate(fd, length)
    return mmap.mmap(fd, length, mmap.MAP_SHARED)


@registry.register_kind
class Umem(DeviceObject):
    """A DEVX UMEM (``mlx5dv_devx_umem_reg``). The registered buffer is kept alive, and a
    ``bytearray`` cannot be resized, while the UMEM is open."""

    KIND = Kind.UMEM
    __slots__ = ("_buffer",)

    def __init__(self, core: object, ctx: Context, buffer: Optional[memoryview] = None) -> None:
        super().__init__(core, ctx)
        self._buffer = buffer

    @classmethod
    def _register(
        cls, ctx: Context, buffer: object, access: Optional[int], allow_unaligned: bool
    ) -> Umem:
        try:
            view = memoryview(buffer)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"a UMEM needs a buffer-protocol object, not {type(buffer).__name__}"
            ) from None
        if view.readonly:
            raise TypeError("a UMEM buffer must be writable (bytes is read-only: use bytearray)")
        if not view.c_contiguous:
            raise ValueError("a UMEM buffer must be C-contiguous")
        view = view.cast("B")
        if view.nbytes == 0:
            raise ValueError("cannot register an empty buffer")
        if access is None:
            access = ACCESS_LOCAL_WRITE
        if not isinstance(access, int) or access < 0 or access >= 1 << 15:
            raise ValueError(f"access must be IBV_ACCESS_* flags, not {access!r}")
        if not allow_unaligned:
            _check_fork_safe(ctx, view)
        umem = cls(_core.Umem.reg(ctx._core, view, access), ctx, view)
        ctx._umems.add(umem)
        return umem

    @classmethod
    def _import(cls, ctx: Context, blob: BytesLike, key: Optional[bytes]) -> Umem:
        env = cls._open(ctx, blob, key)
        return cls(_core.Umem.import_(ctx._core, env.raw), ctx)

    @property
    def umem_id(self) -> int:
        """The UMEM id to put in PRM commands."""
        return int(self._core.umem_id)

    @property
    def size(self) -> int:
        """Registered bytes (0 for an imported UMEM: the export does not carry it)."""
        return int(self._core.size)

    def close(self) -> None:
        """Deregister (owned) or unimport (imported), then release the buffer; idempotent.

        The buffer stays pinned (kept exported, a ``bytearray`` not resizable) until the
        dereg succeeded: after a refused dereg (``EBUSY``, ...) the UMEM is still registered.
        """
        try:
            super().close()
        finally:
            if self.closed:
                self._release_buffer()

    def free(self) -> None:
        """Deregister the UMEM (``mlx5dv_devx_umem_dereg``), then release the buffer."""
        try:
            super().free()
        finally:
            if self.closed:
                self._release_buffer()

    def unimport(self) -> None:
        """Drop an imported UMEM (the kernel object stays)."""
        super().unimport()
        self._release_buffer()

    def _release_buffer(self) -> None:
        if self._buffer is not None:
            self._buffer.release()
            self._buffer = None

    def __repr__(self) -> str:
        if self.closed:
            return "<mlx5tlp.Umem closed>"
        how = "imported" if self.imported else f"owned size={self.size}"
        return f"<mlx5tlp.Umem umem_id={self.umem_id:#x} {how}>"


def _check_fork_safe(ctx: Context, view: memoryview) -> None:
    import ctypes

    from mlx5tlp.backend import rdma_info

    if rdma_info(ctx.backend).fork_status == _FORK_UNNEEDED:
        return  # the kernel copies pinned pages on fork: no MADV_DONTFORK hazard
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    page = mmap.PAGESIZE
    if addr % page or view.nbytes % page:
        raise ValueError(
            "UMEM buffer is not page-aligned: libmlx5 marks whole pages MADV_DONTFORK, so "
            "neighbouring heap objects would vanish in a forked child; use "
            "mlx5tlp.alloc_umem_buffer(size), or pass allow_unaligned=True if this process "
            "never forks"
        )
