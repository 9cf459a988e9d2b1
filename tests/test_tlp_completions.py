"""mlx5tlp.tlp completion builder: byte count / lower address rules, RCB / MPS splitting,
error completions, non-posted writes, and the bulk path."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx5tlp.tlp import (
    Attr,
    Status,
    Tlp,
    TlpError,
    build_completions,
    completions_for,
    decode,
    reason,
)

SETTINGS = settings(max_examples=300, deadline=None)

# PCIe Base §2.3.1.1, byte count for a 1-DW read from its First DW BE ("1xx1" -> 4, ...).
ONE_DW_BYTE_COUNT = {
    0b1001: 4, 0b1011: 4, 0b1101: 4, 0b1111: 4,
    0b0101: 3, 0b0111: 3, 0b1010: 3, 0b1110: 3,
    0b0011: 2, 0b0110: 2, 0b1100: 2,
    0b0001: 1, 0b0010: 1, 0b0100: 1, 0b1000: 1,
    0b0000: 1,
}  # fmt: skip
# PCIe Base §2.3.1.1, Lower Address[1:0] from the First DW BE.
LOWER_ADDRESS_LOW_BITS = {0b0000: 0, 0b0001: 0, 0b0010: 1, 0b0100: 2, 0b1000: 3}


def ref_first_offset(fbe: int) -> int:
    for pattern in (0b0001, 0b0010, 0b0100, 0b1000):
        if fbe & pattern:
            return LOWER_ADDRESS_LOW_BITS[pattern]
    return 0


def ref_byte_count(length: int, fbe: int, lbe: int) -> int:
    if length == 1:
        return ONE_DW_BYTE_COUNT[fbe]
    return length * 4 - ref_first_offset(fbe) - (3 - (lbe.bit_length() - 1))


@st.composite
def mem_read_case(draw: st.DrawFn) -> tuple[Tlp, bytes, int, int]:
    length = draw(st.one_of(st.integers(1, 80), st.integers(1, 1024)))
    page = draw(st.one_of(st.integers(0, 1000), st.integers(1 << 20, 1 << 30)))
    address = page * 4096 + draw(st.integers(0, (4096 - length * 4) // 4)) * 4
    if length == 1:
        fbe, lbe = draw(st.integers(0, 15)), 0
    else:
        fbe, lbe = draw(st.integers(1, 15)), draw(st.integers(1, 15))
    req = Tlp.mem_read(
        address,
        length,
        requester_id=draw(st.integers(0, 0xFFFF)),
        tag=draw(st.integers(0, 1023)),
        first_be=fbe,
        last_be=lbe,
        tc=draw(st.integers(0, 7)),
        attr=draw(st.integers(0, 7)),
        locked=draw(st.booleans()),
    )
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(length * 4)
    mps = draw(st.sampled_from([128, 256, 512, 1024, 2048, 4096]))
    rcb = draw(st.sampled_from([64, 128]))
    return req, data, mps, rcb


@SETTINGS
@given(mem_read_case())
def test_split_invariants(case: tuple[Tlp, bytes, int, int]) -> None:
    req, data, mps, rcb = case
    cpls = completions_for(req, data, completer_id=0x0300, max_payload=mps, rcb=rcb)
    start, end = req.address, req.address + req.length * 4
    first_off = ref_first_offset(req.first_be)
    total = ref_byte_count(req.length, req.first_be, req.last_be)
    enabled_end = start + first_off + total
    cur = start
    for i, c in enumerate(cpls):
        assert c.kind == ("CplDLk" if req.kind == "MRdLk" else "CplD")
        assert (c.requester_id, c.tag, c.tc, c.attr) == (
            req.requester_id,
            req.tag,
            req.tc,
            req.attr,
        )
        assert c.completer_id == 0x0300 and c.status == Status.SC and not c.bcm
        assert 0 < len(c.data) <= mps and len(c.data) == c.length * 4
        first_byte = start + first_off if i == 0 else cur
        assert c.byte_count == enabled_end - first_byte  # the bytes still to come
        assert c.lower_address == first_byte & 0x7F
        cur += len(c.data)
        if i + 1 < len(cpls):
            assert cur % rcb == 0  # all but the last end on an RCB boundary
        assert decode(c.encode()) == c
    assert cur == end
    assert [c.byte_count for c in cpls] == sorted((c.byte_count for c in cpls), reverse=True)
    assert cpls[0].byte_count == total
    last = cpls[-1]
    assert (last.lower_address % 4 + last.byte_count + 3) // 4 == last.length
    payload = b"".join(c.data for c in cpls)
    assert payload == data
    assert payload[first_off : first_off + total] == data[first_off : first_off + total]
    if start // rcb == (end - 1) // rcb:
        assert len(cpls) == 1  # a request inside one RCB block is never split


@pytest.mark.parametrize("fbe", range(16))
def test_one_dw_byte_count_and_lower_address(fbe: int) -> None:
    req = Tlp.mem_read(0x1040, 1, first_be=fbe)
    (c,) = completions_for(req, b"\xaa" * 4, completer_id=1)
    assert c.kind == "CplD" and c.length == 1
    assert c.byte_count == ONE_DW_BYTE_COUNT[fbe]
    assert c.lower_address == 0x40 + ref_first_offset(fbe)


def test_zero_length_read() -> None:
    req = Tlp.mem_read(0x2004, 1, first_be=0, requester_id=0x0100, tag=5)
    (c,) = completions_for(req, b"\x01\x02\x03\x04", completer_id=0x0200)
    assert (c.kind, c.length, c.byte_count, c.lower_address, c.data) == (
        "CplD",
        1,
        1,
        0x04,
        b"\x01\x02\x03\x04",
    )


def test_known_split() -> None:
    # 160 bytes from 0x1004, MPS 128, RCB 64: the first completion ends at 0x1080.
    req = Tlp.mem_read(0x1004, 40, first_be=0xE, last_be=0x3)
    cpls = completions_for(req, bytes(160), completer_id=0, max_payload=128, rcb=64)
    assert [(c.length, c.byte_count, c.lower_address) for c in cpls] == [
        (31, 157, 0x05),
        (9, 34, 0x00),
    ]
    # 4 KiB from a page start, MPS 256: sixteen 256-byte completions.
    big = Tlp.mem_read(0x3000, 1024, last_be=0xF)
    cpls = completions_for(big, bytes(4096), completer_id=0, max_payload=256, rcb=128)
    assert [c.byte_count for c in cpls] == list(range(4096, 0, -256))
    assert all(c.length == 64 for c in cpls)


@pytest.mark.parametrize("status", [Status.UR, Status.CA])
def test_memory_read_error_completion(status: Status) -> None:
    req = Tlp.mem_read(0x10F8, 4, first_be=0xC, last_be=0x1, tag=0x3FF, attr=Attr.RO | Attr.IDO)
    (c,) = completions_for(req, completer_id=0x0200, status=status)
    assert (c.kind, c.status, c.data, c.length) == ("Cpl", status, b"", 0)
    assert c.byte_count == 16 - 2 - 3  # every remaining byte
    assert c.lower_address == (0x10F8 + 2) & 0x7F  # address of the first enabled byte
    assert (c.tag, c.attr) == (0x3FF, Attr.RO | Attr.IDO)
    locked = Tlp.mem_read(0x10F8, 1, locked=True)
    (lc,) = completions_for(locked, completer_id=0x0200, status=status)
    assert lc.kind == "CplLk"


def test_config_and_io_completions() -> None:
    rd = Tlp.cfg_read(0x0100, 0x10, requester_id=0x0008, tag=9)
    (c,) = completions_for(rd, b"\x11\x22\x33\x44", completer_id=0x0100)
    assert (c.kind, c.byte_count, c.lower_address, c.length, c.data) == (
        "CplD",
        4,
        0,
        1,
        b"\x11\x22\x33\x44",
    )
    wr = Tlp.cfg_write(0x0100, 0x10, b"\x00" * 4, type=1, tag=10)
    (c,) = completions_for(wr, completer_id=0x0100)
    assert (c.kind, c.status, c.byte_count, c.lower_address, c.data) == ("Cpl", 0, 4, 0, b"")
    (c,) = completions_for(rd, completer_id=0x0100, status=Status.CRS)
    assert (c.kind, c.status, c.byte_count, c.lower_address) == ("Cpl", Status.CRS, 4, 0)
    (c,) = completions_for(rd, completer_id=0x0100, status=Status.UR)
    assert (c.kind, c.status, c.lower_address) == ("Cpl", Status.UR, 0)
    iow = Tlp.io_write(0x3F8, b"\x00\x00\x00\x41", first_be=0x8)
    (c,) = completions_for(iow, completer_id=0x0100)
    assert (c.kind, c.byte_count, c.lower_address) == ("Cpl", 4, 0)
    ior = Tlp.io_read(0x3F8, first_be=0x2)
    (c,) = completions_for(ior, b"\x00\x41\x00\x00", completer_id=0x0100)
    assert (c.kind, c.byte_count, c.lower_address) == ("CplD", 4, 0)


def test_completion_errors() -> None:
    def code_of(**kw: object) -> str:
        req = kw.pop("req", Tlp.mem_read(0x1000, 2, last_be=0xF))
        assert isinstance(req, Tlp)
        with pytest.raises(TlpError) as e:
            completions_for(req, **kw)  # type: ignore[arg-type]
        return e.value.code

    assert code_of(req=Tlp.mem_write(0, b"1234"), completer_id=0) == "no_completion"
    assert code_of(req=Tlp.message(0x7E), completer_id=0) == "no_completion"
    cpl = Tlp.completion(completer_id=0, requester_id=0, tag=0)
    assert code_of(req=cpl, completer_id=0) == "no_completion"
    assert code_of(data=bytes(8), completer_id=0, max_payload=192) == "bad_max_payload"
    assert code_of(data=bytes(8), completer_id=0, max_payload=8192) == "bad_max_payload"
    assert code_of(data=bytes(8), completer_id=0, rcb=32) == "bad_rcb"
    assert code_of(data=bytes(8), completer_id=0, status=3) == "bad_completion_status"
    assert code_of(completer_id=0, status=Status.CRS) == "crs_not_config"
    assert code_of(data=bytes(7), completer_id=0) == "data_length_mismatch"
    assert code_of(data=b"", completer_id=0) == "data_length_mismatch"
    assert code_of(data=bytes(8), completer_id=0, status=Status.UR) == "data_length_mismatch"
    assert code_of(data=bytes(8), completer_id=0x10000) == "field_out_of_range"


# ---- bulk ----


@st.composite
def request_mix(draw: st.DrawFn) -> list[Tlp]:
    out = []
    for _ in range(draw(st.integers(0, 30))):
        which = draw(st.integers(0, 4))
        tag = draw(st.integers(0, 1023))
        if which == 0:
            length = draw(st.integers(1, 300))
            addr = draw(st.integers(0, (4096 - length * 4) // 4)) * 4 + 0x10000
            out.append(Tlp.mem_read(addr, length, tag=tag, last_be=0 if length == 1 else 0xF))
        elif which == 1:
            out.append(Tlp.mem_write(0x2000, bytes(8), tag=tag))
        elif which == 2:
            out.append(Tlp.cfg_read(0x0100, 4 * draw(st.integers(0, 1023)), tag=tag))
        elif which == 3:
            out.append(Tlp.cfg_write(0x0100, 0x40, b"abcd", tag=tag, type=1))
        else:
            out.append(Tlp.io_read(0x3F8, tag=tag))
    return out


def _share(t: Tlp, status: int) -> int:
    reads = ("MRd", "MRdLk", "IORd", "CfgRd0", "CfgRd1")
    return t.length * 4 if status == 0 and t.kind in reads else 0


@SETTINGS
@given(request_mix(), st.sampled_from([128, 256, 4096]), st.sampled_from([64, 128]), st.data())
def test_bulk_matches_per_request(reqs: list[Tlp], mps: int, rcb: int, draw: st.DataObject) -> None:
    statuses = [
        draw.draw(st.sampled_from([0, 0, 1, 4] + ([2] if t.kind.startswith("Cfg") else [])))
        for t in reqs
    ]
    rng = random.Random(len(reqs))
    datas = [rng.randbytes(_share(t, s)) for t, s in zip(reqs, statuses, strict=False)]
    out = build_completions(
        reqs,
        b"".join(datas),
        completer_id=0x0200,
        max_payload=mps,
        rcb=rcb,
        statuses=statuses,
    )
    expected: list[bytes] = []
    assert out.requests == len(reqs)
    for i, (t, s, d) in enumerate(zip(reqs, statuses, datas, strict=False)):
        assert out.error(i) is None
        if t.kind == "MWr":
            mine: list[bytes] = []
        else:
            mine = [
                c.encode()
                for c in completions_for(
                    t, d, completer_id=0x0200, max_payload=mps, rcb=rcb, status=s
                )
            ]
        got = [bytes(out.record(k)) for k in range(out.request_first[i], out.request_first[i + 1])]
        assert got == mine
        expected += mine
    assert out.buffer == b"".join(expected)
    assert len(out) == len(expected) and out.offsets[-1] == len(out.buffer)


def test_bulk_buffer_format_and_errors() -> None:
    reqs = b"".join(
        [
            Tlp.mem_read(0x1000, 4, last_be=0xF, tag=1).encode(),
            Tlp.mem_write(0x2000, b"1234").encode(),
            bytes.fromhex("02000002 00080101 000003f8".replace(" ", "")),  # IORd, Length 2
            Tlp.completion(completer_id=1, requester_id=2, tag=3).encode(),
            Tlp.cfg_read(0x0100, 0x10, tag=2).encode(),
        ]
    )
    data = bytes(range(16)) + bytes(8) + b"\xde\xad\xbe\xef"
    out = build_completions(bytearray(reqs), memoryview(data), completer_id=0x0200)
    assert len(out) == 2 and out.requests == 5
    assert list(out.offsets) == [0, 28, 44]
    assert list(out.request_first) == [0, 1, 1, 1, 1, 2]
    assert [out.error(i) for i in range(5)] == [None, None, "io_cfg_length", "no_completion", None]
    assert out.errors[2] == 9 and reason(out.errors[2]).startswith("IO/Configuration")
    first, cfg = out.decode_all()
    assert first.data == bytes(range(16)) and cfg.data == b"\xde\xad\xbe\xef"
    assert out.buffer[: out.offsets[1]] == first.encode()

    with pytest.raises(TlpError) as e:
        build_completions(reqs[:-1], data, completer_id=0)
    assert e.value.code == "truncated_payload" or e.value.code == "truncated_header"
    with pytest.raises(TlpError) as e:
        build_completions(reqs, data + b"x", completer_id=0)
    assert e.value.code == "data_length_mismatch"
    with pytest.raises(TlpError) as e:
        build_completions(reqs, data[:-1], completer_id=0)
    assert e.value.code == "data_length_mismatch"
    with pytest.raises(TlpError) as e:
        build_completions(reqs, data, completer_id=0, statuses=[0, 0])
    assert e.value.code == "field_out_of_range"
    with pytest.raises(TlpError) as e:
        build_completions(reqs, data, completer_id=0, rcb=100)
    assert e.value.code == "bad_rcb"
    # All UR: no data consumed, every non-posted request answered without data.
    ur = build_completions(reqs, b"", completer_id=0, status=Status.UR)
    assert [c.kind for c in ur.decode_all()] == ["Cpl", "Cpl"]
    empty = build_completions(b"", b"", completer_id=0)
    assert (len(empty), empty.requests, list(empty.offsets)) == (0, 0, [0])
