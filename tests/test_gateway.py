"""The TLP response gateway from Python, checked by the device model (sim.Host) in this process.

Loop mode (post/post_batch/flush/close) with threads and with many processes each on its own
page, direct mode, back-pressure and lost-record accounting, one committer per page (also
across processes), fork safety, ownership rules and the provisional raw_tlp layout.
"""

from __future__ import annotations

import array
import errno
import itertools
import mmap
import multiprocessing as mp
import os
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import sim, tlp

REC = struct.Struct("<IIQ")  # tag (producer / pid), sequence, checksum; then pattern bytes
_big_names = itertools.count()


def record(tag: int, seq: int, size: int = 40) -> bytes:
    body = bytes((tag * 31 + seq * 7 + i) & 0xFF for i in range(size - REC.size))
    return REC.pack(tag, seq, (tag << 40) ^ (seq * 0x9E3779B1) ^ len(body)) + body


def parse(data: bytes) -> tuple[int, int]:
    """(tag, seq) of a record made by record(); asserts it is whole (no tear)."""
    tag, seq, check = REC.unpack_from(data)
    body = data[REC.size :]
    assert check == (tag << 40) ^ (seq * 0x9E3779B1) ^ len(body), "torn record header"
    assert body == bytes((tag * 31 + seq * 7 + i) & 0xFF for i in range(len(body))), "torn body"
    return tag, seq


def collect(host: sim.Host, n: int, timeout: float = 20.0) -> list[sim.Completion]:
    """Exactly the next n completion records (fails if they do not all arrive in time)."""
    out: list[sim.Completion] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += host.completion_records(timeout=0.05, max_records=n - len(out))
    assert len(out) == n, f"collected {len(out)} of {n} records"
    return out


