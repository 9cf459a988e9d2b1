"""mlx5tlp.tlp.Kind and the per-kind table: agreement with the C++ codec, str compatibility.

Fmt/Type values are from PCIe Base Spec r6.0 §2.2.1, Table 2-3 "Fmt[2:0] and Type[4:0] Field
Encodings"; posted vs non-posted requests from §2.4.1 (Table 2-39 ordering classes).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from mlx5tlp.tlp import KINDS, Kind, Status, Tlp, TlpError, completions_for, decode

_core: Any = importlib.import_module("mlx5tlp._core").tlp

# One constructor call per kind (addresses below 4 GiB, so memory requests use 3DW headers).
BUILD: dict[Kind, Callable[[], Tlp]] = {
    Kind.MRd: lambda: Tlp.mem_read(0x1000, 2, requester_id=0x0100, tag=5),
    Kind.MRdLk: lambda: Tlp.mem_read(0x1000, locked=True, tag=6),
    Kind.MWr: lambda: Tlp.mem_write(0x2000, b"abcdefgh", tag=7),
    Kind.IORd: lambda: Tlp.io_read(0x60, tag=8),
    Kind.IOWr: lambda: Tlp.io_write(0x64, b"wxyz", tag=9),
    Kind.CfgRd0: lambda: Tlp.cfg_read(0x0200, 0x10, tag=10),
    Kind.CfgWr0: lambda: Tlp.cfg_write(0x0200, 0x10, b"\xff\xff\xff\xff", tag=11),
    Kind.CfgRd1: lambda: Tlp.cfg_read(0x0300, 0x100, type=1, tag=12),
    Kind.CfgWr1: lambda: Tlp.cfg_write(0x0300, 0x100, b"1234", type=1, tag=13),
    Kind.Cpl: lambda: Tlp.completion(completer_id=2, requester_id=1, tag=14, status=Status.UR),
    Kind.CplD: lambda: Tlp.completion(completer_id=2, requester_id=1, tag=15, data=b"abcd"),
    Kind.CplLk: lambda: Tlp.completion(completer_id=2, requester_id=1, tag=16, locked=True),
    Kind.CplDLk: lambda: Tlp.completion(
        completer_id=2, requester_id=1, tag=17, data=b"abcd", locked=True
    ),
    Kind.Msg: lambda: Tlp.message(0x7F, routing=4),
    Kind.MsgD: lambda: Tlp.message(0x7F, routing=4, data=b"abcd"),
}

# Table 2-3: (Fmt[2:0], Type[4:0]); messages are 10rrr with the routing in r[2:0].
SPEC_FMT_TYPE = {
    "MRd": (0b000, 0b00000), "MRdLk": (0b000, 0b00001), "MWr": (0b010, 0b00000),
    "IORd": (0b000, 0b00010), "IOWr": (0b010, 0b00010),
    "CfgRd0": (0b000, 0b00100), "CfgWr0": (0b010, 0b00100),
    "CfgRd1": (0b000, 0b00101), "CfgWr1": (0b010, 0b00101),
    "Cpl": (0b000, 0b01010), "CplD": (0b010, 0b01010),
    "CplLk": (0b000, 0b01011), "CplDLk": (0b010, 0b01011),
    "Msg": (0b001, 0b10000), "MsgD": (0b011, 0b10000),
}  # fmt: skip
POSTED = {"MWr", "Msg", "MsgD"}  # §2.4.1: Memory Writes and Messages are posted


def test_kind_order_is_the_core_enum_order() -> None:
    assert tuple(KINDS) == tuple(Kind) == tuple(_core.KINDS)
    assert [k.value for k in Kind] == list(SPEC_FMT_TYPE)


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_table_agrees_with_the_cpp_codec(kind: Kind) -> None:
    t = BUILD[kind]()
    assert t.kind is kind
    wire = t.encode()
    # The C++ decoder's own view: kind index, fmt and type straight from the native fields.
    code, fields = _core.decode(wire)
    assert code == 0
    assert _core.KINDS[fields[0]] == kind.value and fields[0] == KINDS.index(kind)
    routing = t.routing if kind.family == "msg" else 0
    assert (fields[1], fields[2]) == (kind.fmt, kind.type | routing)
    # ... and the wire itself: DW0 byte 0 is Fmt[2:0] << 5 | Type[4:0].
    assert wire[0] == kind.fmt << 5 | kind.type | routing
    assert (kind.fmt, kind.type) == SPEC_FMT_TYPE[kind.value]
    assert kind.has_data == bool(t.data) == bool(kind.fmt & 2)
    assert kind.locked == (kind.value in ("MRdLk", "CplLk", "CplDLk"))


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_posted_matches_the_completion_builder(kind: Kind) -> None:
    t = BUILD[kind]()
    assert kind.posted == (kind.value in POSTED)
    if kind.posted or kind.family == "cpl":
        with pytest.raises(TlpError) as e:
            completions_for(t, completer_id=2)
        assert e.value.code == "no_completion"
    else:
        data = bytes(t.length * 4) if not kind.has_data else b""
        cpls = completions_for(t, data, completer_id=2)
        assert cpls and all(c.kind.family == "cpl" for c in cpls)
        assert all(c.kind.locked == kind.locked for c in cpls)


def test_memory_request_above_4g_sets_fmt_bit_0() -> None:
    t = Tlp.mem_read(1 << 32)
    fields = _core.decode(t.encode())[1]
    assert (t.kind, fields[1], t.fmt) == (Kind.MRd, Kind.MRd.fmt | 1, 1)


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_kind_round_trips_through_pickle_and_decode(kind: Kind) -> None:
    t = BUILD[kind]()
    assert pickle.loads(pickle.dumps(kind)) is kind
    back = pickle.loads(pickle.dumps(t))
    assert back == t and back.kind is kind
    assert decode(t.encode()).kind is kind


def test_a_tlp_pickled_with_a_str_kind_still_works() -> None:
    # Pickles made before Kind existed hold a plain str (unpickling skips __init__).
    t = Tlp.mem_write(0x2000, b"abcd")
    t.kind = "MWr"  # type: ignore[assignment]
    back = pickle.loads(pickle.dumps(t))
    assert type(back.kind) is str
    assert back.encode() == Tlp.mem_write(0x2000, b"abcd").encode()
    assert decode(back.encode()) == back


def test_kind_compares_and_prints_as_its_name() -> None:
    t = Tlp.mem_read(0x1000)
    assert t.kind == "MRd" and "MRd".__eq__(t.kind) and t.kind != "MWr"
    assert t.kind in ("MRd", "MRdLk") and t.kind in {"MRd"} and {"MRd": 1}[t.kind] == 1
    assert Kind("CplD") is Kind.CplD and isinstance(Kind.CplD, str)
    assert str(t.kind) == "MRd" and f"{t.kind}" == "MRd" and f"{t.kind:>5}" == "  MRd"
    assert json.dumps({"kind": t.kind}) == '{"kind": "MRd"}'
    assert repr(t).startswith("Tlp(MRd ")


def test_a_str_kind_is_converted_and_an_unknown_one_refused() -> None:
    t = Tlp(kind="CplD")  # type: ignore[arg-type]
    assert t.kind is Kind.CplD
    for bad in ("Nope", "mrd", 3, None):
        with pytest.raises(TlpError, match="unknown kind") as e:
            Tlp(kind=bad)  # type: ignore[arg-type]
        assert e.value.code == "field_out_of_range"
    t.kind = "Nope"  # type: ignore[assignment]  # assigned after construction: refused on use
    with pytest.raises(TlpError, match="unknown kind 'Nope'") as e:
        t.encode()
    assert e.value.code == "field_out_of_range"


def test_configuration_type_picks_the_kind() -> None:
    assert Tlp.cfg_read(0, 0, type=1).kind is Kind.CfgRd1
    assert Tlp.cfg_write(0, 0, b"abcd", type=0).kind is Kind.CfgWr0
    for bad in (2, -1):
        with pytest.raises(TlpError, match="configuration type") as e:
            Tlp.cfg_read(0, 0, type=bad)
        assert e.value.code == "field_out_of_range"


# The constructors' parameters and defaults before the shared builder (docs/tlp.md "Python API").
SIGNATURES = {
    "mem_read": (
        'address', 'length=1', '*', 'requester_id=0', 'tag=0', 'first_be=15', 'last_be=None',
        'tc=0', 'attr=0', 'td=False', 'ep=False', 'digest=0', 'locked=False', 'addr64=None',
    ),
    "mem_write": (
        'address', 'data', '*', 'requester_id=0', 'tag=0', 'first_be=15', 'last_be=None', 'tc=0',
        'attr=0', 'td=False', 'ep=False', 'digest=0', 'addr64=None',
    ),
    "io_read": (
        'address', '*', 'requester_id=0', 'tag=0', 'first_be=15', 'td=False', 'ep=False',
        'digest=0',
    ),
    "io_write": (
        'address', 'data', '*', 'requester_id=0', 'tag=0', 'first_be=15', 'td=False', 'ep=False',
        'digest=0',
    ),
    "cfg_read": (
        'dest_id', 'address', '*', 'type=0', 'requester_id=0', 'tag=0', 'first_be=15', 'td=False',
        'ep=False', 'digest=0',
    ),
    "cfg_write": (
        'dest_id', 'address', 'data', '*', 'type=0', 'requester_id=0', 'tag=0', 'first_be=15',
        'td=False', 'ep=False', 'digest=0',
    ),
    "completion": (
        '*', 'completer_id', 'requester_id', 'tag', 'status=<Status.SC: 0>', "data=b''",
        'byte_count=None', 'lower_address=0', 'bcm=False', 'tc=0', 'attr=0', 'td=False',
        'ep=False', 'digest=0', 'locked=False',
    ),
    "message": (
        'message_code', '*', 'routing=0', 'requester_id=0', 'tag=0', 'address=0', "data=b''",
        'tc=0', 'attr=0', 'td=False', 'ep=False', 'digest=0',
    ),
}


def _shape(ctor: Callable[..., Tlp]) -> tuple[str, ...]:
    """Parameter names and defaults, with "*" where the keyword-only ones start."""
    out: list[str] = []
    for p in inspect.signature(ctor).parameters.values():
        if p.kind is p.KEYWORD_ONLY and "*" not in out:
            out.append("*")
        out.append(str(p.replace(annotation=inspect.Parameter.empty)))
    return tuple(out)


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_constructor_signatures_are_unchanged(name: str) -> None:
    ctor = getattr(Tlp, name)
    assert _shape(ctor) == SIGNATURES[name]
    assert ctor.__doc__
    # The shared builder maps each parameter to the field of the same name; the only others
    # choose the kind (locked, the configuration type) or the header (addr64).
    fields = {f.name for f in dataclasses.fields(Tlp)} - {"kind", "fmt", "type"}
    assert set(inspect.signature(ctor).parameters) <= fields | {"locked", "addr64", "type"}
