"""The primary lease: at most one primary per emulated function, enforced by the kernel.

The lease is a 64-byte file beside the control socket (``<control path>.lease``). Being primary
*is* holding an OFD write lock (``F_OFD_SETLK``) on its byte 0: the kernel gives it to one open
file description at a time and drops it when the last fd of that description closes — when the
primary exits, is SIGKILLed or crashes — so a dead primary never holds the function. The file's
contents say who holds it and since when (written only by the holder, under the lock):

======  ====  ==========================================================================
offset  size  field (little-endian)
======  ====  ==========================================================================
0       4     magic ``b"M5LS"``
4       2     layout version (1)
6       2     size (64)
8       8     generation: incremented by every new primary (planned or takeover)
16      4     primary pid
20      4     designated successor pid during a planned handover (0: none)
24      8     primary start time (clock ticks after boot, ``/proc/<pid>/stat`` field 22)
32      8     heartbeat (``CLOCK_MONOTONIC`` ns), refreshed by the primary
40      4     function state version (``STATE_VERSION`` of the handover state block)
44      4     reserved, 0
48      8     function spec digest
56      8     reserved, 0
======  ====  ==========================================================================

A planned handover writes the successor's pid, then unlocks; a process that wins the free lock
while a *living* designated successor exists gives it back (so a third process cannot slip in
between commit and the successor's acquisition). The pid + start time pair names a process
unambiguously (pids are reused, start times are not). The C++ side of the same file is
``cpp/include/mlx5tlp/handover_lease.hpp``.

Thread-safety: one thread per :class:`Lease` at a time. A forked child closes its inherited fd
at once (it must not keep a dead parent's lease alive; closing it does not drop the parent's
lock, which belongs to the parent's open file description).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from mlx5tlp._closing import Closing
from mlx5tlp._deadline import Deadline
from mlx5tlp.errors import InvalidArgumentError, InvalidHandleError
from mlx5tlp.handover.errors import HandoverError, LeaseHeldError

__all__ = [
    "LEASE_MAGIC",
    "LEASE_SIZE",
    "LEASE_VERSION",
    "Lease",
    "LeaseRecord",
    "check_private_dir",
    "check_socket_path",
    "pid_start_time",
]

LEASE_MAGIC = b"M5LS"
LEASE_VERSION = 1
LEASE_SIZE = 64
_RECORD = struct.Struct("<4sHHQIIQQIIQQ")
assert _RECORD.size == LEASE_SIZE
# struct flock (x86_64 and aarch64): short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("@hhqqi4x")
assert _FLOCK.size == 32


def check_private_dir(path: str, what: str = "control socket directory") -> None:
    """Refuse a directory another user could write to (or that is not ours).

    Raises:
        InvalidArgumentError: ``EPERM``/``ENOTDIR``/``ENOENT`` naming the directory and why.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise InvalidArgumentError(exc.errno, f"{what} {path!r}: {exc.strerror}",
                                   "handover") from None
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgumentError(errno.EPERM, f"{what} {path!r} is a symbolic link", "handover")
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError(errno.ENOTDIR, f"{what} {path!r} is not a directory",
                                   "handover")
    if st.st_uid != os.geteuid():
        raise InvalidArgumentError(
            errno.EPERM, f"{what} {path!r} is owned by uid {st.st_uid}, not by this user (uid "
            f"{os.geteuid()}): another user could replace the socket or the lease", "handover")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InvalidArgumentError(
            errno.EPERM, f"{what} {path!r} has mode {st.st_mode & 0o7777:04o}: group/others "
            "may write it; it must be private to this user (0700)", "handover")


#: The longest ``AF_UNIX`` socket path: ``sun_path`` is 108 bytes with its NUL (unix(7)).
UNIX_PATH_MAX = 107


def check_socket_path(path: str, extra: int = 0) -> None:
    """Refuse a control socket path ``AF_UNIX`` cannot hold (with `extra` bytes appended, as
    the temporary name a listener binds before its rename).

    Raises:
        InvalidArgumentError: ``ENAMETOOLONG`` naming the path, its length and the limit.
    """
    n = len(os.fsencode(path))
    if n + extra > UNIX_PATH_MAX:
        raise InvalidArgumentError(
            errno.ENAMETOOLONG, f"control socket path {path!r} is {n} bytes; a UNIX socket "
            f"path holds at most {UNIX_PATH_MAX - extra} here (unix(7) sun_path): use a "
            "shorter directory", "handover")


