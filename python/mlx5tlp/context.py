"""Device contexts: open a device, or import one from a command fd another process shares."""

from __future__ import annotations

import errno
import os
import re
import stat
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union, cast

from mlx5tlp import _core, registry
from mlx5tlp._closing import Closing
from mlx5tlp.backend import resolve_backend
from mlx5tlp.envelope import DeviceIdentity, Kind
from mlx5tlp.errors import DeviceNotFoundError, Error, InvalidHandleError

if TYPE_CHECKING:
    from mlx5tlp.devx_obj import DevxObj
    from mlx5tlp.umem import Umem
    from mlx5tlp.var import Var

__all__ = ["Context", "TlpCaps", "open_device"]

BytesLike = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class TlpCaps:
    """TLP emulation capabilities of a device (``QUERY_HCA_CAP``, mlx5_ifc.h layouts).

    Attributes:
        supported: ``tlp_device_emulation_manager`` (general capabilities).
        gw_num_pages: ``tlp_rsp_gw_num_pages``: TLP response gateway pages (1..15).
        gw_page_stride: bytes per gateway page (``4096 << log_tlp_rsp_gw_page_stride``).
        gw_bar_offset: ``tlp_rsp_gw_pages_bar_offset``.
        gw_log_stride: ``log_tlp_rsp_gw_page_stride``.
    """

    supported: bool
    gw_num_pages: int
    gw_page_stride: int
    gw_bar_offset: int
    gw_log_stride: int


class Context(Closing):
    """A device context opened with DEVX (``mlx5dv_open_device``), or imported from an fd.

    Ownership: the context owns its command fd (``cmd_fd``); objects created or imported on it
    keep it alive. ``close()`` first closes every object still open on it (owned objects are
    freed, imported ones unimported), then the context; it is idempotent, and any later use
    raises :class:`~mlx5tlp.InvalidHandleError`. Use it as a context manager.

    Thread-safety: every method may be called from any thread; ``close()`` waits for calls in
    flight. The GIL is released around every call into rdma-core.
    """

    __slots__ = ("__weakref__", "_core", "_identity", "_umems")

    def __init__(self, core: _core.Context) -> None:
        """Internal: use :func:`open_device` or :meth:`Context.import_fd`."""
        self._core = core
        self._identity = DeviceIdentity(
            name=core.name,
            node_guid=int(core.node_guid),
            backend=core.backend,
            rdma_core_version=core.rdma_core_version or None,
        )
        # UMEMs registered here: close() must also release their buffers (see Umem).
        self._umems: weakref.WeakSet[Umem] = weakref.WeakSet()
        registry.register(self)

    @classmethod
    def import_fd(cls, fd: int, *, backend: Optional[str] = None) -> Context:
        """A second context on the same kernel objects as the context whose ``cmd_fd`` is `fd`.

        `fd` is duplicated before ``ibv_import_device`` (which owns the fd it is given): the
        caller keeps ownership of `fd` and may close it afterwards.

        Backend: `backend` if given; else the backend `fd` belongs to when that can be told
        from the fd (an rdma-core ``/dev/infiniband/uverbs*`` fd, or a software-device fd);
        else ``$MLX5TLP_BACKEND``, else ``"rdma"``.

        Raises:
            InvalidHandleError: `fd` is not a device context's command fd, or it is one of the
                other backend (``EINVAL``; the message names the backend it belongs to).
            NotSupportedError: rdma-core lacks ``ibv_import_device``.
        """
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"fd must be a non-negative int, not {fd!r}")
        owner = fd_backend(fd)
        if backend is None and owner is not None:
            chosen = owner[0]
        else:
            chosen = resolve_backend(backend)
            if owner is not None and owner[0] != chosen:
                raise InvalidHandleError(
                    errno.EINVAL,
                    f"fd {fd} is a command fd of the {owner[0]!r} backend ({owner[1]}), not of "
                    f"{chosen!r}: use backend={owner[0]!r} (or leave backend unset)",
                    "ibv_import_device",
                )
        return cls(_core.Context.import_fd(fd, chosen))

    # -- properties ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The device name, e.g. ``"mlx5_0"``."""
        return str(self._core.name)

    @property
    def backend(self) -> str:
        """``"rdma"`` or ``"sim"``."""
        return str(self._core.backend)

    @property
    def cmd_fd(self) -> int:
        """The command fd (owned by the context; dup it to keep it beyond ``close()``)."""
        return int(self._core.cmd_fd)

    @property
    def imported(self) -> bool:
        """True for a context made by :meth:`import_fd`."""
        return bool(self._core.imported)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return bool(self._core.closed)

    @property
    def identity(self) -> DeviceIdentity:
        """Who this context is, as recorded in export envelopes."""
        return self._identity

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Close every object still open on this context, then the context. Idempotent.

        Raises:
            Error: some object could not be released (a destroy failed with ``EBUSY`` or
                ``EREMOTEIO``, or a VAR is still mapped): the message names each one; they,
                and the context, stay open and usable, and ``close()`` may be called again.
                An object whose kernel object was already gone (``ENOENT``) is released
                without an error.
        """
        try:
            self._core.close()
        finally:
            # A UMEM's buffer stays pinned (exported to the core) until its dereg succeeded.
            for umem in list(self._umems):
                if umem.closed:
                    umem._release_buffer()


    def __repr__(self) -> str:
        state = "closed" if self.closed else f"cmd_fd={self._core.cmd_fd}"
        how = "imported " if self.imported else ""
        return f"<mlx5tlp.Context {how}{self.backend}:{self.name} {state}>"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError(
            "a Context cannot be pickled: send its fd with mlx5tlp.share.send() "
            "(SCM_RIGHTS) and use Context.import_fd() on the other side"
        )

    # -- queries ---------------------------------------------------------------------------
    def query_tlp_caps(self) -> TlpCaps:
        """Read the TLP emulation capabilities with ``QUERY_HCA_CAP``."""
        supported, pages, stride, bar, log_stride = self._core.query_tlp_caps()
        return TlpCaps(bool(supported), int(pages), int(stride), int(bar), int(log_stride))

    def devx_general_cmd(self, cmd_in: BytesLike, out_len: int) -> bytes:
        """Run a raw PRM command (``mlx5dv_devx_general_cmd``); returns the outbox.

        Raises:
            DevxCommandError: the firmware returned a bad status (``status``, ``syndrome``).
        """
        mailbox = _mailbox(cmd_in, "cmd_in", minimum=16)
        return bytes(self._core.general_cmd(mailbox, _out_len(out_len)))

    def export_size(self, kind: Kind) -> int:
        """This rdma-core's raw export size for `kind` (``mlx5dv_get_export_sizes``)."""
        return int(self._core.export_size(int(kind)))

    # -- objects ---------------------------------------------------------------------------
    def alloc_var(self, tlp: bool = False) -> Var:
        """Allocate a VAR page: a TLP response gateway page when `tlp`, else a VirtIO page.

        Raises:
            NotSupportedError: the device has no TLP emulation, or rdma-core < 63.
            ResourceExhaustedError: every gateway page is allocated.
        """
        return _var()._alloc(self, bool(tlp))

    def reg_umem(
        self, buffer: object, access: Optional[int] = None, *, allow_unaligned: bool = False
    ) -> Umem:
        """Register a writable buffer as a DEVX UMEM; see :meth:`mlx5tlp.Umem.register`."""
        return _umem()._register(self, buffer, access, allow_unaligned)

    def create_devx_obj(self, cmd_in: BytesLike, out_len: int) -> DevxObj:
        """Create a DEVX object from a raw PRM create command; the outbox is ``obj.out``."""
        return _devx_obj()._create(self, cmd_in, out_len)

    def import_var(self, blob: BytesLike, *, key: Optional[bytes] = None) -> Var:
        """Import a VAR from its export envelope; see :func:`mlx5tlp.import_blob`."""
        return _var()._import(self, blob, key)

    def import_umem(self, blob: BytesLike, *, key: Optional[bytes] = None) -> Umem:
        """Import a UMEM from its export envelope (its id, not its memory)."""
        return _umem()._import(self, blob, key)

    def import_devx_obj(self, blob: BytesLike, *, key: Optional[bytes] = None) -> DevxObj:
        """Import a DEVX object from its export envelope."""
        return _devx_obj()._import(self, blob, key)


