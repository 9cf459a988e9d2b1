"""Request claims across real processes: claim -> mark -> answer -> retire survives SIGKILL.

A worker (a separate interpreter sharing the test's context fd, as a standby does) answers one
request up to a given step and is SIGKILLed there; the test process is the successor. Whatever
the step, every request is answered exactly once: the device model checks each completion
against its request (a second answer is "unexpected", a missing one stays "outstanding").
"""

from __future__ import annotations

import errno
import inspect
import mmap
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

import mlx5tlp
from mlx5tlp import sim

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mlx5tlp.__file__)))
DOORBELL, SLOT_COUNT, SLOTS, SLOT = 0x00, 0x10, 0x80, 256


def cfgrd0(rid: int, tag: int) -> bytes:
    return struct.pack(">BBHHBBHH", 0x04, 0, 1, rid, tag, 0x0F, 0x0100, 0x10)


def cpld_for(req: bytes) -> bytes:
    # CplD: byte count 4, lower address 0, the request's requester id and tag, 1 DW of data.
    return struct.pack(">BBHHHBBBB", 0x4A, 0, 1, 0x0100, 4, req[4], req[5], req[6], 0) + bytes(4)


def write_answer(page: mmap.mmap, req: bytes) -> int:
    """Write the completion for `req` into the next slot and ring the doorbell; its count."""
    produced = struct.unpack_from("<Q", page, DOORBELL)[0]
    count = struct.unpack_from("<I", page, SLOT_COUNT)[0]
    rec = cpld_for(req)
    slot = SLOTS + (produced % count) * SLOT
    page[slot : slot + 8 + len(rec)] = struct.pack("<II", len(rec), 0) + rec
    struct.pack_into("<Q", page, DOORBELL, produced + 1)
    return int(produced + 1)


WORKER = """
import mmap, signal, struct, sys
sys.path.insert(0, {python_dir!r})
import mlx5tlp
from mlx5tlp import sim
DOORBELL, SLOT_COUNT, SLOTS, SLOT = {layout}
{helpers}
fd, off, length, page_id, steps = (int(x) for x in sys.argv[1:6])
ctx = mlx5tlp.Context.import_fd(fd)  # the same context: a standby's view
page = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
claim = None
while claim is None:
    claim = sim.claim_request(ctx, 0)
if steps >= 2:
    sim.mark_answered(ctx, claim, page_id, struct.unpack_from("<Q", page, DOORBELL)[0] + 1)
if steps >= 3:
    write_answer(page, claim.tlp)
if steps >= 4:
    sim.retire_request(ctx, claim)
sys.stdout.write("at step\\n")
sys.stdout.flush()
signal.pause()
"""


@pytest.fixture
def rig(ctx: mlx5tlp.Context, device: str):  # type: ignore[no-untyped-def]
    var = ctx.alloc_var(tlp=True)
    page = mmap.mmap(ctx.cmd_fd, var.length, mmap.MAP_SHARED,
                     mmap.PROT_READ | mmap.PROT_WRITE, offset=var.mmap_off)
    with sim.Host(device) as host:
        yield ctx, var, page, host
    page.close()


def run_worker(ctx: mlx5tlp.Context, var: mlx5tlp.Var, steps: int) -> None:
    """A worker process answers one request up to `steps`, then is SIGKILLed."""
    helpers = "\n".join(
        textwrap.dedent(inspect.getsource(fn)) for fn in (cpld_for, write_answer)
    )
    code = WORKER.format(python_dir=PYTHON_DIR, layout=(DOORBELL, SLOT_COUNT, SLOTS, SLOT),
                         helpers=helpers)
    args = [str(ctx.cmd_fd), str(var.mmap_off), str(var.length), str(var.page_id), str(steps)]
    with subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                          pass_fds=(ctx.cmd_fd,)) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "at step\n"
        finally:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(60) == -signal.SIGKILL


