"""Engine behaviours beyond the happy path: hooks that raise, gateways released and reattached,
a device left open at interpreter exit. Every completion is checked by the host model
(``sim.Host``) and here. Rules cited: PCIe Base Specification 6.x §2.3.1 (Completer Abort: the
completer could not complete a request it decoded), §7.5.1.1.3 (Memory Space Enable).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import engine, sim, tlp
from test_engine import BAR0, Bus, _read_all, spec


@pytest.fixture
def host(device: str) -> Any:
    with sim.Host(device) as h:
        yield h


def _boom(*_args: Any) -> int:
    raise ZeroDivisionError("the hook's own bug")


def test_a_raising_register_hook_is_answered_ca_counted_and_kept(ctx: mlx5tlp.Context,
                                                                 host: sim.Host) -> None:
    regs = engine.RegisterRegion(0, 0x2000, [
        engine.Register("ok", 0x0, reset=0x1234),
        engine.Register("bad_read", 0x4, on_read=_boom),
        engine.Register("bad_write", 0x8, reset=7, on_write=_boom),
    ], name="regs")
    with engine.Device(ctx, spec(), [regs]) as dev:
        bus = Bus(host)
        bus.enumerate()
        assert dev.stats()["hook_errors"] == 0 and dev.last_hook_error is None
        t = bus.next_tag()
        bus.send(tlp.Tlp.mem_read(BAR0 + 0x2004, 1, tag=t))
        (c,) = bus.collect(1)
        assert c.tag == t and c.status == tlp.Status.CA and not c.data  # §2.3.1
        st = dev.stats()
        assert st["hook_errors"] == 1 and st["ca"] == 1
        err = dev.last_hook_error
        assert err is not None and "regs MRd at 0x4" in err
        assert "ZeroDivisionError: the hook's own bug" in err and "_boom" in err
        # A posted write has no completion: the count and the traceback tell.
        bus.send(tlp.Tlp.mem_write(BAR0 + 0x2008, (9).to_bytes(4, "little")))
        data, _ = _read_all(bus, BAR0 + 0x2000, 4)  # serving goes on, ordered after the write
        assert data == (0x1234).to_bytes(4, "little")
        assert dev.stats()["hook_errors"] == 2
        assert "regs MWr at 0x8" in (dev.last_hook_error or "")
        assert regs["bad_write"] == 9  # the register file took the write before the hook ran
        assert host.stats()["errors"] == 0


def test_a_raising_callback_handler_is_answered_ca_and_counted(ctx: mlx5tlp.Context,
                                                               host: sim.Host) -> None:
    def handler(reqs: list[engine.Request]) -> None:
        reqs[0].complete(b"\x11" * reqs[0].length)  # answered before the raise: stays SC
        raise RuntimeError("handler bug")

    cb = engine.CallbackRegion(0, 0x4000, 0x1000, handler, name="cb")
    with engine.Device(ctx, spec(), [cb], batch=32) as dev:
        bus = Bus(host)
        bus.enumerate()
        dev.pause(5.0)  # both reads reach the handler in one batch
        tags = [bus.next_tag(), bus.next_tag()]
        for i, t in enumerate(tags):
            bus.send(tlp.Tlp.mem_read(BAR0 + 0x4000 + 4 * i, 1, tag=t))
        dev.resume()
        cpls = {c.tag: c for c in bus.collect(2)}
        assert cpls[tags[0]].status == tlp.Status.SC and cpls[tags[0]].data == b"\x11" * 4
        assert cpls[tags[1]].status == tlp.Status.CA
        assert dev.stats()["hook_errors"] == 1
        assert "RuntimeError: handler bug" in (dev.last_hook_error or "")
        assert host.stats()["errors"] == 0


def test_release_and_reattach_gateways_lose_nothing(ctx: mlx5tlp.Context, host: sim.Host
                                                    ) -> None:
    # While released, the page is free for another committer (a successor opens its own
    # gateway on it); requests sent meanwhile wait in the channel and are all answered, once,
    # after reattach + resume.
    mem = engine.MemoryRegion(0, 0, 0x1000)
    pattern = bytes((i * 13 + 1) & 0xFF for i in range(0x1000))
    mem.write(0, pattern)
    var = ctx.alloc_var(tlp=True)
    try:
        with engine.Device(ctx, spec(), [mem], gateway_vars=[var]) as dev:
            bus = Bus(host)
            bus.enumerate()
            assert _read_all(bus, BAR0, 64)[0] == pattern[:64]
            with pytest.raises(mlx5tlp.Error, match="not paused"):
                dev.release_gateways()  # running: refused
            assert dev.pause(5.0)
            dev.release_gateways()
            with var.gateway(direct=True) as successor:  # the page has no committer now
                assert successor.max_record > 0
            tags = {}
            for i in range(40):
                t = bus.next_tag()
                tags[t] = (i * 64) % 0x1000
                bus.send(tlp.Tlp.mem_read(BAR0 + tags[t], 16, tag=t))
            assert host.completions(0.05) == []  # nobody serves while released
            dev.reattach_gateways()
            dev.resume()
            cpls = bus.collect(40)
            assert sorted(c.tag for c in cpls) == sorted(tags)  # each answered exactly once
            for c in cpls:
                assert c.status == tlp.Status.SC
                assert c.data == pattern[tags[c.tag]:tags[c.tag] + 64]
            assert _read_all(bus, BAR0 + 0x100, 64)[0] == pattern[0x100:0x140]  # and on
            assert host.completions(0.05) == []
            st = dev.stats()
            assert st["requests"]["MRd"] == 42 and st["redelivered"] == 0
        assert host.stats()["errors"] == 0 and host.stats()["outstanding"] == 0
        assert var.probe()  # the device never frees a caller's VAR
    finally:
        var.free()


def test_bad_lane_channels_are_named(ctx: mlx5tlp.Context) -> None:
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="one channel set per lane"):
        engine.Device(ctx, spec(), [], pages=2, channels=[[0]])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match=r"channels\[1\]: channel 0 is"):
        engine.Device(ctx, spec(), [], pages=2, channels=[[0], [0, 1]])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match=r"channels\[0\]: 8 is not"):
        engine.Device(ctx, spec(), [], channels=[[8]])
    with pytest.raises(TypeError, match=r"gateway_vars\[0\]"):
        engine.Device(ctx, spec(), [], gateway_vars=["page"])  # type: ignore[list-item]
    assert sim.device_stats(ctx.name)["tlp_vars"] == 0


_LEFT_OPEN = textwrap.dedent("""
    import sys, time
    import mlx5tlp
    from mlx5tlp import engine, sim, tlp
    from mlx5tlp import function as fn

    SPEC = fn.FunctionSpec(identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234),
                           bars=[fn.Bar(0, "mem32", 1 << 16)])
    kept = []

    def slow(reqs):  # a handler busy when the interpreter exits
        time.sleep(0.05)
        if sys.argv[2] == "defer":
            kept.extend(reqs)
            return None
        return [b"\\0" * r.length for r in reqs]

    def main():
        ctx = mlx5tlp.open_device(sys.argv[1], backend="sim")
        dev = engine.Device(ctx, SPEC, [engine.CallbackRegion(0, 0, 0x1000, slow)], pages=2,
                            batch=1)
        host = sim.Host(sys.argv[1])
        for ch in (0, 1):
            for off, v in ((0x10, 0xF0000000), (4, 2)):
                host.send_request(tlp.Tlp.cfg_write(0x100, off, v.to_bytes(4, "little"),
                                                    tag=1).encode(), ch)
        for i in range(64):
            host.send_request(tlp.Tlp.mem_read(0xF0000000, 1, tag=i).encode(), i % 2)
        time.sleep(0.3)
        globals()["keep"] = (ctx, dev, host)  # still open, still serving
        print("returning", flush=True)

    main()
""")


@pytest.mark.parametrize("mode", ["answer", "defer"])
def test_a_device_left_open_does_not_hang_or_abort_the_exit(device: str, tmp_path: Any,
                                                            mode: str) -> None:
    script = tmp_path / "left_open.py"
    script.write_text(_LEFT_OPEN)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-W", "always::ResourceWarning", str(script), device,
                          mode], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert out.returncode == 0, out.stderr  # not 134 (abort in finalization), not a hang
    assert out.stdout == "returning\n"
    assert took < 30 + engine.EXIT_TIMEOUT
    assert "left open at interpreter exit: closed it" in out.stderr
    if mode == "defer":  # what was dropped is said
        assert "RuntimeWarning" in out.stderr
        assert "deferred requests were answered Completer Abort" in out.stderr
    else:
        assert "ResourceWarning" in out.stderr and "deferred" not in out.stderr
    assert "Traceback" not in out.stderr and "terminate" not in out.stderr
    st = sim.device_stats(device)
    assert (st["contexts"], st["tlp_vars"]) == (0, 0)
