"""What Var, Umem and DevxObj share: ownership, close/free/unimport, export envelopes, pickle."""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

from mlx5tlp import registry
from mlx5tlp._closing import Closing
from mlx5tlp.context import Context
from mlx5tlp.envelope import Envelope, Kind, open_envelope, peek_device, peek_kind, seal
from mlx5tlp.errors import DeviceNotFoundError, InvalidHandleError

__all__ = ["DeviceObject", "import_blob"]

BytesLike = Union[bytes, bytearray, memoryview]


class DeviceObject(Closing):
    """Base of :class:`Var`, :class:`Umem` and :class:`DevxObj`.

    An object is *owned* (created here) or *imported* (from an envelope). ``free()`` destroys
    the kernel object, whoever calls it: exactly one party frees (the owner, or an importer
    that took over from a dead owner), every other party unimports. ``unimport()`` (imported
    objects only) drops the object here and leaves the kernel object alone. ``close()`` is
    ``free()`` for owned objects and ``unimport()`` for imported ones, and is idempotent; any
    other use after a release raises :class:`~mlx5tlp.InvalidHandleError`.

    A failed ``free()``/``close()`` releases the handle only when the kernel object is already
    gone (``ENOENT``, raised as :class:`~mlx5tlp.InvalidHandleError`). Any other failure
    (``EBUSY``: in use; ``EREMOTEIO``: the firmware refused, as
    :class:`~mlx5tlp.DevxCommandError`) leaves the object alive and usable: call ``free()`` or
    ``close()`` again later.
    Thread-safety: methods may be called from any thread.
    """

    KIND: ClassVar[Kind]
    __slots__ = ("__weakref__", "_core", "_ctx")

    def __init__(self, core: Any, ctx: Context) -> None:
        self._core = core
        self._ctx = ctx

    @property
    def context(self) -> Context:
        """The context this object lives on (kept alive by the object)."""
        return self._ctx

    @property
    def imported(self) -> bool:
        """True when imported from an envelope (close = unimport)."""
        return bool(self._core.imported)

    @property
    def closed(self) -> bool:
        """True once freed, unimported or closed."""
        return bool(self._core.closed)

    def free(self) -> None:
        """Destroy the kernel object (owned or imported: exactly one party frees).

        Raises:
            InvalidHandleError: already released, or the kernel object was already gone
                (``ENOENT``: the handle is released now).
            Error: ``EBUSY`` (in use, or a VAR still mapped) and other refusals: the object
                stays alive; retry later.
            DevxCommandError: ``EREMOTEIO``, the firmware refused; the object stays alive.
        """
        self._core.free()

    def unimport(self) -> None:
        """Drop this imported object without destroying the kernel object."""
        self._core.unimport()

    def close(self) -> None:
        """``free()`` if owned, ``unimport()`` if imported; idempotent."""
        self._core.close()


    # -- export ----------------------------------------------------------------------------
    def _flags(self) -> int:
        return 0

    def export(self, *, key: Optional[bytes] = None) -> bytes:
        """This object's validated export envelope (see docs/export-format.md).

        With `key` (>= 16 bytes) the envelope carries an HMAC-SHA256 that import checks.

        Raises:
            NotSupportedError: rdma-core < 63 has no export (``mlx5dv_*_export``).
            InvalidHandleError: the object is closed.
        """
        raw = bytes(self._core.export_raw())
        return seal(self.KIND, raw, self._ctx.identity, flags=self._flags(), key=key)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle, (self.export(),))

    @classmethod
    def _import(cls, ctx: Context, blob: BytesLike, key: Optional[bytes]) -> DeviceObject:
        """Import an envelope of this class's kind onto `ctx` (each kind defines it)."""
        raise NotImplementedError

    @classmethod
    def _open(cls, ctx: Context, blob: BytesLike, key: Optional[bytes]) -> Envelope:
        return open_envelope(
            blob,
            expected_kind=cls.KIND,
            raw_size=ctx.export_size,
            device=ctx.identity,
            key=key,
        )


def import_blob(ctx: Context, blob: BytesLike, *, key: Optional[bytes] = None) -> DeviceObject:
    """Import any exported object onto `ctx`, dispatching on the envelope's kind.

    Every check of the envelope (magic, version, kind, size, device, rdma-core version, CRC,
    HMAC) runs before rdma-core sees the raw buffer.

    Raises:
        ExportFormatError: the envelope failed a check (the message says which), or a VAR's
            length is not a whole number of pages.
        InvalidHandleError: a VAR whose owner already freed it (its mapping is refused,
            ``EINVAL``). On the software device also: the envelope's handle names no object
            (``ENOENT``) or another object than the one exported (``ESTALE``: the kernel
            reuses the lowest free handle). rdma-core cannot tell these for a UMEM or DEVX
            object (docs/export-format.md, "What the envelope proves").
    """
    return registry.kind_class(peek_kind(blob))._import(ctx, blob, key)


def _unpickle(blob: bytes) -> DeviceObject:
    kind, device = peek_device(blob)
    contexts = registry.candidates(device)
    if not contexts:
        raise DeviceNotFoundError(
            None,
            f"cannot unpickle a {kind.name} of device {device.name} "
            f"(guid {device.node_guid:#018x}, backend {device.backend}): this process has no "
            "open context sharing that device's objects; receive the exporter's context fd "
            "first (mlx5tlp.share.recv or Context.import_fd)",
            "unpickle",
        )
    refused: Optional[InvalidHandleError] = None
    for ctx in contexts:
        try:
            return import_blob(ctx, blob)
        except InvalidHandleError as exc:  # a VAR this context cannot map: not the sharer
            refused = exc
    assert refused is not None
    raise refused
