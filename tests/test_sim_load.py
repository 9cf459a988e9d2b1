"""The native load generator (``Host.load``) against a function answered in Python.

The function here is the README tour's: ``sim.take_request`` + ``tlp.completions_for`` +
``gw.post``, in a thread (``Host.load`` releases the GIL). Each test that breaks the answers
breaks an exact number of them and asserts that exact number of errors of the right kind: a
lenient checker fails these tests. Rules checked, PCIe Base Specification (6.x numbering):
2.2.9 (Completion Rules: Byte Count, Lower Address, Completer ID, tag matching), 2.3.1.1 (Data
Return for Read Requests: Max_Payload_Size, splits on Read Completion Boundaries, address
order), 2.4.1 (ordering: a read must not pass an earlier posted write).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

import mlx5tlp
from mlx5tlp import sim, tlp
from mlx5tlp.gateway import Gateway
from mlx5tlp.sim import LoadOp, LoadRange

BASE = 0xE000_0000  # the function's BAR address
SIZE = 8192
CID = 0x0100  # the function's Completer ID

Mangle = Callable[[int, tlp.Tlp, list[tlp.Tlp]], list[tlp.Tlp]]


class PyFunction(threading.Thread):
    """A memory BAR answered per TLP in Python; ``mangle`` may break the nth read's answer."""

    def __init__(self, ctx: mlx5tlp.Context, gw: Gateway, mem: bytearray, *,
                 mangle: Mangle | None = None, max_payload: int = 128,
                 drop_writes: bool = False) -> None:
        super().__init__(daemon=True)
        self.ctx, self.gw, self.mem = ctx, gw, mem
        self.mangle, self.mps, self.drop_writes = mangle, max_payload, drop_writes
        self.stop = threading.Event()
        self.reads = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                busy = False
                for ch in range(sim.CHANNELS):
                    raw = sim.take_request(self.ctx, ch)
                    if raw is not None:
                        busy = True
                        self.answer(tlp.decode(raw))
                if not busy:
                    self.gw.flush(0.05)
        except BaseException as e:  # reported by the test
            self.failure = e

    def answer(self, req: tlp.Tlp) -> None:
        off = req.address - BASE
        if req.kind == "MWr":
            if not self.drop_writes:
                self.mem[off : off + len(req.data)] = req.data
            return
        cpls = tlp.completions_for(req, self.mem[off : off + req.length * 4], completer_id=CID,
                                   max_payload=self.mps, rcb=64)
        if self.mangle is not None:
            cpls = self.mangle(self.reads, req, cpls)
        self.reads += 1
        for c in cpls:
            self.gw.post(c.encode())


Runner = Callable[..., tuple[sim.LoadResult, PyFunction]]


@pytest.fixture
def bench(ctx: mlx5tlp.Context, device: str) -> Iterator[Runner]:
    """Runs a load against a fresh PyFunction; yields a runner(mangle=..., **load_kwargs)."""
    var = ctx.alloc_var(tlp=True)
    host = sim.Host(device)
    mem = bytearray((i * 7 + 3) & 0xFF for i in range(SIZE))
    threads: list[PyFunction] = []

    def run(mangle: Mangle | None = None, fn_mps: int = 128, drop_writes: bool = False,
            **kw: object) -> tuple[sim.LoadResult, PyFunction]:
        with var.gateway() as gw:
            fn = PyFunction(ctx, gw, mem, mangle=mangle, max_payload=fn_mps,
                            drop_writes=drop_writes)
            threads.append(fn)
            fn.start()
            try:
                args: dict[str, object] = {"window": 8, "count": 200, "completer_id": CID,
                                           "max_payload": 128, "timeout": 5.0}
                args.update(kw)
                res = host.load([LoadRange(BASE, bytes(mem))], **args)  # type: ignore[arg-type]
            finally:
                fn.stop.set()
                fn.join(10)
        assert fn.failure is None, fn.failure
        return res, fn

    yield run
    host.close()
    var.free()


MIX = (LoadOp("read", 4), LoadOp("read", 64), LoadOp("read", 256), LoadOp("read", 7, align=1),
       LoadOp("write", 64))


def test_clean_run_checks_everything(bench: Runner, device: str) -> None:
    res, fn = bench(ops=MIX, count=400)
    assert sim.device_stats(device)["requests_pending"] == 0  # no write left behind
    assert res.errors == 0, res.first_errors
    assert res.sent == 400 and res.reads + res.writes == 400 and res.writes > 0
    assert res.completed == res.reads
    # One flushing read per channel that carried writes (after its last one): the function
    # answered those too, so every write had reached it when load() returned.
    assert 1 <= res.flush_reads <= 8 and fn.reads == res.reads + res.flush_reads
    # 256-byte reads at MPS 128 come back in 2+ completions: more records than reads.
    assert res.completions > res.reads
    assert res.bytes_read > 0 and res.ok
    assert 0 < res.latency_us["min"] <= res.latency_us["p50"] <= res.latency_us["p99"]
    assert res.latency_us["p99"] <= res.latency_us["max"]
    assert res.cpu_s > 0 and res.achieved_rps > 0


