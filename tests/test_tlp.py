"""mlx5tlp.tlp codec: round trips, hand-checked wire vectors, validation reasons."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx5tlp.tlp import KINDS, Attr, Status, Tlp, TlpError, decode, reason

SETTINGS = settings(max_examples=300, deadline=None)

ids = st.integers(0, 0xFFFF)
tags = st.integers(0, 1023)
tcs = st.integers(0, 7)
attrs = st.integers(0, 7)
digests = st.integers(0, 0xFFFFFFFF)


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@st.composite
def mem_address(draw: st.DrawFn, length: int) -> int:
    """A DW address whose length-DW range stays inside one 4 KiB page, below or above 4 GiB."""
    page = draw(st.one_of(st.integers(0, (1 << 20) - 1), st.integers(1 << 20, (1 << 52) - 1)))
    off = draw(st.integers(0, (4096 - length * 4) // 4)) * 4
    return int(page * 4096 + off)


@st.composite
def byte_enables(draw: st.DrawFn, length: int) -> tuple[int, int]:
    if length == 1:
        return draw(st.integers(0, 15)), 0
    return draw(st.integers(1, 15)), draw(st.integers(1, 15))


lengths = st.one_of(st.integers(1, 16), st.integers(1, 1024))


@st.composite
def common(draw: st.DrawFn) -> dict[str, int | bool]:
    td = draw(st.booleans())
    return {
        "requester_id": draw(ids),
        "tag": draw(tags),
        "td": td,
        "ep": draw(st.booleans()),
        "digest": draw(digests) if td else 0,
    }


@st.composite
def mem_reads(draw: st.DrawFn) -> Tlp:
    length = draw(lengths)
    fbe, lbe = draw(byte_enables(length))
    return Tlp.mem_read(
        draw(mem_address(length)),
        length,
        first_be=fbe,
        last_be=lbe,
        tc=draw(tcs),
        attr=draw(attrs),
        locked=draw(st.booleans()),
        **draw(common()),
    )


@st.composite
def mem_writes(draw: st.DrawFn) -> Tlp:
    length = draw(lengths)
    fbe, lbe = draw(byte_enables(length))
    return Tlp.mem_write(
        draw(mem_address(length)),
        _payload(draw(st.integers(0, 2**32)), length * 4),
        first_be=fbe,
        last_be=lbe,
        tc=draw(tcs),
        attr=draw(attrs),
        **draw(common()),
    )


@st.composite
def io_requests(draw: st.DrawFn) -> Tlp:
    address = draw(st.integers(0, (1 << 30) - 1)) * 4
    fbe = draw(st.integers(0, 15))
    if draw(st.booleans()):
        return Tlp.io_read(address, first_be=fbe, **draw(common()))
    return Tlp.io_write(
        address, draw(st.binary(min_size=4, max_size=4)), first_be=fbe, **draw(common())
    )


@st.composite
def cfg_requests(draw: st.DrawFn) -> Tlp:
    dest, reg, typ = draw(ids), draw(st.integers(0, 0x3FF)) * 4, draw(st.integers(0, 1))
    fbe = draw(st.integers(0, 15))
    if draw(st.booleans()):
        return Tlp.cfg_read(dest, reg, type=typ, first_be=fbe, **draw(common()))
    data = draw(st.binary(min_size=4, max_size=4))
    return Tlp.cfg_write(dest, reg, data, type=typ, first_be=fbe, **draw(common()))


@st.composite
def completions(draw: st.DrawFn) -> Tlp:
    la = draw(st.integers(0, 127))
    bcm = draw(st.booleans())
    kw = draw(common())
    kw["tc"], kw["attr"] = draw(tcs), draw(attrs)
    locked = draw(st.booleans())
    cid = draw(ids)
    if draw(st.booleans()):  # with data: SC, payload no longer than the remaining bytes
        length = draw(lengths)
        low = max(1, length * 4 - (la & 3) - 3)
        bc = draw(st.integers(1, 4096)) if bcm else draw(st.integers(low, 4096))
        data = _payload(draw(st.integers(0, 2**32)), length * 4)
        return Tlp.completion(
            completer_id=cid,
            data=data,
            byte_count=bc,
            lower_address=la,
            bcm=bcm,
            locked=locked,
            **kw,
        )
    status = draw(st.sampled_from(list(Status)))
    return Tlp.completion(
        completer_id=cid,
        status=status,
        byte_count=draw(st.integers(1, 4096)),
        lower_address=la,
        bcm=bcm,
        locked=locked,
        **kw,
    )


@st.composite
def messages(draw: st.DrawFn) -> Tlp:
    data = b""
    if draw(st.booleans()):
        data = _payload(draw(st.integers(0, 2**32)), draw(st.integers(1, 64)) * 4)
    return Tlp.message(
        draw(st.integers(0, 255)),
        routing=draw(st.integers(0, 7)),
        address=draw(st.integers(0, 2**64 - 1)),
        data=data,
        tc=draw(tcs),
        attr=draw(attrs),
        **draw(common()),
    )


any_tlp = st.one_of(
    mem_reads(), mem_writes(), io_requests(), cfg_requests(), completions(), messages()
)


# ---- round trips ----


@pytest.mark.parametrize(
    "strategy",
    [mem_reads(), mem_writes(), io_requests(), cfg_requests(), completions(), messages()],
    ids=["mem_read", "mem_write", "io", "cfg", "completion", "message"],
)
def test_round_trip(strategy: st.SearchStrategy[Tlp]) -> None:
    @SETTINGS
    @given(strategy)
    def check(t: Tlp) -> None:
        wire = t.encode()
        back = decode(wire)
        assert back == t
        assert back.encode() == wire
        assert t.kind in KINDS
        assert len(wire) == (16 if t.addr64 else 12) + len(t.data) + (4 if t.td else 0)

    check()


@SETTINGS
@given(st.integers(0, (1 << 62) // 4096 - 1), st.integers(0, 1023))
def test_memory_header_size_follows_address(page: int, dw: int) -> None:
    address = page * 4096 + dw * 4
    t = Tlp.mem_read(address)
    assert t.addr64 == (address >= 1 << 32)
    assert len(t.encode()) == (16 if address >= 1 << 32 else 12)
    if address < 1 << 32:
        with pytest.raises(TlpError) as e:
            Tlp.mem_read(address, addr64=True)
        assert e.value.code == "addr64_below_4g"


@SETTINGS
@given(st.binary(max_size=80))
def test_random_bytes_decode_or_raise_tlp_error(buf: bytes) -> None:
    try:
        t = decode(buf)
    except TlpError as e:
        assert isinstance(e, ValueError)
        assert e.code and e.reason
    else:
        assert decode(t.encode()) == t


# ---- hand-checked wire vectors ----
# Each is assembled by hand from the PCIe Base Specification field definitions: DW0 per §2.2.1
# "Common Packet Header Fields" (byte 0 Fmt[7:5] Type[4:0]; byte 1 T9 TC[6:4] T8 Attr[2] LN TH;
# byte 2 TD EP Attr[1:0] AT[1:0] Length[9:8]; byte 3 Length[7:0]), then the kind's layout.

VECTORS = [
    # Memory Request, 32-bit addressing (§2.2.7): DW1 Requester ID, Tag, Last/First DW BE;
    # DW2 Address[31:2].
    (
        "00000001 01000a0f 00001000",
        Tlp.mem_read(0x1000, requester_id=0x0100, tag=0x0A),
    ),
    # Memory Request, 64-bit addressing (§2.2.7): Fmt 001b; T9=1 T8=0 (tag 0x2a5), TC 5,
    # IDO (byte 1 bit 2), RO+NS (byte 2 bits 5:4), Length 0 = 1024 DW; DW2/DW3 address.
    (
        "20d43000 beefa5ff 00000001 00000000",
        Tlp.mem_read(1 << 32, 1024, requester_id=0xBEEF, tag=0x2A5, tc=5, attr=7),
    ),
    # Memory Write, 32-bit, TD=1 (byte 2 bit 7): payload then the 1-DW digest.
    (
        "40008002 00000fff 00002008 11223344 55667788 deadbeef",
        Tlp.mem_write(
            0x2008, bytes.fromhex("1122334455667788"), tag=0x0F, td=True, digest=0xDEADBEEF
        ),
    ),
    # I/O Request (§2.2.7): Type 00010b; DW2 Address[31:2].
    (
        "02000001 00080101 000003f8",
        Tlp.io_read(0x3F8, requester_id=0x0008, tag=0x01, first_be=0x1),
    ),
    (
        "42000001 00080208 000003f8 00000041",
        Tlp.io_write(0x3F8, b"\x00\x00\x00\x41", requester_id=0x0008, tag=0x02, first_be=0x8),
    ),
    # Configuration Request (§2.2.7): Type 00100b/00101b; DW2 Bus[31:24] Device[23:19]
    # Function[18:16] Ext Register Number[11:8] Register Number[7:2].
    (
        "04000001 0010010f 02190104",
        Tlp.cfg_read(0x0219, 0x104, requester_id=0x0010, tag=0x01),
    ),
    (
        "45000001 0010020f 0500000c aabbccdd",
        Tlp.cfg_write(
            0x0500, 0x00C, bytes.fromhex("aabbccdd"), type=1, requester_id=0x0010, tag=0x02
        ),
    ),
    # Completion (§2.2.9): Type 01010b; DW1 Completer ID, Status[15:13], BCM, Byte Count
    # (0 = 4096); DW2 Requester ID, Tag, Lower Address[6:0].
    (
        "0a000000 02002000 0100107f",
        Tlp.completion(
            completer_id=0x0200,
            requester_id=0x0100,
            tag=0x10,
            status=Status.UR,
            byte_count=4096,
            lower_address=0x7F,
        ),
    ),
    (
        "4a000001 02000004 01001000 01020304",
        Tlp.completion(
            completer_id=0x0200, requester_id=0x0100, tag=0x10, data=b"\x01\x02\x03\x04"
        ),
    ),
    # CplLk (Type 01011b), status CRS (010b), BCM set, 10-bit tag 0x110 (T8).
    (
        "0b080000 02005004 01001000",
        Tlp.completion(
            completer_id=0x0200,
            requester_id=0x0100,
            tag=0x110,
            status=Status.CRS,
            byte_count=4,
            bcm=True,
            locked=True,
        ),
    ),
    # Message Request (§2.2.8): Fmt 001b, Type 10r2r1r0 (routed by ID, 010b), Message Code.
    (
        "32000000 0100007e 02000000 00000000",
        Tlp.message(0x7E, routing=2, requester_id=0x0100, address=0x0200 << 48),
    ),
    (
        "72000001 0100007f 00000000 00000000 01020304",
        Tlp.message(0x7F, routing=2, requester_id=0x0100, data=b"\x01\x02\x03\x04"),
    ),
]


@pytest.mark.parametrize(("wire", "tlp"), VECTORS, ids=[v[1].kind for v in VECTORS])
def test_vectors(wire: str, tlp: Tlp) -> None:
    raw = bytes.fromhex(wire.replace(" ", ""))
    assert tlp.encode() == raw
    assert decode(raw) == tlp


def test_decoded_fields() -> None:
    t = decode(bytes.fromhex("20d43000beefa5ff0000000100000000"))
    assert (t.kind, t.fmt, t.type, t.tc, t.length) == ("MRd", 1, 0, 5, 1024)
    assert t.attr == Attr.IDO | Attr.RO | Attr.NS
    assert (t.requester_id, t.tag, t.first_be, t.last_be, t.address) == (
        0xBEEF,
        0x2A5,
        15,
        15,
        1 << 32,
    )
    c = decode(bytes.fromhex("0a00000002002000 0100107f".replace(" ", "")))
    assert (c.kind, c.status, c.byte_count, c.lower_address, c.length) == ("Cpl", 1, 4096, 127, 0)
    assert c.status is Status.UR
    cfg = decode(bytes.fromhex("040000010010010f02190104"))
    assert (cfg.dest_id, cfg.address) == (0x0219, 0x104)
    r = repr(cfg)
    assert "CfgRd0" in r and "dest=02:03.1" in r and "reg=0x104" in r


# ---- validation reasons ----

INVALID = [
    ("", "truncated_header"),
    ("000000", "truncated_header"),
    ("00000001 01000a0f 000010", "truncated_header"),
    ("20000001 01000a0f 00000001 000010", "truncated_header"),
    ("40000002 00000fff 00002008 11223344", "truncated_payload"),
    ("40008001 0000000f 00002008 11223344", "truncated_payload"),  # digest missing
    ("00000001 01000a0f 00001000 00", "payload_too_long"),
    ("40000001 0000000f 00002008 11223344 55667788", "payload_too_long"),
    ("90000000 00000001 01000a0f 00001000", "tlp_prefix"),
    ("a0000001 01000a0f 00001000", "reserved_fmt"),
    ("03000001 01000a0f 00001000", "reserved_type"),
    ("22000001 01000a0f 00001000 00000000", "reserved_type"),  # 4DW IO
    ("12000000 01000a0f 00001000", "reserved_type"),  # 3DW Msg
    ("41000001 01000a0f 00001000 00000000", "reserved_type"),  # MRdLk with data
    ("4c000001 01000a0f 00001000 00000001", "unsupported_type"),  # FetchAdd
    ("00010001 01000a0f 00001000", "unsupported_header_bits"),  # TH
    ("00020001 01000a0f 00001000", "unsupported_header_bits"),  # LN
    ("00000401 01000a0f 00001000", "unsupported_header_bits"),  # AT
    ("02000002 00080101 000003f8", "io_cfg_length"),
    ("02100001 00080101 000003f8", "io_cfg_tc"),
    ("04001001 0010010f 02190104", "io_cfg_attr"),
    ("04040001 0010010f 02190104", "io_cfg_attr"),
    ("04000001 0010011f 02190104", "io_cfg_last_be"),
    ("00000001 01000a1f 00001000", "last_be_on_single_dw"),
    ("00000002 01000a0f 00001000", "last_be_zero"),
    ("00000002 01000af0 00001000", "first_be_zero"),
    ("00000002 01000aff 00001ffc", "crosses_4k"),
    ("00000000 01000aff 00001004", "crosses_4k"),  # 1024 DW not at a page start
    ("20000001 01000a0f 00000000 ffff0000", "addr64_below_4g"),
    ("0a000000 02006004 01001000", "reserved_status"),
    ("0a000000 0200a004 01001000", "reserved_status"),
    ("4a000001 02002004 01001000 00000000", "error_status_with_data"),
    ("4a000002 02000004 01001000 00000000 00000000", "cpl_length_exceeds_byte_count"),
]


@pytest.mark.parametrize(("wire", "code"), INVALID)
def test_decode_rejects(wire: str, code: str) -> None:
    with pytest.raises(TlpError) as e:
        decode(bytes.fromhex(wire.replace(" ", "")))
    assert e.value.code == code
    assert e.value.reason == reason(code)
    assert isinstance(e.value, ValueError)


def test_encode_rejects() -> None:
    def code_of(fn: object) -> str:
        assert callable(fn)
        with pytest.raises(TlpError) as e:
            fn()
        return e.value.code

    assert code_of(lambda: Tlp.mem_read(0x1000, addr64=True)) == "addr64_below_4g"
    assert code_of(lambda: Tlp.mem_read(1 << 32, addr64=False)) == "address_too_wide"
    assert code_of(lambda: Tlp.mem_read(0x1002)) == "address_unaligned"
    assert code_of(lambda: Tlp.mem_read(0x1000, tag=1024)) == "field_out_of_range"
    assert code_of(lambda: Tlp.mem_read(0x1000, tc=8)) == "field_out_of_range"
    assert code_of(lambda: Tlp.mem_read(-4)) == "field_out_of_range"
    assert code_of(lambda: Tlp.mem_read(0x1000, 1025)) == "field_out_of_range"
    assert code_of(lambda: Tlp.mem_read(0xFF0, 8)) == "crosses_4k"
    assert code_of(lambda: Tlp.mem_read(0x1000, 2, first_be=0)) == "first_be_zero"
    assert code_of(lambda: Tlp.mem_read(0x1000, 2, last_be=0)) == "last_be_zero"
    assert code_of(lambda: Tlp.mem_read(0x1000, 1, last_be=1)) == "last_be_on_single_dw"
    assert code_of(lambda: Tlp.mem_write(0x1000, b"abc")) == "payload_length_mismatch"
    assert code_of(lambda: Tlp.io_read(1 << 32)) == "address_too_wide"
    assert code_of(lambda: Tlp.io_write(0, b"12345678")) == "io_cfg_length"
    assert code_of(lambda: Tlp.cfg_read(0, 0x1000)) == "address_too_wide"
    assert code_of(lambda: Tlp.cfg_read(0, 0, type=2)) == "field_out_of_range"
    assert code_of(lambda: Tlp.completion(completer_id=0, requester_id=0, tag=0, status=3)) == (
        "reserved_status"
    )
    assert (
        code_of(lambda: Tlp.completion(completer_id=0, requester_id=0, tag=0, byte_count=4097))
        == "field_out_of_range"
    )
    assert code_of(lambda: Tlp(kind="Nope").encode()) == "field_out_of_range"
    # A hand-made memory request keeps its Fmt: 3DW cannot carry a 64-bit address.
    t = Tlp.mem_read(0x1000)
    t.address = 1 << 40
    assert code_of(t.encode) == "address_too_wide"


def test_tlp_error_message() -> None:
    e = TlpError("crosses_4k", "MRd")
    assert str(e) == "memory request crosses a 4 KiB boundary (crosses_4k): MRd"
    assert reason(0) == "ok"


def test_repr_and_eq() -> None:
    a = Tlp.mem_write(0x1000, b"\x00" * 8, requester_id=0x0108, tag=3, attr=Attr.RO, tc=2)
    b = Tlp.mem_write(0x1000, b"\x00" * 8, requester_id=0x0108, tag=3, attr=Attr.RO, tc=2)
    assert a == b
    b.tag = 4
    assert a != b
    assert repr(a) == (
        "Tlp(MWr req=01:01.0 tag=0x3 addr=0x1000 be=f/f len=2 tc=2 attr=RO data=0000000000000000)"
    )
    c = Tlp.completion(completer_id=0x200, requester_id=0x100, tag=1, status=Status.CA, attr=5)
    assert repr(c) == "Tlp(Cpl cpl=02:00.0 req=01:00.0 tag=0x1 status=CA bc=4 la=0x0 attr=NS|IDO)"
