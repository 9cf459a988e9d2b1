"""Self-describing, validated envelopes around rdma-core export buffers.

rdma-core (>= 63) exports a VAR, a DEVX UMEM or a DEVX object into an opaque buffer
(``mlx5dv_var_export()`` and friends) whose size comes from ``mlx5dv_get_export_sizes()`` and
may change between library versions. The matching import functions trust that buffer blindly.
This module wraps the raw buffer in an *envelope* that records what it is (kind, flags), where
it came from (device name, node GUID, backend, rdma-core version) and protects it with a CRC32
and, optionally, an HMAC-SHA256. :func:`open_envelope` checks all of it and raises
:class:`~mlx5tlp.errors.ExportFormatError` on the first failed check, so a buffer that failed a
check is never handed to rdma-core.

The byte layout and the exact order of the checks are documented in ``docs/export-format.md``.
This module is the reference implementation, in pure Python (standard library only). Where the
compiled core is present, :func:`open_envelope` first asks its accept-only fast path
(``_core.envelope_accept``) about unkeyed envelopes: it returns the contents only when every
check passes, and anything else is decided, and reported, by the Python checks below.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, Optional, Union

from mlx5tlp.errors import ExportFormatError

_accept: Optional[Callable[..., Any]]
try:  # the compiled core's accept-only fast path (absent in a tree without the extension)
    from mlx5tlp._core import envelope_accept as _accept
except ImportError:  # pragma: no cover - exercised only without the extension
    _accept = None

__all__ = [
    "FLAG_TLP_VAR",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KNOWN_FLAGS",
    "MAC_SIZE",
    "MAGIC",
    "MAX_STRING_BYTES",
    "MIN_KEY_BYTES",
    "OPT_KEYED",
    "DeviceIdentity",
    "Envelope",
    "Kind",
    "peek_device",
    "describe",
    "open_envelope",
    "peek_kind",
    "seal",
]

MAGIC = b"MLX5TLP\x00"
"""The first 8 bytes of every envelope."""

FORMAT_VERSION = 1
"""The only envelope format version this module writes and reads."""

FLAG_TLP_VAR = 1 << 0
"""Object flag: the VAR was allocated with ``MLX5DV_VAR_ALLOC_FLAG_TLP`` (a TLP gateway page)."""

KNOWN_FLAGS = FLAG_TLP_VAR
"""Every object flag bit this format version defines; other bits are refused."""

OPT_KEYED = 1 << 0
"""Header option bit: a 32-byte HMAC-SHA256 trailer follows the CRC."""

_KNOWN_OPTIONS = OPT_KEYED

MAX_STRING_BYTES = 255
"""Upper bound on the UTF-8 length of each string field (device name, backend, version)."""

MIN_KEY_BYTES = 16
"""Shortest HMAC key accepted."""

MAC_SIZE = 32
"""Length of the HMAC-SHA256 trailer of a keyed envelope."""

CRC_SIZE = 4

# magic, format version, kind, flags, raw_size, name_len, backend_len, version_len,
# options, reserved (u8), reserved (u32), node_guid
_HEADER = struct.Struct("<8sHHIIHHHBBIQ")
HEADER_SIZE = _HEADER.size
"""Size of the fixed header (40 bytes)."""

_CRC = struct.Struct("<I")

_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


class Kind(enum.IntEnum):
    """What an envelope carries."""

    VAR = 1
    """A VAR page (``mlx5dv_var_export``)."""
    UMEM = 2
    """A DEVX UMEM (``mlx5dv_devx_umem_export``)."""
    DEVX_OBJ = 3
    """A DEVX object (``mlx5dv_devx_obj_export``)."""


@dataclass(frozen=True)
class DeviceIdentity:
    """The device and runtime an envelope belongs to.

    Attributes:
        name: verbs device name, e.g. ``"mlx5_0"``.
        node_guid: the node GUID as an unsigned 64-bit integer.
        backend: ``"rdma"`` or ``"sim"``.
        rdma_core_version: the loaded rdma-core's version, e.g. ``"63.0"``, or ``None`` when
            it is unknown. Part of the identity because export sizes and layouts may change
            between library versions.
    """

    name: str
    node_guid: int
    backend: str
    rdma_core_version: Optional[str]


@dataclass(frozen=True)
class Envelope:
    """A validated envelope, as returned by :func:`open_envelope`.

    Attributes:
        kind: what ``raw`` is.
        raw: the rdma-core export buffer, exactly ``raw_size`` bytes.
        device: the identity recorded by the exporter (equal to the importer's after checks).
        flags: object flags (``FLAG_*``).
        keyed: whether the envelope carried an HMAC that was verified.
        version: the envelope format version.
    """

    kind: Kind
    raw: bytes
    device: DeviceIdentity
    flags: int
    keyed: bool
    version: int


class _Parsed(NamedTuple):
    """Result of the structural checks (everything but semantics and MAC). A NamedTuple: it
    is built on every import (the hot path of export + import), a frozen dataclass costs more."""

    version: int
    kind_value: int
    flags: int
    raw_size: int
    options: int
    node_guid: int
    name: bytes
    backend: bytes
    rdma_core_version: bytes
    raw: bytes
    crc: int
    crc_ok: bool
    mac: bytes
    signed: bytes  # everything the MAC covers (all bytes before it)


def _fail(message: str) -> ExportFormatError:
    return ExportFormatError(None, f"export envelope rejected: {message}")


def _as_bytes(blob: object) -> bytes:
    if isinstance(blob, bytes):
        return blob
    if isinstance(blob, (bytearray, memoryview)):
        try:
            return bytes(blob)
        except (TypeError, ValueError, BufferError) as exc:  # released or odd memoryview
            raise _fail(f"cannot read the buffer: {exc}") from None
    raise TypeError(
        f"an export envelope must be bytes, bytearray or memoryview, not {type(blob).__name__}"
    )


def _check_key(key: object) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key must be at least {MIN_KEY_BYTES} bytes long, got {len(key)}")
    return bytes(key)


def _encode_str(what: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not encodable as UTF-8: {exc}") from None
    if len(data) > MAX_STRING_BYTES:
        raise ValueError(f"{what} is {len(data)} bytes in UTF-8, at most {MAX_STRING_BYTES}")
    return data


@lru_cache(maxsize=64)
def _encode_identity(name: str, backend: str, version: str) -> tuple[bytes, bytes, bytes]:
    # The identity strings of a context are the same for every export and import: encoded once.
    return (
        _encode_str("device name", name),
        _encode_str("backend", backend),
        _encode_str("rdma_core_version", version),
    )


def _identity_bytes(device: DeviceIdentity) -> tuple[bytes, bytes, bytes]:
    """The UTF-8 device name, backend and rdma-core version ("" when unknown) of `device`."""
    name, backend, version = device.name, device.backend, device.rdma_core_version or ""
    if type(name) is str and type(backend) is str and type(version) is str:
        return _encode_identity(name, backend, version)
    return (  # not all str: raise the TypeError naming the field
        _encode_str("device name", name),
        _encode_str("backend", backend),
        _encode_str("rdma_core_version", version),
    )


def _guid(value: int) -> str:
    return f"0x{value:016x}"


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def seal(
    kind: Kind,
    raw: bytes,
    device: DeviceIdentity,
    *,
    flags: int = 0,
    key: bytes | None = None,
) -> bytes:
    """Wrap an rdma-core export buffer in an envelope.

    Args:
        kind: what ``raw`` is.
        raw: the buffer filled by ``mlx5dv_*_export()`` (bytes-like; copied).
        device: the exporting context's identity.
        flags: object metadata not contained in ``raw`` (``FLAG_*`` bits, u32).
            ``FLAG_TLP_VAR`` is only valid with ``Kind.VAR``.
        key: optional HMAC-SHA256 key (bytes, at least 16 long). The importer must present
            the same key.

    Returns:
        The envelope bytes (see ``docs/export-format.md``).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: a value is out of range (unknown kind or flag, string too long, GUID not
            a u64, key too short, raw buffer too large or empty).
    """
    kind = kind if type(kind) is Kind else Kind(kind)
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"raw must be bytes-like, not {type(raw).__name__}")
    raw_b = bytes(raw)
    if not raw_b:
        raise ValueError("raw export buffer is empty")
    if len(raw_b) > _U32_MAX:
        raise ValueError(f"raw export buffer is too large ({len(raw_b)} bytes)")
    if not isinstance(device, DeviceIdentity):
        raise TypeError(f"device must be a DeviceIdentity, not {type(device).__name__}")
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise TypeError(f"flags must be int, not {type(flags).__name__}")
    if not 0 <= flags <= _U32_MAX:
        raise ValueError(f"flags must be a u32, got {flags:#x}")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if flags & FLAG_TLP_VAR and kind is not Kind.VAR:
        raise ValueError(f"FLAG_TLP_VAR is only valid for Kind.VAR, not Kind.{kind.name}")
    guid = device.node_guid
    if isinstance(guid, bool) or not isinstance(guid, int):
        raise TypeError(f"node_guid must be int, not {type(guid).__name__}")
    if not 0 <= guid <= _U64_MAX:
        raise ValueError(f"node_guid must be a u64, got {guid:#x}")
    name, backend, version = _identity_bytes(device)
    key_b = _check_key(key)

    options = OPT_KEYED if key_b is not None else 0
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        int(kind),
        flags,
        len(raw_b),
        len(name),
        len(backend),
        len(version),
        options,
        0,
        0,
        guid,
    )
    body = b"".join((header, name, backend, version, raw_b))
    body += _CRC.pack(zlib.crc32(body) & _U32_MAX)
    if key_b is not None:
        body += _mac(key_b, body)
    return body


def _parse(data: bytes) -> _Parsed:
    """Structural checks, in order: fixed header, magic, version, options and reserved
    fields, string bounds, total length; then locate the fields and compute the CRC.

    Nothing beyond the fixed header is read before the total length is verified.
    """
    n = len(data)
    if n < HEADER_SIZE:
        raise _fail(f"too short for the fixed header: {n} bytes, need at least {HEADER_SIZE}")
    (
        magic,
        version,
        kind_value,
        flags,
        raw_size,
        name_len,
        backend_len,
        ver_len,
        options,
        reserved8,
        reserved32,
        node_guid,
    ) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise _fail(f"bad magic {magic!r}, expected {MAGIC!r} (not an mlx5tlp export envelope)")
    if version != FORMAT_VERSION:
        raise _fail(
            f"unsupported format version {version}, this runtime reads version {FORMAT_VERSION}"
        )
    if options & ~_KNOWN_OPTIONS:
        raise _fail(f"unknown header option bits {options & ~_KNOWN_OPTIONS:#x}")
    if reserved8 or reserved32:
        raise _fail(f"reserved header fields are not zero ({reserved8:#x}, {reserved32:#x})")
    for what, length in (
        ("device name", name_len),
        ("backend", backend_len),
        ("rdma_core_version", ver_len),
    ):
        if length > MAX_STRING_BYTES:
            raise _fail(f"{what} field is too long: {length} bytes, at most {MAX_STRING_BYTES}")
    keyed = bool(options & OPT_KEYED)
    crc_at = HEADER_SIZE + name_len + backend_len + ver_len + raw_size
    expected = crc_at + CRC_SIZE + (MAC_SIZE if keyed else 0)
    if n != expected:
        how = "truncated" if n < expected else f"{n - expected} unexpected trailing bytes"
        raise _fail(f"length is {n} bytes, its header declares {expected} ({how})")

    pos = HEADER_SIZE
    name = data[pos : pos + name_len]
    pos += name_len
    backend = data[pos : pos + backend_len]
    pos += backend_len
    ver = data[pos : pos + ver_len]
    pos += ver_len
    raw = data[pos : pos + raw_size]
    (crc,) = _CRC.unpack_from(data, crc_at)
    crc_ok = (zlib.crc32(data[:crc_at]) & _U32_MAX) == crc
    mac_at = crc_at + CRC_SIZE
    return _Parsed(
        version=version,
        kind_value=kind_value,
        flags=flags,
        raw_size=raw_size,
        options=options,
        node_guid=node_guid,
        name=name,
        backend=backend,
        rdma_core_version=ver,
        raw=raw,
        crc=crc,
        crc_ok=crc_ok,
        mac=data[mac_at:] if keyed else b"",
        signed=data[:mac_at],
    )


def _parse_checked(data: bytes) -> _Parsed:
    p = _parse(data)
    if not p.crc_ok:
        actual = zlib.crc32(data[: len(p.signed) - CRC_SIZE]) & _U32_MAX
        raise _fail(f"CRC mismatch: stored {p.crc:#010x}, computed {actual:#010x} (corrupted)")
    return p


_KIND_OF = {k.value: k for k in Kind}


def _kind(value: int) -> Kind:
    kind = _KIND_OF.get(value)
    if kind is None:
        known = ", ".join(f"{k.name}={k.value}" for k in Kind)
        raise _fail(f"unknown kind {value} (known: {known})")
    return kind


def _decode(what: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(f"{what} field is not valid UTF-8: {data!r}") from None


def peek_kind(blob: bytes | bytearray | memoryview) -> Kind:
    """The kind of an envelope, after the structural and CRC checks only.

    Meant for dispatching (``import_blob``); it does not check the device, the runtime's raw
    size or the MAC. :func:`open_envelope` must still be called before using the contents.

    Raises:
        TypeError: ``blob`` is not bytes-like.
        ExportFormatError: the header, length or CRC check failed, or the kind is unknown.
    """
    return _kind(_parse_checked(_as_bytes(blob)).kind_value)


def peek_device(blob: bytes | bytearray | memoryview) -> tuple[Kind, DeviceIdentity]:
    """The kind and the exporting device of an envelope, after the structural and CRC checks.

    For finding the context to import onto (unpickling); :func:`open_envelope` still runs
    every check before the contents are used.

    Raises:
        TypeError: ``blob`` is not bytes-like.
        ExportFormatError: a structural or CRC check failed, or a string is not UTF-8.
    """
    p = _parse_checked(_as_bytes(blob))
    device = DeviceIdentity(
        name=_decode("device name", p.name),
        node_guid=p.node_guid,
        backend=_decode("backend", p.backend),
        rdma_core_version=_decode("rdma-core version", p.rdma_core_version) or None,
    )
    return _kind(p.kind_value), device


def open_envelope(
    blob: bytes | bytearray | memoryview,
    *,
    expected_kind: Kind | None,
    raw_size: Union[int, Callable[[Kind], int]],
    device: DeviceIdentity,
    key: bytes | None = None,
) -> Envelope:
    """Validate an envelope against this runtime and context; return its contents.

    The checks run in the order documented in ``docs/export-format.md``; the first failure
    raises. In short: fixed header, magic, format version, option/reserved fields, string
    lengths, total length, CRC, kind, key presence, HMAC, UTF-8, expected kind, flags,
    raw size against the runtime, backend, device name and GUID, rdma-core version.

    Args:
        blob: the envelope.
        expected_kind: the kind the caller is importing, or ``None`` to accept any.
        raw_size: the export buffer size the loaded rdma-core wants now, either as a number
            (for ``expected_kind``) or as a function of the envelope's kind.
        device: the importing context's identity; the envelope's must be equal.
        key: the HMAC key if envelopes are expected to be keyed (bytes, >= 16 long).

    Returns:
        The validated :class:`Envelope`.

    Raises:
        TypeError: ``blob`` or ``key`` has the wrong type.
        ValueError: ``key`` is shorter than 16 bytes.
        ExportFormatError: a check failed; the message says which and shows both sides.
    """
    key_b = _check_key(key)
    if (key_b is None and type(expected_kind) is Kind and type(blob) is bytes
            and _accept is not None):
        fast = _accept_fast(_accept, blob, expected_kind, raw_size, device)
        if fast is not None:
            return fast
    data = _as_bytes(blob)
    p = _parse_checked(data)
    kind = _kind(p.kind_value)

    keyed = bool(p.options & OPT_KEYED)
    if key_b is not None and not keyed:
        raise _fail("a key was given but the envelope is not keyed (no HMAC)")
    if key_b is None and keyed:
        raise _fail("the envelope is keyed (has an HMAC) but no key was given")
    if key_b is not None and not hmac.compare_digest(_mac(key_b, p.signed), p.mac):
        raise _fail("HMAC-SHA256 mismatch (wrong key, or the envelope was altered)")

    # The envelope's strings are the importer's own (the usual case): equal bytes are valid
    # UTF-8 and pass the device checks below, so they are neither decoded nor compared again.
    try:
        mine_b: Optional[tuple[bytes, bytes, bytes]] = _identity_bytes(device)
    except (TypeError, ValueError):  # an importer identity no envelope can carry
        mine_b = None
    same_device = (p.name, p.backend, p.rdma_core_version) == mine_b
    if not same_device:
        name = _decode("device name", p.name)
        backend = _decode("backend", p.backend)
        version = _decode("rdma_core_version", p.rdma_core_version)

    if expected_kind is not None:
        expected = expected_kind if type(expected_kind) is Kind else Kind(expected_kind)
        if kind is not expected:
            raise _fail(f"wrong kind: expected {expected.name}, got {kind.name}")
    if p.flags & ~KNOWN_FLAGS:
        raise _fail(f"unknown flag bits {p.flags & ~KNOWN_FLAGS:#x}")
    if p.flags & FLAG_TLP_VAR and kind is not Kind.VAR:
        raise _fail(f"flag TLP_VAR set on a {kind.name} envelope")

    want = raw_size(kind) if callable(raw_size) else raw_size
    if p.raw_size != want:
        raise _fail(
            f"raw {kind.name} export is {p.raw_size} bytes, this runtime's rdma-core expects "
            f"{want} (exported by a library with another layout?)"
        )

    if same_device:
        if p.node_guid != device.node_guid:
            raise _fail(
                f"envelope is for device {device.name} (guid {_guid(p.node_guid)}), "
                f"this context is {device.name} (guid {_guid(device.node_guid)})"
            )
        exporter = _as_recorded(device)
    else:
        if backend != device.backend:
            raise _fail(
                f"envelope is for backend {backend!r}, this context is {device.backend!r}"
            )
        if name != device.name or p.node_guid != device.node_guid:
            raise _fail(
                f"envelope is for device {name} (guid {_guid(p.node_guid)}), "
                f"this context is {device.name} (guid {_guid(device.node_guid)})"
            )
        mine = device.rdma_core_version or ""
        if version != mine:
            raise _fail(
                f"envelope was exported with rdma-core {version or 'unknown'}, this runtime "
                f"has rdma-core {mine or 'unknown'} (export layouts may change between versions)"
            )
        exporter = DeviceIdentity(
            name=name, node_guid=p.node_guid, backend=backend, rdma_core_version=version or None
        )

    return Envelope(
        kind=kind,
        raw=p.raw,
        device=exporter,
        flags=p.flags,
        keyed=keyed,
        version=p.version,
    )


def _as_recorded(device: DeviceIdentity) -> DeviceIdentity:
    """`device` as an envelope of it records it (an empty rdma-core version reads as None)."""
    if device.rdma_core_version != "":
        return device
    return DeviceIdentity(device.name, device.node_guid, device.backend, None)


def _accept_fast(
    accept: Callable[..., Any],
    blob: bytes,
    kind: Kind,
    raw_size: Union[int, Callable[[Kind], int]],
    device: DeviceIdentity,
) -> Optional[Envelope]:
    """The Envelope if the core's fast path accepts `blob` (every check passes), else None."""
    want = raw_size(kind) if callable(raw_size) else raw_size
    guid = device.node_guid
    if type(want) is not int or not 0 <= want <= _U32_MAX:
        return None
    if type(guid) is not int or not 0 <= guid <= _U64_MAX:
        return None
    try:
        name, backend, version = _identity_bytes(device)
    except (TypeError, ValueError):
        return None
    got = accept(blob, int(kind), want, name, guid, backend, version)
    if got is None:
        return None
    exporter = _as_recorded(device)
    return Envelope(kind=kind, raw=got[1], device=exporter, flags=int(got[0]), keyed=False,
                    version=FORMAT_VERSION)


def describe(blob: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode an envelope for debugging, without judging it against a device or key.

    Only the structural checks (header, magic, version, lengths) must pass; a CRC mismatch, an
    unknown kind or a bad string is reported in the result instead of raised. The MAC cannot
    be verified without the key.

    Returns:
        A dict with ``format_version``, ``kind`` (name, or the number if unknown), ``flags``,
        ``flag_names``, ``raw_size``, ``raw_hex``, ``keyed``, ``device`` (dict: ``name``,
        ``node_guid`` (hex string), ``backend``, ``rdma_core_version``), ``crc``, ``crc_ok``,
        ``mac_hex`` (``None`` when not keyed) and ``length``.

    Raises:
        ExportFormatError: the envelope is not structurally parseable (or not bytes-like).
    """
    try:
        data = _as_bytes(blob)
    except TypeError as exc:
        raise _fail(str(exc)) from None
    p = _parse(data)
    try:
        kind: str | int = Kind(p.kind_value).name
    except ValueError:
        kind = p.kind_value
    flag_names = ["TLP_VAR"] if p.flags & FLAG_TLP_VAR else []
    if p.flags & ~KNOWN_FLAGS:
        flag_names.append(f"unknown:{p.flags & ~KNOWN_FLAGS:#x}")
    return {
        "format_version": p.version,
        "kind": kind,
        "flags": p.flags,
        "flag_names": flag_names,
        "raw_size": p.raw_size,
        "raw_hex": p.raw.hex(),
        "keyed": bool(p.options & OPT_KEYED),
        "device": {
            "name": p.name.decode("utf-8", "backslashreplace"),
            "node_guid": _guid(p.node_guid),
            "backend": p.backend.decode("utf-8", "backslashreplace"),
            "rdma_core_version": p.rdma_core_version.decode("utf-8", "backslashreplace") or None,
        },
        "crc": f"{p.crc:#010x}",
        "crc_ok": p.crc_ok,
        "mac_hex": p.mac.hex() if p.options & OPT_KEYED else None,
        "length": len(data),
    }
