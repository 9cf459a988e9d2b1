"""Hostile buffers at the Python boundary (issue 10 B1, B2, F1).

Every buffer argument goes through one checked view (cpp/bindings/boundary.hpp): a strided or
negative-stride view, the wrong item size and a read-only buffer where one is written are
refused with a TypeError naming the argument; a thread rewriting a buffer during a call that
releases the GIL cannot push an access out of bounds (the bounding values are copied first).
"""

from __future__ import annotations

import array
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import _core, tlp
from mlx5tlp import function as fn

REQ = tlp.Tlp.mem_read(0x1000, 4, requester_id=0x0100, tag=1).encode()

# Non-contiguous, negative-stride and wrong-item-size versions of a byte buffer of `raw`.
HOSTILE: dict[str, Callable[[bytes], Any]] = {
    "strided": lambda raw: memoryview(raw * 2)[::2],
    "reversed": lambda raw: memoryview(raw)[::-1],
    "uint32 items": lambda raw: array.array("I", raw + bytes(-len(raw) % 4)),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_tlp_decode_refuses(kind: str) -> None:
    with pytest.raises(TypeError, match="buf"):
        tlp.decode(HOSTILE[kind](REQ))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_build_completions_refuses(kind: str) -> None:
    with pytest.raises(TypeError, match="requests"):
        tlp.build_completions(HOSTILE[kind](REQ), bytes(16), completer_id=1)
    with pytest.raises(TypeError, match="data"):
        tlp.build_completions(REQ, HOSTILE[kind](bytes(16)), completer_id=1)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_post_completions_refuses(ctx: mlx5tlp.Context, kind: str) -> None:
    var = ctx.alloc_var(tlp=True)
    with var.gateway() as gw:
        with pytest.raises(TypeError, match="requests"):
            gw.post_completions(HOSTILE[kind](REQ), bytes(16), completer_id=1)
        with pytest.raises(TypeError, match="data"):
            gw.post_completions(REQ, HOSTILE[kind](bytes(16)), completer_id=1)
        assert gw.stats()["posted"] == 0
    var.close()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_gateway_refuses(ctx: mlx5tlp.Context, kind: str) -> None:
    var = ctx.alloc_var(tlp=True)
    with var.gateway() as gw:
        with pytest.raises(TypeError, match="record"):
            gw.post(HOSTILE[kind](bytes(40)))
        with pytest.raises(TypeError, match="records buffer"):
            gw._core.post_batch(HOSTILE[kind](bytes(40)), array.array("I", [0, 40]), 0)
        assert gw.stats()["posted"] == 0
    with var.gateway(direct=True) as gw, pytest.raises(TypeError, match="records buffer"):
        gw._core.write_batch(HOSTILE[kind](bytes(40)), array.array("I", [0, 40]), 0)
    var.free()


def test_gateway_offsets_checked(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    with var.gateway() as gw:
        offs = array.array("I", [0, 40, 80])
        for bad in (memoryview(offs)[::-1], memoryview(offs)[::2], array.array("H", [0, 40]),
                    offs.tobytes()):
            with pytest.raises(TypeError, match="offsets"):
                gw._core.post_batch(bytes(80), bad, 0)
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            gw._core.post_batch(bytes(80), array.array("I", [0, 81]), 0)
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            gw._core.post_batch(bytes(80), array.array("I"), 0)
        assert gw.stats()["posted"] == 0
    var.free()


def test_read_only_where_written() -> None:
    with pytest.raises(TypeError, match="writable"):
        _core.function.Function({}, bytes(fn.STATE_SIZE), False)


def test_object_bindings_take_bytes_like(ctx: mlx5tlp.Context) -> None:
    for bad in (memoryview(bytes(48))[::2], memoryview(bytes(24))[::-1]):
        with pytest.raises(TypeError, match="raw"):
            _core.Var.import_(ctx._core, bad, True)
    with pytest.raises(TypeError, match="raw"):
        _core.Umem.import_(ctx._core, 5)


def test_mutation_during_bulk_build_stays_in_bounds() -> None:
    # A thread flips the request Length fields while build_completions runs without the GIL:
    # the call sees one snapshot, so it either succeeds consistently or reports a status.
    reqs = bytearray(b"".join(
        tlp.Tlp.mem_read(0x1000 * i, 1, requester_id=1, tag=i % 256).encode() for i in range(2000)
    ))
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for off in range(0, len(reqs), 12):
                reqs[off + 3] ^= 0xFF  # Length 1 <-> 254 DWs

    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(50):
            try:
                out = tlp.build_completions(reqs, bytes(4 * 2000), completer_id=1)
            except tlp.TlpError:
                continue  # the snapshot's data share did not match: refused, not overrun
            assert len(out.buffer) == out.offsets[-1]
    finally:
        stop.set()
        t.join()


def test_mutation_of_offsets_during_post_batch(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    offs = array.array("I", range(0, 40 * 65, 40))
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for i in range(1, len(offs)):
                offs[i] = 0xFFFFFFFF if offs[i] != 0xFFFFFFFF else 40 * i

    gw = var.gateway(ring_slots=1024, drain_timeout=0.1)
    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(50):
            # An out-of-range copy is refused as a whole; an in-range one is posted.
            with contextlib.suppress(mlx5tlp.InvalidArgumentError):
                gw._core.post_batch(bytes(40 * 64), offs, 0)
    finally:
        stop.set()
        t.join()
        with contextlib.suppress(mlx5tlp.ResourceExhaustedError):
            gw.close()  # nobody consumes here: what was queued may be dropped
    var.free()


# ---- one unambiguous batch type (issue 10 B3) ----


def test_records_pair_is_never_read_as_two_records(ctx: mlx5tlp.Context) -> None:
    # (buffer, memoryview(offsets)) used to be taken as a sequence of two records: the
    # buffer, then the offsets' bytes written to the page as a second "completion".
    var = ctx.alloc_var(tlp=True)
    buf = bytes(range(40)) * 2
    offs = array.array("I", [0, 40, 80])
    with var.gateway(direct=True) as gw:
        for pair in ((buf, memoryview(offs)), (buf, offs), [buf, memoryview(offs)]):
            for call in (gw.write_batch, gw.post_batch):
                with pytest.raises(TypeError, match=r"mlx5tlp\.Records\(buffer, offsets\)"):
                    call(pair)
        assert gw.write_batch(mlx5tlp.Records(buf, memoryview(offs)), 5.0) == 2
        assert gw.stats()["written"] == 2
    var.free()


def test_records_checks_its_parts() -> None:
    offs = array.array("I", [0, 4])
    for bad in (5, "text", array.array("I", [1, 2])):
        with pytest.raises(TypeError, match=r"Records\.buffer"):
            mlx5tlp.Records(bad, offs)
    for bad_offs in (None, array.array("H", [0, 4]), bytes(8), array.array("Q", [0, 4])):
        with pytest.raises(TypeError, match=r"Records\.offsets"):
            mlx5tlp.Records(b"abcd", bad_offs)
    r = mlx5tlp.Records.join([b"ab", bytearray(b"cde"), memoryview(b"f")])
    assert len(r) == 3 and bytes(r.record(1)) == b"cde" and list(r.offsets) == [0, 2, 5, 6]
    # The bulk builder's result is a Records.
    out = tlp.build_completions(REQ, bytes(16), completer_id=1)
    assert isinstance(out, mlx5tlp.Records) and len(out) == 1


def test_batches_of_other_shapes_are_refused(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    with var.gateway() as gw:
        # A bare buffer is not a sequence of records (bytes iterates as ints: each int used to
        # become that many zero bytes).
        for bad in (bytes(40), bytearray(40), memoryview(bytes(40)), "records", 7):
            with pytest.raises(TypeError, match="a batch is"):
                gw.post_batch(bad)  # type: ignore[arg-type]
        for bad_item in (array.array("I", [1, 2]), memoryview(bytes(8))[::2], 3):
            with pytest.raises(TypeError, match=r"records\[1\]"):
                gw.post_batch([bytes(40), bad_item])  # type: ignore[list-item]
        # The old duck type (an object with .buffer and .offsets) is not a batch either.
        duck = type("Duck", (), {"buffer": bytes(40), "offsets": array.array("I", [0, 40])})()
        with pytest.raises(TypeError, match="a batch is"):
            gw.post_batch(duck)
        assert gw.stats()["posted"] == 0
    var.free()


# ---- every buffer-taking binding has a hostile-buffer test (issue 10: hostile buffers) ----
# Parameters of these types can carry a buffer (pybind11 `object`, `bytes`, and the TLP field
# tuples whose last field is the data buffer); the names below never do.
_BUFFER_TYPES = ("object", "bytes", "tuple")
_NOT_BUFFERS = {"timeout", "drain_timeout", "dispatch", "completer"}


def _buffer_params() -> set[str]:
    """'<binding>.<parameter>' for every parameter of mlx5tlp._core that may take a buffer."""
    import inspect
    import re

    found: set[str] = set()

    def visit(obj: Any, prefix: str) -> None:
        for name in dir(obj):
            if name.startswith("__") and name != "__init__":
                continue
            member = getattr(obj, name)
            path = f"{prefix}{name}" if prefix else name
            if inspect.ismodule(member) or inspect.isclass(member):
                visit(member, path + ".")
                continue
            doc = getattr(member, "__doc__", None) or ""
            m = re.match(r"\w+\((.*)\) ->", doc.split("\n")[0])
            if not callable(member) or m is None:
                continue
            for param in re.finditer(r"(\w+): ([\w.]+)", m.group(1)):
                pname, ptype = param.groups()
                if ptype in _BUFFER_TYPES and pname not in _NOT_BUFFERS:
                    found.add(f"{path}.{pname}")

    visit(_core, "")
    return found


_SPEC = fn.FunctionSpec(
    identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
    bars=[fn.Bar(0, "mem32", 1 << 16)])


class _Env:
    """Objects the binding calls need, made on first use and released at the end."""

    def __init__(self, ctx: mlx5tlp.Context) -> None:
        self.ctx = ctx
        self._made: list[Any] = []
        self._cache: dict[str, Any] = {}

    def get(self, what: str) -> Any:
        if what not in self._cache:
            self._cache[what] = self._make(what)
        return self._cache[what]

    def _make(self, what: str) -> Any:
        from mlx5tlp import engine, sim

        ctx = self.ctx
        if what in ("gw", "gwd"):
            var = ctx.alloc_var(tlp=True)
            gw = var.gateway(direct=what == "gwd", drain_timeout=0.1)
            self._made += [gw, var]
            return gw._core
        if what == "obj":
            obj = ctx.create_devx_obj(bytes([0x0A, 0x00, 0, 0, 0, 0, 0, 0x42]) + bytes(8), 16)
            self._made.append(obj)
            return obj._core
        if what == "engine":
            mem = engine.MemoryRegion(0, 0, 0x1000)
            dev = engine.Device(ctx, _SPEC, [mem], start=False)
            self._made.append(dev)
            return dev, mem
        if what == "function":
            return fn.Function(_SPEC)
        if what == "host":
            h = sim.Host(ctx.name)
            self._made.append(h)
            return h
        raise AssertionError(what)

    def close(self) -> None:
        for o in self._made:
            with contextlib.suppress(mlx5tlp.Error):
                if isinstance(o, mlx5tlp.DeviceObject):
                    o.free()
                else:
                    o.close()


def _fields_with(data: Any) -> tuple[Any, ...]:
    return (*tlp._fields(tlp.Tlp.mem_write(0x1000, b"abcd"))[:-1], data)


# binding parameter -> a call that passes `bad` in that parameter. Every one must refuse each
# hostile buffer with a TypeError (naming the argument where the boundary layer checks it).
BUFFER_BINDINGS: dict[str, Callable[[_Env, Any], Any]] = {
    "Context.general_cmd.cmd_in": lambda e, bad: e.ctx._core.general_cmd(bad, 16),
    "DevxObj.create.cmd_in": lambda e, bad: _core.DevxObj.create(e.ctx._core, bad, 16),
    "DevxObj.import_.raw": lambda e, bad: _core.DevxObj.import_(e.ctx._core, bad),
    "DevxObj.query.cmd_in": lambda e, bad: e.get("obj").query(bad, 32),
    "DevxObj.modify.cmd_in": lambda e, bad: e.get("obj").modify(bad, 32),
    "Gateway.post.record": lambda e, bad: e.get("gw").post(bad, 0),
    "Gateway.post_batch.data": lambda e, bad: e.get("gw").post_batch(
        bad, array.array("I", [0, 4]), 0),
    "Gateway.post_batch.offsets": lambda e, bad: e.get("gw").post_batch(bytes(8), bad, 0),
    "Gateway.post_completions.requests": lambda e, bad: e.get("gw").post_completions(
        bad, bytes(16), None, 1, 256, 64, 0, 0, False),
    "Gateway.post_completions.data": lambda e, bad: e.get("gw").post_completions(
        REQ, bad, None, 1, 256, 64, 0, 0, False),
    "Gateway.post_completions.statuses": lambda e, bad: e.get("gw").post_completions(
        REQ, bytes(16), bad, 1, 256, 64, 0, 0, False),
    "Gateway.write.record": lambda e, bad: e.get("gwd").write(bad, 0),
    "Gateway.write_batch.data": lambda e, bad: e.get("gwd").write_batch(
        bad, array.array("I", [0, 4]), 0),
    "Gateway.write_batch.offsets": lambda e, bad: e.get("gwd").write_batch(bytes(8), bad, 0),
    "Umem.import_.raw": lambda e, bad: _core.Umem.import_(e.ctx._core, bad),
    "Umem.reg.buffer": lambda e, bad: _core.Umem.reg(e.ctx._core, bad, 1),
    "Var.import_.raw": lambda e, bad: _core.Var.import_(e.ctx._core, bad, True),
    "engine.Engine.__init__.state": lambda e, bad: _core.engine.Engine(
        _spec_value(), [], 32, 1024, 0, lambda items: None, bad, False),
    "engine.Engine.adopt_state.state": lambda e, bad: e.get("engine")[0]._engine.adopt_state(
        bad, None),
    "engine.Engine.complete.data": lambda e, bad: e.get("engine")[0]._engine.complete(1, bad),
    "engine.MemoryRegion.write.data": lambda e, bad: e.get("engine")[1]._core.write(0, bad),
    "function.Function.__init__.state": lambda e, bad: _core.function.Function(
        _spec_value(), bad, False),
    "function.Function.restore.snapshot": lambda e, bad: e.get("function")._n.restore(bad),
    "function.Function.msix_write.data": lambda e, bad: e.get("function")._n.msix_write(
        0, 0, bad, 0xF, 0xF),
    "sim.Host.send.tlp": lambda e, bad: e.get("host")._host().send(bad, 0),
    "envelope_accept.blob": lambda e, bad: _core.envelope_accept(
        bad, 1, 24, b"n", 0, b"sim", b""),
    "envelope_accept.name": lambda e, bad: _core.envelope_accept(
        bytes(64), 1, 24, bad, 0, b"sim", b""),
    "envelope_accept.backend": lambda e, bad: _core.envelope_accept(
        bytes(64), 1, 24, b"n", 0, bad, b""),
    "envelope_accept.version": lambda e, bad: _core.envelope_accept(
        bytes(64), 1, 24, b"n", 0, b"sim", bad),
    "tlp.build_bulk.requests": lambda e, bad: _core.tlp.build_bulk(bad, b"", None, 1, 256, 64, 0),
    "tlp.build_bulk.data": lambda e, bad: _core.tlp.build_bulk(REQ, bad, None, 1, 256, 64, 0),
    "tlp.build_bulk.statuses": lambda e, bad: _core.tlp.build_bulk(
        REQ, bytes(16), bad, 1, 256, 64, 0),
    "tlp.completions.request": lambda e, bad: _core.tlp.completions(
        _fields_with(bad), bytes(16), 1, 256, 64, 0),
    "tlp.completions.data": lambda e, bad: _core.tlp.completions(
        tlp._fields(tlp.decode(REQ)), bad, 1, 256, 64, 0),
    "tlp.decode.buf": lambda e, bad: _core.tlp.decode(bad),
    "tlp.encode.fields": lambda e, bad: _core.tlp.encode(_fields_with(bad), True),
}


def _offsets_bad() -> list[Any]:
    offs = array.array("I", [0, 4, 8, 12])
    return [memoryview(offs)[::-1], memoryview(offs)[::2], bytes(16), array.array("H", [0, 4])]


def _state_bad() -> list[Any]:
    # The state is raw memory of exactly STATE_SIZE bytes, written: any contiguous writable
    # buffer of that size is fine, so the hostile ones are strided, reversed and read-only.
    n = fn.STATE_SIZE
    return [memoryview(bytearray(2 * n))[::2], memoryview(bytearray(n))[::-1], bytes(n)]


# Arguments whose valid form is not a byte buffer get their own hostile values.
BAD_VALUES: dict[str, Callable[[], list[Any]]] = {
    "Gateway.post_batch.offsets": _offsets_bad,
    "Gateway.write_batch.offsets": _offsets_bad,
    "engine.Engine.__init__.state": _state_bad,
    "engine.Engine.adopt_state.state": _state_bad,
    "function.Function.__init__.state": _state_bad,
}


def _spec_value() -> Any:
    from mlx5tlp.function.model import _core_value

    return _core_value(_SPEC)


def test_every_buffer_binding_has_a_hostile_buffer_test() -> None:
    # A new binding taking a buffer fails here until it has an entry in BUFFER_BINDINGS (and
    # a stale entry fails when its binding is gone).
    found = _buffer_params()
    assert found - BUFFER_BINDINGS.keys() == set(), "buffer bindings without a hostile test"
    assert BUFFER_BINDINGS.keys() - found == set(), "entries for bindings that do not exist"


@pytest.mark.parametrize("binding", sorted(BUFFER_BINDINGS))
def test_buffer_binding_refuses_hostile_buffers(ctx: mlx5tlp.Context, binding: str) -> None:
    env = _Env(ctx)
    bads = (BAD_VALUES[binding]() if binding in BAD_VALUES
            else [make(bytes(64)) for _, make in sorted(HOSTILE.items())])
    try:
        for bad in bads:
            with pytest.raises(TypeError):
                BUFFER_BINDINGS[binding](env, bad)
    finally:
        env.close()
