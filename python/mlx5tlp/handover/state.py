"""The function state that outlives a process: one memfd shared by the primary and standbys.

Layout of the state memfd (little-endian), version :data:`STATE_VERSION`:

======  ======  ==========================================================================
offset  size    field
======  ======  ==========================================================================
0       4       magic ``b"M5HS"``
4       2       handover state version (1)
6       2       header size (64)
8       8       generation of the primary that last wrote it
16      8       function spec digest (``Function.digest``)
24      4       function state size (``mlx5tlp.function.STATE_SIZE``)
28      4       function state version (``mlx5tlp.function.STATE_VERSION``)
32      8       requests answered (all primaries)
40      4       request channels served (bit mask)
44      4       flags: bit 0 = paused by a planned handover (not a crash)
48      4       the engine's captured Completer ID + 1 (0: none yet; written by the engine
                at every CfgWr0 it completes, PCIe Base 6.x §2.2.6.2, so a successor
                answers with the Bus/Device Numbers its predecessor captured)
52      12      reserved, 0
64      ...     the function model's ``FunctionState`` (``Function(spec, state=..., adopt=)``)
======  ======  ==========================================================================

What is shared (the successor continues from the bytes): this block — configuration space,
MSI-X table and pending bits (the function model's state) — and the memory region (a second
memfd). What lives in the device, not here: the request channels (their position and every
claimed-but-unretired request, redelivered by the software device when a claimer dies) and the
gateway page's doorbell. What is copied at a planned handover: a sealed summary of this block
(:func:`state_summary`: the header and the block's SHA-256, sealed with :func:`seal_snapshot`),
which the successor checks against the shared bytes before adopting; a whole block can be
sealed the same way to copy it.

Versioning: a successor whose handover or function state version differs refuses to adopt
(:class:`~mlx5tlp.handover.StateMismatchError`, ``EPROTO``); there is no implicit migration.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import mmap
import os
import struct
from typing import Optional, Union

from mlx5tlp._closing import Closing
from mlx5tlp._memfd import check_guarded, check_sealed, sealed_memfd
from mlx5tlp.function import STATE_SIZE as FUNCTION_STATE_SIZE
from mlx5tlp.function import STATE_VERSION as FUNCTION_STATE_VERSION
from mlx5tlp.function import Function, FunctionSpec
from mlx5tlp.handover.errors import AuthenticationError, StateMismatchError

__all__ = [
    "HEADER_SIZE",
    "STATE_MAGIC",
    "STATE_VERSION",
    "SharedState",
    "check_shared_fds",
    "open_snapshot",
    "seal_snapshot",
    "state_size",
    "state_summary",
]

STATE_MAGIC = b"M5HS"
STATE_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<4sHHQQIIQII16x")  # the completer word (48) is left as it is
_COMPLETER = slice(48, 52)
assert _HEADER.size == HEADER_SIZE
_SNAP_LABEL = b"mlx5tlp-handover-state-1"
_MAC = 32
FLAG_PAUSED = 1


def _size() -> int:
    total = HEADER_SIZE + FUNCTION_STATE_SIZE
    return (total + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def _mismatch(err: int, message: str) -> StateMismatchError:
    return StateMismatchError(err, message, "handover")


def state_size() -> int:
    """Bytes of a state memfd (header + function state, whole pages)."""
    return _size()


def check_shared_fds(fds: list[tuple[int, int, str]]) -> None:
    """Each ``(fd, bytes needed, which fd)`` a peer sent must be a memfd sealed against
    shrinking (``F_SEAL_SHRINK``) of at least that size, checked before it is mapped.

    Raises:
        StateMismatchError: ``EPROTO``, naming the fd, its size and the size needed.
    """
    for fd, need, what in fds:
        check_sealed(fd, need, what, _mismatch)


def check_region_fds(fds: list[tuple[int, int, str]]) -> None:
    """Each ``(fd, bytes needed, which fd)`` of an engine region a peer sent must be a regular
    file of at least that size. It need not be sealed: the engine maps an unsealed one under
    the SIGBUS guard (docs/engine.md, "Shared backing files"), so a spec's ``shared`` file can
    be handed over.

    Raises:
        StateMismatchError: ``EPROTO``, naming the fd, its size and the size needed.
    """
    for fd, need, what in fds:
        check_guarded(fd, need, what, _mismatch)


def _check_header(raw: bytes, digest: int, what: str, *,
                  version: int = STATE_VERSION) -> tuple[int, int, int, int, int]:
    if len(raw) < HEADER_SIZE:
        raise StateMismatchError(errno.EPROTO, f"{what}: {len(raw)} bytes, not a handover "
                                 "state", "handover")
    magic, ver, hsize, gen, dig, fsize, fver, served, chans, flags = _HEADER.unpack_from(raw)
    if magic != STATE_MAGIC or hsize != HEADER_SIZE:
        raise StateMismatchError(errno.EPROTO, f"{what}: not a handover state (magic "
                                 f"{magic!r}, header size {hsize})", "handover")
    if ver != version or fver != FUNCTION_STATE_VERSION or fsize != FUNCTION_STATE_SIZE:
        raise StateMismatchError(
            errno.EPROTO, f"{what}: handover state version {ver} / function state version "
            f"{fver} ({fsize} bytes); this process runs version {version} / "
            f"{FUNCTION_STATE_VERSION} ({FUNCTION_STATE_SIZE} bytes): a successor of another "
            "version must migrate the state explicitly", "handover")
    if dig != digest:
        raise StateMismatchError(
            errno.EINVAL, f"{what}: state of function digest {dig:#018x}, this process "
            f"compiled {digest:#018x}: another function spec", "handover")
    return gen, served, chans, flags, fver


class SharedState(Closing):
    """The state memfd mapped in this process, and (once adopted) the function model on it.

    Create with :meth:`create` (the first primary) or :meth:`attach` (a standby: maps and
    checks, does not adopt). Thread-safety: the serving thread owns :attr:`function`.
    """

    def __init__(self, fd: int, spec: FunctionSpec, digest: int) -> None:
        self.fd = fd
        self.spec = spec
        self.digest = digest
        self.map = mmap.mmap(fd, _size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view: Optional[memoryview] = None
        self._cview: Optional[memoryview] = None
        self.function: Optional[Function] = None

    @classmethod
    def create(cls, spec: FunctionSpec, generation: int, channels: int = 1) -> SharedState:
        """A new state block (reset function state) in a new memfd."""
        # Sealed at its size: a standby that maps it must not get SIGBUS (see _memfd).
        fd = sealed_memfd("mlx5tlp-handover-state", _size())
        probe = Function(spec)
        st = cls(fd, spec, probe.digest)
        probe.close()
        st.map[:HEADER_SIZE] = _HEADER.pack(STATE_MAGIC, STATE_VERSION, HEADER_SIZE, generation,
                                            st.digest, FUNCTION_STATE_SIZE,
                                            FUNCTION_STATE_VERSION, 0, channels, 0)
        st._view = memoryview(st.map)[HEADER_SIZE : HEADER_SIZE + FUNCTION_STATE_SIZE]
        st.function = Function(spec, state=st._view, adopt=False)
        return st

    @classmethod
    def attach(cls, fd: int, spec: FunctionSpec, *, version: int = STATE_VERSION) -> SharedState:
        """Map a predecessor's state block (`fd` is now owned by the result) and check it.

        Raises:
            StateMismatchError: another version (``EPROTO``) or another function (``EINVAL``);
                a memfd not sealed against shrinking, or smaller than a state block
                (``EPROTO``): checked before it is mapped, so that its creator cannot make
                this process fault (SIGBUS) by truncating it.
        """
        probe = Function(spec)
        digest = probe.digest
        probe.close()
        try:
            check_sealed(fd, _size(), "the state memfd", _mismatch)
            st = cls(fd, spec, digest)
        except BaseException:
            os.close(fd)
            raise
        try:
            _check_header(st.map[:HEADER_SIZE], digest, "the primary's state", version=version)
        except BaseException:
            st.close()
            raise
        return st

    # ---- header fields ----

    def header(self) -> tuple[int, int, int, int, int]:
        """(generation, served, channels, flags, function state version), checked."""
        return _check_header(self.map[:HEADER_SIZE], self.digest, "the shared state")

    def _set(self, generation: int, served: int, flags: int) -> None:
        _gen, _served, chans, _flags, _fver = self.header()
        raw = _HEADER.pack(STATE_MAGIC, STATE_VERSION, HEADER_SIZE, generation, self.digest,
                           FUNCTION_STATE_SIZE, FUNCTION_STATE_VERSION, served, chans, flags)
        # Around the completer word: a serving engine may store it at any time.
        self.map[: _COMPLETER.start] = raw[: _COMPLETER.start]
        self.map[_COMPLETER.stop : HEADER_SIZE] = raw[_COMPLETER.stop :]

    def mark(self, generation: int, served: int, *, paused: bool = False) -> None:
        """Record the writer's generation, the answered count and whether it paused cleanly."""
        self._set(generation, served, FLAG_PAUSED if paused else 0)

    def adopt(self, generation: int) -> Function:
        """Continue from the shared function state (the predecessor has stopped): the function
        model's checks (version, digest, read-only bits), then record our generation.

        Raises:
            StateMismatchError: the header names another version or function.
            InvalidArgumentError: the function state failed a check (the model names it).
        """
        _gen, served, _chans, _flags, _fver = self.header()
        if self.function is None:
            self.function = Function(self.spec, state=self.function_view(), adopt=True)
        self._set(generation, served, 0)
        return self.function

    def function_view(self) -> memoryview:
        """The function state bytes (:data:`mlx5tlp.function.STATE_SIZE`, 8-byte aligned) for a
        native function model (the engine) to serve from; valid until :meth:`close`."""
        if self._view is None:
            self._view = memoryview(self.map)[HEADER_SIZE : HEADER_SIZE + FUNCTION_STATE_SIZE]
        return self._view

    def completer_view(self) -> memoryview:
        """The 4-byte word where the engine keeps the captured Completer ID + 1 (header
        offset 48): shared, so that a successor answers as its predecessor did."""
        if self._cview is None:
            self._cview = memoryview(self.map)[_COMPLETER]
        return self._cview

    def claim(self, generation: int) -> None:
        """Record our generation, checking the header, without a Python function model (the
        engine adopts the state itself, with the same checks)."""
        _gen, served, _chans, _flags, _fver = self.header()
        self._set(generation, served, 0)

    def served(self) -> int:
        """Requests answered so far, by every primary."""
        return self.header()[1]

    def snapshot(self) -> bytes:
        """A copy of the whole block (header + function state)."""
        return bytes(self.map[: HEADER_SIZE + FUNCTION_STATE_SIZE])

    def summary(self) -> bytes:
        """:func:`state_summary` of the block as it is now, hashed in place (no copy)."""
        with memoryview(self.map) as m, m[: HEADER_SIZE + FUNCTION_STATE_SIZE] as block:
            return state_summary(block)

    def release_function(self) -> None:
        """Drop the function model (a primary that handed over: the successor owns it now)."""
        if self.function is not None:
            self.function.close()
            self.function = None
        if self._view is not None:
            try:
                self._view.release()
                self._view = None
            except BufferError:
                pass  # a native model (the engine) still serves from it: released at close()

    def close(self) -> None:
        """Unmap and close the memfd (idempotent); the state lives on in other processes."""
        self.release_function()
        for v in (self._view, self._cview):
            if v is not None:
                v.release()
        self._view = self._cview = None
        if not self.map.closed:
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def state_summary(block: Union[bytes, memoryview]) -> bytes:
    """The header of a state block followed by the SHA-256 of the whole block: what a planned
    handover seals instead of the 37 KB block itself (the successor has the block shared and
    checks that it hashes the same)."""
    return bytes(block[:HEADER_SIZE]) + hashlib.sha256(block).digest()