@pytest.mark.parametrize("steps", [1, 2, 3, 4], ids=["claimed", "marked", "published", "retired"])
def test_killed_claimer_loses_and_duplicates_nothing(rig, steps: int) -> None:  # type: ignore[no-untyped-def]
    ctx, var, page, host = rig
    req = cfgrd0(0x0200, steps)
    assert host.send_request(req)
    run_worker(ctx, var, steps)
    # The successor takes every dead claim first, then answers by the flags.
    got = sim.recover_requests(ctx)
    if steps == 4:
        assert got == []  # retired before the kill: nothing to redo
    else:
        assert len(got) == 1
        claim = got[0]
        assert claim.tlp == req and claim.redelivered
        assert claim.marked == (steps >= 2)
        assert claim.published == (steps >= 3)
        if steps >= 2:
            assert claim.page_id == var.page_id
        if not claim.published:
            sim.mark_answered(ctx, claim, var.page_id, struct.unpack_from("<Q", page, 0)[0] + 1)
            write_answer(page, claim.tlp)
        sim.retire_request(ctx, claim)
    assert sim.claim_request(ctx) is None
    assert len(host.completions(timeout=5.0)) == 1
    st = host.stats()
    assert (st["retired"], st["unexpected"], st["errors"], st["outstanding"]) == (1, 0, 0, 0)
    assert sim.device_stats(ctx.name)["requests_claimed"] == 0


def test_claim_api_errors(ctx: mlx5tlp.Context, device: str) -> None:
    with sim.Host(device) as host:
        host.send_request(cfgrd0(1, 1))
        host.send_request(cfgrd0(1, 2))
        a = sim.claim_request(ctx)
        b = sim.claim_request(ctx)
        assert a is not None and b is not None
        assert (a.tlp[6], b.tlp[6], b.claim) == (1, 2, a.claim + 1)
        assert not (a.redelivered or a.marked or a.published)
        st = sim.device_stats(device)
        assert (st["requests_pending"], st["requests_claimed"]) == (0, 2)
        with pytest.raises(mlx5tlp.Error) as exc:
            sim.mark_answered(ctx, a, 14, 1)  # no gateway page 14 on this device
        assert exc.value.errno == errno.EINVAL
        sim.retire_request(ctx, a)
        with pytest.raises(mlx5tlp.Error) as exc:
            sim.retire_request(ctx, a)
        assert exc.value.errno == errno.ESTALE
        sim.retire_request(ctx, b)
        with pytest.raises(ValueError):
            sim.claim_request(ctx, 8)
    # A new host epoch: queued and claimed requests of the previous host are discarded.
    with sim.Host(device) as host:
        host.send_request(cfgrd0(1, 3))
        host.send_request(cfgrd0(1, 4))
        c = sim.claim_request(ctx)
        assert c is not None
    with sim.Host(device) as host:
        assert host.stats()["stale_requests"] == 2
        with pytest.raises(mlx5tlp.Error) as exc:
            sim.retire_request(ctx, c)
        assert exc.value.errno == errno.ESTALE
        assert sim.claim_request(ctx) is None
    assert sim.device_stats(device)["stale_requests"] >= 2


CLAIM_ALL = """
import signal, sys
sys.path.insert(0, {python_dir!r})
import mlx5tlp
from mlx5tlp import sim
ctx = mlx5tlp.Context.import_fd(int(sys.argv[1]))
got = 0
while got < int(sys.argv[2]):
    if sim.claim_request(ctx, 0) is not None:
        got += 1
sys.stdout.write("claimed\\n")
sys.stdout.flush()
signal.pause()
"""


def test_dead_claims_are_redelivered_oldest_first_across_the_ring_wrap(
        ctx: mlx5tlp.Context, device: str) -> None:
    # A successor must answer what a dead claimer left in the order the host sent it: a
    # redelivered configuration read answered after a later write would see that write (and
    # two writes to one register re-applied out of order leave the older value: the handover
    # demo found it as "data differs" after kills). Slot order is not position order once the
    # 64-slot ring wraps, so redelivery goes by position.
    with sim.Host(device) as host:
        for tag in range(50):  # advance the ring: positions 0..49, answered and retired here
            assert host.send_request(cfgrd0(0, tag))
            claim = sim.claim_request(ctx, 0)
            assert claim is not None
            sim.retire_request(ctx, claim)
        for tag in range(30):  # positions 50..79: slots 50..63, then 0..15
            assert host.send_request(cfgrd0(0, 100 + tag))
        code = CLAIM_ALL.format(python_dir=PYTHON_DIR)
        with subprocess.Popen([sys.executable, "-c", code, str(ctx.cmd_fd), "30"],
                              stdout=subprocess.PIPE, text=True, pass_fds=(ctx.cmd_fd,)) as proc:
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline() == "claimed\n"
            finally:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(60) == -signal.SIGKILL
        claims = sim.recover_requests(ctx, 0)
        assert [c.tlp[6] for c in claims] == [100 + t for t in range(30)]  # byte 6: the tag
        assert all(c.redelivered and not c.marked for c in claims)
        for c in claims:
            sim.retire_request(ctx, c)
