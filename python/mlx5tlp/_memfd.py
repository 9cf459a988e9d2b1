"""Memfds that another process may map without risking SIGBUS: sealed against shrinking.

A ``MAP_SHARED`` mapping of a file faults with SIGBUS on any page past the file's end, so a
process that maps an fd someone else can ``ftruncate`` can be killed by that someone. A memfd
created with ``MFD_ALLOW_SEALING`` can be sealed (memfd_create(2); fcntl(2) "File Sealing"):
``F_SEAL_SHRINK`` makes every later shrinking ``ftruncate`` fail with ``EPERM``, ``F_SEAL_GROW``
keeps the size fixed, ``F_SEAL_SEAL`` forbids changing the seals again. Seals belong to the
file (the inode), not to an fd, so a receiver can check them with ``F_GET_SEALS`` on its own
fd before it maps: once ``F_SEAL_SHRINK`` is set it can never be removed.

The creator seals (:func:`sealed_memfd`); every receiver checks (:func:`check_sealed`) before
``mmap``. Regular files cannot be sealed: those mappings are covered by the native SIGBUS
guard instead (docs/engine.md, "Shared backing files").
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

__all__ = ["SEALS", "check_guarded", "check_sealed", "sealed_memfd", "seals_of"]

#: What :func:`sealed_memfd` adds: the size can neither shrink nor grow, the seals are final.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int) -> int:
    """A new close-on-exec memfd of exactly `size` zero bytes, sealed with :data:`SEALS`."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seals_of(fd: int) -> int:
    """``F_GET_SEALS`` of `fd`, or 0 for a file that cannot carry seals (not a memfd/shmem:
    the kernel answers ``EINVAL``)."""
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
    except OSError:
        return 0


def _stat(fd: int, what: str, error: Callable[[int, str], BaseException]) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise error(errno.EBADF, f"{what}: fd {fd}: fstat failed: {exc.strerror}") from exc


def check_sealed(fd: int, need: int, what: str,
                 error: Callable[[int, str], BaseException]) -> None:
    """Raise ``error(errno, message)`` unless `fd` is sealed against shrinking and holds at
    least `need` bytes: what a receiver checks before it maps a peer's fd. The message names
    `what` (which fd), its size, `need` and which part failed."""
    size = _stat(fd, what, error).st_size
    if not seals_of(fd) & fcntl.F_SEAL_SHRINK:
        raise error(errno.EPROTO, f"{what}: fd {fd} has {size} bytes, {need} needed, and is "
                    "not sealed against shrinking (F_SEAL_SHRINK): another process could "
                    "truncate it under the mapping (SIGBUS)")
    if size < need:
        raise error(errno.EPROTO, f"{what}: fd {fd} has {size} bytes, {need} needed")


def check_guarded(fd: int, need: int, what: str,
                  error: Callable[[int, str], BaseException]) -> None:
    """Raise ``error(errno, message)`` unless `fd` is a regular file (a memfd or a file of the
    application's, e.g. a spec's ``shared`` file) of at least `need` bytes: what a receiver
    checks of an fd that only the engine maps, under the native SIGBUS guard when it is not
    sealed (a truncation then loses the region's bytes, it does not kill the process)."""
    st = _stat(fd, what, error)
    if not stat.S_ISREG(st.st_mode):
        raise error(errno.EPROTO, f"{what}: fd {fd} is not a regular file "
                    f"(mode {stat.filemode(st.st_mode)})")
    if st.st_size < need:
        raise error(errno.EPROTO, f"{what}: fd {fd} has {st.st_size} bytes, {need} needed")