def _every(n: int, change: Callable[[tlp.Tlp], tlp.Tlp]) -> tuple[Mangle, list[int]]:
    broken: list[int] = []

    def mangle(i: int, req: tlp.Tlp, cpls: list[tlp.Tlp]) -> list[tlp.Tlp]:
        if i % n != 3:
            return cpls
        broken.append(i)
        return [change(cpls[0]), *cpls[1:]]
    return mangle, broken


def test_wrong_data_is_reported_exactly(bench: Runner) -> None:
    def flip(c: tlp.Tlp) -> tlp.Tlp:
        lead = c.lower_address & 3
        d = bytearray(c.data)
        d[lead] ^= 0x40  # a byte the read asked for
        return replace(c, data=bytes(d))
    mangle, broken = _every(10, flip)
    res, _ = bench(mangle=mangle, ops=(LoadOp("read", 64),), count=200)
    assert len(broken) == 20
    assert res.errors_by_kind["data"] == 20 and res.errors == 20, res.first_errors
    assert res.completed == 180 and not res.ok
    assert "expected" in res.first_errors[0]


def test_wrong_byte_count(bench: Runner) -> None:
    mangle, broken = _every(25, lambda c: replace(c, byte_count=c.byte_count + 4))
    res, _ = bench(mangle=mangle, ops=(LoadOp("read", 64),), count=100)
    assert len(broken) == 4
    assert res.errors_by_kind["byte_count"] == 4 and res.errors == 4, res.first_errors


def test_wrong_lower_address(bench: Runner) -> None:
    mangle, _ = _every(25, lambda c: replace(c, lower_address=(c.lower_address + 4) & 0x7F))
    res, _ = bench(mangle=mangle, ops=(LoadOp("read", 64),), count=100)
    assert res.errors_by_kind["lower_address"] == 4 and res.errors == 4, res.first_errors


def test_wrong_tag_is_unexpected_and_the_read_times_out(
        bench: Runner) -> None:
    # window 8 uses tags 0..7: tag 200 matches nothing.
    mangle, broken = _every(50, lambda c: replace(c, tag=200))
    res, _ = bench(mangle=mangle, ops=(LoadOp("read", 64),), count=100, timeout=0.3)
    assert len(broken) == 2
    assert res.errors_by_kind["tag"] == 2 and res.errors_by_kind["timeout"] == 2, res.first_errors
    assert res.errors == 4 and res.completed == 98


def test_wrong_completer_id(bench: Runner) -> None:
    mangle, _ = _every(25, lambda c: replace(c, completer_id=0x0200))
    res, _ = bench(mangle=mangle, ops=(LoadOp("read", 64),), count=100)
    assert res.errors_by_kind["completer"] == 4 and res.errors == 4, res.first_errors
    # Unchecked when the caller does not say which Completer ID the function has.
    res, _ = bench(mangle=_every(25, lambda c: replace(c, completer_id=0x0200))[0],
                   ops=(LoadOp("read", 64),), count=100, completer_id=None)
    assert res.errors == 0


def test_unsuccessful_status(bench: Runner) -> None:
    def ur(i: int, req: tlp.Tlp, cpls: list[tlp.Tlp]) -> list[tlp.Tlp]:
        if i % 20 != 3:
            return cpls
        return tlp.completions_for(req, completer_id=CID, status=tlp.Status.UR)
    res, _ = bench(mangle=ur, ops=(LoadOp("read", 64),), count=100)
    assert res.errors_by_kind["status"] == 5 and res.errors == 5, res.first_errors
    assert res.completed == 95


def test_split_rules(bench: Runner) -> None:
    # The function answers with MPS 256 while the host programmed 128: every 192-byte read's
    # single 192-byte completion is too big (192 + 12 bytes still fit a 256-byte gateway slot).
    res, _ = bench(fn_mps=256, ops=(LoadOp("read", 192),), count=50)
    assert res.errors_by_kind["split"] == 50 and res.errors == 50, res.first_errors

    # Splitting off an RCB boundary: a 64-byte read starting at 32 answered as 8 + 56 bytes.
    def off_rcb(i: int, req: tlp.Tlp, cpls: list[tlp.Tlp]) -> list[tlp.Tlp]:
        (c,) = cpls
        first = replace(c, length=2, data=c.data[:8])
        second = replace(c, length=(len(c.data) - 8) // 4, data=c.data[8:],
                         byte_count=c.byte_count - 8, lower_address=(c.lower_address + 8) & 0x7F)
        return [first, second]
    res, _ = bench(mangle=off_rcb, ops=(LoadOp("read", 64, align=32),), count=40)
    assert res.errors_by_kind["split"] == 40 and res.errors == 40, res.first_errors


def test_writes_are_tracked(bench: Runner) -> None:
    # A small range written and read back: a function that drops the writes returns old data.
    ops = (LoadOp("read", 64), LoadOp("write", 64))
    res, _ = bench(ops=ops, count=300, drop_writes=True)
    assert res.writes > 50
    assert res.errors_by_kind["data"] > 0 and res.errors == res.errors_by_kind["data"]
    res, _ = bench(ops=ops, count=300)  # the same job, writes applied: clean
    assert res.errors == 0, res.first_errors


