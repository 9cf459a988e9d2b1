"""PCIe Transaction Layer Packets: decode, encode, and build completions.

The codec lives in the C++ core (``mlx5tlp/tlp.hpp``); this module is its typed face.

* :func:`decode` turns exactly one TLP (header, payload, optional 4-byte digest) into a
  :class:`Tlp`; :meth:`Tlp.encode` does the reverse. Headers are in wire order (big-endian
  DWs). Anything malformed raises :class:`TlpError`, a :class:`ValueError` whose ``code``
  names the rule that failed (see ``docs/tlp.md``).
* :class:`Kind` names the 15 kinds (a ``str`` enum) and carries the per-kind table (family,
  Fmt/Type, payload, posted, locked).
* :func:`completions_for` builds the completion(s) for one non-posted request.
* :func:`build_completions` builds the completions for many requests at once in C++ with the
  GIL released, into one buffer (the gateway path; format in :class:`BulkCompletions`).

Example::

    req = Tlp.mem_read(0x1000, 4, requester_id=0x0100, tag=7)
    cpls = completions_for(req, bytes(16), completer_id=0x0200)
"""

from __future__ import annotations

import array
import enum
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from mlx5tlp.records import Records

__all__ = [
    "KINDS",
    "Attr",
    "BulkCompletions",
    "Kind",
    "RequestsRefusedError",
    "Status",
    "Tlp",
    "TlpError",
    "build_completions",
    "completions_for",
    "decode",
    "reason",
]

_native: Any = importlib.import_module("mlx5tlp._core").tlp

_STATUS_NAMES: tuple[str, ...] = tuple(_native.STATUS_NAMES)
_REASONS: tuple[str, ...] = tuple(_native.REASONS)


class Kind(str, enum.Enum):
    """The kind of a TLP, in the C++ codec's ``tlp::Kind`` order (PCIe Base §2.2.1 Table 2-3).

    A :class:`str` enum: ``Kind.MRd == "MRd"``, ``str(Kind.MRd) == "MRd"``, and a member can be
    used wherever a kind name is (dict keys, sets, f-strings, JSON). The properties come from
    one per-kind table, which the :class:`Tlp` constructors and ``repr`` also consult.
    """

    MRd = "MRd"  #: Memory Read Request
    MRdLk = "MRdLk"  #: Memory Read Request-Locked
    MWr = "MWr"  #: Memory Write Request
    IORd = "IORd"  #: I/O Read Request
    IOWr = "IOWr"  #: I/O Write Request
    CfgRd0 = "CfgRd0"  #: Configuration Read Type 0
    CfgWr0 = "CfgWr0"  #: Configuration Write Type 0
    CfgRd1 = "CfgRd1"  #: Configuration Read Type 1
    CfgWr1 = "CfgWr1"  #: Configuration Write Type 1
    Cpl = "Cpl"  #: Completion without Data
    CplD = "CplD"  #: Completion with Data
    CplLk = "CplLk"  #: Completion for Locked Memory Read without Data
    CplDLk = "CplDLk"  #: Completion for Locked Memory Read with Data
    Msg = "Msg"  #: Message Request
    MsgD = "MsgD"  #: Message Request with Data

    # The plain name, as the former ``str`` kinds printed (Python 3.12 would print "Kind.MRd").
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)

    @property
    def family(self) -> str:
        """``"mem"``, ``"io"``, ``"cfg"``, ``"cpl"`` (completions) or ``"msg"``."""
        return _SPECS[self].family

    @property
    def fmt(self) -> int:
        """Wire Fmt[2:0] (bit 1: with data; bit 0: 4DW header — messages always, memory
        requests at or above 4 GiB or when asked)."""
        return _SPECS[self].fmt

    @property
    def type(self) -> int:
        """Wire Type[4:0]; for messages with routing r[2:0] = 000b (the TLP adds its own)."""
        return _SPECS[self].type

    @property
    def has_data(self) -> bool:
        """Whether the TLP carries a payload."""
        return bool(self.fmt & 2)

    @property
    def posted(self) -> bool:
        """A posted request (MWr, Msg, MsgD): it gets no completion (PCIe Base §2.4.1)."""
        return _SPECS[self].posted

    @property
    def locked(self) -> bool:
        """A locked transaction (MRdLk, CplLk, CplDLk)."""
        return _SPECS[self].locked


