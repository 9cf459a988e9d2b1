"""VAR pages: TLP response gateway pages and VirtIO doorbell pages."""

from __future__ import annotations

import errno
import mmap
import weakref
from typing import TYPE_CHECKING, Optional

from mlx5tlp import _core, registry
from mlx5tlp._object import BytesLike, DeviceObject
from mlx5tlp.context import Context
from mlx5tlp.envelope import FLAG_TLP_VAR, Kind
from mlx5tlp.errors import InvalidHandleError

if TYPE_CHECKING:
    from mlx5tlp.gateway import Gateway

__all__ = ["Var"]


class _PageMapping(mmap.mmap):
    """A Python mapping of a VAR page that the VAR counts until it is closed (see Var.mmap).

    On the software device the page is its ``bar`` file, which another process can truncate:
    the mapping is registered with the SIGBUS guard (docs/sim.md), and unregistered before it
    is unmapped — in :meth:`close`, and in ``__del__`` for a mapping dropped without it
    (``__del__`` runs before ``mmap``'s own deallocation unmaps; a weakref callback would not).
    """

    _hold: _core.MappingHold

    def close(self) -> None:
        self._hold.unguard()  # before the munmap: the address may be reused at once
        try:
            super().close()
        finally:
            self._hold.release()

    def __del__(self) -> None:
        hold = getattr(self, "_hold", None)
        if hold is not None:
            hold.unguard()

    def __exit__(self, *exc: object) -> None:
        self.close()


@registry.register_kind
class Var(DeviceObject):
    """A VAR page from ``mlx5dv_alloc_var``: a TLP response gateway page when ``is_tlp``.

    The page is mapped with ``mmap(cmd_fd, offset=mmap_off, length)``. Use :meth:`mmap` for a
    Python mapping, or ``gateway()`` to write completions through the doorbell loop. Owned VARs
    are freed (the page returns to the device's pool); imported ones are unimported.
    """

    KIND = Kind.VAR
    __slots__ = ()

    @classmethod
    def _alloc(cls, ctx: Context, tlp: bool) -> Var:
        return cls(_core.Var.alloc(ctx._core, tlp), ctx)

    @classmethod
    def _import(cls, ctx: Context, blob: BytesLike, key: Optional[bytes]) -> Var:
        env = cls._open(ctx, blob, key)
        var = cls(_core.Var.import_(ctx._core, env.raw, bool(env.flags & FLAG_TLP_VAR)), ctx)
        # Import itself asks the kernel nothing (upstream rebuilds the struct from the buffer),
        # so ask once now: the kernel refuses the mapping of a freed VAR's offset. Where the
        # backend confirmed the live VAR behind the handle (the software device's identity
        # check: same page, length and offset in this context), the mapping is known to work.
        if not var._core.identity_checked and not var._core.probe():
            var.unimport()
            raise InvalidHandleError(
                errno.EINVAL,
                f"VAR page {var.page_id} of device {ctx.name} cannot be mapped: its exporter "
                "freed it, or this context does not share the exporter's objects (import the "
                "exporter's command fd with Context.import_fd first)",
                "mlx5dv_var_import",
            )
        return var

    def _flags(self) -> int:
        return FLAG_TLP_VAR if self.is_tlp else 0

    @property
    def page_id(self) -> int:
        """The page index in the device's VAR region."""
        return int(self._core.page_id)

    @property
    def length(self) -> int:
        """Bytes to map (the gateway page stride for a TLP VAR)."""
        return int(self._core.length)

    @property
    def mmap_off(self) -> int:
        """Offset to pass to ``mmap`` on the context's ``cmd_fd``."""
        return int(self._core.mmap_off)

    @property
    def is_tlp(self) -> bool:
        """True for a TLP response gateway page (``MLX5DV_VAR_ALLOC_FLAG_TLP``)."""
        return bool(self._core.is_tlp)

    def probe(self) -> bool:
        """Would the kernel map this page now? False once its owner freed it."""
        return bool(self._core.probe())

    def mmap(self, prot: int = mmap.PROT_WRITE) -> mmap.mmap:
        """Map the page into a Python ``mmap`` (``MAP_SHARED`` on ``cmd_fd`` at ``mmap_off``).

        The default protection is write-only, as for a gateway page; pass
        ``mmap.PROT_READ | mmap.PROT_WRITE`` to read it back (the software device allows it).
        The mapping is counted by this VAR until it is closed (``close()``, ``with``, or
        garbage collection): :meth:`free` (and :meth:`Context.close`) refuse with ``EBUSY``
        while it is open, so no mapping made here outlives its page.

        Raises:
            InvalidHandleError: the VAR is closed, or its page was freed by its owner.
        """
        if not self._core.probe():
            raise InvalidHandleError(
                errno.EINVAL, f"VAR page {self.page_id} was freed: the kernel refuses its mapping",
                "mmap",
            )
        hold = self._core.hold_mapping()
        try:
            m = _PageMapping(
                self._ctx.cmd_fd, self.length, mmap.MAP_SHARED, prot, offset=self.mmap_off
            )
        except BaseException:
            hold.release()
            raise
        m._hold = hold
        try:
            hold.guard(m, prot)
        except BaseException:
            m.close()
            raise
        # A mapping dropped without close() is unmapped by the collector: uncount it then too.
        weakref.finalize(m, hold.release)
        return m

    def gateway(
        self,
        layout: Optional[str] = None,
        *,
        direct: bool = False,
        ring_slots: int = 1024,
        batch_max: int = 64,
        drain_timeout: Optional[float] = 10.0,
    ) -> Gateway:
        """Map this TLP gateway page and open a :class:`~mlx5tlp.gateway.Gateway` on it.

        Args:
            layout: record layout: ``"sim"`` (default on the software device) or
                ``"raw_tlp[:<slot bytes>]"`` (provisional hardware layout, default on rdma).
            direct: write from the calling thread (no ring, no writer thread).
            ring_slots: ring capacity in loop mode: a power of two in [2, 2**30]
                (:data:`mlx5tlp.gateway.MAX_RING_SLOTS`).
            batch_max: records per doorbell at most.
            drain_timeout: seconds close() waits for the device to take what is queued
                (None: no limit).

        Raises:
            InvalidArgumentError: a VirtIO VAR, a page the layout does not recognise, or
                `ring_slots` / `batch_max` out of range.
            ResourceExhaustedError: the ring cannot be allocated (``ENOMEM``) or the writer
                thread cannot be started (``EAGAIN``: a process or memory limit).
            Error: ``EBUSY``: the page already has a gateway (this or another process).
        """
        from mlx5tlp.gateway import open_gateway

        return open_gateway(
            self, layout, direct=direct, ring_slots=ring_slots, batch_max=batch_max,
            drain_timeout=drain_timeout,
        )

    def __repr__(self) -> str:
        what = "TLP gateway VAR" if self.is_tlp else "VirtIO VAR"
        if self.closed:
            return f"<mlx5tlp.Var {what} closed>"
        how = "imported" if self.imported else "owned"
        return (
            f"<mlx5tlp.Var {what} page_id={self.page_id} length={self.length} "
            f"mmap_off={self.mmap_off:#x} {how}>"
        )
