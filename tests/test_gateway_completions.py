"""Gateway.post_completions: the fused bulk path (requests -> completions built straight into
the ring's slots) against the two-step path it replaces, tlp.build_completions + post_batch,
on the software device: the same bytes in the same page slots for many request shapes
(sizes, byte enables, RCB / Max_Payload_Size splits, 3DW / 4DW, locked reads, IO and
configuration requests, per-request statuses), the same refusals, nothing posted on a refusal,
and the completions of one request never split by a timeout.

Completion rules: PCIe Base Specification §2.2.9 (Completion header) and §2.3.1.1 (Byte Count,
Lower Address, splits at the Read Completion Boundary, Max_Payload_Size).
"""

from __future__ import annotations

import contextlib
import mmap
import random
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx5tlp
from mlx5tlp import sim
from mlx5tlp.errors import InvalidArgumentError, InvalidHandleError
from mlx5tlp.gateway import Gateway
from mlx5tlp.tlp import RequestsRefusedError, Tlp, TlpError, build_completions, decode

CID = 0x0200
PAGE_SLOTS_MAX = 128


@pytest.fixture(scope="module")
def big_ctx() -> Iterator[mlx5tlp.Context]:
    """A context on a device with 64 KiB gateway pages (room for 128 records of 512 bytes)."""
    name = f"fused{random.getrandbits(32):08x}"
    sim.create_device(name, gw_pages=4, gw_log_stride=4, virtio_pages=0)
    try:
        with mlx5tlp.open_device(name, backend="sim") as c:
            yield c
    finally:
        sim.remove_device(name)


def slot_for(mps: int) -> int:
    """The smallest raw_tlp slot (a power of two, >= 64) a completion of up to `mps` fits."""
    s = 64
    while s < 12 + mps:
        s *= 2
    return s


