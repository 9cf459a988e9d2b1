"""Export envelopes at the object level: every refused blob is refused before rdma-core."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx5tlp
from mlx5tlp import _core, sim
from mlx5tlp.envelope import HEADER_SIZE, MAC_SIZE, Kind, describe, open_envelope, peek_kind

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CREATE_OBJ = bytes([0x0A, 0x00, 0, 0, 0, 0, 0, 0x42]) + bytes(8)
QUERY = bytes([0x0A, 0x02, 0, 0, 0, 0, 0, 0x42]) + bytes(8)


class Objects:
    """One live object of each kind on a context, and their envelopes."""

    def __init__(self, ctx: mlx5tlp.Context) -> None:
        self.ctx = ctx
        self.var = ctx.alloc_var(tlp=True)
        self.umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
        self.obj = ctx.create_devx_obj(CREATE_OBJ, 16)
        self.blobs = {
            Kind.VAR: self.var.export(),
            Kind.UMEM: self.umem.export(),
            Kind.DEVX_OBJ: self.obj.export(),
        }
        self.importers: dict[Kind, Callable[..., Any]] = {
            Kind.VAR: ctx.import_var,
            Kind.UMEM: ctx.import_umem,
            Kind.DEVX_OBJ: ctx.import_devx_obj,
        }


@pytest.fixture
def objs(ctx: mlx5tlp.Context) -> Objects:
    return Objects(ctx)


@pytest.fixture
def other_device() -> Iterator[str]:
    name = f"other{os.getpid()}"
    sim.create_device(name)
    yield name
    sim.remove_device(name)


class ImportSpy:
    """Records every call into the core's import functions (the rdma-core *_import layer)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for cls_name in ("Var", "Umem", "DevxObj"):
            cls = getattr(_core, cls_name)
            real = cls.import_

            def spy(*args: Any, _real: Any = real, _name: str = cls_name) -> Any:
                self.calls.append(_name)
                return _real(*args)

            monkeypatch.setattr(cls, "import_", staticmethod(spy))


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> ImportSpy:
    return ImportSpy(monkeypatch)


def fix_crc(blob: bytes) -> bytes:
    """Recompute the CRC of an unkeyed envelope after an edit (to reach the later checks)."""
    body = blob[:-4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def set_kind(blob: bytes, kind: int) -> bytes:
    return fix_crc(blob[:10] + struct.pack("<H", kind) + blob[12:])


def bad_blobs(blob: bytes) -> dict[str, bytes]:
    flipped = bytearray(blob)
    flipped[HEADER_SIZE + 2] ^= 0x10
    return {
        "truncated": blob[:-1],
        "truncated_to_header": blob[:HEADER_SIZE],
        "too_short": blob[:10],
        "empty": b"",
        "extended": blob + b"\x00",
        "bit_flipped": bytes(flipped),
        "magic": b"X" + blob[1:],
        "crc": blob[:-4] + bytes(4),
        "unknown_kind": set_kind(blob, 9),
    }


# -- object-level checks ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_malformed_blobs_are_refused_before_rdma_core(
    objs: Objects, spy: ImportSpy, kind: Kind
) -> None:
    before = sim.device_stats(objs.ctx.name)
    for what, blob in bad_blobs(objs.blobs[kind]).items():
        for importer in (objs.importers[kind], lambda b: mlx5tlp.import_blob(objs.ctx, b)):
            with pytest.raises(mlx5tlp.ExportFormatError) as info:
                importer(blob)
            err = info.value
            assert err.operation == "import", what
            assert err.errno is None, what
            assert "export envelope rejected" in str(err), what
    assert spy.calls == []
    assert sim.device_stats(objs.ctx.name) == before


def test_messages_name_the_check(objs: Objects) -> None:
    blob = objs.blobs[Kind.VAR]
    cases = {
        "truncated": (blob[:-1], "truncated"),
        "extended": (blob + b"\x00\x00", "trailing"),
        "bit_flipped": (blob[:45] + bytes([blob[45] ^ 1]) + blob[46:], "CRC mismatch"),
        "short": (blob[:39], "too short"),
    }
    for what, (bad, fragment) in cases.items():
        with pytest.raises(mlx5tlp.ExportFormatError, match=fragment):
            objs.ctx.import_var(bad)
        del what


