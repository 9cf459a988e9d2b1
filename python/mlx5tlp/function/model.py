"""A compiled emulated PCIe function: configuration space, BAR decode, MSI-X and state.

:class:`Function` is the typed face of the C++ model (``mlx5tlp/function.hpp``). It answers
configuration reads and writes with every register's semantics (RO, RW, RW1C, reserved),
decodes memory and I/O addresses against the BARs the host programmed, serves the MSI-X
table and PBA, raises MSI-X interrupts with the spec's masking and pending rules, and
snapshots/restores its whole state as bytes.

Interrupt messages are recorded and returned by :meth:`Function.take_interrupts`. On the
software device the engine will post them to the host model as Memory Writes; how an
emulated function sends MSI-X messages on mlx5 hardware is not public (see docs/function.md).

Thread-safety: calls hold the GIL and are short; one thread should drive configuration and
table accesses (as the engine does), while :meth:`raise_msix` may come from any thread.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import Any, NamedTuple, Optional

from mlx5tlp import _core
from mlx5tlp._closing import Closing
from mlx5tlp.errors import InvalidArgumentError, InvalidHandleError
from mlx5tlp.function.spec import FunctionSpec

__all__ = [
    "STATE_SIZE",
    "STATE_VERSION",
    "CompletionTimeout",
    "ConfigTemplate",
    "Decoded",
    "Function",
    "ROM_BAR",
]

#: Bytes of a state snapshot (header, 4096 configuration bytes, MSI-X table, PBA, control).
STATE_SIZE: int = int(_core.function.STATE_SIZE)
#: Layout version of the state; a snapshot of another version is refused (EPROTO).
STATE_VERSION: int = int(_core.function.STATE_VERSION)
#: The BAR index :meth:`Function.decode_memory` reports for the Expansion ROM.
ROM_BAR = 6


class Decoded(NamedTuple):
    """Where an address falls: ``status`` is ``hit``, ``disabled`` (the space's Command enable
    is clear, or the function is not in D0), ``unclaimed`` or ``crosses_end``."""

    status: str
    bar: int
    offset: int


class CompletionTimeout(NamedTuple):
    """The host's Completion Timeout setting (Device Control 2), in microseconds."""

    disabled: bool
    min_us: int
    max_us: int


class ConfigTemplate(NamedTuple):
    """The compiled masks: reset image, writable bits, write-1-to-clear bits, bits checked
    on restore (read-only / reserved); 4096 bytes each."""

    init: bytes
    wmask: bytes
    w1cmask: bytes
    cmask: bytes


