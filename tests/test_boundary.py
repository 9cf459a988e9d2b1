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
