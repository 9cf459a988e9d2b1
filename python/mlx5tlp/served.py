"""A served function: a function spec file with a ``regions`` section, and ``mlx5tlp serve``.

The spec file is the function format of ``docs/function.md`` (JSON, or TOML by the ``.toml``
suffix) plus an array ``regions`` saying what answers each BAR range — ``memory`` (bytes,
optionally in a shared file, served natively), ``registers`` (a register file, with optional
Python hooks) and ``callback`` (a Python function called in batches). ``docs/spec-format.md``
documents every key; ``examples/serve/`` holds a complete example::

    from mlx5tlp import served
    spec = served.load("examples/serve/nic.toml")   # every field checked, named on error
    with open_device(backend="sim") as ctx, spec.device(ctx) as dev:
        ...                                          # any host program talks to it

Errors: :class:`mlx5tlp.InvalidArgumentError` (EINVAL) whose message starts with the file and
names the key and the bad value, e.g. ``nic.toml: regions[1].registers[0].access: 'rx' is not
one of ro, rw, rw1c, w1c, wo``.

Thread-safety: a :class:`ServedSpec` is immutable; :meth:`ServedSpec.device` creates new
regions (and imports hook modules) on each call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import itertools
import json
import math
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from mlx5tlp import engine
from mlx5tlp.context import Context
from mlx5tlp.errors import InvalidArgumentError
from mlx5tlp.function.model import Function
from mlx5tlp.function.spec import FunctionSpec, _toml_loads

__all__ = [
    "CallbackSpec",
    "MemorySpec",
    "RegisterFileSpec",
    "RegisterSpec",
    "ServedSpec",
    "load",
    "serve",
]

_ACCESS_ALIASES = {"w1c": "rw1c"}  # the name PCI specs' tables use for RW1C
_ACCESS_NAMES = (*engine.ACCESSES, *_ACCESS_ALIASES)
_BARS = 7  # 0..5 and 6 = the Expansion ROM
_MAX_WAIT_S = 1e9  # threading's waits overflow time_t beyond ~9.2e9 s


@dataclass(frozen=True)
class MemorySpec:
    """A ``memory`` region: ``size`` bytes at ``offset`` of BAR ``bar``, served natively.

    ``contents`` (bytes at the region's start) over ``fill`` (every other byte); ``shared``:
    a file backing the bytes (created, or grown, to ``size``), which other processes map.
    With ``shared`` and neither ``fill`` nor ``contents`` given, the file's bytes are kept.
    """

    bar: int
    offset: int
    size: int
    fill: Optional[int] = None
    contents: bytes = b""
    shared: Optional[str] = None
    name: str = ""


@dataclass(frozen=True)
class RegisterSpec:
    """One register of a ``registers`` region; hooks are ``"module:function"`` names."""

    name: str
    offset: int
    width: int = 4
    reset: int = 0
    access: str = "rw"
    reserved: int = 0
    on_read: Optional[str] = None
    on_write: Optional[str] = None


@dataclass(frozen=True)
class RegisterFileSpec:
    """A ``registers`` region: a register file at ``offset`` of BAR ``bar``."""

    bar: int
    offset: int
    registers: tuple[RegisterSpec, ...]
    size: Optional[int] = None
    name: str = ""


@dataclass(frozen=True)
class CallbackSpec:
    """A ``callback`` region: ``handler`` (``"module:function"``) answers it in batches."""

    bar: int
    offset: int
    size: int
    handler: str
    deadline: Optional[float] = None
    name: str = ""


RegionSpec = Union[MemorySpec, RegisterFileSpec, CallbackSpec]


@dataclass(frozen=True)
class ServedSpec:
    """A function and its regions, as read from ``path`` by :func:`load`."""

    function: FunctionSpec
    regions: tuple[RegionSpec, ...]
    path: str

    def regions_for_engine(self) -> list[engine.Region]:
        """New engine regions for this spec: memory filled, hook modules imported.

        Returns:
            The regions, in file order (the caller owns them: a memory region's memfd closes
            with it).

        Raises:
            InvalidArgumentError: a hook cannot be imported, a shared file cannot be opened,
                or a region is refused by the engine (the message names the region's key).
        """
        out: list[engine.Region] = []
        for i, r in enumerate(self.regions):
            where = f"regions[{i}]"
            name = r.name or where
            try:
                if isinstance(r, MemorySpec):
                    out.append(self._memory(r, where, name))
                elif isinstance(r, RegisterFileSpec):
                    regs = [engine.Register(
                        x.name, x.offset, x.width, x.reset, x.access,
                        _hook(self, x.on_read, f"{where}.registers[{k}].on_read"),
                        _hook(self, x.on_write, f"{where}.registers[{k}].on_write"), x.reserved)
                        for k, x in enumerate(r.registers)]
                    out.append(engine.RegisterRegion(r.bar, r.offset, regs, size=r.size,
                                                     name=name))
                else:
                    out.append(engine.CallbackRegion(
                        r.bar, r.offset, r.size, _hook(self, r.handler, f"{where}.handler"),
                        deadline=r.deadline, name=name))
            except InvalidArgumentError as exc:
                if str(exc).startswith(self.path):
                    raise
                raise self._error(f"{where}: {_strip_operation(str(exc))}") from None
        return out

    def device(self, ctx: Context, **options: Any) -> engine.Device:
        """An :class:`mlx5tlp.engine.Device` serving this spec on ``ctx`` (``options`` as for
        it: ``pages``, ``batch``, ``trace``, ...). The caller closes it.

        Raises:
            InvalidArgumentError: as :meth:`regions_for_engine`, or the engine refused a region
                (placement, overlap), prefixed with the spec file.
        """
        regions = self.regions_for_engine()
        try:
            return engine.Device(ctx, self.function, regions, **options)
        except InvalidArgumentError as exc:
            raise self._error(_strip_operation(str(exc))) from None

    def _memory(self, r: MemorySpec, where: str, name: str) -> engine.MemoryRegion:
        fd: Optional[int] = None
        if r.shared is not None:
            try:
                fd = _open_shared(r.shared, r.size)
            except OSError as exc:
                raise self._error(f"{where}.shared: {r.shared!r}: {exc.strerror}",
                                  exc.errno or errno.EINVAL) from None
        try:
            region = engine.MemoryRegion(r.bar, r.offset, r.size, fd=fd, name=name)
        finally:
            if fd is not None:
                os.close(fd)  # the region holds its own descriptor
        if r.fill or r.contents or (r.shared is not None and r.fill is not None):
            _fill(region, r)  # else: a new memfd is zero, a shared file's bytes are kept
        return region

    def _error(self, message: str, err: int = errno.EINVAL) -> InvalidArgumentError:
        return InvalidArgumentError(err, f"{self.path}: {message}", "load spec")


def load(path: Union[str, Path]) -> ServedSpec:
    """Read a served-function spec file (TOML by the ``.toml`` suffix, else JSON).

    Every field is checked here, the function compiled once (so its rules — BAR sizes,
    capability placement, MSI-X — are checked too); hooks are imported later, by
    :meth:`ServedSpec.regions_for_engine`.

    Raises:
        InvalidArgumentError: unreadable file, bad syntax, an unknown or missing key or a bad
            value; the message starts with the path and names the key and value.
        NotSupportedError: a TOML file without a TOML parser (Python < 3.11, no ``tomli``).
    """
    p = Path(path)
    where = str(p)

    def bad(message: str, err: int = errno.EINVAL) -> InvalidArgumentError:
        return InvalidArgumentError(err, f"{where}: {message}", "load spec")

    try:
        text = _read_bounded(p).decode("utf-8")
    except OSError as exc:
        raise bad(exc.strerror or str(exc), exc.errno or errno.EINVAL) from None
    except UnicodeDecodeError as exc:
        raise bad(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    syntax = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        data: Any = _toml_loads(text) if p.suffix == ".toml" else json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise bad(f"not valid {syntax}: {exc}") from None
    except RecursionError:  # both parsers recurse once per nesting level
        raise bad(f"not valid {syntax}: nested too deeply") from None
    if not isinstance(data, Mapping):
        raise bad("the top level must be a table/object")
    data = dict(data)
    raw_regions = data.pop("regions", [])
    try:
        function = FunctionSpec.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from None
    try:
        Function(function).close()  # the function's own rules, checked now
    except InvalidArgumentError as exc:
        raise bad(_strip_operation(str(exc))) from None
    if not isinstance(raw_regions, list):
        raise bad(f"regions: must be an array of tables, not {_show(raw_regions)}")
    regions = tuple(_region(r, f"regions[{i}]", bad) for i, r in enumerate(raw_regions))
    _check_layout(function, regions, bad)
    return ServedSpec(function, regions, where)


#: Spec files larger than this are refused before they are read (the example is 3 KiB).
MAX_SPEC_BYTES = 4 << 20


def _read_bounded(p: Path) -> bytes:
    # O_NONBLOCK: a FIFO or device named as the spec must not block the open; only a regular
    # file of bounded size is read (not /dev/zero, not a 10 GiB file).
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > MAX_SPEC_BYTES:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than the {MAX_SPEC_BYTES} "
                                       "a spec file may have")
        chunks, left = [], MAX_SPEC_BYTES + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # it grew while being read
            raise OSError(errno.EFBIG, f"more than the {MAX_SPEC_BYTES} bytes a spec file "
                                       "may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


# ---- parsing one region ----------------------------------------------------------------------

Bad = Callable[[str], InvalidArgumentError]


def _region(data: Any, where: str, bad: Bad) -> RegionSpec:
    if not isinstance(data, Mapping):
        raise bad(f"{where}: must be a table/object, not {_show(data)}")
    kinds: dict[str, type] = {"memory": MemorySpec, "registers": RegisterFileSpec,
                              "callback": CallbackSpec}
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise bad(f"{where}.kind: {_show(kind)} is not one of {', '.join(kinds)}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    cls = kinds[kind]
    kw = _fields(cls, fields, where, bad, skip=("registers",))
    _check_place(kw, where, bad)
    if cls is MemorySpec:
        _check_memory(kw, where, bad)
    elif cls is RegisterFileSpec:
        regs = fields.get("registers")
        if not isinstance(regs, list) or not regs:
            raise bad(f"{where}.registers: must be a non-empty array of tables, not "
                      f"{_show(regs)}")
        kw["registers"] = tuple(_register(x, f"{where}.registers[{k}]", bad)
                                for k, x in enumerate(regs))
        first: dict[str, int] = {}
        for k, x in enumerate(kw["registers"]):  # hooks address registers by name
            if first.setdefault(x.name, k) != k:
                raise bad(f"{where}.registers[{k}].name: {x.name!r} is the name of "
                          f"registers[{first[x.name]}] too")
    else:
        _check_hook_name(kw["handler"], f"{where}.handler", bad)
        d = kw.get("deadline")
        if d is not None and not (math.isfinite(d) and 0 < d <= 4000):
            raise bad(f"{where}.deadline: {d!r} is not 0 < seconds <= 4000")
    return cls(**kw)  # type: ignore[no-any-return]


def _register(data: Any, where: str, bad: Bad) -> RegisterSpec:
    if not isinstance(data, Mapping):
        raise bad(f"{where}: must be a table/object, not {_show(data)}")
    kw = _fields(RegisterSpec, dict(data), where, bad)
    if kw.get("width", 4) not in (1, 2, 4, 8):
        raise bad(f"{where}.width: {kw['width']!r} is not 1, 2, 4 or 8")
    access = kw.get("access", "rw")
    if access not in _ACCESS_NAMES:
        raise bad(f"{where}.access: {access!r} is not one of {', '.join(_ACCESS_NAMES)}")
    kw["access"] = _ACCESS_ALIASES.get(access, access)
    if not kw["name"]:
        raise bad(f"{where}.name: must not be empty")
    bits = 8 * kw.get("width", 4)
    for key in ("reset", "reserved"):
        if kw.get(key, 0) >> bits:
            raise bad(f"{where}.{key}: {kw[key]:#x} does not fit {bits // 8} bytes")
    for hook in ("on_read", "on_write"):
        if kw.get(hook) is not None:
            _check_hook_name(kw[hook], f"{where}.{hook}", bad)
    return RegisterSpec(**kw)


def _fields(cls: type, data: dict[str, Any], where: str, bad: Bad,
            skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Typed values for the dataclass ``cls`` from ``data``: unknown, missing and mistyped
    keys are refused by name (integers may be ``"0x..."`` strings, for JSON)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    allowed = ([] if cls is RegisterSpec else ["kind"]) + [f.name for f in
                                                           dataclasses.fields(cls)]
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in fields:
            raise bad(f"{where}.{key}: unknown key (expected one of {', '.join(allowed)})")
        kw[key] = _typed(fields[key], value, f"{where}.{key}", bad)
    for name, f in fields.items():
        if name not in kw and f.default is dataclasses.MISSING:
            raise bad(f"{where}.{name}: missing")
    return kw


def _typed(f: dataclasses.Field[Any], value: Any, where: str, bad: Bad) -> Any:
    kind = str(f.type)
    if "str" in kind:
        if not isinstance(value, str):
            raise bad(f"{where}: {_show(value)} is not a string")
        return value
    if "bytes" in kind:
        if not isinstance(value, str):
            raise bad(f"{where}: {_show(value)} is not a hex string")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise bad(f"{where}: {_show(value)} is not hex") from None
    if "float" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"{where}: {_show(value)} is not a number of seconds")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise bad(f"{where}: {_show(value)} is not a finite number of seconds") from None
    if isinstance(value, str) and value.lower().startswith("0x"):
        try:
            value = int(value, 16)
        except ValueError:
            raise bad(f"{where}: {_show(value)} is not a hex number") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{where}: {_show(value)} is not an integer")
    if value < 0:
        raise bad(f"{where}: {value} is negative")
    return value


def _check_place(kw: dict[str, Any], where: str, bad: Bad) -> None:
    if not 0 <= kw["bar"] < _BARS:
        raise bad(f"{where}.bar: {kw['bar']} is not a BAR index 0..5 (6: the Expansion ROM)")
    if kw["offset"] % 4:
        raise bad(f"{where}.offset: {kw['offset']:#x} is not DW (4-byte) aligned")
    size = kw.get("size")
    if size is not None and (size == 0 or size % 4):
        raise bad(f"{where}.size: {size} is not a positive multiple of 4")


def _check_memory(kw: dict[str, Any], where: str, bad: Bad) -> None:
    fill = kw.get("fill")
    if fill is not None and fill > 0xFF:
        raise bad(f"{where}.fill: {fill} is not a byte 0..255")
    contents = kw.get("contents", b"")
    if len(contents) > kw["size"]:
        raise bad(f"{where}.contents: {len(contents)} bytes do not fit the region's "
                  f"{kw['size']}")
    if kw.get("shared") == "":
        raise bad(f"{where}.shared: must be a file path")


def _extent(r: RegionSpec) -> int:
    if isinstance(r, RegisterFileSpec) and r.size is None:
        return (max(x.offset + x.width for x in r.registers) + 3) & ~3
    assert r.size is not None
    return r.size


def _check_layout(function: FunctionSpec, regions: tuple[RegionSpec, ...], bad: Bad) -> None:
    """Each region inside a BAR the function declares, none overlapping another: checked when
    the file is read, before anything is allocated (a 2^62-byte region must not reach mmap)."""
    sizes = {b.index: b.size for b in function.bars}
    if function.expansion_rom is not None:
        sizes[6] = function.expansion_rom.size
    placed: list[tuple[int, int, int, str]] = []
    for i, r in enumerate(regions):
        where = f"regions[{i}]"
        if r.bar not in sizes:
            raise bad(f"{where}.bar: the function declares no BAR {r.bar} (BARs: "
                      f"{', '.join(map(str, sorted(sizes))) or 'none'})")
        if isinstance(r, RegisterFileSpec) and r.size is not None:
            for k, x in enumerate(r.registers):
                if x.offset + x.width > r.size:
                    raise bad(f"{where}.registers[{k}].offset: {x.offset:#x} + {x.width} bytes "
                              f"is past the region's size {r.size:#x}")
        end = r.offset + _extent(r)
        if end > sizes[r.bar]:
            raise bad(f"{where}: [{r.offset:#x}, {end:#x}) is outside BAR {r.bar} of "
                      f"{sizes[r.bar]:#x} bytes")
        placed.append((r.bar, r.offset, end, where))
    placed.sort()
    for (bar, _, end, first), (bar2, start2, _, second) in itertools.pairwise(placed):
        if bar == bar2 and start2 < end:
            raise bad(f"{second}: overlaps {first} in BAR {bar}")


def _open_shared(path: str, size: int) -> int:
    """The file backing a shared memory region, opened read-write with at least ``size`` bytes
    allocated. Refused: a symbolic link (O_NOFOLLOW: a spec must not make the server grow and
    overwrite the file a link in a shared directory points to), anything but a regular file
    (O_NONBLOCK: a FIFO must not block the open), a file another user owns. The blocks are
    allocated now, so a full file system is ENOSPC here and never SIGBUS while serving."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user "
                                       f"({os.geteuid()})")
        if st.st_size < size:
            os.posix_fallocate(fd, 0, size)
        return fd
    except BaseException:
        os.close(fd)
        raise


_FILL_CHUNK = 1 << 20


def _fill(region: engine.MemoryRegion, r: MemorySpec) -> None:
    # In bounded chunks: a large region must not need a buffer of its own size. A new memfd
    # is already zero, so only non-zero bytes are written there.
    fill = r.fill or 0
    if fill or r.shared is not None:
        chunk = bytes([fill]) * min(_FILL_CHUNK, r.size)
        for at in range(len(r.contents), r.size, len(chunk)):
            region.write(at, chunk[: r.size - at])
    if r.contents:
        region.write(0, r.contents)


def _check_hook_name(name: str, where: str, bad: Bad) -> None:
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise bad(f"{where}: {name!r} is not 'module:function'")


def _hook(spec: ServedSpec, name: Optional[str], where: str) -> Any:
    """The callable ``module:function`` names; the spec file's directory is searched first."""
    if name is None:
        return None
    module_name, _, attr = name.partition(":")
    # Hook modules may sit next to the spec (examples/serve/): its directory is searched first,
    # for this import only. Left on sys.path it would shadow every module imported later in
    # the process (a spec in /tmp would put /tmp before the standard library).
    base = str(Path(spec.path).resolve().parent)
    sys.path.insert(0, base)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise spec._error(f"{where}: cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(ValueError):  # the module may have edited sys.path itself
            sys.path.remove(base)  # the first occurrence: the one inserted above
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise spec._error(f"{where}: {name!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise spec._error(f"{where}: {name!r} is not callable")
    return obj


def _describe(r: engine.Region) -> dict[str, Any]:
    out = {"name": r.name, "kind": r._core.kind, "bar": r._core.bar, "offset": r._core.offset,
           "size": r._core.size}
    if isinstance(r, engine.MemoryRegion):
        # Another process of this user opens it (then mmap MAP_SHARED) to share the bytes.
        out["memfd"] = f"/proc/{os.getpid()}/fd/{r.fd}"
    return out


_WATCH_S = 0.25  # how soon a lost backing file is reported (docs/engine.md)


def _watch_backing(dev: engine.Device, stop: threading.Event, max_seconds: Optional[float],
                   emit: Optional[Callable[[dict[str, Any]], None]]) -> list[str]:
    """Wait for ``stop`` (or ``max_seconds``), emitting a ``backing_lost`` event for each
    region whose shared file another process truncated meanwhile (the SIGBUS guard kept the
    process alive: docs/engine.md "Shared backing files"). Returns the lost regions' names."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    lost: list[str] = []
    while True:
        for r in dev.regions:
            if isinstance(r, (engine.MemoryRegion, engine.RegisterRegion)) \
                    and r.name not in lost and r.backing_lost:
                lost.append(r.name)
                if emit is not None:
                    emit({"event": "backing_lost", "pid": os.getpid(), "region": r.name,
                          "bar": r._core.bar, "offset": r._core.offset,
                          "detail": "its backing file was truncated by another process: "
                                    "reads are answered Completer Abort, writes dropped"})
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return lost
        if stop.wait(_WATCH_S if left is None else min(_WATCH_S, left)):
            return lost


def _give_up(why: str) -> None:
    # Nothing more can be freed from Python: the process ends, the device reclaims the rest.
    sys.stderr.write(f"mlx5tlp serve: {why}; ending the process\n")
    sys.stderr.flush()
    os._exit(1)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _strip_operation(message: str) -> str:
    # "define function failed: Invalid argument (errno 22): bars[0].size: ..." -> the rule.
    marker = "): "
    return message.split(marker, 1)[1] if marker in message else message


# ---- mlx5tlp serve SPEC ----------------------------------------------------------------------

def serve(spec: ServedSpec, *, device: str, pages: int = 1, batch: int = 32,
          max_seconds: Optional[float] = None,
          emit: Optional[Callable[[dict[str, Any]], None]] = None,
          stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """Serve ``spec`` on the software device ``device`` until ``stop`` is set, SIGINT or
    SIGTERM arrives (main thread only), or ``max_seconds`` pass; then close everything.

    ``emit`` receives a ``serving`` event once the device answers (pid, device, gateway
    pages, regions with their BAR placement), a ``backing_lost`` event for a region whose
    ``shared`` file another process truncated (docs/engine.md "Shared backing files"), and a
    ``stopped`` event with the final counters.

    Returns:
        The ``stopped`` event.

    Raises:
        InvalidArgumentError: the spec's hooks or regions are refused (named).
        Error: the device cannot be opened, or has no free gateway page.
        ValueError: ``max_seconds`` is not None or a number of seconds in (0, 1e9].
    """
    from mlx5tlp import open_device

    if max_seconds is not None and (
            isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
            or not 0 < max_seconds <= _MAX_WAIT_S):  # NaN fails this too
        raise ValueError(f"max_seconds must be None or seconds in (0, {_MAX_WAIT_S:g}], "
                         f"not {max_seconds!r}")
    stop = stop if stop is not None else threading.Event()
    previous: dict[signal.Signals, Any] = {}
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()
        for sig in signals:  # a second signal ends the process at once
            signal.signal(sig, signal.SIG_DFL)

    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous[sig] = signal.signal(sig, on_signal)
    try:
        with open_device(device, backend="sim") as ctx:
            dev = spec.device(ctx, pages=pages, batch=batch)
            try:
                event = {"event": "serving", "pid": os.getpid(), "device": device,
                         "pages": dev.page_ids, "spec": spec.path,
                         "regions": [_describe(r) for r in dev.regions]}
                if emit is not None:
                    emit(event)
                lost = _watch_backing(dev, stop, max_seconds, emit)
                open_deferred = dev.stats()["deferred_outstanding"]
                # Stop the lanes (deferred requests still open: answered Completer Abort)
                # within a bound: a hook that never returns must not hold the command.
                stopper = threading.Thread(target=dev.stop, daemon=True)
                stopper.start()
                stopper.join(engine.EXIT_TIMEOUT)
                if stopper.is_alive():
                    _give_up(f"the lanes did not stop within {engine.EXIT_TIMEOUT} s "
                             "(a hook or handler does not return)")
                final = dev.stats()
                last_error = dev.last_hook_error
            finally:
                dev.close()  # stopped: closing only frees the gateways and pages
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    out = {"event": "stopped", "pid": os.getpid(),
           "requests": sum(final["requests"].values()), "completions": final["completions"],
           "ur": final["ur"], "ca": final["ca"], "hook_errors": final["hook_errors"],
           "deferred_answered_ca_at_stop": open_deferred, "last_hook_error": last_error,
           "backing_lost": lost}
    if emit is not None:
        emit(out)
    return out