@dataclass(frozen=True)
class _Spec:
    """One row of the per-kind table (PCIe Base §2.2.1 Table 2-3 "Fmt[2:0] and Type[4:0]")."""

    family: str
    fmt: int
    type: int
    posted: bool = False
    locked: bool = False
    length: Optional[int] = None  # fixed Length (None: from the argument or the payload)


_SPECS: dict[Kind, _Spec] = {
    Kind.MRd: _Spec("mem", 0b000, 0x00),
    Kind.MRdLk: _Spec("mem", 0b000, 0x01, locked=True),
    Kind.MWr: _Spec("mem", 0b010, 0x00, posted=True),
    Kind.IORd: _Spec("io", 0b000, 0x02, length=1),
    Kind.IOWr: _Spec("io", 0b010, 0x02),
    Kind.CfgRd0: _Spec("cfg", 0b000, 0x04, length=1),
    Kind.CfgWr0: _Spec("cfg", 0b010, 0x04),
    Kind.CfgRd1: _Spec("cfg", 0b000, 0x05, length=1),
    Kind.CfgWr1: _Spec("cfg", 0b010, 0x05),
    Kind.Cpl: _Spec("cpl", 0b000, 0x0A, length=0),
    Kind.CplD: _Spec("cpl", 0b010, 0x0A),
    Kind.CplLk: _Spec("cpl", 0b000, 0x0B, locked=True, length=0),
    Kind.CplDLk: _Spec("cpl", 0b010, 0x0B, locked=True),
    Kind.Msg: _Spec("msg", 0b001, 0x10, posted=True, length=0),
    Kind.MsgD: _Spec("msg", 0b011, 0x10, posted=True),
}

#: Every TLP kind :func:`decode` recognises, in the codec's order (index = ``tlp::Kind``).
KINDS: tuple[Kind, ...] = tuple(Kind)
if tuple(_native.KINDS) != KINDS:  # the table above must follow tlp.hpp's enum
    raise ImportError(f"mlx5tlp.tlp.Kind {KINDS} differs from the core's {_native.KINDS}")
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
# (family, with data, locked, configuration type) -> kind: how the constructors pick one.
_PICK = {(s.family, bool(s.fmt & 2), s.locked, s.type & 1 if s.family == "cfg" else 0): k
         for k, s in _SPECS.items()}  # fmt: skip


def _kind(value: object) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        raise TlpError("field_out_of_range", f"unknown kind {value!r}") from None


def _pick(family: str, *, data: bool = False, locked: bool = False, cfg_type: int = 0) -> Kind:
    return _PICK[(family, data, locked, cfg_type)]


# Constructor parameters that are not Tlp fields: they choose the kind (``locked``, the
# configuration ``type``) or the header (``addr64``). Every other parameter names its field.
_SELECTORS = ("cls", "locked", "addr64", "type")

#: A bytes-like object (anything with the buffer protocol works at run time).
Buffer = Union[bytes, bytearray, memoryview]


class Status(enum.IntEnum):
    """Completion Status (PCIe Base §2.2.9)."""

    SC = 0  #: Successful Completion
    UR = 1  #: Unsupported Request
    CRS = 2  #: Configuration Request Retry Status
    CA = 4  #: Completer Abort


class Attr(enum.IntFlag):
    """Bits of :attr:`Tlp.attr`."""

    NS = 1  #: No Snoop (Attr[0])
    RO = 2  #: Relaxed Ordering (Attr[1])
    IDO = 4  #: ID-Based Ordering (Attr[2], DW0 byte 1 bit 2)