def page_after(ctx: mlx5tlp.Context, slot: int, post: Callable[[Gateway], object],
               ring_slots: int = 1024) -> tuple[bytes, object, dict[str, int]]:
    """Zero a page, open a fresh raw_tlp gateway on it (slots from 0), post, flush, close:
    the page's bytes, what post returned, and the gateway's stats."""
    var = ctx.alloc_var(tlp=True)
    try:
        mm = var.mmap(mmap.PROT_READ | mmap.PROT_WRITE)
        with contextlib.closing(mm):
            mm[:] = bytes(len(mm))
            with var.gateway(f"raw_tlp:{slot}", ring_slots=ring_slots) as gw:
                got = post(gw)
                assert gw.flush(30)
                stats = gw.stats()
            return bytes(mm), got, stats
    finally:
        var.close()


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    """Encoded requests (every kind that gets completions, and posted writes) and a
    completion status per request."""
    out: list[bytes] = []
    statuses: list[int] = []
    for _ in range(draw(st.integers(0, 40))):
        which = draw(st.integers(0, 9))
        tag = draw(st.integers(0, 1023))
        rid = draw(st.integers(0, 0xFFFF))
        status = draw(st.sampled_from([0, 0, 0, 0, 1, 4]))
        if which <= 5:  # memory reads: the fast path's shapes and beyond
            length = draw(st.one_of(st.integers(1, 20), st.integers(1, 1024)))
            wide = draw(st.booleans())
            page = draw(st.integers(1 << 20, 1 << 40)) if wide else draw(st.integers(0, 1 << 19))
            addr = page * 4096 + draw(st.integers(0, (4096 - length * 4) // 4)) * 4
            if length == 1:
                fbe, lbe = draw(st.integers(0, 15)), 0
            else:
                fbe, lbe = draw(st.integers(1, 15)), draw(st.integers(1, 15))
            t = Tlp.mem_read(addr, length, requester_id=rid, tag=tag, first_be=fbe,
                             last_be=lbe, tc=draw(st.integers(0, 7)),
                             attr=draw(st.integers(0, 7)), locked=draw(st.booleans()),
                             td=draw(st.booleans()) and which == 5, ep=which == 4)
        elif which == 6:
            t = Tlp.mem_write(0x2000 + 4 * draw(st.integers(0, 100)), bytes(8), tag=tag)
        elif which == 7:
            t = Tlp.cfg_read(0x0100, 4 * draw(st.integers(0, 1023)), tag=tag, requester_id=rid,
                             type=draw(st.integers(0, 1)))
            status = draw(st.sampled_from([0, 1, 2, 4]))
        elif which == 8:
            t = Tlp.cfg_write(0x0100, 0x40, b"abcd", tag=tag, type=1)
        else:
            t = Tlp.io_read(0x3F8, tag=tag, requester_id=rid)
        out.append(t.encode())
        statuses.append(status)
    return out, statuses


def data_for(reqs: list[bytes], statuses: list[int], rng: random.Random) -> bytes:
    """Length * 4 bytes for every read under SC (what the bulk format wants)."""
    parts = []
    for r, s in zip(reqs, statuses, strict=True):
        fmt_type = r[0]
        read = fmt_type in (0x00, 0x20, 0x01, 0x21, 0x02, 0x04, 0x05)
        length = ((r[2] & 3) << 8 | r[3]) or 1024
        if read and s == 0:
            parts.append(rng.randbytes(length * 4))
    return b"".join(parts)


def fitting_prefix(reqs: list[bytes], statuses: list[int], mps: int, rcb: int,
                   slots: int) -> int:
    """How many requests of the input give at most `slots` completions (the page holds them
    all, so every record can be compared)."""
    n = len(reqs)
    while n > 0:
        rng = random.Random(0)
        cpl = build_completions(reqs[:n], data_for(reqs[:n], statuses[:n], rng),
                                completer_id=CID, max_payload=mps, rcb=rcb,
                                statuses=statuses[:n])
        if len(cpl) <= slots:
            return n
        n -= 1
    return 0


@settings(max_examples=60, deadline=None)
@given(requests(), st.sampled_from([128, 256, 512, 4096]), st.sampled_from([64, 128]),
       st.sampled_from([4, 64, 1024]), st.integers(0, 2**32))
def test_same_bytes_as_build_completions_then_post_batch(
    big_ctx: mlx5tlp.Context, case: tuple[list[bytes], list[int]], mps: int, rcb: int,
    ring: int, seed: int,
) -> None:
    reqs, statuses = case
    slot = slot_for(mps)
    slots = min(PAGE_SLOTS_MAX, 65536 // slot)
    n = fitting_prefix(reqs, statuses, mps, rcb, slots)
    reqs, statuses = reqs[:n], statuses[:n]
    data = data_for(reqs, statuses, random.Random(seed))
    joined = b"".join(reqs)
    kw = {"completer_id": CID, "max_payload": mps, "rcb": rcb, "statuses": statuses}
    ref = build_completions(joined, data, **kw)  # type: ignore[arg-type]
    assert all(e == 0 for e in ref.errors)
    if len(ref) == 0:
        return
    # A ring smaller than one request's completions is refused (below); keep the ring large
    # enough for the biggest request here.
    most = max(ref.request_first[i + 1] - ref.request_first[i] for i in range(ref.requests))
    while ring < most:
        ring *= 2

    want, _, _ = page_after(big_ctx, slot, lambda gw: gw.post_batch(ref), ring)
    # bytes, bytearray and a memoryview of the requests, as one buffer or a list of TLPs.
    for given_reqs in (joined, bytearray(joined), memoryview(joined), reqs):
        got, res, stats = page_after(
            big_ctx, slot,
            lambda gw, r=given_reqs: gw.post_completions(r, bytearray(data), **kw),  # type: ignore[misc]
            ring)
        assert got == want
        assert res == (n, len(ref), bytes(n))
        assert stats["posted"] == stats["written"] == len(ref)
    # And each record where the page says it is (slot k holds completion k).
    for k in range(len(ref)):
        rec = bytes(ref.record(k))
        assert want[k * slot: k * slot + len(rec)] == rec


def test_a_known_split(big_ctx: mlx5tlp.Context) -> None:
    # §2.3.1.1: a 256-byte read at offset 0x30 with RCB 64 and MPS 128 comes back as
    # completions of 80 bytes (as much as MPS allows, ending on an RCB boundary: 0x80), 128
    # bytes (to 0x100), and the 48 left; Byte Count is what remains, Lower Address the low
    # 7 bits of each completion's first byte.
    req = Tlp.mem_read(0x1_0030, 64, tag=5, requester_id=0x0100, last_be=0xF).encode()
    data = bytes(range(256))
    page, res, _ = page_after(big_ctx, 512, lambda gw: gw.post_completions(
        req, data, completer_id=CID, max_payload=128, rcb=64))
    assert res == (1, 3, b"\0")
    cpls = [decode(page[k * 512: k * 512 + 12 + n]) for k, n in enumerate((80, 128, 48))]
    assert [c.data for c in cpls] == [data[:80], data[80:208], data[208:]]
    assert [c.byte_count for c in cpls] == [256, 176, 48]
    assert [c.lower_address for c in cpls] == [0x30, 0x00, 0x00]
    assert all(c.kind == "CplD" and c.tag == 5 and c.completer_id == CID for c in cpls)


def bad_mix() -> tuple[bytes, bytes, list[int]]:
    """Good reads with refused requests between them; the indices of the refused ones."""
    good = [Tlp.mem_read(0x1000 + 64 * i, 4, tag=i, last_be=0xF).encode() for i in range(6)]
    ln = bytearray(good[0])
    ln[1] |= 0x02  # LN set: unsupported_header_bits
    crossing = bytearray(Tlp.mem_read(0x1FF8, 1).encode())
    crossing[3] = 4  # 16 bytes from 0xFF8: crosses 4 KiB
    cpl = Tlp.completion(completer_id=1, requester_id=2, tag=3).encode()  # no_completion
    reqs = [good[0], bytes(ln), good[1], good[2], bytes(crossing), good[3], cpl, good[4]]
    data = b"".join(bytes([i]) * (((r[2] & 3) << 8 | r[3]) * 4)
                    for i, r in enumerate(reqs) if r[0] == 0)
    return b"".join(reqs), data, [1, 4, 6]


def test_a_bad_request_posts_nothing_and_names_every_refused_one(
        big_ctx: mlx5tlp.Context) -> None:
    reqs, data, refused = bad_mix()
    ref = build_completions(reqs, data, completer_id=CID)
    assert [i for i, e in enumerate(ref.errors) if e] == refused
    _, err, stats = page_after(big_ctx, 64, lambda gw: _raises(
        lambda: gw.post_completions(reqs, data, completer_id=CID)))
    assert isinstance(err, RequestsRefusedError)
    assert (err.index, err.refused, err.errors) == (1, refused, ref.errors)
    assert err.code == "unsupported_header_bits"
    assert "request 1 of 8" in str(err) and "nothing was posted" in str(err)
    assert stats["posted"] == 0

    # skip_bad: the good ones, exactly what build_completions + post_batch post.
    want, _, _ = page_after(big_ctx, 64, lambda gw: gw.post_batch(ref))
    got, res, stats = page_after(big_ctx, 64, lambda gw: gw.post_completions(
        reqs, data, completer_id=CID, skip_bad=True))
    assert got == want and res == (8, 5, ref.errors) and stats["posted"] == 5


def _raises(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # returned to the caller, which checks it
        return exc
    raise AssertionError("no exception")


@pytest.mark.parametrize(
    ("reqs", "data", "kw"),
    [
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode()[:-1], bytes(8), {}),  # truncated
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(7), {}),  # data short
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(9), {}),  # data left over
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(8), {"statuses": [0, 0]}),
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(8), {"max_payload": 192}),
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(8), {"rcb": 32}),
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(8), {"status": 3}),
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(8), {"completer_id": 1 << 16}),
        (Tlp.mem_read(0x1000, 2, last_be=0xF).encode(), bytes(8), {"statuses": [256]}),
    ],
)
def test_whole_call_refusals_are_build_completions_own(
        ctx: mlx5tlp.Context, reqs: bytes, data: bytes, kw: dict[str, object]) -> None:
    args: dict[str, object] = {"completer_id": CID, **kw}
    with pytest.raises(TlpError) as ref:
        build_completions(reqs, data, **args)  # type: ignore[arg-type]
    var = ctx.alloc_var(tlp=True)
    with contextlib.closing(var), var.gateway("raw_tlp:64") as gw:
        with pytest.raises(TlpError) as got:
            gw.post_completions(reqs, data, **args)  # type: ignore[arg-type]
        assert not isinstance(got.value, RequestsRefusedError)
        assert got.value.code == ref.value.code
        assert gw.stats()["posted"] == 0


