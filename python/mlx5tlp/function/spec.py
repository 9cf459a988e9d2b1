"""The declarative description of an emulated PCIe function, and its file format.

A :class:`FunctionSpec` is plain, immutable data: identity, BARs, capabilities and where the
MSI-X table and PBA live. :class:`mlx5tlp.function.Function` compiles it (in the C++ core),
which validates every field against the PCIe Base Specification and raises
:class:`mlx5tlp.InvalidArgumentError` (``errno`` EINVAL) whose message names the field at
fault, e.g. ``... bars[1].size: 100 is not a power of two``.

The same data reads from and writes to JSON and TOML (:meth:`FunctionSpec.to_json`,
:meth:`FunctionSpec.from_toml`, :func:`load`, :func:`dump`); the format is documented in
``docs/function.md``. Wrong Python types raise :class:`TypeError`, unknown keys
:class:`ValueError`, both naming the field.

Thread-safety: every class here is immutable and may be shared between threads.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from mlx5tlp.errors import NotSupportedError
from mlx5tlp.function import _toml

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Aer",
    "Bar",
    "BarKind",
    "ExpansionRom",
    "FunctionSpec",
    "Identity",
    "Msix",
    "PciExpress",
    "PowerManagement",
    "SerialNumber",
    "VendorCap",
    "VendorExtCap",
    "dump",
    "load",
]

#: The ``format`` key of a spec file and the version this package reads and writes.
FORMAT = "mlx5tlp.function"
FORMAT_VERSION = 1

BarKind = Literal["mem32", "mem64", "io"]
Range = tuple[int, int]


def _freeze(obj: Any, name: str, kind: type) -> None:
    value = getattr(obj, name)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of {kind.__name__}")
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"{name}[{i}] must be a {kind.__name__}, not {type(item).__name__}")
    object.__setattr__(obj, name, items)


def _freeze_ranges(obj: Any) -> None:
    ranges = tuple(tuple(r) for r in obj.writable)
    for i, r in enumerate(ranges):
        if len(r) != 2:
            raise ValueError(f"writable[{i}] must be a (start, length) pair")
    object.__setattr__(obj, "writable", ranges)
    object.__setattr__(obj, "data", bytes(obj.data))


@dataclass(frozen=True)
class Identity:
    """Type-0 header identity (PCIe Base §7.5.1.1, §7.5.1.2.3).

    ``class_code`` is 24 bits: base class << 16 | sub-class << 8 | programming interface.
    ``interrupt_pin``: 0 (no INTx) or 1 (INTA).
    """

    vendor_id: int
    device_id: int
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    revision: int = 0
    class_code: int = 0
    interrupt_pin: int = 0


@dataclass(frozen=True)
class Bar:
    """One Base Address Register: slot ``index`` (0..5; ``mem64`` also takes ``index + 1``).

    Sizes are powers of two: memory >= 128 bytes (the PCIe minimum), I/O 16..256 bytes;
    prefetchable BARs must be ``mem64`` (PCIe Base §1.3.2.2, §7.5.1.2.1).
    """

    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False


@dataclass(frozen=True)
class ExpansionRom:
    """The Expansion ROM BAR at 30h: a power of two, 2 KiB .. 16 MiB (§7.5.1.2.4)."""

    size: int


@dataclass(frozen=True)
class PciExpress:
    """The PCI Express Capability (ID 10h, version 2, Endpoint; §7.5.3). Always present.

    ``max_link_speed``: 1 = 2.5 GT/s .. 6 = 64 GT/s; ``completion_timeout_ranges``: a 4-bit
    mask of ranges A..D (Device Capabilities 2 bits 3:0).
    """

    max_payload_supported: int = 256
    max_link_speed: int = 2
    max_link_width: int = 8
    extended_tag: bool = True
    completion_timeout_ranges: int = 0x3
    completion_timeout_disable: bool = True
    offset: Optional[int] = None


@dataclass(frozen=True)
class PowerManagement:
    """The Power Management Capability (ID 01h; §7.5.2). Always present.

    ``pme_support`` is PMC bits 15:11 (bit n: PME from Dn; bit 4: D3cold).
    """

    d1: bool = False
    d2: bool = False
    no_soft_reset: bool = True
    pme_support: int = 0
    offset: Optional[int] = None


@dataclass(frozen=True)
class Msix:
    """The MSI-X Capability (ID 11h; §7.7.2): ``vectors`` 1..2048, table and PBA in BARs.

    The PBA defaults to the table's BAR, right after the table (QWORD-aligned).
    """

    vectors: int
    table_bar: int
    table_offset: int = 0
    pba_bar: Optional[int] = None
    pba_offset: Optional[int] = None
    offset: Optional[int] = None

    def __post_init__(self) -> None:
        if self.pba_bar is None:
            object.__setattr__(self, "pba_bar", self.table_bar)
        if self.pba_offset is None:
            end = self.table_offset + 16 * self.vectors if self.pba_bar == self.table_bar else 0
            object.__setattr__(self, "pba_offset", (end + 7) & ~7)


@dataclass(frozen=True)
class Aer:
    """The Advanced Error Reporting Extended Capability (0001h, version 2; §7.8.4)."""

    ecrc_generation: bool = False
    ecrc_check: bool = False
    offset: Optional[int] = None


@dataclass(frozen=True)
class SerialNumber:
    """The Device Serial Number Extended Capability (0003h; §7.9.3): 64-bit, read-only."""

    serial: int
    offset: Optional[int] = None


@dataclass(frozen=True)
class VendorCap:
    """A Vendor-Specific Capability (ID 09h; §7.9.4): the user ``data`` after the 3 header
    bytes; ``writable`` ranges ``(start, length)`` of ``data`` are RW, the rest RO."""

    data: bytes = b""
    writable: Sequence[Range] = ()
    offset: Optional[int] = None

    def __post_init__(self) -> None:
        _freeze_ranges(self)


@dataclass(frozen=True)
class VendorExtCap:
    """A Vendor-Specific Extended Capability (000Bh; §7.9.5): VSEC ID, 4-bit revision, then
    the user ``data`` after the 8 header bytes; ``writable`` as for :class:`VendorCap`."""

    vsec_id: int
    revision: int = 0
    data: bytes = b""
    writable: Sequence[Range] = ()
    offset: Optional[int] = None

    def __post_init__(self) -> None:
        _freeze_ranges(self)


_OPTIONAL_PARTS: dict[str, type] = {
    "expansion_rom": ExpansionRom,
    "msix": Msix,
    "aer": Aer,
    "serial_number": SerialNumber,
}
_LIST_PARTS: dict[str, type] = {
    "bars": Bar,
    "vendor_caps": VendorCap,
    "vendor_ext_caps": VendorExtCap,
}


@dataclass(frozen=True)
class FunctionSpec:
    """A whole emulated function. Sequences are stored as tuples (hashable, immutable)."""

    identity: Identity
    bars: Sequence[Bar] = ()
    expansion_rom: Optional[ExpansionRom] = None
    pcie: PciExpress = field(default_factory=PciExpress)
    power_management: PowerManagement = field(default_factory=PowerManagement)
    msix: Optional[Msix] = None
    aer: Optional[Aer] = None
    serial_number: Optional[SerialNumber] = None
    vendor_caps: Sequence[VendorCap] = ()
    vendor_ext_caps: Sequence[VendorExtCap] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.identity, Identity):
            raise TypeError("identity must be an Identity")
        for name, kind in _LIST_PARTS.items():
            _freeze(self, name, kind)
        for name, kind in {**_OPTIONAL_PARTS, "pcie": PciExpress,
                           "power_management": PowerManagement}.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__} or None")

    # ---- the file format ----

    def to_dict(self) -> dict[str, Any]:
        """The spec as the file format's mapping (vendor data as hex strings).

        Returns:
            A new dict of JSON/TOML-compatible values; ``None`` parts are left out.
        """
        out: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                out[f.name] = [_part_to_dict(v) for v in value]
            else:
                out[f.name] = _part_to_dict(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FunctionSpec:
        """Build a spec from the file format's mapping.

        Raises:
            ValueError: wrong ``format``/``version``, unknown or missing keys (named).
            TypeError: a value of the wrong type (named).
        """
        if not isinstance(data, Mapping):
            raise TypeError("a function spec must be a mapping")
        d = dict(data)
        fmt = d.pop("format", FORMAT)
        version = d.pop("version", FORMAT_VERSION)
        if fmt != FORMAT:
            raise ValueError(f"format: {fmt!r} is not {FORMAT!r}")
        if not _is_int(version) or version != FORMAT_VERSION:  # not True, not 1.0
            raise ValueError(
                f"version: this package reads version {FORMAT_VERSION}, not {version!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key == "regions":
                raise ValueError("regions: the regions of a served function are read by "
                                 "mlx5tlp.served.load() (mlx5tlp serve SPEC), not by "
                                 "FunctionSpec (docs/spec-format.md)")
            if key not in known:
                raise ValueError(f"{key}: unknown key (expected one of {', '.join(sorted(known))})")
        if "identity" not in d:
            raise ValueError("identity: missing")
        kw: dict[str, Any] = {"identity": _part_from_dict(Identity, d["identity"], "identity")}
        for name in ("pcie", "power_management", *_OPTIONAL_PARTS):
            if d.get(name) is not None:
                kind = {**_OPTIONAL_PARTS, "pcie": PciExpress,
                        "power_management": PowerManagement}[name]
                kw[name] = _part_from_dict(kind, d[name], name)
        for name, kind in _LIST_PARTS.items():
            items = d.get(name, [])
            if not isinstance(items, list):
                raise TypeError(f"{name} must be a list")
            kw[name] = tuple(_part_from_dict(kind, v, f"{name}[{i}]") for i, v in enumerate(items))
        return cls(**kw)

    def to_json(self, *, indent: Optional[int] = 2) -> str:
        """The spec as JSON text (the documented file format)."""
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> FunctionSpec:
        """Parse JSON text; raises ValueError for invalid JSON, as :meth:`from_dict` else."""
        return cls.from_dict(json.loads(text))

    def to_toml(self) -> str:
        """The spec as TOML text (the documented file format)."""
        return _toml.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> FunctionSpec:
        """Parse TOML text (needs Python 3.11's ``tomllib`` or the ``tomli`` package).

        Raises:
            NotSupportedError: no TOML parser is available.
        """
        return cls.from_dict(_toml_loads(text))


def _toml_loads(text: str) -> dict[str, Any]:
    name = "tomllib" if sys.version_info >= (3, 11) else "tomli"
    try:
        parser: Any = importlib.import_module(name)
    except ImportError:
        raise NotSupportedError(None, "reading TOML needs Python >= 3.11 or the tomli package",
                                "load FunctionSpec") from None
    result: dict[str, Any] = parser.loads(text)
    return result


def _part_to_dict(part: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if value is None:
            continue
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = [list(r) for r in value]
        out[f.name] = value
    return out


def _part_from_dict(kind: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise TypeError(f"{where} must be a table/object")
    names = {f.name: f for f in dataclasses.fields(kind)}
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{where}.{key}: unknown key (expected one of {', '.join(names)})")
        kw[key] = _value(names[key], value, f"{where}.{key}")
    missing = [n for n, f in names.items() if n not in kw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing")
    return kind(**kw)


def _value(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    if f.name == "data":
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a hex string")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not hex") from None
    if f.name == "writable":
        if not isinstance(value, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r) for r in value):
            raise TypeError(f"{where} must be a list of [start, length] pairs")
        return tuple((int(r[0]), int(r[1])) for r in value)
    if f.name == "kind":
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string")
        return value
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false")
        return value
    if isinstance(value, str) and value.lower().startswith("0x"):  # JSON has no hex literals
        try:
            return int(value, 16)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a hex number") from None
    if not _is_int(value):
        raise TypeError(f"{where} must be an integer")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load(path: Union[str, Path]) -> FunctionSpec:
    """Read a spec file: TOML when the name ends in ``.toml``, JSON otherwise."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    return FunctionSpec.from_toml(text) if p.suffix == ".toml" else FunctionSpec.from_json(text)


def dump(spec: FunctionSpec, path: Union[str, Path]) -> None:
    """Write a spec file: TOML when the name ends in ``.toml``, JSON otherwise."""
    p = Path(path)
    p.write_text(spec.to_toml() if p.suffix == ".toml" else spec.to_json(), encoding="utf-8")