def reason(code: Union[int, str]) -> str:
    """Human-readable text for a codec status, given its number or its name."""
    if isinstance(code, str):
        code = _STATUS_NAMES.index(code)
    return _REASONS[code] if 0 <= code < len(_REASONS) else f"unknown status {code}"


class TlpError(ValueError):
    """A TLP (or a request for completions) broke a rule.

    Attributes:
        code: the rule's identifier, e.g. ``"truncated_header"`` or ``"crosses_4k"``.
        reason: the human-readable text for ``code``.
    """

    def __init__(self, code: Union[int, str], detail: str = "") -> None:
        self.code: str = _STATUS_NAMES[code] if isinstance(code, int) else code
        self.reason: str = reason(self.code) if self.code in _STATUS_NAMES else self.code
        super().__init__(f"{self.reason} ({self.code}){': ' + detail if detail else ''}")


class RequestsRefusedError(TlpError):
    """Requests of a bulk call got no completion and the call posted nothing
    (:meth:`mlx5tlp.Gateway.post_completions` without ``skip_bad``).

    ``code`` / ``reason`` are those of the first refused request.

    Attributes:
        index: the first refused request.
        refused: the indices of every refused request, in order.
        errors: one status byte per request of the call (0: fine), as
            :attr:`BulkCompletions.errors`; :func:`reason` of
            ``Status(errors[i]).name`` gives the text.
    """

    def __init__(self, errors: bytes) -> None:
        self.errors: bytes = errors
        self.refused: list[int] = [i for i, e in enumerate(errors) if e]
        self.index: int = self.refused[0]
        shown = ", ".join(map(str, self.refused[:8])) + (", ..." if len(self.refused) > 8 else "")
        super().__init__(
            errors[self.index],
            f"request {self.index} of {len(errors)}; {len(self.refused)} request(s) refused "
            f"(indices {shown}); nothing was posted",
        )


def _bdf(rid: int) -> str:
    return f"{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"