def wait_until(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture
def big_device() -> Iterator[str]:
    """A fresh device with 64 KiB gateway pages of 64-byte slots (1022 records in flight)."""
    name = f"gwbig{os.getpid()}_{next(_big_names)}"
    sim.create_device(name, gw_pages=8, gw_log_stride=4, slot_size=64)
    yield name
    sim.remove_device(name)


@pytest.fixture
def host(device: str) -> Iterator[sim.Host]:
    with sim.Host(device) as h:
        yield h


# ------------------------------------------------------------------ basics


def test_post_flush_close(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    var = ctx.alloc_var(tlp=True)
    recs = [record(1, i, 16 + 8 * (i % 5)) for i in range(10)]
    with var.gateway() as gw:
        assert gw.layout == "sim" and not gw.direct and not gw.closed
        assert gw.max_record == 256 - 8
        assert gw.var is var
        assert "loop" in repr(gw)
        for r in recs:
            assert gw.post(r) is True
        assert gw.post(memoryview(bytearray(recs[0])), timeout=1.0)  # any contiguous buffer
        assert gw.flush(5.0) is True
        st = gw.stats()
        assert st["posted"] == st["written"] == 11
        assert st["lost"] == 0 and 1 <= st["batches"] <= 11 and st["max_batch"] <= 64
        assert set(st) == {"posted", "written", "batches", "max_batch", "full_waits",
                           "credit_waits", "lost", "producer_sleeps", "writer_parks"}
    assert gw.closed
    got = collect(host, 11)
    assert [c.page_id for c in got] == [var.page_id] * 11
    assert [c.sequence for c in got] == list(range(11))
    assert [c.tlp for c in got] == [*recs, recs[0]]
    hs = host.stats()
    assert hs["completions"] == 11 and hs["bad_records"] == 0
    # Use after close.
    for call in (lambda: gw.post(recs[0]), lambda: gw.post_batch(recs), lambda: gw.flush(0)):
        with pytest.raises(mlx5tlp.InvalidHandleError):
            call()
    gw.close()  # idempotent
    var.free()


def _mrd(tag: int, length: int, address: int) -> tlp.Tlp:
    return tlp.Tlp.mem_read(address, length, requester_id=0x0200 + tag, tag=tag)


def _check_completions(host: sim.Host, reqs: list[tlp.Tlp], data: list[bytes], page: int) -> None:
    """Every request answered in order, with the right ids, byte counts and data."""
    expected = sum(len(tlp.completions_for(r, d, completer_id=0x0100, max_payload=128))
                   for r, d in zip(reqs, data, strict=True))
    got = collect(host, expected)
    assert all(c.page_id == page for c in got)
    by_tag: dict[int, list[tlp.Tlp]] = {}
    for c in got:
        t = tlp.decode(c.tlp)
        assert t.kind == "CplD" and t.completer_id == 0x0100 and t.status == 0
        by_tag.setdefault(t.tag, []).append(t)
    for r, d in zip(reqs, data, strict=True):
        parts = by_tag[r.tag]
        assert all(p.requester_id == r.requester_id for p in parts)
        assert parts[0].byte_count == r.length * 4
        remaining = r.length * 4
        for p in parts:
            assert p.byte_count == remaining
            remaining -= len(p.data)
        assert remaining == 0
        assert b"".join(p.data for p in parts) == d


def test_post_batch_list_and_bulk(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    var = ctx.alloc_var(tlp=True)
    reqs = [_mrd(tag, length, 0x10000 + 0x400 * tag) for tag, length in
            enumerate([1, 40, 16, 64, 32, 2, 3, 8])]
    data = [bytes((r.tag * 13 + i) & 0xFF for i in range(r.length * 4)) for r in reqs]
    with var.gateway() as gw:
        # 1) a list of encoded completions (completions_for, one request at a time)
        first, second = reqs[:4], reqs[4:]
        for r in reqs:
            assert host.send_request(r.encode())
        records = [c.encode() for r, d in zip(first, data[:4], strict=True)
                   for c in tlp.completions_for(r, d, completer_id=0x0100, max_payload=128)]
        assert len(records) > len(first)  # some requests need several completions
        assert gw.post_batch(records) == len(records)
        assert gw.flush(5.0)
        _check_completions(host, first, data[:4], var.page_id)
        # 2) the bulk format straight from build_completions (buffer + n+1 offsets)
        bulk = tlp.build_completions(second, b"".join(data[4:]), completer_id=0x0100,
                                     max_payload=128)
        assert bulk.errors == bytes(len(second))
        assert gw.post_batch(bulk) == len(bulk)
        # 3) and an explicit Records of it, for an empty tail check
        assert gw.post_batch(mlx5tlp.Records(bulk.buffer, bulk.offsets[:1])) == 0
        assert gw.flush(5.0)
        _check_completions(host, second, data[4:], var.page_id)
        st = gw.stats()
        assert st["posted"] == st["written"] == len(records) + len(bulk)
    hs = host.stats()
    assert hs["retired"] == len(reqs) and hs["outstanding"] == 0
    assert hs["errors"] == 0 and hs["unexpected"] == 0 and hs["bad_records"] == 0, hs
    for _ in reqs:
        assert sim.take_request(ctx, 0) is not None
    var.free()


def test_argument_errors(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    virtio = ctx.alloc_var(tlp=False)
    with pytest.raises(mlx5tlp.InvalidArgumentError):
        virtio.gateway()
    with pytest.raises(mlx5tlp.InvalidArgumentError):
        var.gateway("nope")
    with pytest.raises(mlx5tlp.InvalidArgumentError):
        var.gateway("raw_tlp:100")  # not a multiple of 64
    with pytest.raises(ValueError):
        var.gateway(ring_slots=3)
    with pytest.raises(ValueError):
        var.gateway(batch_max=0)
    with pytest.raises(TypeError):
        var.gateway(7)  # type: ignore[arg-type]
    with var.gateway(ring_slots=64) as gw:
        for bad in (b"", bytes(gw.max_record + 1)):
            with pytest.raises(mlx5tlp.InvalidArgumentError):
                gw.post(bad)
            with pytest.raises(mlx5tlp.InvalidArgumentError):
                gw.post_batch([record(0, 0), bad])
        assert gw.stats()["posted"] == 0  # a refused batch queues nothing
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            gw.write(record(0, 0))  # direct-mode call on a loop gateway
        with pytest.raises(ValueError):
            gw.post(record(0, 0), timeout=-1)
        with pytest.raises(ValueError):
            gw.post_batch(mlx5tlp.Records(b"abcd", array.array("I", [0, 9])))  # beyond the buffer
        with pytest.raises(TypeError, match="offsets"):
            mlx5tlp.Records(b"abcd", array.array("H", [0, 4]))  # offsets must be uint32
    var.free()
    virtio.free()


def test_direct_mode(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    var = ctx.alloc_var(tlp=True)
    with var.gateway(direct=True, batch_max=4) as gw:
        assert gw.direct and "direct" in repr(gw)
        recs = [record(2, i) for i in range(30)]
        for r in recs[:10]:
            assert gw.write(r, timeout=1.0)
        got = collect(host, 10)
        # 20 records, more than the page's 15 slots: write_batch waits for the host's credits,
        # so collect from another thread while it writes.
        collected: list[sim.Completion] = []
        t = threading.Thread(target=lambda: collected.extend(collect(host, 20)))
        t.start()
        assert gw.write_batch(recs[10:], timeout=10.0) == 20
        t.join()
        got += collected
        assert [c.tlp for c in got] == recs
        assert [c.sequence for c in got] == list(range(30))
        assert gw.flush(0) is True
        st = gw.stats()
        assert st["posted"] == st["written"] == 30 and st["max_batch"] <= 4
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            gw.post(recs[0])
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            gw.post_batch(recs)
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            gw.write(b"")
    assert host.stats()["bad_records"] == 0
    var.free()


def test_direct_write_whole_never_splits_a_group(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    # Every completion of one request under one doorbell, or none: a mark names one doorbell
    # count, so a request split across two doorbells by a crash would be half published and
    # answered again in full by the successor (a duplicate first completion).
    var = ctx.alloc_var(tlp=True)
    with var.gateway(direct=True) as gw:
        recs = [record(2, i) for i in range(16)]
        assert gw.write_batch(recs[:14], timeout=1.0) == 14  # 1 of the page's 15 slots left
        assert gw.write_batch(recs[14:16], timeout=0.05, whole=True) == 0  # 2 do not fit
        assert gw.stats()["written"] == 14
        got = collect(host, 14)
        assert gw.write_batch(recs[14:16], timeout=1.0, whole=True) == 2
        got += collect(host, 2)
        assert [c.tlp for c in got] == recs
        # Without `whole`, the batch is cut at the credits: 1 now, the other after the host.
        assert gw.write_batch(recs[:14], timeout=1.0) == 14
        assert gw.write_batch(recs[14:16], timeout=0.05) == 1
        assert len(collect(host, 15)) == 15
    var.free()


# ------------------------------------------------------------------ concurrency


def test_many_threads(big_device: str) -> None:
    threads_n, per = 4, 2500
    with mlx5tlp.open_device(big_device, backend="sim") as c, sim.Host(big_device) as h:
        var = c.alloc_var(tlp=True)
        gw = var.gateway(ring_slots=256, batch_max=32)
        assert gw.max_record == 56
        errors: list[BaseException] = []

        def produce(k: int) -> None:
            try:
                if k % 2:
                    for s in range(0, per, 10):  # batches
                        batch = [record(k, s + i, 16 + 8 * ((s + i) % 5)) for i in range(10)]
                        assert gw.post_batch(batch, timeout=10.0) == 10
                else:
                    for s in range(per):
                        assert gw.post(record(k, s, 16 + 8 * (s % 5)), timeout=10.0)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        ts = [threading.Thread(target=produce, args=(k,)) for k in range(threads_n)]
        for t in ts:
            t.start()
        got = collect(h, threads_n * per, timeout=60.0)  # the host consumes meanwhile
        for t in ts:
            t.join()
        assert not errors, errors
        assert gw.flush(5.0)
        st = gw.stats()
        assert st["posted"] == st["written"] == threads_n * per and st["lost"] == 0
        gw.close()
        assert [g.sequence for g in got] == list(range(threads_n * per))
        assert {g.page_id for g in got} == {var.page_id}
        nxt = [0] * threads_n
        for g in got:
            k, s = parse(g.tlp)
            assert s == nxt[k], f"producer {k}: record {s} after {nxt[k] - 1}"
            nxt[k] = s + 1
        assert nxt == [per] * threads_n
        assert h.stats()["bad_records"] == 0
        assert h.completion_records(timeout=0.05) == []  # nothing duplicated
        var.free()


def _child_post(device: str, n: int, done: Any, release: Any) -> None:
    """A spawned process: its own context, VAR page and gateway; n records tagged with its pid."""
    pid = os.getpid()
    with mlx5tlp.open_device(device, backend="sim") as c:
        var = c.alloc_var(tlp=True)
        with var.gateway(ring_slots=128) as gw:
            for s in range(0, n, 50):
                if s % 100:
                    batch = [record(pid, s + i, 24) for i in range(50)]
                    assert gw.post_batch(batch, timeout=30) == 50
                else:
                    for i in range(50):
                        assert gw.post(record(pid, s + i, 32), timeout=30)
            assert gw.flush(30)
            st = gw.stats()
            assert st["posted"] == st["written"] == n
        done.put((pid, var.page_id))
        # Keep the page until the host has read it (a freed page is reset on reallocation).
        assert release.wait(60)
        var.free()


def test_many_processes(big_device: str) -> None:
    procs_n, per = 6, 2000
    spawn = mp.get_context("spawn")
    done = spawn.Queue()
    release = spawn.Event()
    with sim.Host(big_device) as h:
        procs = [spawn.Process(target=_child_post, args=(big_device, per, done, release))
                 for _ in range(procs_n)]
        for p in procs:
            p.start()
        try:
            got = collect(h, procs_n * per, timeout=60.0)
        finally:
            release.set()
            for p in procs:
                p.join(60)
        assert [p.exitcode for p in procs] == [0] * procs_n
        pages = dict(done.get(timeout=5) for _ in range(procs_n))
        assert sorted(pages) == sorted(p.pid for p in procs)
        assert len(set(pages.values())) == procs_n  # one page each
        per_page: dict[int, list[sim.Completion]] = {}
        for g in got:
            per_page.setdefault(g.page_id, []).append(g)
        assert sorted(per_page) == sorted(pages.values())
        for pid, page in pages.items():
            recs = per_page[page]
            assert [r.sequence for r in recs] == list(range(per))
            assert [parse(r.tlp) for r in recs] == [(pid, s) for s in range(per)]
        assert h.stats()["bad_records"] == 0
        assert h.completion_records(timeout=0.05) == []
    done.close()
    done.join_thread()


# ------------------------------------------------------------------ fork


def _fork(child: Any) -> int:
    """Runs child() in a forked process; returns its exit code (child() returns the code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            code = child()
        except BaseException:
            import traceback

            traceback.print_exc()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_fork_child_cannot_use_parents_gateway(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    var = ctx.alloc_var(tlp=True)
    other = ctx.alloc_var(tlp=True)
    gw = var.gateway()
    assert gw.post(record(7, 0)) and gw.flush(5)  # the writer thread is running

    def child() -> int:
        for call in (lambda: gw.post(record(8, 0)), lambda: gw.post_batch([record(8, 0)]),
                     lambda: gw.flush(1)):
            try:
                call()
                return 10
            except mlx5tlp.InvalidHandleError:
                pass
        # The parent still holds the page: a gateway on it from this process is refused.
        try:
            var.gateway().close()
            return 11
        except mlx5tlp.Error as e:
            if e.errno != errno.EBUSY:
                return 12
        # Its own gateway on another page works.
        with other.gateway() as mine:
            for s in range(10):  # fits the page: the host polls only after the child exits
                if not mine.post(record(8, s)):
                    return 13
            if not mine.flush(10):
                return 14
        gw.close()  # closing the parent's gateway here must not hang or touch the parent's
        return 0

    assert _fork(child) == 0
    # The parent's gateway keeps working; the child's records arrived on the other page.
    for s in range(1, 11):
        assert gw.post(record(7, s))
    assert gw.flush(5)
    got = collect(host, 21)
    mine = [parse(g.tlp) for g in got if g.page_id == var.page_id]
    theirs = [parse(g.tlp) for g in got if g.page_id == other.page_id]
    assert mine == [(7, s) for s in range(11)]
    assert theirs == [(8, s) for s in range(10)]
    with pytest.raises(mlx5tlp.Error) as ei:
        var.gateway()  # still ours after the child exited
    assert ei.value.errno == errno.EBUSY
    gw.close()
    assert gw.stats()["written"] == 11
    with other.gateway():  # the child's gateway released the other page when it closed
        pass
    var.free()
    other.free()
    assert host.stats()["bad_records"] == 0


# ------------------------------------------------------------------ back-pressure and lost


def test_back_pressure(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    var = ctx.alloc_var(tlp=True)
    gw = var.gateway(ring_slots=16, drain_timeout=1.0)
    accepted = 0
    for i in range(1000):  # nobody polls: the page (15 slots) and then the ring (16) fill up
        if not gw.post(record(3, i), timeout=0):
            break
        accepted += 1
    assert 16 <= accepted <= 15 + 16
    assert wait_until(lambda: gw.stats()["written"] == 15)
    while gw.post(record(3, accepted), timeout=0):  # the writer moved some into the page
        accepted += 1
    assert accepted == 31
    t0 = time.monotonic()
    assert gw.post(record(3, accepted), timeout=0.05) is False
    assert time.monotonic() - t0 >= 0.04
    assert gw.post_batch([record(3, accepted)] * 3, timeout=0) == 0
    assert gw.flush(0.02) is False
    st = gw.stats()
    assert st["posted"] == 31 and st["written"] == 15
    # Four calls found the ring full: two post(timeout=0), one post(timeout=0.05), one batch.
    assert st["full_waits"] == 4
    assert st["credit_waits"] > 0
    # The host consumes: room comes back, in the page and then in the ring.
    got = host.completion_records(max_records=5)
    assert len(got) == 5
    assert gw.post(record(3, accepted), timeout=5.0)
    accepted += 1
    got += collect(host, accepted - 5)
    assert [parse(g.tlp) for g in got] == [(3, s) for s in range(accepted)]
    assert gw.flush(5.0)
    gw.close()
    var.free()


def test_close_reports_lost_records(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    var = ctx.alloc_var(tlp=True)
    gw = var.gateway(ring_slots=16, drain_timeout=0.2)
    n = 0
    while gw.post(record(4, n), timeout=0.01):
        n += 1
    t0 = time.monotonic()
    with pytest.raises(mlx5tlp.ResourceExhaustedError) as ei:
        gw.close()  # the host never polls
    assert time.monotonic() - t0 >= 0.15
    assert ei.value.errno == errno.ETIMEDOUT
    st = gw.stats()
    assert st["lost"] > 0 and st["written"] == 15
    assert st["posted"] == n == st["written"] + st["lost"]
    assert gw.closed
    gw.close()  # already closed: no second report
    with pytest.raises(mlx5tlp.InvalidHandleError):
        gw.post(record(4, 0))
    # The page was released: the written records are still there for the host, in order.
    got = collect(host, 15)
    assert [parse(g.tlp) for g in got] == [(4, s) for s in range(15)]
    var.free()


# ------------------------------------------------------------------ ownership


def test_one_gateway_per_page(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    gw = var.gateway()
    for kwargs in ({}, {"direct": True}, {"layout": "raw_tlp"}):
        with pytest.raises(mlx5tlp.Error) as ei:
            var.gateway(**kwargs)  # type: ignore[arg-type]
        assert ei.value.errno == errno.EBUSY
    other = ctx.alloc_var(tlp=True)
    other.gateway().close()  # other pages are independent
    gw.close()
    var.gateway().close()  # free again after close
    var.free()
    other.free()


def _try_gateway_on(sock: Any, result: Any) -> None:
    """A spawned process: receives the parent's context and VAR (SCM_RIGHTS), tries a gateway."""
    from mlx5tlp import share

    c, objs = share.recv(sock, backend="sim", timeout=30)
    sock.close()
    with c:
        try:
            objs[0].gateway().close()
            result.put("opened")
        except mlx5tlp.Error as e:
            result.put(f"{type(e).__name__} {e.errno}")


def test_second_gateway_from_another_process(ctx: mlx5tlp.Context) -> None:
    from mlx5tlp import share

    var = ctx.alloc_var(tlp=True)
    with var.gateway():
        # A forked child (shares the context) and a spawned process (imports the context's
        # command fd and the VAR) both find the page taken.
        def child() -> int:
            try:
                var.gateway().close()
                return 1
            except mlx5tlp.Error as e:
                return 0 if e.errno == errno.EBUSY else 2

        assert _fork(child) == 0
        spawn = mp.get_context("spawn")
        result = spawn.Queue()
        mine, theirs = share.socketpair()
        with mine, theirs:
            p = spawn.Process(target=_try_gateway_on, args=(theirs, result))
            p.start()
            share.send(mine, ctx, var)
            outcome = result.get(timeout=30)
            p.join(30)
        result.close()
        result.join_thread()
        assert p.exitcode == 0
        assert outcome == f"Error {errno.EBUSY}"
    # Released: another process may take it now.
    assert _fork(lambda: (var.gateway().close(), 0)[1]) == 0
    var.free()


def test_free_and_context_close_with_open_gateway(device: str) -> None:
    c = mlx5tlp.open_device(device, backend="sim")
    var = c.alloc_var(tlp=True)
    gw = var.gateway()
    with pytest.raises(mlx5tlp.InvalidArgumentError) as ei:
        var.free()
    assert ei.value.errno == errno.EBUSY
    assert not var.closed
    gw.close()
    var.free()  # fine once the gateway is closed
    var2 = c.alloc_var(tlp=True)
    gw2 = var2.gateway()
    assert gw2.post(record(5, 0))
    c.close()  # closes the gateway first (drains), then frees the VAR: no error
    assert gw2.closed and var2.closed and c.closed
    assert gw2.stats()["written"] == 1
    with pytest.raises(mlx5tlp.InvalidHandleError):
        gw2.post(record(5, 1))
    assert sim.device_stats(device)["tlp_vars"] == 0


# ------------------------------------------------------------------ raw_tlp layout


def test_raw_tlp_layout_wire_order(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    page = var.mmap(mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        page[:] = b"\xee" * len(page)
        req = tlp.Tlp.mem_read(0x2000, 3, requester_id=0x0300, tag=0x15)
        cpls = [c.encode() for c in tlp.completions_for(req, bytes(range(12)), completer_id=0x0100)]
        cpls.append(tlp.Tlp.completion(completer_id=0x0100, requester_id=0x0300, tag=0x16,
                                       status=tlp.Status.UR).encode())  # 12 bytes: ends mid-word
        cpls.append(bytes(range(1, 25)))  # any bytes: the layout copies them as they are
        with var.gateway("raw_tlp") as gw:
            assert gw.layout == "raw_tlp" and gw.max_record == 512
            assert gw.post_batch(cpls) == len(cpls)
            assert gw.flush(5.0)
            st = gw.stats()
            assert st["written"] == st["batches"] == len(cpls)  # one fence per record
        for k, c in enumerate(cpls):
            slot = k * 512
            assert page[slot : slot + len(c)] == c, f"slot {k}"
            padded = (len(c) + 63) // 64 * 64  # whole 64-byte chunks, zero-padded
            assert page[slot + len(c) : slot + padded] == bytes(padded - len(c))
            assert page[slot + padded] == 0xEE  # nothing past the record's last chunk
        assert tlp.decode(page[0 : len(cpls[0])]).tag == 0x15
        assert page[len(cpls) * 512] == 0xEE
        # Direct mode, 64-byte slots: the 65th record wraps around to slot 0.
        with var.gateway("raw_tlp:64", direct=True) as gw:
            assert gw.max_record == 64
            for k in range(65):
                assert gw.write(struct.pack(">QQ", 0x4A000001, k))
        assert struct.unpack_from(">QQ", page, 0) == (0x4A000001, 64)
        assert struct.unpack_from(">QQ", page, 64) == (0x4A000001, 1)
        assert struct.unpack_from(">QQ", page, 63 * 64) == (0x4A000001, 63)
    finally:
        page.close()
    var.free()