def seal_snapshot(state: bytes, key: bytes, generation: int) -> bytes:
    """``HMAC-SHA256 || generation (u64) || state``: a state copy only a key holder can make."""
    body = struct.pack("<Q", generation) + state
    return hmac.new(key, _SNAP_LABEL + body, hashlib.sha256).digest() + body


def open_snapshot(blob: bytes, key: bytes, *, generation: int, digest: int,
                  version: int = STATE_VERSION) -> bytes:
    """Check a sealed snapshot and return the state bytes.

    Args:
        generation: the lease generation the snapshot must be of (an older one is stale).
        digest: our compiled function's digest.

    Raises:
        AuthenticationError: bad HMAC (forged, or another key) — ``EBADMSG``; a snapshot of
            another generation (stale or replayed) — ``ESTALE``.
        StateMismatchError: another state version (``EPROTO``) or function (``EINVAL``).
    """
    if len(blob) < _MAC + 8 + HEADER_SIZE:
        raise AuthenticationError(errno.EBADMSG, f"state snapshot of {len(blob)} bytes is "
                                  "truncated", "handover")
    mac, body = blob[:_MAC], blob[_MAC:]
    if not hmac.compare_digest(mac, hmac.new(key, _SNAP_LABEL + body, hashlib.sha256).digest()):
        raise AuthenticationError(errno.EBADMSG, "state snapshot failed its HMAC check (forged, "
                                  "damaged, or sealed with another key)", "handover")
    (gen,) = struct.unpack_from("<Q", body)
    state = body[8:]
    if gen != generation:
        raise AuthenticationError(errno.ESTALE, f"state snapshot is of generation {gen}, the "
                                  f"lease is at {generation}: stale or replayed", "handover")
    hgen = _check_header(state, digest, "the state snapshot", version=version)[0]
    if hgen != generation:
        raise AuthenticationError(errno.ESTALE, f"state snapshot header is of generation "
                                  f"{hgen}, the lease is at {generation}", "handover")
    return state