@dataclass(repr=False)
class Tlp:
    """One TLP. Fields that the kind does not have are 0.

    Build requests and completions with the constructors (:meth:`mem_read`, ...): they validate
    and fill ``fmt`` / ``type``. ``decode(t.encode()) == t`` for every constructed ``t``.

    Attributes:
        kind: a :class:`Kind` (a ``str``: ``t.kind == "MRd"`` holds); a name given as a plain
            ``str`` is converted, an unknown one raises :class:`TlpError`
            (``field_out_of_range``).
        fmt: wire Fmt (bit 0: 4DW header, bit 1: with data); for memory requests bit 0 chooses
            the header :meth:`encode` writes.
        type: wire Type (derived from ``kind``; for messages includes the routing).
        tc: Traffic Class 0..7.
        attr: :class:`Attr` bits (NS, RO, IDO).
        td: a 4-byte TLP digest (ECRC) follows the payload; its value is ``digest``.
        ep: poisoned.
        length: payload / requested length in DWs, 1..1024; 0 for Cpl, CplLk and Msg.
        requester_id: Requester ID (bus << 8 | device << 3 | function).
        completer_id: Completer ID (completions).
        tag: 10-bit tag (T9, T8 and the 8-bit Tag field).
        first_be: First DW Byte Enables (requests).
        last_be: Last DW Byte Enables (requests).
        address: memory / IO: DW-aligned byte address; configuration: byte address of the
            register (Extended Register Number << 8 | Register Number << 2); messages: header
            DW2 << 32 | DW3, raw.
        dest_id: configuration requests: target bus << 8 | device << 3 | function.
        status: completion status (:class:`Status` value).
        bcm: Byte Count Modified (completions).
        byte_count: completions: remaining byte count, 1..4096.
        lower_address: completions: 7-bit Lower Address.
        message_code: messages.
        routing: messages: r[2:0] from the Type field.
        digest: the ECRC value carried when ``td`` (not computed or checked).
        data: the payload.
    """

    kind: Kind = Kind.MRd
    fmt: int = 0
    type: int = 0
    tc: int = 0
    attr: int = 0
    td: bool = False
    ep: bool = False
    length: int = 0
    requester_id: int = 0
    completer_id: int = 0
    tag: int = 0
    first_be: int = 0
    last_be: int = 0
    address: int = 0
    dest_id: int = 0
    status: int = 0
    bcm: bool = False
    byte_count: int = 0
    lower_address: int = 0
    message_code: int = 0
    routing: int = 0
    digest: int = 0
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.kind.__class__ is not Kind:
            self.kind = _kind(self.kind)

    # ---- constructors ----

    @classmethod
    def mem_read(
        cls,
        address: int,
        length: int = 1,
        *,
        requester_id: int = 0,
        tag: int = 0,
        first_be: int = 0xF,
        last_be: Optional[int] = None,
        tc: int = 0,
        attr: int = 0,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
        locked: bool = False,
        addr64: Optional[bool] = None,
    ) -> Tlp:
        """A Memory Read Request (MRdLk when ``locked``) of ``length`` DWs at ``address``.

        ``last_be`` defaults to 0000b for 1 DW and 1111b otherwise. ``addr64=None`` picks the
        3DW header below 4 GiB and the 4DW header above; ``addr64=True`` below 4 GiB is refused.
        """
        return cls._build(_pick("mem", locked=locked), locals())

    @classmethod
    def mem_write(
        cls,
        address: int,
        data: Buffer,
        *,
        requester_id: int = 0,
        tag: int = 0,
        first_be: int = 0xF,
        last_be: Optional[int] = None,
        tc: int = 0,
        attr: int = 0,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
        addr64: Optional[bool] = None,
    ) -> Tlp:
        """A Memory Write Request of ``data`` (a whole number of DWs) at ``address``."""
        return cls._build(Kind.MWr, locals())

    @classmethod
    def io_read(
        cls,
        address: int,
        *,
        requester_id: int = 0,
        tag: int = 0,
        first_be: int = 0xF,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
    ) -> Tlp:
        """An I/O Read Request of one DW at ``address`` (below 4 GiB)."""
        return cls._build(Kind.IORd, locals())

    @classmethod
    def io_write(
        cls,
        address: int,
        data: Buffer,
        *,
        requester_id: int = 0,
        tag: int = 0,
        first_be: int = 0xF,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
    ) -> Tlp:
        """An I/O Write Request of one DW (``data`` is 4 bytes) at ``address``."""
        return cls._build(Kind.IOWr, locals())

    @classmethod
    def cfg_read(
        cls,
        dest_id: int,
        address: int,
        *,
        type: int = 0,
        requester_id: int = 0,
        tag: int = 0,
        first_be: int = 0xF,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
    ) -> Tlp:
        """A Configuration Read (``type`` 0 or 1) of the DW at register byte ``address``
        (0..0xFFC) of function ``dest_id``."""
        return cls._build(_cfg_kind(False, type), locals())

    @classmethod
    def cfg_write(
        cls,
        dest_id: int,
        address: int,
        data: Buffer,
        *,
        type: int = 0,
        requester_id: int = 0,
        tag: int = 0,
        first_be: int = 0xF,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
    ) -> Tlp:
        """A Configuration Write (``type`` 0 or 1) of one DW (``data`` is 4 bytes)."""
        return cls._build(_cfg_kind(True, type), locals())

    @classmethod
    def completion(
        cls,
        *,
        completer_id: int,
        requester_id: int,
        tag: int,
        status: int = Status.SC,
        data: Buffer = b"",
        byte_count: Optional[int] = None,
        lower_address: int = 0,
        bcm: bool = False,
        tc: int = 0,
        attr: int = 0,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
        locked: bool = False,
    ) -> Tlp:
        """A completion: CplD (CplDLk when ``locked``) with ``data``, else Cpl (CplLk).

        ``byte_count`` defaults to ``len(data)`` for a completion with data and to 4 without.
        """
        data = bytes(data)
        return cls._build(_pick("cpl", data=bool(data), locked=locked), locals())

    @classmethod
    def message(
        cls,
        message_code: int,
        *,
        routing: int = 0,
        requester_id: int = 0,
        tag: int = 0,
        address: int = 0,
        data: Buffer = b"",
        tc: int = 0,
        attr: int = 0,
        td: bool = False,
        ep: bool = False,
        digest: int = 0,
    ) -> Tlp:
        """A Message Request (MsgD when ``data`` is given); ``address`` is DW2:DW3, raw."""
        data = bytes(data)
        return cls._build(_pick("msg", data=bool(data)), locals())

    @classmethod
    def _build(cls, kind: Kind, args: dict[str, Any]) -> Tlp:
        # The one builder behind every constructor: ``args`` is the constructor's ``locals()``
        # (its parameters are named after the fields they fill); the per-kind table supplies
        # the rest (Length, Last DW BE and Byte Count defaults).
        fields = dict(args)
        for name in _SELECTORS:
            fields.pop(name, None)
        spec = _SPECS[kind]
        if "data" in fields:
            fields["data"] = bytes(fields["data"])
            if spec.fmt & 2:  # with data
                fields["length"] = _dw_length(fields["data"])
        if spec.length is not None:
            fields["length"] = spec.length
        if "last_be" in fields:
            fields["last_be"] = _default_last_be(fields["length"], fields["last_be"])
        if spec.family == "cpl" and fields["byte_count"] is None:
            fields["byte_count"] = len(fields["data"]) if fields["data"] else 4
        return cls(kind=kind, **fields)._canonical(args.get("addr64"))

    # ---- codec ----

    def encode(self) -> bytes:
        """The TLP on the wire: header, payload, then the digest when ``td``.

        Raises:
            TlpError: a field is out of range or a rule is broken.
        """
        code, out = _native.encode(_fields(self), False)
        if code != 0:
            raise TlpError(code, self.kind)
        return bytes(out)

    @property
    def addr64(self) -> bool:
        """Whether the header is 4DW (always for messages, memory requests >= 4 GiB)."""
        return bool(self.fmt & 1)

    def _canonical(self, addr64: Optional[bool]) -> Tlp:
        if addr64 is not None and _SPECS[self.kind].family == "mem":
            self.fmt = _SPECS[self.kind].fmt | int(addr64)
            code, out = _native.encode(_fields(self), False)
        else:
            code, out = _native.encode(_fields(self), True)
        if code != 0:
            raise TlpError(code, self.kind)
        return decode(out)

    def __repr__(self) -> str:
        k = self.kind
        family = _SPECS[k].family if k in _SPECS else ""
        parts = [str(k)]
        if family == "cpl":
            parts += [
                f"cpl={_bdf(self.completer_id)}",
                f"req={_bdf(self.requester_id)}",
                f"tag={self.tag:#x}",
                f"status={_status_name(self.status)}",
                f"bc={self.byte_count}",
                f"la={self.lower_address:#x}",
            ]
            if self.bcm:
                parts.append("bcm")
        elif family == "msg":
            parts += [
                f"req={_bdf(self.requester_id)}",
                f"tag={self.tag:#x}",
                f"code={self.message_code:#04x}",
                f"routing={self.routing}",
                f"dw23={self.address:#x}",
            ]
        else:
            parts += [f"req={_bdf(self.requester_id)}", f"tag={self.tag:#x}"]
            if family == "cfg":
                parts += [f"dest={_bdf(self.dest_id)}", f"reg={self.address:#05x}"]
            else:
                parts.append(f"addr={self.address:#x}")
            parts.append(f"be={self.first_be:x}/{self.last_be:x}")
        if self.length:
            parts.append(f"len={self.length}")
        if self.tc:
            parts.append(f"tc={self.tc}")
        if self.attr:
            parts.append(f"attr={_attr_text(self.attr)}")
        if self.ep:
            parts.append("ep")
        if self.td:
            parts.append(f"digest={self.digest:#010x}")
        if self.data:
            shown = self.data[:16].hex()
            parts.append(f"data={shown}{'...' if len(self.data) > 16 else ''}")
        return f"Tlp({' '.join(parts)})"