# The object classes, from the registry (each registers itself where it is defined): Context
# needs no import of them, and the kinds are listed in one place.
def _var() -> type[Var]:
    return cast("type[Var]", registry.kind_class(Kind.VAR))


def _umem() -> type[Umem]:
    return cast("type[Umem]", registry.kind_class(Kind.UMEM))


def _devx_obj() -> type[DevxObj]:
    return cast("type[DevxObj]", registry.kind_class(Kind.DEVX_OBJ))


def fd_backend(fd: int) -> Optional[tuple[str, str]]:
    """Which backend a command fd belongs to, as ``(backend, what)``, or None if unknown.

    An rdma-core command fd is the character device ``/dev/infiniband/uverbs<N>``; a
    software-device command fd is that device's ``bar`` file, beside its ``state`` file
    (docs/sim.md). Only the fd's own metadata is read; nothing is imported.
    """
    try:
        st = os.fstat(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # a bad fd: ibv_import_device reports it
    if stat.S_ISCHR(st.st_mode) and re.fullmatch(r"/dev/infiniband/uverbs\d+", path):
        return "rdma", path
    if (stat.S_ISREG(st.st_mode) and os.path.basename(path) == "bar"
            and os.path.isfile(os.path.join(os.path.dirname(path), "state"))):
        return "sim", f"software device {os.path.basename(os.path.dirname(path))!r} at {path}"
    return None


def _mailbox(data: object, what: str, minimum: int = 8) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes-like, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) < minimum or len(raw) % 4:
        raise ValueError(
            f"{what} must be a PRM mailbox: a multiple of 4 bytes, at least {minimum}"
        )
    return raw


def _out_len(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 16 <= n <= (1 << 20):
        raise ValueError(f"out_len must be an int in 16..1048576, not {n!r}")
    return n


def open_device(name: Optional[str] = None, *, backend: Optional[str] = None) -> Context:
    """Open device `name` (the first mlx5 device when None) with DEVX.

    Backend: `backend`, else ``$MLX5TLP_BACKEND``, else ``"rdma"``.

    Raises:
        DeviceNotFoundError: no such device (the message lists those there are; on the rdma
            backend with no mlx5 device at all it also points to the software device).
        LibraryNotFoundError: rdma-core is not installed (or use ``backend="sim"``).
        NotSupportedError: the device is not an mlx5 device.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, not {type(name).__name__}")
    chosen = resolve_backend(backend)
    try:
        return Context(_core.Context.open(name or "", chosen))
    except DeviceNotFoundError as exc:
        if chosen != "rdma" or _has_mlx5_device(chosen):
            raise
        raise DeviceNotFoundError(
            exc.errno,
            f"{exc}; without mlx5 hardware, use the bundled software device: "
            "open_device(backend=\"sim\") or MLX5TLP_BACKEND=sim (try `mlx5tlp demo`)",
            exc.operation,
        ) from None


def _has_mlx5_device(backend: str) -> bool:
    from mlx5tlp.backend import list_devices

    try:
        return any(d.mlx5 for d in list_devices(backend))
    except Error:
        return False
