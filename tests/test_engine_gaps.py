"""Engine behaviours beyond the happy path: hooks that raise, gateways released and reattached,
a device left open at interpreter exit. Every completion is checked by the host model
(``sim.Host``) and here. Rules cited: PCIe Base Specification 6.x §2.3.1 (Completer Abort: the
completer could not complete a request it decoded), §7.5.1.1.3 (Memory Space Enable).
"""

from __future__ import annotations

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