def _attr_text(a: int) -> str:
    names = [f.name for f in (Attr.RO, Attr.NS, Attr.IDO) if a & f and f.name]
    return "|".join(names) if names else str(a)


def _status_name(s: int) -> str:
    try:
        return Status(s).name
    except ValueError:
        return str(s)


def _default_last_be(length: int, last_be: Optional[int]) -> int:
    if last_be is not None:
        return last_be
    return 0 if length == 1 else 0xF


def _dw_length(data: Buffer) -> int:
    n = len(bytes(data))
    if n == 0 or n % 4 != 0 or n > 4096:
        raise TlpError("payload_length_mismatch", f"{n} bytes is not 1..1024 DWs")
    return n // 4


def _cfg_kind(write: bool, type: int) -> Kind:
    if type not in (0, 1):
        raise TlpError("field_out_of_range", f"configuration type {type} (must be 0 or 1)")
    return _pick("cfg", data=write, cfg_type=type)


def _fields(t: Tlp) -> tuple[Any, ...]:
    try:
        kind = _KIND_INDEX[t.kind]
    except (KeyError, TypeError):  # a kind assigned after construction
        raise TlpError("field_out_of_range", f"unknown kind {t.kind!r}") from None
    return (
        kind, t.fmt, t.type, t.tc, t.attr, t.td, t.ep, t.length, t.requester_id,
        t.completer_id, t.tag, t.first_be, t.last_be, t.address, t.dest_id, t.status, t.bcm,
        t.byte_count, t.lower_address, t.message_code, t.routing, t.digest, t.data,
    )  # fmt: skip