def pid_start_time(pid: int) -> int:
    """The process's start time in clock ticks after boot, or 0 if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0
    # The command name may contain spaces and parentheses: fields follow the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else 0


_own_start: tuple[int, int] = (0, 0)  # (pid, start time): ours, read once per process


def own_start_time() -> int:
    """This process's start time (:func:`pid_start_time`), read once per process."""
    global _own_start
    me = os.getpid()
    if _own_start[0] != me:
        _own_start = (me, pid_start_time(me))
    return _own_start[1]


def _alive(pid: int, start: int) -> bool:
    return pid > 0 and pid_start_time(pid) == start != 0


@dataclass(frozen=True)
class LeaseRecord:
    """The lease file's contents (see the module docstring)."""

    generation: int
    pid: int
    successor: int
    start_time: int
    heartbeat_ns: int
    state_version: int
    digest: int

    def holder_alive(self) -> bool:
        """Whether the recorded primary process still exists (pid and start time match)."""
        return _alive(self.pid, self.start_time)


_open_leases: weakref.WeakSet[Lease] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lease in list(_open_leases):
        lease._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Lease(Closing):
    """The lease file of one function (opened, not yet held).

    Args:
        path: the lease file; its directory must be private to this user.
        state_version, digest: what a primary records when it takes the lease.

    Raises:
        InvalidArgumentError: the directory or the file is unsafe (another owner, a symlink,
            group/world-writable) or the file is damaged.
    """

    def __init__(self, path: str, *, state_version: int = 0, digest: int = 0) -> None:
        self.path = os.path.abspath(path)
        check_private_dir(os.path.dirname(self.path))
        self.state_version = state_version
        self.digest = digest
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InvalidArgumentError(exc.errno, f"lease file {self.path!r}: {exc.strerror}",
                                       "handover") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            os.close(fd)
            raise InvalidArgumentError(
                errno.EPERM, f"lease file {self.path!r} is not a private regular file of this "
                "user", "handover")
        self._fd: Optional[int] = fd
        self.held = False
        self.generation = 0
        _open_leases.add(self)

    # ---- the lock ----

    def _lock(self, kind: int) -> bool:
        arg = _FLOCK.pack(kind, os.SEEK_SET, 0, 1, 0)
        try:
            fcntl.fcntl(self._need(), fcntl.F_OFD_SETLK, arg)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _need(self) -> int:
        if self._fd is None:
            raise InvalidHandleError(errno.EBADF, "the lease was closed", "handover")
        return self._fd

    def read(self) -> Optional[LeaseRecord]:
        """The current contents, or None for a lease nobody ever held (empty or all zeros).

        Raises:
            InvalidArgumentError: ``EPROTO``: the file is not a lease (magic, version, size,
                a truncated record).
        """
        raw = os.pread(self._need(), LEASE_SIZE, 0)
        if not raw or raw == bytes(LEASE_SIZE):
            return None  # new (created empty), or never written
        if len(raw) < LEASE_SIZE:
            # Not "never held": a truncated record would restart the generation at 1, and
            # generations fence stale handover messages (docs/handover.md).
            raise InvalidArgumentError(
                errno.EPROTO, f"lease file {self.path!r} is damaged: {len(raw)} bytes, a "
                f"lease record is {LEASE_SIZE}", "handover")
        magic, version, size, gen, pid, succ, start, beat, sver, _r, digest, _r2 = (
            _RECORD.unpack(raw))
        if magic != LEASE_MAGIC or version != LEASE_VERSION or size != LEASE_SIZE:
            raise InvalidArgumentError(
                errno.EPROTO, f"lease file {self.path!r} is damaged or of another version "
                f"(magic {magic!r}, version {version}, size {size})", "handover")
        return LeaseRecord(gen, pid, succ, start, beat, sver, digest)

    def _write(self, rec: LeaseRecord) -> None:
        os.pwrite(self._need(), _RECORD.pack(
            LEASE_MAGIC, LEASE_VERSION, LEASE_SIZE, rec.generation, rec.pid, rec.successor,
            rec.start_time, rec.heartbeat_ns, rec.state_version, 0, rec.digest, 0), 0)

    def try_acquire(self) -> bool:
        """Become primary if nobody is: take the lock, generation + 1, record ourselves.

        Returns False (holding nothing) when another process holds the lease, or when a planned
        handover designated another living process as successor.
        """
        if self.held:
            return True
        if not self._lock(fcntl.F_WRLCK):
            return False
        try:
            old = self.read()
            me = os.getpid()
            if old is not None and old.successor not in (0, me) and pid_start_time(old.successor):
                self._lock(fcntl.F_UNLCK)
                return False
            gen = (old.generation if old is not None else 0) + 1
            self._write(LeaseRecord(gen, me, 0, own_start_time(), time.monotonic_ns(),
                                    self.state_version, self.digest))
        except BaseException:
            self._lock(fcntl.F_UNLCK)
            raise
        self.held = True
        self.generation = gen
        return True

    def acquire(self, timeout: Optional[float] = 0.0) -> int:
        """:meth:`try_acquire`, retrying until `timeout` seconds; returns the new generation.

        Raises:
            LeaseHeldError: ``EBUSY``: another process is primary (named with its generation).
            InvalidArgumentError: ``EINVAL``: `timeout` is NaN or negative.
        """
        return self._retry(self.try_acquire, Deadline.in_seconds(timeout, "lease timeout"))

    def reclaim(self, generation: int, timeout: Optional[float] = 0.0) -> int:
        """Take the lease back after a planned handover that did not complete.

        If nobody took it since this process released it at `generation` (the record is still
        ours: that generation, our pid), the lease is held again at the same generation — the
        handover did not happen. If the successor took it and let it go since, this is
        :meth:`acquire` (a new generation). Returns the generation now held.

        Raises:
            LeaseHeldError: ``EBUSY``: the successor holds it (it serves; step down).
            InvalidArgumentError: ``EINVAL``: `timeout` is NaN or negative.
        """
        deadline = Deadline.in_seconds(timeout, "lease timeout")
        if self.held:
            return self.generation
        return self._retry(lambda: self._try_reclaim(generation), deadline)

    def _try_reclaim(self, generation: int) -> bool:
        if not self._lock(fcntl.F_WRLCK):
            return False
        try:
            rec = self.read()
            me = os.getpid()
            if rec is not None and rec.generation == generation and rec.pid == me:
                self._write(LeaseRecord(rec.generation, me, 0, rec.start_time,
                                        time.monotonic_ns(), rec.state_version, rec.digest))
                self.held = True
                self.generation = generation
                return True
        finally:
            if not self.held:
                self._lock(fcntl.F_UNLCK)
        return self.try_acquire()  # the successor took it and let it go: a new generation

    def _retry(self, attempt: Callable[[], bool], deadline: Deadline) -> int:
        pause = 20e-6
        while not attempt():
            if deadline.expired():
                rec = self.read()
                who = ("nobody recorded" if rec is None else
                       f"pid {rec.pid} at generation {rec.generation}"
                       + (f", handing over to pid {rec.successor}" if rec.successor else ""))
                raise LeaseHeldError(
                    errno.EBUSY, f"the function already has a primary ({who}; lease "
                    f"{self.path!r}): at most one primary per function", "handover")
            # Only after a death (the kernel drops the lock as the dead process's files close)
            # or mid-commit: short, bounded waits, not a serving path.
            left = deadline.remaining()
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, 1e-3)
        return self.generation

    def heartbeat(self) -> None:
        """Refresh the heartbeat (holder only; a hint for operators, not for takeover)."""
        if self.held:
            rec = self.read()
            if rec is not None:
                self._write(LeaseRecord(rec.generation, rec.pid, rec.successor, rec.start_time,
                                        time.monotonic_ns(), rec.state_version, rec.digest))

    def release(self, successor: int = 0) -> None:
        """Stop being primary; with `successor`, only that process may take the lease next
        (until it dies). Idempotent."""
        if not self.held:
            return
        rec = self.read()
        if rec is None or rec.pid != os.getpid():
            raise HandoverError(errno.EPROTO, f"lease {self.path!r} was rewritten by another "
                                "process while held", "handover")
        self._write(LeaseRecord(rec.generation, rec.pid, successor, rec.start_time,
                                rec.heartbeat_ns, rec.state_version, rec.digest))
        self._lock(fcntl.F_UNLCK)
        self.held = False

    def _forget(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self.held = False

    def close(self) -> None:
        """Release (no successor) and close the file. Idempotent."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError, HandoverError):
            self.release()
        self._forget()