def test_rate_and_duration(bench: Runner) -> None:
    # Open loop at 2000 requests/s for 0.1 s: request i is due at i / 2000 s, and `duration`
    # bounds the schedule, so exactly the 200 requests due before 0.1 s are sent, spread over it.
    res, _ = bench(ops=(LoadOp("read", 4),), count=None, duration=0.1, rate=2000.0, window=64)
    assert res.errors == 0, res.first_errors
    assert res.sent == 200 and res.completed == 200
    assert res.elapsed_s >= 0.0995


def test_open_loop_does_not_hide_a_slow_function(
        bench: Runner) -> None:
    # A function that takes >= 5 ms per read, window 1, offered 2000 reads/s for 20 ms: 40 reads
    # are due within 20 ms but take >= 200 ms. The sends fall behind their schedule ("late"),
    # and latency from the scheduled time includes the queueing that per-send latency hides
    # (coordinated omission).
    def slow(i: int, req: tlp.Tlp, cpls: list[tlp.Tlp]) -> list[tlp.Tlp]:
        time.sleep(0.005)
        return cpls
    res, _ = bench(mangle=slow, ops=(LoadOp("read", 4),), count=None, duration=0.02,
                   rate=2000.0, window=1)
    assert res.errors == 0 and res.sent == 40 and res.completed == 40, res.first_errors
    assert res.elapsed_s >= 0.2
    assert res.late >= 30
    assert res.latency_us["p50"] >= 5000
    # The median read waited for ~20 earlier ones: ~100 ms after its due time.
    assert res.sched_latency_us["p50"] >= max(50_000, 8 * res.latency_us["p50"])


def test_argument_errors(device: str) -> None:
    with sim.Host(device) as host:
        r = [LoadRange(BASE, bytes(4096))]
        with pytest.raises(ValueError, match="count, duration"):
            host.load(r)
        with pytest.raises(ValueError, match="window"):
            host.load(r, window=0, count=1)
        with pytest.raises(ValueError, match="kind"):
            host.load(r, [LoadOp("erase", 4)], count=1)
        with pytest.raises(TypeError, match="bytes-like"):
            host.load([LoadRange(BASE, "abc")], count=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="rate"):
            host.load(r, count=1, rate=float("nan"))
        for rate in (1e-300, 5e-7, -1.0, float("inf")):  # a period beyond 64-bit nanoseconds
            with pytest.raises(ValueError, match="rate must be 0 or a finite number"):
                host.load(r, count=1, rate=rate)
        with pytest.raises(TypeError, match="sequences"):
            host.load(r[0], count=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="sequences"):
            host.load(r, LoadOp("read", 4), count=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            host.load(r, count=1, timeout=1e300)
        with pytest.raises(TypeError, match="count"):
            host.load(r, count=True)
        with pytest.raises(ValueError, match="ops"):
            host.load(r, [], count=1)
        # The C++ side's own rules, with the reason: an op that fits no range, odd writes.
        with pytest.raises(mlx5tlp.Error, match="does not fit range 0") as e:
            host.load([LoadRange(BASE, bytes(64))], [LoadOp("read", 128)], count=1)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(mlx5tlp.Error, match="whole DWs"):
            host.load(r, [LoadOp("write", 6)], count=1)
        with pytest.raises(mlx5tlp.Error, match="max_payload"):
            host.load(r, count=1, max_payload=200)
        # Requests of its own outstanding: the generator would not know their completions.
        assert host.send_request(tlp.Tlp.mem_read(BASE, 1, tag=1).encode())
        with pytest.raises(mlx5tlp.Error, match="outstanding") as e:
            host.load(r, count=1)
        assert e.value.errno == errno.EBUSY
    with pytest.raises(mlx5tlp.InvalidHandleError):
        host.load(r, count=1)


def test_close_is_refused_while_a_load_runs(device: str) -> None:
    # Nobody serves: the reads time out after 0.3 s, the run lasts about 0.5 s. Meanwhile the
    # host's memory is in use without the GIL, so close() must refuse instead of freeing it.
    host = sim.Host(device)
    out: list[sim.LoadResult] = []
    t = threading.Thread(target=lambda: out.append(host.load(
        [LoadRange(BASE, bytes(4096))], count=None, duration=0.2, rate=200.0, window=64,
        timeout=0.3)))
    t.start()
    deadline = time.monotonic() + 10
    while sim.device_stats(device)["requests_pending"] == 0:  # the run has started
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.001)
    with pytest.raises(mlx5tlp.Error, match="still running") as e:
        host.close()
    assert e.value.errno == errno.EBUSY
    t.join(30)
    (res,) = out
    assert res.sent == 40 and res.errors_by_kind["timeout"] == 40 and res.completed == 0
    host.close()
    with pytest.raises(mlx5tlp.InvalidHandleError):
        host.load([LoadRange(BASE, bytes(4096))], count=1)