def _from_fields(f: tuple[Any, ...]) -> Tlp:
    status = f[15]
    return Tlp(
        kind=KINDS[f[0]], fmt=f[1], type=f[2], tc=f[3], attr=f[4], td=f[5], ep=f[6],
        length=f[7], requester_id=f[8], completer_id=f[9], tag=f[10], first_be=f[11],
        last_be=f[12], address=f[13], dest_id=f[14],
        status=Status(status) if status in (0, 1, 2, 4) else status,
        bcm=f[16], byte_count=f[17], lower_address=f[18], message_code=f[19], routing=f[20],
        digest=f[21], data=f[22],
    )  # fmt: skip


def decode(buf: Buffer) -> Tlp:
    """Decode exactly one TLP occupying all of ``buf``.

    Raises:
        TlpError: truncated or over-long buffer, reserved or unsupported encoding, or a broken
            field rule; ``code`` says which.
    """
    code, fields = _native.decode(buf)
    if code != 0:
        raise TlpError(code)
    return _from_fields(fields)


def completions_for(
    request: Tlp,
    data: Buffer = b"",
    *,
    completer_id: int,
    max_payload: int = 256,
    rcb: int = 64,
    status: int = Status.SC,
) -> list[Tlp]:
    """The completion(s) a completer returns for ``request``.

    Args:
        request: a non-posted request (MRd, MRdLk, IORd, IOWr, CfgRd0/1, CfgWr0/1).
        data: for an SC read, the request's whole DW-aligned range (``request.length * 4``
            bytes) as read from the target; empty otherwise.
        completer_id: the Completer ID to put in the completions.
        max_payload: Max_Payload_Size in bytes (power of two, 128..4096).
        rcb: Read Completion Boundary in bytes (64 or 128).
        status: SC, UR, CA, or CRS (configuration requests only).

    Raises:
        TlpError: posted request or completion (``no_completion``), bad parameter, data of the
            wrong length, or a request that breaks a field rule.
    """
    code, out = _native.completions(
        _fields(request), data, completer_id, max_payload, rcb, int(status)
    )
    if code != 0:
        raise TlpError(code, request.kind)
    return [_from_fields(f) for f in out]