def _core_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_core_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _core_value(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    return value


def _bad(operation: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(errno.EINVAL, message, operation)


def _check_access(offset: int, size: int, operation: str) -> None:
    if size not in (1, 2, 4):
        raise _bad(operation, f"size {size} is not 1, 2 or 4")
    if not 0 <= offset <= 4096 - size or offset % size:
        raise _bad(operation,
                   f"offset {offset:#x} is not a {size}-byte aligned offset below 0x1000")


def _dwords(offset: int, length: int) -> tuple[int, int, int, int]:
    """(DW-aligned start, bytes covering whole DWs, First DW BE, Last DW BE) for a range."""
    start = offset & ~3
    end = (offset + length + 3) & ~3
    first = (0xF << (offset & 3)) & 0xF
    last_bytes = (offset + length) & 3
    last = 0xF if last_bytes == 0 else (1 << last_bytes) - 1
    if end - start == 4:
        return start, 4, first & last, 0
    return start, end - start, first, last


class Function(Closing):
    """One emulated function compiled from a :class:`FunctionSpec`.

    ``close()`` (idempotent; also ``with Function(...) as f:``) releases the native model and
    the ``state`` buffer (an ``mmap`` can be closed afterwards); later calls raise
    :class:`~mlx5tlp.InvalidHandleError` (EBADF). The state itself stays where it is.

    Args:
        spec: the declaration; compiled (validated) here.
        state: optional writable buffer of :data:`STATE_SIZE` bytes, 8-byte aligned (e.g. an
            ``mmap`` of shared memory) holding the state; kept referenced by this object.
        adopt: with ``state``: continue from the state already in it (a predecessor's),
            after the restore checks, instead of resetting it.

    Raises:
        InvalidArgumentError: a spec field is invalid (EINVAL; the message names it), or the
            adopted state fails a check.
        TypeError: a spec value has the wrong type.
    """

    def __init__(self, spec: FunctionSpec, *, state: Optional[Any] = None,
                 adopt: bool = False) -> None:
        if not isinstance(spec, FunctionSpec):
            raise TypeError(f"spec must be a FunctionSpec, not {type(spec).__name__}")
        self._spec = spec
        native = _core.function.Function(_core_value(spec), state, adopt)
        self._layout: dict[str, Any] = dict(native.layout())
        self._f: Optional[Any] = native

    @property
    def _n(self) -> Any:
        if self._f is None:
            raise InvalidHandleError(errno.EBADF, "the function was closed", "function")
        return self._f

    def close(self) -> None:
        """Release the native model and the state buffer (idempotent)."""
        self._f = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._f is None

    @property
    def spec(self) -> FunctionSpec:
        """The declaration this function was compiled from."""
        return self._spec

    def capability_offset(self, name: str) -> int:
        """Offset of ``pcie``, ``power_management``, ``msix``, ``aer`` or ``serial_number``
        in configuration space (0 when absent)."""
        if name not in ("pcie", "power_management", "msix", "aer", "serial_number"):
            raise ValueError(f"unknown capability {name!r}")
        return int(self._layout[name])

    @property
    def digest(self) -> int:
        """The compiled spec's digest (the "masks version" a state snapshot carries)."""
        return int(self._layout["digest"])

    # ---- configuration space (the host's CfgRd / CfgWr) ----

    def config_read(self, offset: int, size: int = 4) -> int:
        """Read 1, 2 or 4 bytes at an aligned ``offset``."""
        _check_access(offset, size, "config read")
        dw = int(self._n.config_read(offset & ~3))
        return (dw >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        """Write 1, 2 or 4 bytes at an aligned ``offset`` (one CfgWr with its byte enables)."""
        _check_access(offset, size, "config write")
        if not 0 <= value < 1 << (8 * size):
            raise _bad("config write", f"value {value:#x} does not fit {size} bytes")
        be = ((1 << size) - 1) << (offset & 3)
        self._n.config_write(offset & ~3, value << (8 * (offset & 3)), be)

    def config_write_dword(self, dw_offset: int, value: int, byte_enables: int) -> None:
        """One Configuration Write Request as on the wire: a DW and its First DW BE."""
        self._n.config_write(dw_offset, value, byte_enables)

    def config_bytes(self) -> bytes:
        """All 4096 bytes of configuration space, as a host reading them would see them."""
        return bytes(self._n.config_bytes())

    def device_write(self, offset: int, value: int, size: int = 4) -> None:
        """The function's own update of a register (bypasses the host masks), e.g. setting
        an error status bit or a header log."""
        self._n.device_write(offset, size, value)

    def template(self) -> ConfigTemplate:
        """The compiled reset image and masks."""
        return ConfigTemplate(*(bytes(b) for b in self._n.template()))

    # ---- what the engine reads ----

    @property
    def memory_enabled(self) -> bool:
        """Memory Space Enable and D0: memory requests are decoded."""
        return bool(self._n.memory_enabled)

    @property
    def io_enabled(self) -> bool:
        """I/O Space Enable and D0."""
        return bool(self._n.io_enabled)

    @property
    def bus_master(self) -> bool:
        """Bus Master Enable and D0: the function may send Memory Writes (MSI-X included)."""
        return bool(self._n.bus_master)

    @property
    def power_state(self) -> int:
        """PMCSR PowerState: 0 = D0, 1 = D1, 2 = D2, 3 = D3hot."""
        return int(self._n.power_state)

    @property
    def max_payload_size(self) -> int:
        """Bytes per completion payload: min(Device Control MPS, MPS Supported)."""
        return int(self._n.max_payload_size)

    @property
    def max_read_request_size(self) -> int:
        """Device Control Max_Read_Request_Size in bytes."""
        return int(self._n.max_read_request_size)

    @property
    def read_completion_boundary(self) -> int:
        """64 or 128 bytes (Link Control RCB)."""
        return int(self._n.read_completion_boundary)

    @property
    def completion_timeout(self) -> CompletionTimeout:
        """The host's Completion Timeout range (default 50 us .. 50 ms) or disabled."""
        disabled, lo, hi = self._n.completion_timeout()
        return CompletionTimeout(bool(disabled), int(lo), int(hi))

    def decode_memory(self, address: int, length: int) -> Decoded:
        """Which BAR (0..5, or :data:`ROM_BAR`) a memory request of ``length`` bytes hits."""
        status, bar, offset = self._n.decode_memory(address, length)
        return Decoded(str(status), int(bar), int(offset))

    def decode_io(self, address: int, length: int) -> Decoded:
        """Which I/O BAR a request hits."""
        status, bar, offset = self._n.decode_io(address, length)
        return Decoded(str(status), int(bar), int(offset))

    def bar_base(self, bar: int) -> int:
        """The address BAR ``bar`` (or :data:`ROM_BAR`) is programmed with."""
        return int(self._n.bar_base(bar))

    # ---- MSI-X ----

    def msix_region(self, bar: int, offset: int, length: int) -> tuple[str, int]:
        """(``table`` | ``pba`` | ``straddles`` | ``none``, offset in the structure)."""
        region, off = self._n.msix_hit(bar, offset, length)
        return str(region), int(off)

    def msix_read(self, bar: int, offset: int, length: int) -> tuple[str, bytes]:
        """Read the MSI-X table or PBA: (``ok`` | ``undefined_size`` | ``out_of_range``, data).
        ``undefined_size``: not an aligned DW/QW access (the spec leaves the result
        undefined; the data is returned anyway)."""
        status, data = self._n.msix_read(bar, offset, length)
        return str(status), bytes(data)

    def msix_write(self, bar: int, offset: int, data: bytes) -> str:
        """Write the MSI-X table (``ok``), or not: ``undefined_size`` (not an aligned full DW
        or QW; ignored), ``read_only`` (the PBA; ignored), ``out_of_range``."""
        start, n, first, last = _dwords(offset, len(data))
        buf = bytearray(n)
        buf[offset - start: offset - start + len(data)] = data
        return str(self._n.msix_write(bar, start, bytes(buf), first, last))

    def memory_read(self, address: int, length: int) -> tuple[str, bytes]:
        """A host Memory Read, for the parts this model serves (the MSI-X structures):
        the decode status when it does not hit a BAR, ``no_region`` for BAR space outside
        MSI-X (regions are served by the engine), else as :meth:`msix_read`."""
        d = self.decode_memory(address, length)
        if d.status != "hit":
            return d.status, b""
        region, _ = self.msix_region(d.bar, d.offset, length)
        if region == "none":
            return "no_region", b""
        return self.msix_read(d.bar, d.offset, length)

    def memory_write(self, address: int, data: bytes) -> str:
        """A host Memory Write; statuses as :meth:`memory_read` and :meth:`msix_write`."""
        d = self.decode_memory(address, len(data))
        if d.status != "hit":
            return d.status
        region, _ = self.msix_region(d.bar, d.offset, len(data))
        if region == "none":
            return "no_region"
        return self.msix_write(d.bar, d.offset, data)

    def raise_msix(self, vector: int) -> str:
        """Signal vector ``vector``: ``sent``, ``pending`` (masked, or Bus Master Enable
        clear: sent when that ends), ``disabled`` (MSI-X Enable clear) or ``bad_vector``."""
        return str(self._n.raise_msix(vector))

    def msix_pending(self, vector: int) -> bool:
        """The vector's Pending bit."""
        return bool(self._n.msix_pending(vector))

    def clear_msix_pending(self, vector: int) -> None:
        """The interrupt condition went away while masked: no message on unmask."""
        self._n.clear_msix_pending(vector)

    def take_interrupts(self) -> list[tuple[int, int]]:
        """MSI-X messages sent since the last call, oldest first: ``(address, data)``."""
        return [(int(a), int(d)) for a, d in self._n.take_interrupts()]

    @property
    def messages_sent(self) -> int:
        """MSI-X messages sent since creation."""
        return int(self._n.messages_sent)

    # ---- state ----

    def reset(self) -> None:
        """Conventional reset: every register and MSI-X entry to its reset value."""
        self._n.reset()

    def snapshot(self) -> bytes:
        """The whole state, :data:`STATE_SIZE` bytes (layout in docs/function.md)."""
        return bytes(self._n.snapshot())

    def restore(self, snapshot: bytes) -> None:
        """Continue from a snapshot after checking it (layout version, spec digest, read-only
        and reserved bits, MSI-X reserved bits, power state).

        Raises:
            InvalidArgumentError: EINVAL naming what differs, EPROTO for another layout
                version; the state is unchanged.
        """
        self._n.restore(bytes(snapshot))
