"""Export envelopes at the object level: every refused blob is refused before rdma-core."""

from __future__ import annotations

import contextlib
import errno
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
    except mlx5tlp.InvalidHandleError as exc:
        # Only a well-formed envelope gets this far: a VAR whose page cannot be mapped, or an
        # object whose handle names nothing or another object (the identity check).
        env = open_envelope(
            blob, expected_kind=None, raw_size=ctx.export_size, device=ctx.identity, key=key
        )
        assert env.kind == Kind.VAR or exc.errno in (errno.ENOENT, errno.ESTALE), exc
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
    except mlx5tlp.ExportFormatError as exc:  # a VAR length that is not whole pages
        assert peek_kind(forged) == Kind.VAR and "whole number" in str(exc), exc
        return
    except mlx5tlp.InvalidHandleError as exc:
        kind = peek_kind(forged)
        assert exc.operation == _IMPORT_OPERATION[kind]
        # A VAR's mapping is refused (EINVAL), or the identity check refuses a handle that
        # names nothing (ENOENT) or another object than the buffer records (ESTALE).
        assert exc.errno in ((errno.EINVAL, errno.ESTALE) if kind == Kind.VAR
                             else (errno.ENOENT, errno.ESTALE)), exc
        return
    _use_and_close(got)


_IMPORT_OPERATION = {Kind.VAR: "mlx5dv_var_import", Kind.UMEM: "mlx5dv_devx_umem_import",
                     Kind.DEVX_OBJ: "mlx5dv_devx_obj_import"}


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


# ---- stale handles and forged raw buffers (issue 10 A5, D6) ----
# The raw export buffers have rdma-core's layouts (providers/mlx5/mlx5.h, as in
# cpp/sim/dv_common.hpp): VAR {u32 handle, u32 page_id, u32 length, u32 pad, i64 mmap_off},
# UMEM {u32 handle, u32 umem_id}, DEVX object {u32 handle, u32 type, u32 object_id, ...}.
_VAR_FIELDS = {"handle": 0, "page_id": 4, "length": 8}


def _rewrite_raw(blob: bytes, offset: int, value: int) -> bytes:
    """`blob` with the u32 at `offset` of its raw buffer set to `value`, CRC recomputed."""
    info = describe(blob)
    data = bytearray(blob)
    start = len(data) - 4 - info["raw_size"]
    struct.pack_into("<I", data, start + offset, value)
    return fix_crc(bytes(data))


def _raw_u32(blob: bytes, offset: int) -> int:
    info = describe(blob)
    return int(struct.unpack_from("<I", bytes.fromhex(info["raw_hex"]), offset)[0])


def test_stale_envelopes_naming_newer_objects_are_refused(ctx: mlx5tlp.Context) -> None:
    # The kernel (and the software device) hand out the lowest free handle of a context, so an
    # envelope of a freed object names whatever took its handle: refused at import (ESTALE)
    # instead of acting on the newer object.
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        old = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
        stale = old.export()
        old.free()
        newer = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
        assert _raw_u32(newer.export(), 0) == _raw_u32(stale, 0)  # the same handle number
        with pytest.raises(mlx5tlp.InvalidHandleError, match="names another UMEM") as info:
            ictx.import_umem(stale)
        assert info.value.errno == errno.ESTALE
        imp = ictx.import_umem(newer.export())  # the live one imports
        assert imp.umem_id == newer.umem_id
        imp.close()
        newer.free()

        obj = ctx.create_devx_obj(CREATE_OBJ, 16)
        stale = obj.export()
        obj.free()
        newer_obj = ctx.create_devx_obj(CREATE_OBJ, 16)
        assert _raw_u32(newer_obj.export(), 0) == _raw_u32(stale, 0)
        with pytest.raises(mlx5tlp.InvalidHandleError, match="names another DEVX object") as info:
            ictx.import_devx_obj(stale)
        assert info.value.errno == errno.ESTALE
        newer_obj.free()

        # A VAR's handle taken by a UMEM, its page by a new VAR: the mapping alone would pass.
        var = ctx.alloc_var(tlp=True)
        stale = var.export()
        var.free()
        taker = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
        again = ctx.alloc_var(tlp=True)
        assert again.mmap_off == _raw_u32(stale, 16) and again.probe()
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            ictx.import_var(stale)
        assert info.value.errno == errno.ESTALE
        assert sim.device_stats(ctx.name)["tlp_vars"] == 1  # nothing was freed or leaked
        again.free()
        taker.free()


@pytest.mark.parametrize("field", sorted(_VAR_FIELDS))
def test_forged_var_keeping_the_mmap_offset_is_refused(ctx: mlx5tlp.Context, field: str) -> None:
    # A CRC-valid unkeyed envelope whose handle, page id or length was rewritten but whose
    # mmap offset still names a live page: the mapping check alone would accept it.
    var = ctx.alloc_var(tlp=True)
    other = ctx.alloc_var(tlp=True)
    blob = var.export()
    value = {"handle": _raw_u32(blob, 0) + 7, "page_id": other.page_id,
             "length": var.length * 2}[field]
    forged = _rewrite_raw(blob, _VAR_FIELDS[field], value)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            ictx.import_var(forged)
        assert info.value.errno == errno.ESTALE
        genuine = ictx.import_var(blob)
        assert genuine.probe()
        genuine.close()
    var.free()
    other.free()


def test_forged_var_length_must_be_whole_pages(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        for bad in (0, 100, var.length + 1):
            with pytest.raises(mlx5tlp.ExportFormatError, match="whole number"):
                ictx.import_var(_rewrite_raw(var.export(), _VAR_FIELDS["length"], bad))
    assert sim.device_stats(ctx.name)["tlp_vars"] == 1
    var.free()


def test_forged_umem_and_devx_ids_are_refused(ctx: mlx5tlp.Context) -> None:
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    second = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        # Another id under the same handle, and another live UMEM's handle under this id.
        for forged in (_rewrite_raw(umem.export(), 4, umem.umem_id + 100),
                       _rewrite_raw(umem.export(), 0, _raw_u32(second.export(), 0))):
            with pytest.raises(mlx5tlp.InvalidHandleError) as info:
                ictx.import_umem(forged)
            assert info.value.errno == errno.ESTALE
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            ictx.import_devx_obj(_rewrite_raw(obj.export(), 8, _raw_u32(obj.export(), 8) + 1))
        assert info.value.errno == errno.ESTALE
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:  # the type too
            ictx.import_devx_obj(_rewrite_raw(obj.export(), 4, 0x0B00))
        assert info.value.errno == errno.ESTALE
    for o in (umem, second, obj):
        o.free()