@dataclass(frozen=True)
class BulkCompletions(Records):
    """Completions for many requests, built in one call: a :class:`mlx5tlp.Records` batch.

    Attributes:
        buffer: completion TLPs back to back, each a full TLP (3DW header then payload, no
            digest), in request order.
        offsets: ``len(self) + 1`` unsigned 32-bit offsets (native byte order); completion
            ``k`` is ``buffer[offsets[k]:offsets[k + 1]]`` (:meth:`record`).
        request_first: ``requests + 1`` entries; request ``i``'s completions are
            ``request_first[i]`` up to (excluding) ``request_first[i + 1]``.
        errors: one byte per request: 0, or the status code explaining why request ``i`` got
            no completion (:func:`reason` gives the text). MWr requests get none and 0.
    """

    request_first: array.array[int]
    errors: bytes

    @property
    def requests(self) -> int:
        """The number of requests."""
        return len(self.errors)

    def error(self, i: int) -> Optional[str]:
        """The status name for request ``i`` (``None`` when it was fine)."""
        code = self.errors[i]
        return None if code == 0 else _STATUS_NAMES[code]

    def decode_all(self) -> list[Tlp]:
        """Every completion as a :class:`Tlp` (for tests and debugging)."""
        return [decode(self.record(k)) for k in range(len(self))]


def _is_buffer(obj: object) -> bool:
    # A buffer such as array('I') is one request buffer (refused by the core unless its items
    # are bytes), never a sequence of requests whose items are ints.
    try:
        memoryview(obj).release()  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _bulk_inputs(
    requests: Union[Buffer, Sequence[Union[Buffer, Tlp]]],
    statuses: Optional[Union[Buffer, Sequence[int]]],
) -> tuple[Any, Optional[bytes]]:
    """The requests as one buffer and the statuses as bytes, as the bulk calls take them."""
    if isinstance(requests, (bytes, bytearray, memoryview)) or _is_buffer(requests):
        reqs: Any = requests  # the core checks it (contiguous, byte items)
    else:
        reqs = b"".join(r.encode() if isinstance(r, Tlp) else bytes(r) for r in requests)
    st: Optional[bytes] = None
    if statuses is not None:
        try:
            st = bytes(statuses)
        except ValueError:
            raise TlpError("bad_completion_status", "statuses must be 0..255") from None
    return reqs, st


def build_completions(
    requests: Union[Buffer, Sequence[Union[Buffer, Tlp]]],
    data: Buffer = b"",
    *,
    completer_id: int,
    max_payload: int = 256,
    rcb: int = 64,
    status: int = Status.SC,
    statuses: Optional[Union[Buffer, Sequence[int]]] = None,
) -> BulkCompletions:
    """Build the completions for many requests in C++, with the GIL released.

    Args:
        requests: request TLPs concatenated back to back (a bytes-like object), or a sequence
            of encoded requests / :class:`Tlp` objects (joined first).
        data: for each request that is a read (MRd, MRdLk, IORd, CfgRd0/1) and whose status is
            SC, ``length * 4`` bytes (its header's Length), concatenated in request order.
            A read that is rejected still consumes its share.
        completer_id: Completer ID for every completion.
        max_payload: Max_Payload_Size in bytes (power of two, 128..4096).
        rcb: Read Completion Boundary in bytes (64 or 128).
        status: the completion status for every request when ``statuses`` is None.
        statuses: one status per request (bytes or a sequence of ints).

    Raises:
        TlpError: the input does not end on a TLP boundary, ``data`` is not consumed exactly,
            ``statuses`` has the wrong length, or a parameter is bad. Problems with a single
            request do not raise: they are reported in :attr:`BulkCompletions.errors`.
    """
    reqs, st = _bulk_inputs(requests, statuses)
    code, buf, offsets, first, errors = _native.build_bulk(
        reqs, data, st, completer_id, max_payload, rcb, int(status)
    )
    if code != 0:
        raise TlpError(code)
    off = array.array("I")
    off.frombytes(offsets)
    req_first = array.array("I")
    req_first.frombytes(first)
    return BulkCompletions(buffer=buf, offsets=off, request_first=req_first, errors=errors)