def test_buffers_the_core_refuses(ctx: mlx5tlp.Context) -> None:
    req = Tlp.mem_read(0x1000, 1).encode() * 2
    var = ctx.alloc_var(tlp=True)
    with contextlib.closing(var), var.gateway("raw_tlp:64") as gw:
        strided = memoryview(bytes(16))[::2]
        for bad_reqs, bad_data in ((memoryview(req)[::2], bytes(8)), (req, strided)):
            with pytest.raises(TypeError, match="C-contiguous"):
                build_completions(bad_reqs, bad_data, completer_id=CID)
            with pytest.raises(TypeError, match="C-contiguous"):
                gw.post_completions(bad_reqs, bad_data, completer_id=CID)
        with pytest.raises(TypeError):
            gw.post_completions(req, "not bytes", completer_id=CID)  # type: ignore[arg-type]
        assert gw.stats()["posted"] == 0


def test_records_the_gateway_cannot_take(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    with contextlib.closing(var):
        small = Tlp.mem_read(0x1000, 1).encode()
        big = Tlp.mem_read(0x1000, 16, last_be=0xF).encode()  # a 76-byte CplD
        with var.gateway("raw_tlp:64") as gw:
            with pytest.raises(InvalidArgumentError, match=r"request 2 has a 76-byte completion"):
                gw.post_completions(small * 2 + big, bytes(4 + 4 + 64), completer_id=CID)
            assert gw.stats()["posted"] == 0
        # A 4 KiB read at MPS 128: 32 completions; a 16-slot ring never holds them at once.
        whole = Tlp.mem_read(0x10000, 1024, last_be=0xF).encode()
        with var.gateway("raw_tlp:512", ring_slots=16) as gw:
            with pytest.raises(InvalidArgumentError, match=r"request 1 has 32 completions"):
                gw.post_completions(small + whole, bytes(4 + 4096), completer_id=CID,
                                    max_payload=128)
            assert gw.stats()["posted"] == 0
        with var.gateway("raw_tlp:64", direct=True) as gw, pytest.raises(
                InvalidArgumentError, match="direct mode"):
            gw.post_completions(small, bytes(4), completer_id=CID)
        gw = var.gateway("raw_tlp:64")
        gw.close()
        with pytest.raises(InvalidHandleError):
            gw.post_completions(small, bytes(4), completer_id=CID)


def test_a_timeout_never_splits_a_request(big_ctx: mlx5tlp.Context) -> None:
    # 256-byte reads at offset 0x20: MPS 128 / RCB 64 split each into 3 completions. A 16-slot
    # ring and timeout=0: the call ends where the ring is full, always between two requests.
    reqs = b"".join(Tlp.mem_read(0x4_0020 + 4096 * i, 64, tag=i & 0xFF, last_be=0xF).encode()
                    for i in range(600))
    data = bytes(256 * 600)
    ref = build_completions(reqs, data, completer_id=CID, max_payload=128)
    assert len(ref) == 1800
    var = big_ctx.alloc_var(tlp=True)
    with contextlib.closing(var), var.gateway("raw_tlp:512", ring_slots=16) as gw:
        total = 0
        for _ in range(20):
            res = gw.post_completions(reqs, data, completer_id=CID, max_payload=128, timeout=0)
            assert res.completions == ref.request_first[res.requests]
            total += res.completions
        assert gw.flush(30)
        assert gw.stats()["posted"] == gw.stats()["written"] == total


def test_requests_changed_by_another_thread(big_ctx: mlx5tlp.Context) -> None:
    # Another thread rewrites the request buffer while calls run: each call works on the
    # copy it took (a consistent plan), so it either posts what that copy asks for or refuses
    # it; no crash, no record out of place, posted == what the calls report.
    good = b"".join(Tlp.mem_read(0x1000 + 64 * (i % 60), 4, tag=i & 0xFF, last_be=0xF).encode()
                    for i in range(2000))
    reqs = bytearray(good)
    data = bytearray(16 * 2000)
    stop = threading.Event()

    def scribble() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            i = rng.randrange(len(reqs))
            reqs[i] = rng.randrange(256) if rng.random() < 0.5 else good[i]
            data[rng.randrange(len(data))] ^= 0xFF

    var = big_ctx.alloc_var(tlp=True)
    t = threading.Thread(target=scribble)
    with contextlib.closing(var), var.gateway("raw_tlp:64", ring_slots=64) as gw:
        t.start()
        posted = 0
        try:
            for _ in range(200):
                try:
                    res = gw.post_completions(reqs, data, completer_id=CID, skip_bad=True)
                except TlpError:
                    continue  # e.g. a rewritten Length: the data no longer matches
                posted += res.completions
        finally:
            stop.set()
            t.join()
        assert gw.flush(30)
        assert gw.stats()["posted"] == gw.stats()["written"] == posted
