"""Serve an emulated PCIe function with the native engine.

Declare the function (:class:`mlx5tlp.function.FunctionSpec`), say what answers each BAR
range — :class:`MemoryRegion` (bytes in shared memory, served natively), :class:`RegisterRegion`
(a register file, native unless a register has a Python hook), :class:`CallbackRegion` (Python,
called in batches) — and serve it on a device with :class:`Device`::

    from mlx5tlp import engine, function as fn, open_device

    spec = fn.FunctionSpec(identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234),
                           bars=[fn.Bar(0, "mem32", 1 << 16)])
    with open_device(backend="sim") as ctx, engine.Device(
            ctx, spec, regions=[engine.MemoryRegion(0, 0, 4096)]) as dev:
        ...  # the host sends requests; the engine answers them

The engine's loop, routing rules, counters and trace format: ``docs/engine.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

from mlx5tlp import _core
from mlx5tlp._closing import Closing
from mlx5tlp.context import Context
from mlx5tlp.errors import Error, InvalidArgumentError, InvalidHandleError
from mlx5tlp.function.model import Function, _core_value
from mlx5tlp.function.spec import FunctionSpec
from mlx5tlp.handover.state import SharedState
from mlx5tlp.var import Var

if TYPE_CHECKING:
    from mlx5tlp.handover.primary import Primary

__all__ = [
    "ACCESSES",
    "CallbackRegion",
    "Device",
    "MemoryRegion",
    "Register",
    "RegisterRegion",
    "Request",
    "TraceEntry",
    "close_within",
    "read_trace",
]

ACCESSES = ("ro", "rw", "rw1c", "wo")
_CHANNELS = 8
#: Seconds :func:`_close_at_exit` gives an open device's lanes to stop at interpreter exit.
EXIT_TIMEOUT = 5.0
_open_devices: weakref.WeakSet[Device] = weakref.WeakSet()


class MemoryRegion:
    """Bytes of a BAR served natively: reads return them, writes change them.

    Args:
        bar: BAR index (0..5; 6 = Expansion ROM).
        offset: start within the BAR (DW aligned).
        size: bytes (a positive multiple of 4).
        fd: an existing memfd/regular file of at least ``size`` bytes to map (the region dups
            it), or None for a new zeroed memfd (sealed at ``size``: ``F_SEAL_SHRINK |
            F_SEAL_GROW | F_SEAL_SEAL``, so nobody can truncate it under a mapping). Either
            way the bytes are ``MAP_SHARED``: any process that maps :attr:`fd` sees and
            changes what the host sees.
        name: for errors and statistics.

    Thread-safety: :meth:`read`/:meth:`write` from any thread, concurrently with the engine
    (accesses to the same bytes race as on a device).
    """

    def __init__(self, bar: int, offset: int, size: int, *, fd: Optional[int] = None,
                 name: str = "") -> None:
        self.name = name or f"memory@{bar}:{offset:#x}"
        self._core = _core.engine.MemoryRegion.create(
            self.name, _int(bar, "bar"), _int(offset, "offset"), _int(size, "size"),
            -1 if fd is None else _int(fd, "fd"))

    @property
    def fd(self) -> int:
        """The memfd holding the bytes (owned by the region: dup it to keep it)."""
        return int(self._core.fd)

    @property
    def size(self) -> int:
        """Bytes in the region."""
        return int(self._core.size)

    @property
    def backing_lost(self) -> bool:
        """Whether the file behind :attr:`fd` was truncated by another process while mapped.

        A file that is not sealed against shrinking (a spec's ``shared`` file, an
        application's fd) is mapped under the native SIGBUS guard: a truncation costs the
        region its bytes (the mapping becomes private zero pages) instead of killing the
        process. From then on the engine answers reads Completer Abort and drops writes, and
        :meth:`read`/:meth:`write` raise :class:`~mlx5tlp.Error` (``EIO``). Never true for a
        region's own (sealed) memfd. See docs/engine.md, "Shared backing files"."""
        return bool(self._core.backing_lost)

    def read(self, offset: int, length: int) -> bytes:
        """A copy of ``length`` bytes at region offset ``offset``.

        Raises:
            Error: ``EIO``: the backing file was truncated (:attr:`backing_lost`).
        """
        return bytes(self._core.read(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at region offset ``offset`` (the device side changing its memory).

        Raises:
            Error: ``EIO``: the backing file was truncated (:attr:`backing_lost`).
        """
        self._core.write(offset, bytes(data))


@dataclass(frozen=True)
class Register:
    """One register of a :class:`RegisterRegion`.

    Attributes:
        name: its name (hooks receive it).
        offset: region offset, aligned to ``width``.
        width: 1, 2, 4 or 8 bytes.
        reset: value at creation and at :meth:`RegisterRegion.reset`.
        access: ``"ro"`` (writes ignored), ``"rw"``, ``"rw1c"`` (a 1 clears the bit), ``"wo"``
            (reads return 0).
        reserved: a mask of reserved bits: they read 0 and host writes leave them alone
            (RsvdP/RsvdZ on the device side, PCIe Base §7.4); ``reset`` must not set them.
        on_read: ``f(name) -> int``: the register's value for this read (stored, then read).
        on_write: ``f(name, value)``: called after a write changed it, with the new value.
    Hooks run on an engine thread with the GIL, batched per engine batch.
    """

    name: str
    offset: int
    width: int = 4
    reset: int = 0
    access: str = "rw"
    on_read: Optional[Callable[[str], int]] = None
    on_write: Optional[Callable[[str, int], None]] = None
    reserved: int = 0

    def __post_init__(self) -> None:
        if self.access not in ACCESSES:
            raise InvalidArgumentError(errno.EINVAL,
                                       f"register {self.name!r}: access: {self.access!r} "
                                       f"is not one of {', '.join(ACCESSES)}", "define register")


class RegisterRegion:
    """A register file in a BAR range. Bytes no register covers read 0 and ignore writes.

    The values live in a memfd (:attr:`fd`, sealed at its size like a new
    :class:`MemoryRegion`'s), so that they outlive the process for a successor;
    ``fd``: continue from an existing one (each value masked to its register's width) instead
    of starting at the reset values.

    Raises:
        InvalidArgumentError: a register's width, alignment, placement or reset value is
            invalid, or two overlap (the message names ``registers[i].<field>``).
    """

    def __init__(self, bar: int, offset: int, registers: Sequence[Register], *,
                 size: Optional[int] = None, name: str = "", fd: Optional[int] = None) -> None:
        regs = list(registers)
        seen: dict[str, int] = {}
        for i, r in enumerate(regs):
            if not isinstance(r, Register):
                raise TypeError(f"registers[{i}] must be a Register")
            if r.name in seen:
                # Hooks and region[name] address registers by name: a second one of the
                # same name would be unreachable, or get the first one's value.
                raise InvalidArgumentError(
                    errno.EINVAL, f"registers[{i}].name: {r.name!r} is the name of "
                    f"registers[{seen[r.name]}] too", "create register region")
            seen.setdefault(r.name, i)
        end = max((r.offset + r.width for r in regs), default=4)
        self.name = name or f"registers@{bar}:{offset:#x}"
        self.registers = tuple(regs)
        self._by_name = {r.name: r for r in regs}
        self._core = _core.engine.RegisterRegion(
            self.name, _int(bar, "bar"), _int(offset, "offset"),
            _int(size if size is not None else (end + 3) // 4 * 4, "size"),
            [(r.name, r.offset, r.width, r.reset, r.access, r.on_read is not None,
              r.on_write is not None, r.reserved) for r in regs],
            -1 if fd is None else _int(fd, "fd"))
        self._index = {n: i for i, (n, _o, _w) in enumerate(self._core.names())}

    @property
    def fd(self) -> int:
        """The memfd holding the values (one little-endian u64 per register, in offset order;
        owned by the region: dup it to keep it). A successor passes it as ``fd`` to continue
        from these values (docs/handover.md)."""
        return int(self._core.fd)

    @property
    def backing_lost(self) -> bool:
        """Whether an adopted, unsealed :attr:`fd` was truncated under the mapping (see
        :attr:`MemoryRegion.backing_lost`): reads are answered Completer Abort, and item
        access raises :class:`~mlx5tlp.Error` (``EIO``)."""
        return bool(self._core.backing_lost)

    def __getitem__(self, name: str) -> int:
        """The register's current value."""
        return int(self._core.value(self._index[name]))

    def __setitem__(self, name: str, value: int) -> None:
        """Set it from the device side (the access rules do not apply)."""
        self._core.set_value(self._index[name], value)

    def reset(self) -> None:
        """Every register back to its reset value."""
        self._core.reset()

    def _dispatch(self, offset: int, length: int, write: bool) -> None:
        names = self._core.names()
        for n, o, w in names:
            if o + w <= offset or o >= offset + length:
                continue
            reg = self._by_name[n]
            if write and reg.on_write is not None:
                reg.on_write(n, self[n])
            elif not write and reg.on_read is not None:
                self[n] = int(reg.on_read(n)) & ~reg.reserved  # reserved bits read 0


class Request:
    """One access handed to a :class:`CallbackRegion` handler.

    Attributes:
        kind: ``"MRd"``, ``"MWr"``, ``"IORd"`` or ``"IOWr"``.
        offset: region offset (DW aligned); ``length``: bytes (a multiple of 4).
        first_be / last_be: the TLP's byte enables.
        data: the payload of a write, else None.
        requester_id / tag: who asked.
    A read (and an IOWr) is answered with :meth:`complete` (data: exactly ``length`` bytes) or
    :meth:`fail` — in the handler or later from any thread. Unanswered when its deadline
    passes, the engine answers Completer Abort (``stats()["deferred_expired"]``).
    """

    __slots__ = ("_engine", "_id", "data", "first_be", "kind", "last_be", "length", "offset",
                 "requester_id", "tag")

    def __init__(self, engine: Any, item: tuple[Any, ...]) -> None:
        (_r, _w, self.offset, self.length, self.first_be, self.last_be, data, self._id,
         self.requester_id, self.tag, self.kind) = item
        self.data: Optional[bytes] = data
        self._engine = engine

    @property
    def needs_answer(self) -> bool:
        """True for reads and IOWr (non-posted); posted writes need nothing."""
        return bool(self._id)

    def complete(self, data: bytes = b"") -> None:
        """Answer with ``data`` (``length`` bytes for a read, empty for an IOWr).

        Raises:
            InvalidHandleError: already answered, expired, or the device is closed (ENOENT).
            InvalidArgumentError: wrong data length (EINVAL).
        """
        _check_answer(self._engine.complete(self._id, bytes(data)), self, len(data))

    def fail(self, status: str = "CA") -> None:
        """Answer ``"UR"`` (Unsupported Request) or ``"CA"`` (Completer Abort)."""
        _check_answer(self._engine.fail(self._id, status), self, 0)

    def __repr__(self) -> str:
        return f"Request({self.kind} offset={self.offset:#x} length={self.length} tag={self.tag})"


def _check_answer(rc: int, req: Request, n: int) -> None:
    if rc == 0:
        return
    if rc == errno.EINVAL:
        raise InvalidArgumentError(rc, f"{req!r}: {n} bytes of data, need "
                                   f"{0 if req.kind == 'IOWr' else req.length}", "complete request")
    raise InvalidHandleError(rc, f"{req!r} was already answered, expired or its device is closed",
                             "complete request")


class CallbackRegion:
    """A BAR range answered by Python, in batches: ``handler(requests)`` gets a list of
    :class:`Request` (one GIL acquisition per engine batch). It may answer reads in the call
    (``req.complete(data)``, or return a list with bytes/None per request) or keep them and
    answer later from any thread.

    Args:
        deadline: seconds a read may stay unanswered (None: the function's Completion Timeout
            range maximum from Device Control 2, 50 ms by default).
    """

    def __init__(self, bar: int, offset: int, size: int,
                 handler: Callable[[list[Request]], Optional[Sequence[Optional[bytes]]]], *,
                 deadline: Optional[float] = None, name: str = "") -> None:
        if not callable(handler):
            raise TypeError("handler must be callable")
        ok = isinstance(deadline, (int, float)) and 0 < deadline <= 4000
        if deadline is not None and not ok:
            raise InvalidArgumentError(errno.EINVAL,
                                       f"deadline: {deadline!r} is not 0 < seconds <= 4000",
                                       "define region")
        self.name = name or f"callback@{bar}:{offset:#x}"
        self.handler = handler
        self._core = _core.engine.CallbackRegion(
            self.name, _int(bar, "bar"), _int(offset, "offset"), _int(size, "size"),
            0 if deadline is None else max(1, int(deadline * 1e6)))


Region = Union[MemoryRegion, RegisterRegion, CallbackRegion]


class TraceEntry(NamedTuple):
    """One traced request (docs/engine.md, "Trace format")."""

    time_ns: int
    lane: int
    kind: int
    status: int
    address: int
    length_dw: int
    requester_id: int
    tag: int
    first_be: int
    last_be: int
    completions: int
    region: int
    latency_ns: int
    header: bytes


def read_trace(path: Union[str, Path]) -> list[TraceEntry]:
    """Read a trace file written by :meth:`Device.trace_dump`.

    Raises:
        Error: the file is missing, not a trace, or of another version (EPROTO).
    """
    return [TraceEntry(*t) for t in _core.engine.read_trace(str(path))]


class Device(Closing):
    """An emulated function served by the native engine on ``pages`` gateway pages.

    Each page gets a lane: a native thread that is the page's one committer and takes the
    requests of its channels (channel ``c`` goes to lane ``c % pages``) from the software
    device's request channels. The lanes run without the GIL; hooks and callbacks get it once
    per batch.

    Args:
        ctx: an open context of the software device (``backend="sim"``). How requests reach
            software on mlx5 hardware is not public: there is no hardware request source.
        spec: the function (a :class:`FunctionSpec`, or a :class:`Function` whose spec is
            taken; the served state starts from reset, or from ``state``).
        regions: what answers each BAR range (they must not overlap each other or MSI-X).
        pages: gateway pages (lanes), 1..8.
        batch: requests per take at most.
        trace: entries of the TLP trace ring per lane (0: off; a power of two).
        state: optional shared buffer of :data:`mlx5tlp.function.STATE_SIZE` bytes for the
            function state, or a handover :class:`~mlx5tlp.handover.SharedState` (its function
            state and its Completer ID word); ``adopt`` continues from what is in it.
        start: start serving at once (else call :meth:`start`).
        spin_us: how long an idle lane polls before it blocks, 0..1e6 microseconds.
        gateway_vars: TLP gateway VARs to serve on (one lane each; ``pages`` is then their
            number), of ``ctx`` (allocated or imported on it; another context's VAR is
            refused), e.g. imported from the process that allocated them. They stay the
            caller's: the device never frees them (free or unimport them after
            :meth:`close`). None: the device allocates ``pages`` VARs of ``ctx`` and frees
            them at :meth:`close`.
        channels: the request channels of each lane (a sequence per lane, every channel in
            at most one lane), e.g. ``[[3]]`` for one lane serving channel 3. None: channel
            ``c`` goes to lane ``c % pages``.
        handover: keep the function state in a handover state block (a memfd,
            :class:`mlx5tlp.handover.SharedState`) so that :meth:`serve` can hand the function
            to a successor process; ``state`` must then be None.
        attach: open the pages' gateways now. False: build everything else (lanes, buffers,
            request sources) and open them with :meth:`attach` later — a successor prepares
            its engine while its predecessor still commits to the pages (``start`` is then
            ignored).

    Raises:
        InvalidArgumentError: a bad spec, region, or option (named).
        Error: no gateway page free (ENOSPC), and the errors of opening gateways.

    Thread-safety: every method from any thread. ``close()`` (or leaving the ``with`` block)
    stops the lanes, answers deferred requests Completer Abort, closes the gateways and frees
    the pages.
    """

    def __init__(self, ctx: Context, spec: Union[FunctionSpec, Function],
                 regions: Sequence[Region] = (),
                 *, pages: int = 1, batch: int = 32, deferred_max: int = 1024, trace: int = 0,
                 state: Optional[Any] = None, adopt: bool = False, start: bool = True,
                 spin_us: float = 20.0, gateway_vars: Optional[Sequence[Var]] = None,
                 channels: Optional[Sequence[Sequence[int]]] = None,
                 handover: bool = False, attach: bool = True) -> None:
        if isinstance(spec, Function):
            spec = spec.spec  # its declaration; the served state starts from reset (or `state`)
        if not isinstance(spec, FunctionSpec):
            raise TypeError(f"spec must be a FunctionSpec or Function, not {type(spec).__name__}")
        given = None if gateway_vars is None else list(gateway_vars)
        if given is not None:
            for i, v in enumerate(given):
                if not isinstance(v, Var):
                    raise TypeError(f"gateway_vars[{i}] must be a mlx5tlp.Var, "
                                    f"not {type(v).__name__}")
                if v._ctx is not ctx:
                    # Another context's VAR: of another device, the lanes would answer this
                    # device's requests into that device's page; of this device, closing
                    # that context would free the page under the running lanes.
                    raise InvalidArgumentError(
                        errno.EINVAL, f"gateway_vars[{i}]: a VAR of another context, not of "
                        "this device's: allocate or import it on ctx", "create device")
            if not given:
                raise InvalidArgumentError(errno.EINVAL, "gateway_vars: no VAR (one per lane)",
                                           "create device")
            pages = len(given)
        if not isinstance(pages, int) or isinstance(pages, bool) or not 1 <= pages <= _CHANNELS:
            raise InvalidArgumentError(errno.EINVAL, f"pages: {pages!r} is not 1..{_CHANNELS}",
                                       "create device")
        masks = _lane_masks(pages, channels)
        spin = _spin_us(spin_us)
        self.spec = spec
        self.regions = tuple(regions)
        for i, r in enumerate(self.regions):
            if not isinstance(r, (MemoryRegion, RegisterRegion, CallbackRegion)):
                raise TypeError(
                    f"regions[{i}] must be a MemoryRegion, RegisterRegion or CallbackRegion")
        self._ctx = ctx
        self._lock = threading.Lock()
        self._err_lock = threading.Lock()
        self._hook_errors = 0
        self._last_hook_error: Optional[str] = None
        self._vars: list[Any] = []
        self._owns_vars = given is None
        self._e: Optional[Any] = None
        self.shared: Optional[SharedState] = None
        self._adopted: Optional[SharedState] = None  # by attach()
        if handover:
            if state is not None:
                raise InvalidArgumentError(errno.EINVAL, "state: a handover device keeps its "
                                           "own state block; pass one or the other",
                                           "create device")
            self.shared = SharedState.create(spec, 0, channels=(1 << _CHANNELS) - 1)
            state, adopt = self.shared, True  # initialised by create()
        completer: Optional[memoryview] = None
        if isinstance(state, SharedState):
            completer = state.completer_view()
            state = state.function_view()
        try:
            engine = _core.engine.Engine(
                _core_value(spec), [r._core for r in self.regions], _int(batch, "batch"),
                _int(deferred_max, "deferred_max"), _int(trace, "trace"), self._dispatch, state,
                adopt, completer)
        except BaseException:
            if self.shared is not None:
                self.shared.close()
            raise
        self._e = engine
        try:
            for lane in range(pages):
                var = ctx.alloc_var(tlp=True) if given is None else given[lane]
                self._vars.append(var)
                engine.add_sim_lane(var._core, masks[lane], spin, attach)
            if start and attach:
                engine.start()
        except BaseException:
            self.close()
            raise
        _open_devices.add(self)

    @property
    def _engine(self) -> Any:
        if self._e is None:
            raise InvalidHandleError(errno.EBADF, "the device was closed", "device")
        return self._e

    def _hook_failed(self, where: str) -> None:
        # Called in an except block. Not self._lock: close() holds that while lanes finish.
        with self._err_lock:
            self._hook_errors += 1
            self._last_hook_error = f"{where}:\n{traceback.format_exc()}"

    def _dispatch(self, items: list[tuple[Any, ...]]) -> None:
        running = _hooks_running()
        running.append(self)
        try:
            self._dispatch_items(items)
        finally:
            running.pop()

    def _not_from_own_hook(self, what: str) -> None:
        # A lane runs the hooks: stopping, pausing or closing the device from one would make
        # that lane wait for (join) itself — a deadlock, or std::terminate on the join.
        if self in _hooks_running():
            raise Error(errno.EDEADLK, f"{what}: called from a hook or handler of this device, "
                        "on the lane that would have to finish first; call it from another "
                        "thread", what)

    def _dispatch_items(self, items: list[tuple[Any, ...]]) -> None:
        e = self._engine
        groups: dict[int, list[Request]] = {}
        for it in items:
            region = self.regions[it[0]]
            if isinstance(region, RegisterRegion):
                try:
                    region._dispatch(it[2], it[3], bool(it[1]))
                except BaseException:  # SystemExit too: a lane has nobody to raise it to
                    # The access failed: a non-posted one is answered Completer Abort
                    # (§2.3.1: the completer could not complete it); a posted write has no
                    # completion, so the count and the traceback are all that tell.
                    self._hook_failed(f"{region.name} {it[10]} at {it[2]:#x}")
                    if it[7]:
                        e.fail(it[7], "CA")
                continue
            groups.setdefault(it[0], []).append(Request(e, it))
        for index, reqs in groups.items():
            region = self.regions[index]
            assert isinstance(region, CallbackRegion)
            try:
                answers = region.handler(reqs)
                if answers is not None:  # what it returned is checked as part of the call
                    for r, a in zip(reqs, answers, strict=False):
                        if a is not None and r.needs_answer:
                            e.complete(r._id, bytes(a))
            except BaseException:  # SystemExit too: a lane has nobody to raise it to
                self._hook_failed(f"{region.name} handler ({len(reqs)} requests)")
                for r in reqs:
                    if r.needs_answer:
                        e.fail(r._id, "CA")  # already answered ones are left as they are

    # ---- lifecycle ----

    def start(self) -> None:
        """Start serving (once)."""
        self._engine.start()

    def pause(self, timeout: Optional[float] = None) -> bool:
        """Stop taking requests and finish the ones taken (their answers are in the pages);
        deferred ones stay answerable. True when every lane is idle, False at the timeout (the
        lanes are still told to pause: call again, or :meth:`resume`).

        Raises:
            Error: EDEADLK from one of this device's hooks or handlers (the lane running it
                would wait for itself).
        """
        self._not_from_own_hook("pause device")
        return bool(self._engine.pause(timeout))

    def resume(self) -> None:
        """Take requests again after :meth:`pause` — also after one that returned False (a lane
        still told to pause would otherwise pause as soon as it could, and stay paused).

        Raises:
            InvalidArgumentError: stopped or closed (``EINVAL``), or the gateways were released
                (``reattach_gateways()`` first).
        """
        self._engine.resume()

    def release_gateways(self) -> None:
        """Paused only: close every lane's gateway, so another process may commit to the pages."""
        self._not_from_own_hook("release gateways")
        self._engine.release_gateways()

    def reattach_gateways(self) -> None:
        """Paused only: open the pages' gateways again (then :meth:`resume`)."""
        self._engine.reattach_gateways()

    def attach(self, state: Optional[SharedState] = None) -> None:
        """Before :meth:`start`, on a device built with ``attach=False``: adopt ``state`` (a
        predecessor's handover state block: configuration space, MSI-X, the captured
        Completer ID; validated) if given, and open the gateways of the pages.

        Raises:
            InvalidArgumentError: started already (EBUSY), or the state failed a check.
            Error: a page's gateway is held by another process (EBUSY).
        """
        e = self._engine
        if state is not None and self._adopted is not state:
            if self._adopted is not None:
                raise InvalidArgumentError(errno.EINVAL, "attach: this device adopted another "
                                           "state block already", "attach")
            e.adopt_state(state.function_view(), state.completer_view())
            self._adopted = state  # a retry after EBUSY only opens the gateways
        e.attach_gateways()

    def drain_deferred(self, timeout: Optional[float] = None) -> bool:
        """Paused only: wait until every deferred request is answered (by its region, or
        Completer Abort at its deadline) and published. True when none is open, False at the
        timeout. A planned handover does this before :meth:`release_gateways`: the claims of a
        living process cannot move to its successor.

        Raises:
            InvalidArgumentError: the device is not paused (EBUSY).
        """
        return bool(self._engine.drain_deferred(timeout))

    @property
    def answered(self) -> int:
        """Requests answered so far: ``sum(stats()["latency_ns_log2"])``, read without building
        the stats (a planned handover's pause reads it)."""
        return int(self._engine.answered)

    @property
    def first_answer_ns(self) -> int:
        """``CLOCK_MONOTONIC`` ns of the first request answered since the last start, resume or
        reattach (0: none yet)."""
        return int(self._engine.first_answer_ns)

    def wait_first_answer(self, timeout: Optional[float]) -> int:
        """Block (without the GIL) until :attr:`first_answer_ns` is set or `timeout` seconds
        pass (None: no limit); returns it, 0 at the timeout or once the device is stopped or
        closed (:meth:`stop` / :meth:`close` from another thread wake it). A successor calls
        this right after :meth:`start` so that its lanes get the CPU for the first answers.

        Raises:
            InvalidArgumentError: a negative or NaN timeout (``EINVAL``).
        """
        return int(self._engine.wait_first_answer(timeout))

    def prepare_pause(self, on: bool = True) -> None:
        """A :meth:`pause` is coming (a planned handover was asked for): until
        ``prepare_pause(False)`` (or :meth:`start`) each lane takes no more requests than its
        gateway page can take now (at least one) instead of a whole batch, so that the pause
        waits for the host to consume little. A hint: nothing taken is lost either way.
        Thread-safety: any thread."""
        self._engine.set_lean(bool(on))

    @property
    def vars(self) -> list[Var]:
        """The gateway VARs the lanes commit to (lane order)."""
        return list(self._vars)

    def serve(self, control: str, key: bytes, *,
              events: Optional[Callable[[dict[str, Any]], None]] = None,
              allow_uids: Optional[Collection[int]] = None) -> Primary:
        """Become the primary of this function at the control socket ``control``: returns a
        :class:`mlx5tlp.handover.Primary` (call ``run()``) that keeps the engine serving and
        hands the function to a standby (``handover.Standby(control, key)``) on request:
        pause, finish deferred requests, release the gateways, commit; or resumes (rollback).

        The device must have been created with ``handover=True``. Ownership: the VARs this
        device allocated move to the primary (a successor serves them after a handover; the
        process that finally stops the function frees them) — close the primary, not the
        device. docs/handover.md.

        Raises:
            InvalidArgumentError: not a ``handover=True`` device, or the socket directory is
                not private.
            LeaseHeldError: the function already has a primary (EBUSY).
        """
        from mlx5tlp.handover.engine_node import serve_device

        if self.shared is None:
            raise InvalidArgumentError(errno.EINVAL, "serve(control=...) needs a device created "
                                       "with handover=True (its state must be shareable)",
                                       "serve")
        return serve_device(self, control, key, events=events, allow_uids=allow_uids)

    def _give_vars(self) -> list[Var]:
        """The VARs, now the caller's: close() will not free them (handover ownership)."""
        self._owns_vars = False
        return list(self._vars)

    def stop(self) -> None:
        """Stop the lanes (deferred requests are answered Completer Abort); idempotent.

        Raises:
            Error: EDEADLK from one of this device's hooks or handlers (as :meth:`close`).
        """
        self._not_from_own_hook("stop device")
        if self._e is not None:
            self._e.stop()

    @property
    def state(self) -> str:
        """``"created"``, ``"running"``, ``"paused"`` or ``"stopped"``."""
        return str(self._engine.state)

    @property
    def page_ids(self) -> list[int]:
        """The gateway pages the lanes commit to (lane order)."""
        return [int(v.page_id) for v in self._vars]

    @property
    def completer_id(self) -> int:
        """The Completer ID in use (Bus/Device Numbers captured from CfgWr0, §2.2.6.2)."""
        return int(self._engine.completer_id)

    def stats(self) -> dict[str, Any]:
        """Counters: ``requests`` by kind, ``completions``, ``ur``, ``ca``, ``malformed``,
        ``poisoned`` (EP writes discarded, PCIe Base §2.7.2.2), ``deferred*``, ``regions``
        (per region: reads, writes, bytes, batched, and ``backing_lost``: its backing file
        was truncated while served, see :attr:`MemoryRegion.backing_lost`),
        ``latency_ns_log2`` (bucket b counts requests that took [2^b, 2^(b+1)) ns from take
        to in the page), and ``hook_errors`` (register hooks and callback handlers that
        raised; see :attr:`last_hook_error`)."""
        out = dict(self._engine.stats())
        out["hook_errors"] = self._hook_errors
        return out

    @property
    def last_hook_error(self) -> Optional[str]:
        """The last exception a register hook or callback handler raised: where, and its
        formatted traceback (None if none did). The accesses it failed were answered
        Completer Abort (non-posted) or dropped (posted writes); serving goes on."""
        return self._last_hook_error

    def trace_dump(self, path: Union[str, Path]) -> int:
        """Write the trace rings to ``path`` (docs/engine.md format); returns the entries."""
        return int(self._engine.trace_dump(str(path)))

    # ---- the function ----

    def raise_msix(self, vector: int) -> str:
        """Signal MSI-X ``vector``: ``"sent"``, ``"pending"`` (masked: delivered on unmask),
        ``"disabled"`` or ``"bad_vector"``. The message is an MWr the host model receives."""
        return str(self._engine.raise_msix(_int(vector, "vector")))

    def msix_pending(self, vector: int) -> bool:
        """Whether the vector's Pending bit is set."""
        return bool(self._engine.msix_pending(_int(vector, "vector")))

    def config_read(self, offset: int, size: int = 4) -> int:
        """Read configuration space (as the host would, without a TLP)."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset < 4096:
            raise InvalidArgumentError(errno.EINVAL, f"config read of {size} at {offset:#x}",
                                       "config read")
        v = int(self._engine.config_read(offset & ~3))
        return (v >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def config_bytes(self) -> bytes:
        """The 4096 configuration bytes."""
        return bytes(self._engine.config_bytes())

    def close(self) -> None:
        """Stop, close the gateways and free the pages (idempotent).

        Raises:
            Error: EDEADLK when called from one of this device's own hooks or handlers: the
                lane running the hook would have to stop first. Nothing is closed then (the
                hook's access fails as any raising hook's does); close from another thread.
        """
        self._not_from_own_hook("close device")
        with self._lock:
            e = self._e
            if e is not None:
                e.close()  # lanes in a handler still answer through self._e meanwhile
            self._e = None
            for v in self._vars if self._owns_vars else ():
                # The context may be closed already: its objects went with it.
                with contextlib.suppress(Exception):
                    v.free()
            self._vars.clear()
            if self.shared is not None:
                self.shared.close()
                self.shared = None

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._e is None

    def __repr__(self) -> str:
        state = "closed" if self._e is None else self._e.state
        return f"<mlx5tlp.engine.Device {state} pages={self.page_ids}>"


def close_within(dev: Device, timeout: float) -> bool:
    """Close ``dev``, waiting at most ``timeout`` seconds for its lanes to stop.

    Returns:
        True when closed; False when a lane is still busy (a hook or callback handler that
        does not return): the close goes on in a daemon thread, and the caller decides (e.g.
        end the process).
    """
    closer = threading.Thread(target=dev.close, name="mlx5tlp-close", daemon=True)
    closer.start()
    closer.join(timeout)
    return not closer.is_alive()


def _close_at_exit() -> None:
    """Close every device still open when the interpreter exits.

    Runs from :mod:`atexit`, before the interpreter finalizes: lanes that call Python (hooks,
    callbacks) must stop while Python still runs them. Deferred requests still open are
    answered Completer Abort, with a :class:`RuntimeWarning` saying how many; a device with
    nothing dropped gets a :class:`ResourceWarning` (hidden by default). A device whose lanes
    do not stop within :data:`EXIT_TIMEOUT` seconds (a handler that never returns) gets a
    warning and the process ends at once with ``os._exit(1)``, rather than hanging or
    aborting in finalization.
    """
    for dev in list(_open_devices):
        if dev.closed:
            continue
        name = repr(dev)
        try:
            open_deferred = int(dev._engine.stats()["deferred_outstanding"])
        except Exception:
            open_deferred = 0
        if not close_within(dev, EXIT_TIMEOUT):
            warnings.warn(f"{name} left open at interpreter exit did not stop within "
                          f"{EXIT_TIMEOUT} s (a hook or callback handler is blocked); "
                          "ending the process", RuntimeWarning, stacklevel=1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        if open_deferred:
            warnings.warn(f"{name} left open at interpreter exit: closed it; {open_deferred} "
                          "deferred requests were answered Completer Abort", RuntimeWarning,
                          stacklevel=1)
        else:
            warnings.warn(f"{name} left open at interpreter exit: closed it", ResourceWarning,
                          stacklevel=1)


atexit.register(_close_at_exit)


_hook_threads = threading.local()


def _hooks_running() -> list[Device]:
    """The devices whose hooks or handlers this thread is running now (innermost last)."""
    running: Optional[list[Device]] = getattr(_hook_threads, "devices", None)
    if running is None:
        running = _hook_threads.devices = []
    return running


def _lane_masks(pages: int, channels: Optional[Sequence[Sequence[int]]]) -> list[int]:
    """Each lane's channel bit mask: the default spread, or the given sets (checked)."""
    if channels is None:
        return [sum(1 << c for c in range(_CHANNELS) if c % pages == lane)
                for lane in range(pages)]
    if isinstance(channels, (str, bytes)) or len(channels) != pages:
        raise InvalidArgumentError(errno.EINVAL, f"channels: need one channel set per lane "
                                   f"({pages}), got {channels!r}", "create device")
    masks: list[int] = []
    seen = 0
    for lane, chans in enumerate(channels):
        mask = 0
        for c in chans:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < _CHANNELS:
                raise InvalidArgumentError(errno.EINVAL, f"channels[{lane}]: {c!r} is not a "
                                           f"channel 0..{_CHANNELS - 1}", "create device")
            if seen >> c & 1:
                raise InvalidArgumentError(errno.EINVAL, f"channels[{lane}]: channel {c} is "
                                           "already served by another lane", "create device")
            mask |= 1 << c
            seen |= 1 << c
        if not mask:
            raise InvalidArgumentError(errno.EINVAL, f"channels[{lane}]: no channel",
                                       "create device")
        masks.append(mask)
    return masks


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 0:
        raise InvalidArgumentError(errno.EINVAL, f"{what}: {value} is negative", "engine")
    if value >= 1 << 63:  # beyond any native parameter: pybind11 would say "incompatible"
        raise InvalidArgumentError(errno.EINVAL, f"{what}: {value} is too large", "engine")
    return value


_MAX_SPIN_US = 1e6


def _spin_us(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"spin_us must be a number, not {type(value).__name__}")
    if not 0 <= value <= _MAX_SPIN_US:  # NaN fails this too; converted to ns in C++
        raise InvalidArgumentError(errno.EINVAL, f"spin_us: {value!r} is not 0..{_MAX_SPIN_US:g} "
                                   "microseconds", "create device")
    return float(value)

