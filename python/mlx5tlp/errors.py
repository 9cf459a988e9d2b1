"""The mlx5tlp exception hierarchy.

Every error the package raises for a device, library or handle problem is an
:class:`Error`. It is an :class:`OSError`, so ``errno`` is set where the failure came with one
(``None`` otherwise), and it names the failed ``operation`` (an rdma-core call or one of our
own steps). Argument problems detected before any call (wrong type, value out of range) raise
the standard ``TypeError`` / ``ValueError`` instead.

==========================  ==============================================================
class                       raised when
==========================  ==========================================================
NotSupportedError           a function or flag is missing from the loaded rdma-core, or the
                            device/kernel refuses it (EOPNOTSUPP, EPROTONOSUPPORT)
LibraryNotFoundError        rdma-core (or the software device library) cannot be loaded
DeviceNotFoundError         no such device (ENODEV)
ResourceExhaustedError      ENOMEM / ENOSPC: gateway pages used up, memlock limit, ...
InvalidHandleError          use after close/free; EINVAL/ENOENT/EBADF on an object handle
ExportFormatError           an export envelope failed a check (never passed to rdma-core)
DevxCommandError            firmware rejected a DEVX command (EREMOTEIO); has
                            ``status`` and ``syndrome`` from the command outbox
InvalidArgumentError        the core refused a value (e.g. an unknown backend name)
TimedOutError               a wait of our own ended at its timeout (ETIMEDOUT); also a
                            built-in ``TimeoutError``
PermissionDeniedError       a peer or file is not allowed (EPERM/EACCES); also a built-in
                            ``PermissionError``
NotInstalledError           a file of the installed package is missing (a development tree);
                            also a built-in ``FileNotFoundError``
==========================  ==============================================================

No other exception leaves the library for a failure: C++ exceptions that reach a binding
(``std::bad_alloc``, ``std::system_error`` from a thread that cannot start, ...) are mapped onto
these classes too (``ResourceExhaustedError`` for ENOMEM/EAGAIN), never ``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "DeviceNotFoundError",
    "DevxCommandError",
    "Error",
    "ExportFormatError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "LibraryNotFoundError",
    "NotInstalledError",
    "NotSupportedError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TimedOutError",
]


class Error(OSError):
    """Base class of every mlx5tlp error.

    Attributes:
        errno: the errno value, or ``None`` when the failure has none.
        operation: the failed operation, e.g. ``"mlx5dv_alloc_var"``.
    """

    operation: str | None

    def __init__(self, errno: int | None, message: str, operation: str | None = None) -> None:
        super().__init__(errno, message)
        self.operation = operation

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep exceptions picklable across multiprocessing with their attributes intact.
        return (type(self), (self.errno, self.strerror, self.operation), self.__dict__)


class NotSupportedError(Error):
    """The loaded rdma-core, the kernel or the device does not support the feature."""


class LibraryNotFoundError(NotSupportedError):
    """rdma-core (libibverbs/libmlx5) or the software device library could not be loaded."""


class DeviceNotFoundError(Error):
    """No device with that name exists on the selected backend."""


class ResourceExhaustedError(Error):
    """ENOMEM / ENOSPC: a device pool or a process limit is used up."""


class InvalidHandleError(Error):
    """The object was closed or freed, or the handle is not valid for this context."""


class ExportFormatError(Error):
    """An export envelope is malformed, from another device or runtime, or fails its MAC."""

    def __init__(self, errno: int | None, message: str, operation: str | None = "import") -> None:
        super().__init__(errno, message, operation)


class DevxCommandError(Error):
    """Firmware returned a bad status for a DEVX command.

    Attributes:
        status: the firmware status byte from the command outbox.
        syndrome: the 32-bit firmware syndrome from the command outbox.
    """

    status: int = 0
    syndrome: int = 0


class InvalidArgumentError(Error, ValueError):
    """The core refused an argument value."""


class TimedOutError(Error, TimeoutError):
    """A wait of the library's own ended at its timeout (``errno`` ``ETIMEDOUT``)."""


class PermissionDeniedError(Error, PermissionError):
    """A peer, user or file is not allowed to do what was asked (``EPERM`` / ``EACCES``)."""


class NotInstalledError(Error, FileNotFoundError):
    """A file of the installed package (C++ headers, static core, software device) is missing."""
