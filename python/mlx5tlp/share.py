"""Pass a device context and exported objects to another process over a UNIX socket.

The sender passes the context's command fd with ``SCM_RIGHTS`` together with a list of export
envelopes (see :mod:`mlx5tlp.envelope`); the receiver checks the peer's credentials
(``SO_PEERCRED``), imports the device from the fd (``ibv_import_device``) and every envelope
onto it.

Two layers:

* :func:`send_fds` / :func:`recv_fds` move fds and byte payloads, nothing else. They work on
  plain fds and need neither rdma-core nor the compiled core.
* :func:`send` / :func:`recv` use them for a context plus objects (duck-typed: the context has
  ``cmd_fd`` and ``backend``; objects have ``export(key=None) -> bytes``). The context's
  backend travels with it: :func:`send` puts a context descriptor (``b"MLX5CTX\\0"`` + JSON
  ``{"backend": ..., "device": ...}``) before the envelopes, and :func:`recv` imports the fd on
  that backend without the receiver naming it.

Wire format (all integers little-endian), one message per :func:`send_fds` call::

    magic     8 bytes  b"MLX5FDS\\0"
    version   u16      1
    nfds      u16      number of fds in the SCM_RIGHTS message
    npayloads u32
    lengths   npayloads x u32
    payloads  the payload bytes, concatenated

The header and the fds go in one ``sendmsg()`` (the fds ride on the header's first byte).

fd ownership: :func:`recv_fds` returns new fds (close-on-exec) owned by the caller. On any
error after fds arrived, it closes all of them before raising. :func:`recv` passes its fd to
``Context.import_fd()``, which duplicates it (``ibv_import_device()`` takes ownership of the fd
it gets and closes it when the context is closed), then closes its own copy, whether the import
worked or not. If importing the context or any object fails, everything imported so far is
closed before the error propagates. See ``docs/export-format.md``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import importlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from mlx5tlp._deadline import Deadline
from mlx5tlp.errors import (
    Error,
    InvalidArgumentError,
    PermissionDeniedError,
    TimedOutError,
)

__all__ = [
    "CONTEXT_MAGIC",
    "MAX_FDS",
    "MAX_PAYLOADS",
    "MAX_PAYLOAD_BYTES",
    "MessageAssembler",
    "WIRE_MAGIC",
    "WIRE_VERSION",
    "PeerCredentials",
    "ProtocolError",
    "context_descriptor",
    "parse_context_descriptor",
    "peer_credentials",
    "recv",
    "recv_fds",
    "send",
    "send_fds",
    "socketpair",
]

WIRE_MAGIC = b"MLX5FDS\x00"
"""First 8 bytes of every message."""

WIRE_VERSION = 1
"""Message format version."""

CONTEXT_MAGIC = b"MLX5CTX\x00"
"""First 8 bytes of the context descriptor, the first payload of a :func:`send` message."""

_MAX_DESCRIPTOR = 4096
_BACKENDS = ("rdma", "sim")

MAX_FDS = 253
"""Most fds one message may carry (Linux ``SCM_MAX_FD``)."""

MAX_PAYLOADS = 256
"""Most payloads one message may carry."""

MAX_PAYLOAD_BYTES = 1 << 20
"""Largest total payload size of one message."""

_PREFIX = struct.Struct("<8sHHI")
_LEN = struct.Struct("<I")
_PEERCRED = struct.Struct("3i")
_SO_PEERCRED: int = getattr(socket, "SO_PEERCRED", 17)
_MSG_CMSG_CLOEXEC: int = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)
_FD_SIZE = array.array("i").itemsize


class ProtocolError(Error):
    """A message on the socket was malformed, truncated or carried the wrong number of fds."""

    def __init__(self, errno: int | None, message: str, operation: str | None = "recv_fds") -> None:
        super().__init__(errno, message, operation)


@dataclass(frozen=True)
class PeerCredentials:
    """The peer's credentials from ``SO_PEERCRED``.

    They are those of the process that called ``connect()`` (or ``socketpair()``) at that time,
    not necessarily of the process that wrote the message.
    """

    pid: int
    uid: int
    gid: int


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of ``AF_UNIX``/``SOCK_STREAM`` sockets (close-on-exec)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _check_socket(sock: socket.socket) -> None:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if sock.family != socket.AF_UNIX:
        raise ValueError(f"fd passing needs an AF_UNIX socket, got {sock.family!r}")
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"fd passing needs a SOCK_STREAM socket, got {sock.type!r}")


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The peer's ``SO_PEERCRED`` credentials of a connected ``AF_UNIX`` socket."""
    _check_socket(sock)
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def send_fds(sock: socket.socket, fds: Sequence[int], payloads: Sequence[bytes]) -> None:
    """Send fds and byte payloads as one framed message.

    The fds are duplicated into the receiver by the kernel; the caller keeps (and still owns)
    its own. Blocks until everything is written (honouring the socket's timeout).

    Raises:
        TypeError, ValueError: wrong socket type/family, bad fd or payload, limits exceeded.
        OSError: the send failed (e.g. ``EBADF`` for a closed fd, ``EPIPE``).
    """
    _check_socket(sock)
    fd_list = [int(fd) for fd in fds]
    if any(isinstance(fd, bool) or fd < 0 for fd in fds):
        raise ValueError(f"fds must be non-negative integers, got {list(fds)!r}")
    if len(fd_list) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds per message, got {len(fd_list)}")
    blobs: list[bytes] = []
    for i, p in enumerate(payloads):
        if not isinstance(p, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload {i} must be bytes-like, not {type(p).__name__}")
        blobs.append(bytes(p))
    if len(blobs) > MAX_PAYLOADS:
        raise ValueError(f"at most {MAX_PAYLOADS} payloads per message, got {len(blobs)}")
    total = sum(len(b) for b in blobs)
    if total > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payloads total {total} bytes, at most {MAX_PAYLOAD_BYTES}")

    header = _PREFIX.pack(WIRE_MAGIC, WIRE_VERSION, len(fd_list), len(blobs)) + b"".join(
        _LEN.pack(len(b)) for b in blobs
    )
    message = header + b"".join(blobs)
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list).tobytes())]
        if fd_list
        else []
    )
    sent = sock.sendmsg([message], ancillary)
    if sent < len(message):
        sock.sendall(message[sent:])