def test_every_truncation_and_bit_flip_of_a_devx_blob(objs: Objects, spy: ImportSpy) -> None:
    blob = objs.blobs[Kind.DEVX_OBJ]
    for n in range(len(blob)):
        with pytest.raises(mlx5tlp.ExportFormatError):
            mlx5tlp.import_blob(objs.ctx, blob[:n])
    for bit in range(len(blob) * 8):
        b = bytearray(blob)
        b[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(mlx5tlp.ExportFormatError):
            mlx5tlp.import_blob(objs.ctx, bytes(b))
    assert spy.calls == []


@pytest.mark.parametrize(
    ("blob_kind", "importer_kind"),
    [(a, b) for a in Kind for b in Kind if a != b],
)
def test_wrong_kind(objs: Objects, spy: ImportSpy, blob_kind: Kind, importer_kind: Kind) -> None:
    with pytest.raises(mlx5tlp.ExportFormatError, match="wrong kind") as info:
        objs.importers[importer_kind](objs.blobs[blob_kind])
    assert importer_kind.name in str(info.value)
    assert blob_kind.name in str(info.value)
    assert spy.calls == []


def test_other_device(objs: Objects, other_device: str, spy: ImportSpy) -> None:
    before = sim.device_stats(other_device)
    with mlx5tlp.open_device(other_device) as other:
        for kind, blob in objs.blobs.items():
            with pytest.raises(mlx5tlp.ExportFormatError, match="envelope is for device"):
                mlx5tlp.import_blob(other, blob)
            with pytest.raises(mlx5tlp.ExportFormatError):
                {
                    Kind.VAR: other.import_var,
                    Kind.UMEM: other.import_umem,
                    Kind.DEVX_OBJ: other.import_devx_obj,
                }[kind](blob)
        assert sim.device_stats(other_device)["tlp_vars"] == before["tlp_vars"]
    assert spy.calls == []
    assert sim.device_stats(other_device) == before


@pytest.mark.parametrize("kind", list(Kind))
def test_keys(objs: Objects, spy: ImportSpy, kind: Kind) -> None:
    source = {Kind.VAR: objs.var, Kind.UMEM: objs.umem, Kind.DEVX_OBJ: objs.obj}[kind]
    keyed = source.export(key=KEY)
    assert len(keyed) == len(objs.blobs[kind]) + MAC_SIZE
    importer = objs.importers[kind]
    with pytest.raises(mlx5tlp.ExportFormatError, match="HMAC-SHA256 mismatch"):
        importer(keyed, key=OTHER_KEY)
    with pytest.raises(mlx5tlp.ExportFormatError, match="no key was given"):
        importer(keyed)
    with pytest.raises(mlx5tlp.ExportFormatError, match="not keyed"):
        importer(objs.blobs[kind], key=KEY)
    # Stripping the MAC (and the keyed option) is a downgrade the CRC catches.
    with pytest.raises(mlx5tlp.ExportFormatError):
        importer(keyed[:-MAC_SIZE])
    altered = bytearray(keyed)
    altered[-1] ^= 1
    with pytest.raises(mlx5tlp.ExportFormatError, match="HMAC"):
        importer(bytes(altered), key=KEY)
    assert spy.calls == []

    # The keyed round trip works, with the same key only.
    with mlx5tlp.Context.import_fd(objs.ctx.cmd_fd) as ictx:
        got = mlx5tlp.import_blob(ictx, keyed, key=KEY)
        assert type(got) is type(source)
        assert got.imported
        got.close()
    assert spy.calls == [{Kind.VAR: "Var", Kind.UMEM: "Umem", Kind.DEVX_OBJ: "DevxObj"}[kind]]


def test_key_argument_checks(objs: Objects) -> None:
    with pytest.raises(ValueError):
        objs.var.export(key=b"short")
    with pytest.raises(TypeError):
        objs.var.export(key="k" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        objs.ctx.import_var(objs.blobs[Kind.VAR], key=b"short")


def test_not_a_buffer(objs: Objects) -> None:
    for bad in (None, 5, "MLX5TLP"):
        with pytest.raises(TypeError):
            mlx5tlp.import_blob(objs.ctx, bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            objs.ctx.import_var(bad)  # type: ignore[arg-type]


# -- import_blob dispatch --------------------------------------------------------------------


def test_import_blob_dispatch(objs: Objects, spy: ImportSpy) -> None:
    with mlx5tlp.Context.import_fd(objs.ctx.cmd_fd) as ictx:
        var = mlx5tlp.import_blob(ictx, objs.blobs[Kind.VAR])
        umem = mlx5tlp.import_blob(ictx, bytearray(objs.blobs[Kind.UMEM]))
        obj = mlx5tlp.import_blob(ictx, memoryview(objs.blobs[Kind.DEVX_OBJ]))
        assert isinstance(var, mlx5tlp.Var)
        assert isinstance(umem, mlx5tlp.Umem)
        assert isinstance(obj, mlx5tlp.DevxObj)
        assert all(isinstance(o, mlx5tlp.DeviceObject) for o in (var, umem, obj))
        assert all(o.imported and o.context is ictx for o in (var, umem, obj))
        assert var.page_id == objs.var.page_id
        assert var.is_tlp
        assert umem.umem_id == objs.umem.umem_id
        assert obj.query(QUERY, 32)[16:] == CREATE_OBJ
        assert spy.calls == ["Var", "Umem", "DevxObj"]
    assert var.closed and umem.closed and obj.closed
    assert peek_kind(objs.blobs[Kind.UMEM]) == Kind.UMEM
    assert describe(objs.blobs[Kind.VAR])["kind"] in (Kind.VAR, "VAR", 1)


def test_tlp_flag_round_trip(objs: Objects) -> None:
    virtio = objs.ctx.alloc_var(tlp=False)
    with mlx5tlp.Context.import_fd(objs.ctx.cmd_fd) as ictx:
        a = ictx.import_var(objs.blobs[Kind.VAR])
        b = ictx.import_var(virtio.export())
        assert a.is_tlp
        assert not b.is_tlp
        a.close()
        b.close()
    virtio.free()


# -- property test ---------------------------------------------------------------------------

_edit = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.integers(0, 400 * 8), st.just(0)),
    st.tuples(st.just("ins"), st.integers(0, 400), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("del"), st.integers(0, 400), st.integers(1, 16)),
    st.tuples(st.just("trunc"), st.integers(0, 400), st.just(0)),
    st.tuples(st.just("extend"), st.just(0), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("splice"), st.integers(0, 400), st.integers(0, 7)),
    st.tuples(st.just("fixcrc"), st.just(0), st.just(0)),
)


def _apply(blob: bytes, edits: list[tuple[str, int, Any]], pool: list[bytes]) -> bytes:
    b = bytearray(blob)
    for op, p, arg in edits:
        if op == "set" and b:
            b[p % len(b)] = arg
        elif op == "flip" and b:
            b[(p // 8) % len(b)] ^= 1 << (p % 8)
        elif op == "ins":
            b[p:p] = arg
        elif op == "del":
            del b[p : p + arg]
        elif op == "trunc":
            del b[p:]
        elif op == "extend":
            b += arg
        elif op == "splice":
            other = pool[arg % len(pool)]
            b = b[:p] + other[p % (len(other) + 1) :]
        elif op == "fixcrc" and len(b) > 4:
            b = bytearray(fix_crc(bytes(b)))
    return bytes(b)


@settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.integers(0, 7),
    edits=st.lists(_edit, min_size=0, max_size=5),
    use_key=st.booleans(),
)
def test_mutated_blobs(
    ctx: mlx5tlp.Context, base: int, edits: list[tuple[str, int, Any]], use_key: bool
) -> None:
    pool = _pool(ctx)
    blob = _apply(pool[base], edits, pool)
    key = KEY if use_key else None
    try:
        got = mlx5tlp.import_blob(ctx, blob, key=key)
    except mlx5tlp.ExportFormatError:
        return
    except mlx5tlp.InvalidHandleError:
        # Only a well-formed VAR envelope whose page cannot be mapped gets this far.
        env = open_envelope(
            blob, expected_kind=Kind.VAR, raw_size=ctx.export_size, device=ctx.identity, key=key
        )
        assert env.kind == Kind.VAR
        return
    # Accepted: a genuine envelope, or one whose CRC an edit recomputed (the CRC detects
    # corruption, not forgery: only a key does that).
    assert blob in pool or any(op in ("fixcrc", "splice") for op, _, _ in edits)
    _use_and_close(got)


def _use_and_close(got: mlx5tlp.DeviceObject) -> None:
    assert got.imported
    assert not got.closed
    if isinstance(got, mlx5tlp.Var):
        assert got.probe()  # import refuses a VAR the kernel would not map
        with got.mmap(mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert len(m) == got.length
    elif isinstance(got, mlx5tlp.DevxObj):
        # A forged handle names no object: the "kernel" refuses it.
        with contextlib.suppress(mlx5tlp.InvalidHandleError):
            got.query(QUERY, 32)
    got.close()
    assert got.closed


@settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.integers(0, 4),
    raw_edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_forged_raw_buffers_with_valid_crc(
    ctx: mlx5tlp.Context, base: int, raw_edits: list[tuple[int, int]]
) -> None:
    """Unkeyed envelopes whose raw rdma-core buffer was rewritten and the CRC recomputed.

    They pass every envelope check, so rdma-core's import sees them: no crash, and only
    the documented errors (a VAR's page is probed before the import is returned).
    """
    pool = _pool(ctx)
    blob = bytearray(pool[base])
    info = describe(bytes(blob))
    raw_size = info["raw_size"]
    raw_start = len(blob) - 4 - raw_size
    for pos, value in raw_edits:
        blob[raw_start + pos % raw_size] = value
    forged = fix_crc(bytes(blob))
    try:
        got = mlx5tlp.import_blob(ctx, forged)
    except mlx5tlp.InvalidHandleError as exc:
        assert peek_kind(forged) == Kind.VAR
        assert exc.operation == "mlx5dv_var_import"
        return
    _use_and_close(got)


_POOLS: dict[str, list[bytes]] = {}


def _pool(ctx: mlx5tlp.Context) -> list[bytes]:
    """Genuine envelopes on `ctx` (built once per context): live, keyed and freed objects."""
    pool = _POOLS.get(ctx.name)
    if pool is None:
        _POOLS.clear()
        var = ctx.alloc_var(tlp=True)
        virtio = ctx.alloc_var()
        freed = ctx.alloc_var(tlp=True)
        umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
        obj = ctx.create_devx_obj(CREATE_OBJ, 16)
        pool = [
            var.export(),
            virtio.export(),
            freed.export(),
            umem.export(),
            obj.export(),
            var.export(key=KEY),
            umem.export(key=KEY),
            obj.export(key=KEY),
        ]
        freed.free()
        _POOLS[ctx.name] = pool
    return pool