class _Reader:
    """Reads exact byte counts with recvmsg, collecting every fd that arrives."""

    def __init__(self, sock: socket.socket, max_fds: int, deadline: float | None) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self.deadline = deadline
        self.fds: list[int] = []
        self.ancbufsize = socket.CMSG_SPACE(max_fds * _FD_SIZE) if max_fds else 0

    def read(self, n: int, what: str) -> bytes:
        chunks: list[bytes] = []
        got = 0
        while got < n:
            if self.deadline is not None:
                # 0 makes the socket non-blocking: what is already queued is still read.
                self.sock.settimeout(max(self.deadline - time.monotonic(), 0.0))
            try:
                data = self.some(n - got, what, got, n)
            except (TimeoutError, BlockingIOError) as exc:
                if self.deadline is None and isinstance(exc, BlockingIOError):
                    raise  # the caller's own non-blocking socket
                raise TimedOutError(
                    errno.ETIMEDOUT, f"timed out waiting for the {what} ({got} of {n} bytes)",
                    "recv_fds",
                ) from None
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def some(self, want: int, what: str, got: int, n: int) -> bytes:
        """One recvmsg of at most `want` bytes (`got` of the `what`'s `n` read before it)."""
        data, ancdata, flags, _addr = self.sock.recvmsg(want, self.ancbufsize, _MSG_CMSG_CLOEXEC)
        self._collect(ancdata)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(
                errno.EMSGSIZE,
                f"the peer sent more fds than max_fds={self.max_fds}, or this process "
                f"is out of file descriptors (RLIMIT_NOFILE) (control data truncated; "
                f"{len(self.fds)} received and closed)",
            )
        if len(self.fds) > self.max_fds:
            raise ProtocolError(
                errno.EMSGSIZE,
                f"the peer sent {len(self.fds)} fds, more than max_fds={self.max_fds}",
            )
        if not data:
            raise ProtocolError(
                errno.ECONNRESET,
                f"the peer closed the connection during the {what} ({got} of {n} bytes)",
            )
        return data

    def _collect(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % _FD_SIZE
                self.fds.extend(array.array("i", cdata[:usable]))


class _Frame:
    """The parse of one message, a part at a time: the prefix (checked), the payload lengths
    (checked), the payloads. :attr:`need` is the byte count of the next part."""

    def __init__(self, max_fds: int, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.max_fds = max_fds
        self.max_bytes = max_bytes
        self.what = "header"
        self.need = _PREFIX.size
        self.nfds = 0
        self.lengths: list[int] = []
        self.body = b""
        self._stage = 0
        self._skip_empty()

    @property
    def done(self) -> bool:
        return self._stage == 3

    @property
    def started(self) -> bool:
        """Whether a part (the prefix at least) has been parsed."""
        return self._stage > 0

    def take(self, data: bytes) -> None:
        """Parse the next part (exactly :attr:`need` bytes)."""
        if self._stage == 0:
            magic, version, nfds, npayloads = _PREFIX.unpack(data)
            if magic != WIRE_MAGIC:
                raise ProtocolError(
                    errno.EPROTO, f"bad message magic {magic!r}, want {WIRE_MAGIC!r}"
                )
            if version != WIRE_VERSION:
                raise ProtocolError(
                    errno.EPROTO, f"unsupported message version {version}, want {WIRE_VERSION}"
                )
            if npayloads > MAX_PAYLOADS:
                raise ProtocolError(
                    errno.EPROTO, f"message declares {npayloads} payloads, at most {MAX_PAYLOADS}"
                )
            if nfds > self.max_fds:
                raise ProtocolError(
                    errno.EMSGSIZE, f"message declares {nfds} fds, more than max_fds={self.max_fds}"
                )
            self.nfds, self.need, self._stage = nfds, _LEN.size * npayloads, 1
        elif self._stage == 1:
            self.lengths = [v for (v,) in _LEN.iter_unpack(data)]
            total = sum(self.lengths)
            if total > self.max_bytes:
                raise ProtocolError(
                    errno.EPROTO,
                    f"message declares {total} payload bytes, at most {self.max_bytes}",
                )
            self.what, self.need, self._stage = "payload", total, 2
        else:
            self.body, self.need, self._stage = data, 0, 3
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._stage in (1, 2) and self.need == 0:
            self.take(b"")

    def finish(self, fds: Sequence[int]) -> list[bytes]:
        """The payloads, once the fds that arrived with the message are counted."""
        if len(fds) != self.nfds:
            raise ProtocolError(
                errno.EPROTO, f"message declares {self.nfds} fds but {len(fds)} arrived"
            )
        payloads: list[bytes] = []
        pos = 0
        for n in self.lengths:
            payloads.append(self.body[pos : pos + n])
            pos += n
        return payloads


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def recv_fds(
    sock: socket.socket,
    *,
    max_fds: int = 16,
    allow_uids: Collection[int] | None = None,
    timeout: float | None = None,
) -> tuple[list[int], list[bytes], PeerCredentials]:
    """Receive one message sent by :func:`send_fds`.

    The peer's credentials are checked first, before anything is read: its uid must be
    ``os.getuid()`` or, when ``allow_uids`` is given, in ``allow_uids`` (so an empty
    collection refuses everyone). A refused message is left unread; close the socket.

    Args:
        sock: a connected ``AF_UNIX``/``SOCK_STREAM`` socket.
        max_fds: most fds accepted; a message with more is refused (all of its fds closed).
        allow_uids: uids allowed to send, instead of only our own.
        timeout: seconds for the whole message; ``None`` uses the socket's own timeout
            setting (blocking by default). The socket's timeout is restored afterwards.

    Returns:
        ``(fds, payloads, credentials)``. The fds are new, close-on-exec and owned by the
        caller, in the sender's order.

    Raises:
        TypeError, ValueError: wrong socket type/family, bad ``max_fds``.
        PermissionDeniedError: (a ``PermissionError``) the peer's uid is not allowed.
        TimedOutError: (a ``TimeoutError``) the message did not arrive in time (received fds
            are closed).
        ProtocolError: malformed or truncated message, wrong fd count, peer closed the
            connection (received fds are closed).
        OSError: the socket failed (received fds are closed).
    """
    _check_socket(sock)
    _check_max_fds(max_fds)
    # NaN/negative refused (InvalidArgumentError, a ValueError); inf/huge: no limit (a
    # deadline past time_t's range would overflow socket.settimeout mid-message).
    limit = Deadline.in_seconds(timeout, "recv_fds timeout")
    creds = _allowed_peer(sock, allow_uids)

    old_timeout = sock.gettimeout()
    deadline = limit.end
    reader = _Reader(sock, max_fds, deadline)
    frame = _Frame(max_fds)
    try:
        while not frame.done:
            frame.take(reader.read(frame.need, frame.what))
        payloads = frame.finish(reader.fds)
    except BaseException:
        _close_all(reader.fds)
        raise
    finally:
        if deadline is not None:
            sock.settimeout(old_timeout)
    return reader.fds, payloads, creds


def _check_max_fds(max_fds: object) -> None:
    if isinstance(max_fds, bool) or not isinstance(max_fds, int):
        raise TypeError(f"max_fds must be int, not {type(max_fds).__name__}")
    if not 0 <= max_fds <= MAX_FDS:
        raise ValueError(f"max_fds must be in 0..{MAX_FDS}, got {max_fds}")


def _allowed_peer(sock: socket.socket, allow_uids: Collection[int] | None) -> PeerCredentials:
    creds = peer_credentials(sock)
    allowed = {os.getuid()} if allow_uids is None else set(allow_uids)
    if creds.uid not in allowed:
        raise PermissionDeniedError(
            errno.EPERM,
            f"peer uid {creds.uid} (pid {creds.pid}) is not allowed to send "
            f"(allowed uids: {sorted(allowed)})",
            "recv_fds",
        )
    return creds


_STEP_READ = 64 << 10  # MessageAssembler: the most one read asks for


class MessageAssembler:
    """One :func:`send_fds` message received without ever blocking: each :meth:`step` reads
    what has arrived and keeps it, so a peer that sends part of a message and stalls holds
    nothing but this state (a caller serving others from a poll loop steps it when the socket
    is readable, and bounds the whole message with its own deadline). What it holds is what
    has arrived: at most the frame limits (:data:`MAX_PAYLOAD_BYTES` of payload, 4 bytes of
    length per payload, :data:`MAX_FDS` fds — fewer with `max_fds` and `max_bytes`, the most
    payload bytes a message may announce, for a receiver that expects only small messages),
    however it was sent.

    The checks are :func:`recv_fds`'s (credentials first, then the framing as it arrives).
    The socket is made non-blocking for each step and its timeout restored.

    Thread-safety: one thread per assembler (and per socket).
    """

    def __init__(self, sock: socket.socket, *, max_fds: int = 16,
                 allow_uids: Collection[int] | None = None,
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        _check_socket(sock)
        _check_max_fds(max_fds)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(f"max_bytes must be int, not {type(max_bytes).__name__}")
        if not 0 <= max_bytes <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_bytes must be in 0..{MAX_PAYLOAD_BYTES}, got {max_bytes}")
        self.sock = sock
        self.allow_uids = allow_uids
        self._creds: PeerCredentials | None = None
        self._reader = _Reader(sock, max_fds, None)
        self._frame = _Frame(max_fds, max_bytes)
        # What has arrived of the current part, in one buffer: a list of the reads cost ~40 B
        # of object per read, so a peer that dribbled a 60 KB frame a byte per poll round
        # made it hold 2.5 MB (before any MAC check: a HELLO is assembled too).
        self._part = bytearray()

    def step(self) -> tuple[list[int], list[bytes], PeerCredentials] | None:
        """Read what has arrived; the message once it is complete, else None.

        Raises:
            PermissionDeniedError, ProtocolError, OSError: as :func:`recv_fds` (every fd
                received so far is closed; the assembler is then spent).
        """
        old_timeout = self.sock.gettimeout()
        if old_timeout != 0.0:
            self.sock.settimeout(0.0)
        try:
            if self._creds is None:
                self._creds = _allowed_peer(self.sock, self.allow_uids)
            frame = self._frame
            while not frame.done:
                got = len(self._part)
                try:
                    # At most _STEP_READ a read: recvmsg allocates what it is asked for, and a
                    # header announcing 1 MiB then sending a byte made every step allocate 1 MiB.
                    data = self._reader.some(min(frame.need - got, _STEP_READ), frame.what,
                                             got, frame.need)
                except BlockingIOError:
                    return None
                self._part += data
                if len(self._part) == frame.need:
                    part, self._part = bytes(self._part), bytearray()
                    frame.take(part)
            payloads = frame.finish(self._reader.fds)
        except BaseException:
            self.close()
            raise
        finally:
            if old_timeout != 0.0:
                self.sock.settimeout(old_timeout)
        fds, self._reader.fds = self._reader.fds, []
        return fds, payloads, self._creds

    @property
    def started(self) -> bool:
        """Whether part of a message has been read (the caller's deadline runs from then)."""
        return len(self._part) > 0 or self._frame.started

    def close(self) -> None:
        """Close the fds received for an unfinished message (idempotent)."""
        _close_all(self._reader.fds)
        self._reader.fds = []


def send(sock: socket.socket, ctx: Any, *objs: Any, key: bytes | None = None) -> None:
    """Send a context's command fd, its backend and an export envelope of each object.

    Args:
        sock: a connected ``AF_UNIX``/``SOCK_STREAM`` socket.
        ctx: the context; its ``cmd_fd`` is sent (the sender keeps its own fd), and its
            ``backend`` (``"rdma"`` or ``"sim"``) and ``name`` in a context descriptor, so that
            :func:`recv` imports it on the same backend.
        objs: objects with ``export(key=...) -> bytes`` (VARs, UMEMs, DEVX objects) that
            belong to ``ctx``.
        key: optional HMAC key for the envelopes; the receiver must pass the same key.

    Raises:
        ValueError: ``ctx.backend`` is not a backend name.
        OSError: see :func:`send_fds`.

    Thread-safety: one sender per socket at a time (a message is several writes).
    """
    payloads = [o.export() if key is None else o.export(key=key) for o in objs]
    backend = getattr(ctx, "backend", None)
    if backend is not None:
        payloads.insert(0, context_descriptor(str(backend), str(getattr(ctx, "name", ""))))
    send_fds(sock, [int(ctx.cmd_fd)], payloads)


def context_descriptor(backend: str, device: str = "") -> bytes:
    """The payload :func:`send` puts before the envelopes: which backend the fd belongs to.

    Raises:
        ValueError: `backend` is not ``"rdma"`` or ``"sim"``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, not {backend!r}")
    body = json.dumps({"backend": backend, "device": device}, separators=(",", ":"))
    return CONTEXT_MAGIC + body.encode()


def parse_context_descriptor(payload: bytes) -> Optional[dict[str, str]]:
    """The descriptor's fields, or None when `payload` is not a descriptor (an envelope).

    Raises:
        ProtocolError: it starts like a descriptor but is malformed (``EPROTO``).
    """
    if not payload.startswith(CONTEXT_MAGIC):
        return None
    try:
        if len(payload) > _MAX_DESCRIPTOR:
            raise ValueError(f"{len(payload)} bytes, at most {_MAX_DESCRIPTOR}")
        fields = json.loads(payload[len(CONTEXT_MAGIC) :].decode())
        if not isinstance(fields, dict) or fields.get("backend") not in _BACKENDS:
            raise ValueError(f"backend {fields.get('backend')!r} is not one of {_BACKENDS}"
                             if isinstance(fields, dict) else "not a JSON object")
        if not isinstance(fields.get("device", ""), str):
            raise ValueError("device is not a string")
    except ValueError as exc:
        raise ProtocolError(errno.EPROTO, f"malformed context descriptor: {exc}", "recv") from None
    return {"backend": str(fields["backend"]), "device": str(fields.get("device", ""))}


def _close_quietly(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # already failing; keep the original error
            close()


def recv(
    sock: socket.socket,
    *,
    backend: str | None = None,
    key: bytes | None = None,
    allow_uids: Collection[int] | None = None,
    timeout: float | None = None,
    _import_fd: Optional[Callable[[int], Any]] = None,
    _import_blob: Optional[Callable[[Any, bytes], Any]] = None,
) -> tuple[Any, list[Any]]:
    """Receive what :func:`send` sent: import the context, then every object onto it.

    The context is imported on the backend the sender's context was on (carried in the
    message); a message from a sender that did not say uses `backend` (``None``: the
    default). The received command fd is given to ``Context.import_fd(fd, backend=...)``, which
    duplicates it; this function then closes its own copy (also when the import fails). Each
    envelope is imported with ``mlx5tlp.import_blob(ctx, blob, key=key)``, which validates it
    (:func:`mlx5tlp.envelope.open_envelope`) before rdma-core sees it. If any import fails,
    the objects imported so far and the context are closed, then the error propagates.

    Args:
        sock: a connected ``AF_UNIX``/``SOCK_STREAM`` socket.
        backend: the backend the caller expects (``None``: whatever the sender's context was
            on). A message whose context is on another backend is refused
            (:class:`~mlx5tlp.InvalidArgumentError`, ``EINVAL``, naming both).
        key: the HMAC key the sender used, if any.
        allow_uids: see :func:`recv_fds`.
        timeout: see :func:`recv_fds`.

    Returns:
        ``(context, [objects...])`` in the sender's order.

    Raises:
        PermissionDeniedError, TimedOutError, ProtocolError: see :func:`recv_fds`.
        ExportFormatError: an envelope failed a check.
        Error: importing the device or an object failed.
    """
    fds, payloads, _creds = recv_fds(sock, max_fds=1, allow_uids=allow_uids, timeout=timeout)
    if len(fds) != 1:
        _close_all(fds)
        raise ProtocolError(errno.EPROTO, f"expected 1 context fd, got {len(fds)}")
    try:
        descriptor = parse_context_descriptor(payloads[0]) if payloads else None
    except ProtocolError:
        _close_all(fds)
        raise
    use_backend = backend
    if descriptor is not None:
        payloads = payloads[1:]
        sent = descriptor["backend"]
        if backend is not None and backend != sent:
            _close_all(fds)
            raise InvalidArgumentError(
                errno.EINVAL,
                f"the peer sent a context of backend {sent!r} (device "
                f"{descriptor['device']!r}), not {backend!r}: recv(backend=None) takes the "
                "sender's backend",
                "recv",
            )
        use_backend = sent

    def default_import_fd(fd: int) -> Any:
        # Imported lazily: the compiled core is only needed here.
        return importlib.import_module("mlx5tlp").Context.import_fd(fd, backend=use_backend)

    def default_import_blob(ctx: Any, blob: bytes) -> Any:
        return importlib.import_module("mlx5tlp").import_blob(ctx, blob, key=key)

    import_fd = default_import_fd if _import_fd is None else _import_fd
    import_blob = default_import_blob if _import_blob is None else _import_blob

    try:
        ctx = import_fd(fds[0])
    finally:
        _close_all(fds)

    objs: list[Any] = []
    try:
        for blob in payloads:
            objs.append(import_blob(ctx, blob))
    except BaseException:
        for o in reversed(objs):
            _close_quietly(o)
        _close_quietly(ctx)
        raise
    return ctx, objs
