"""Tests of the export envelope (mlx5tlp.envelope): round trips, every check, fuzzing."""

from __future__ import annotations

import contextlib
import struct
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx5tlp.envelope import (
    FLAG_TLP_VAR,
    HEADER_SIZE,
    MAC_SIZE,
    MAGIC,
    DeviceIdentity,
    Envelope,
    Kind,
    describe,
    open_envelope,
    peek_kind,
    seal,
)
from mlx5tlp.errors import Error, ExportFormatError

DEV = DeviceIdentity(
    name="mlx5_0", node_guid=0x0C42A10300AB12CD, backend="rdma", rdma_core_version="63.0"
)
SIZES = {Kind.VAR: 40, Kind.UMEM: 24, Kind.DEVX_OBJ: 48}
KEY = b"k" * 32
OTHER_KEY = b"K" * 32


def raw_for(kind: Kind) -> bytes:
    return bytes((i * 7 + int(kind)) & 0xFF for i in range(SIZES[kind]))


def sizes(kind: Kind) -> int:
    return SIZES[kind]


def make(kind: Kind = Kind.VAR, *, key: bytes | None = None, **kw: Any) -> bytes:
    flags = kw.pop("flags", FLAG_TLP_VAR if kind is Kind.VAR else 0)
    device = kw.pop("device", DEV)
    return seal(kind, raw_for(kind), device, flags=flags, key=key)


def opened(blob: Any, **kw: Any) -> Envelope:
    kw.setdefault("expected_kind", None)
    kw.setdefault("raw_size", sizes)
    kw.setdefault("device", DEV)
    return open_envelope(blob, **kw)


def rejects(blob: Any, fragment: str, **kw: Any) -> ExportFormatError:
    with pytest.raises(ExportFormatError) as info:
        opened(blob, **kw)
    assert fragment in str(info.value), str(info.value)
    return info.value


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_round_trip(kind: Kind, key: bytes | None) -> None:
    blob = make(kind, key=key)
    env = opened(blob, expected_kind=kind, raw_size=SIZES[kind], key=key)
    assert env.kind is kind
    assert env.raw == raw_for(kind)
    assert env.device == DEV
    assert env.flags == (FLAG_TLP_VAR if kind is Kind.VAR else 0)
    assert env.keyed is (key is not None)
    assert env.version == 1
    assert peek_kind(blob) is kind
    # any bytes-like works
    assert opened(bytearray(blob), key=key) == env
    assert opened(memoryview(blob), key=key) == env


def test_layout_is_as_documented() -> None:
    blob = make(Kind.UMEM)
    magic, ver, kind, flags, raw_size, nl, bl, vl, opts, r8, r32, guid = struct.unpack_from(
        "<8sHHIIHHHBBIQ", blob
    )
    assert HEADER_SIZE == 40
    assert (magic, ver, kind, flags, raw_size) == (MAGIC, 1, 2, 0, 24)
    assert (nl, bl, vl, opts, r8, r32, guid) == (6, 4, 4, 0, 0, 0, DEV.node_guid)
    assert blob[40:54] == b"mlx5_0rdma63.0"
    assert blob[54:78] == raw_for(Kind.UMEM)
    assert struct.unpack_from("<I", blob, 78)[0] == zlib.crc32(blob[:78])
    assert len(blob) == 82
    keyed = make(Kind.UMEM, key=KEY)
    assert len(keyed) == 82 + MAC_SIZE
    assert keyed[26] == 1  # options byte: keyed


def test_no_rdma_core_version() -> None:
    dev = DeviceIdentity("mlx5_sim0", 1, "sim", None)
    env = opened(make(Kind.DEVX_OBJ, device=dev), device=dev)
    assert env.device.rdma_core_version is None
    newer = DeviceIdentity("mlx5_sim0", 1, "sim", "63.0")
    rejects(make(Kind.DEVX_OBJ, device=dev), "rdma-core unknown", device=newer)


def test_unicode_device_name() -> None:
    dev = DeviceIdentity("gerät_0", 2, "sim", "63.0")
    assert opened(make(device=dev), device=dev).device == dev


# --- each check --------------------------------------------------------------------------------


def test_not_bytes() -> None:
    with pytest.raises(TypeError):
        opened("not bytes")
    with pytest.raises(TypeError):
        opened(12)


def test_error_type_and_operation() -> None:
    err = rejects(b"", "too short")
    assert isinstance(err, Error) and isinstance(err, OSError)
    assert err.errno is None and err.operation == "import"


def test_too_short_and_every_truncation() -> None:
    for key in (None, KEY):
        blob = make(Kind.VAR, key=key)
        for n in range(len(blob)):
            fragment = "too short for the fixed header" if n < HEADER_SIZE else "truncated"
            rejects(blob[:n], fragment, key=key)


def test_extended() -> None:
    blob = make()
    for extra in (b"\x00", b"junk", bytes(32), bytes(4096)):
        rejects(blob + extra, "unexpected trailing bytes")
    # a keyed blob with its MAC removed looks truncated, an unkeyed one plus MAC extended
    rejects(make(key=KEY)[:-MAC_SIZE], "truncated", key=KEY)


def test_bad_magic() -> None:
    blob = bytearray(make())
    blob[0:8] = b"MLX5TLQ\x00"
    rejects(bytes(blob), "bad magic")
    rejects(bytes(100), "bad magic")


def _fix_crc(blob: bytes) -> bytes:
    """Recompute the CRC of an unkeyed blob so that only the intended check fires."""
    b = bytearray(blob)
    crc_at = len(b) - 4
    struct.pack_into("<I", b, crc_at, zlib.crc32(bytes(b[:crc_at])))
    return bytes(b)


def _patch(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Change a header field and fix the CRC so only the intended check fires."""
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    crc_at = len(b) - 4
    struct.pack_into("<I", b, crc_at, zlib.crc32(bytes(b[:crc_at])))
    return bytes(b)


def test_unsupported_version() -> None:
    err = rejects(_patch(make(), 8, "<H", 2), "unsupported format version 2")
    assert "version 1" in str(err)


def test_unknown_kind() -> None:
    rejects(_patch(make(Kind.UMEM), 10, "<H", 9), "unknown kind 9")


def test_wrong_kind() -> None:
    rejects(make(Kind.UMEM), "expected VAR, got UMEM", expected_kind=Kind.VAR)
    rejects(make(Kind.VAR), "expected DEVX_OBJ, got VAR", expected_kind=Kind.DEVX_OBJ)


def test_unknown_and_misplaced_flags() -> None:
    rejects(_patch(make(Kind.VAR), 12, "<I", 0x80), "unknown flag bits 0x80")
    rejects(_patch(make(Kind.UMEM), 12, "<I", FLAG_TLP_VAR), "flag TLP_VAR set on a UMEM")


def test_unknown_options_and_reserved() -> None:
    rejects(make()[:26] + b"\x02" + make()[27:], "unknown header option bits 0x2")
    rejects(make()[:27] + b"\x01" + make()[28:], "reserved header fields")
    rejects(_patch(make(), 28, "<I", 5), "reserved header fields")


def test_raw_size_mismatch() -> None:
    blob = make(Kind.VAR)
    err = rejects(blob, "raw VAR export is 40 bytes", raw_size=48)
    assert "expects 48" in str(err)
    rejects(blob, "expects 32", raw_size=lambda k: 32)


def test_string_too_long() -> None:
    rejects(_patch(make(), 20, "<H", 256), "device name field is too long: 256")
    rejects(_patch(make(), 22, "<H", 256), "backend field is too long: 256")
    rejects(_patch(make(), 24, "<H", 300), "rdma_core_version field is too long")


def test_string_not_utf8() -> None:
    blob = bytearray(make())
    blob[40:46] = b"mlx5\xff0"
    rejects(_fix_crc(bytes(blob)), "device name field is not valid UTF-8")


def test_crc_mismatch() -> None:
    blob = bytearray(make())
    blob[60] ^= 0x10
    rejects(bytes(blob), "CRC mismatch")
    blob = bytearray(make())
    blob[-1] ^= 0x01
    rejects(bytes(blob), "CRC mismatch")


def test_other_backend() -> None:
    dev = DeviceIdentity(DEV.name, DEV.node_guid, "sim", DEV.rdma_core_version)
    err = rejects(make(device=dev), "backend 'sim'")
    assert "this context is 'rdma'" in str(err)


def test_other_device_name_and_guid() -> None:
    dev = DeviceIdentity("mlx5_1", DEV.node_guid, "rdma", "63.0")
    err = rejects(make(device=dev), "envelope is for device mlx5_1 (guid 0x0c42a10300ab12cd)")
    assert "this context is mlx5_0 (guid 0x0c42a10300ab12cd)" in str(err)
    dev = DeviceIdentity("mlx5_0", DEV.node_guid + 1, "rdma", "63.0")
    err = rejects(make(device=dev), "guid 0x0c42a10300ab12ce")
    assert "this context is mlx5_0 (guid 0x0c42a10300ab12cd)" in str(err)


def test_other_rdma_core_version() -> None:
    dev = DeviceIdentity(DEV.name, DEV.node_guid, "rdma", "64.0")
    err = rejects(make(device=dev), "exported with rdma-core 64.0")
    assert "this runtime has rdma-core 63.0" in str(err)


def test_keys() -> None:
    rejects(make(key=KEY), "HMAC-SHA256 mismatch", key=OTHER_KEY)
    rejects(make(key=KEY), "no key was given")
    rejects(make(), "not keyed", key=KEY)
    # MAC trailer tampered
    blob = bytearray(make(key=KEY))
    blob[-5] ^= 0x40
    rejects(bytes(blob), "HMAC-SHA256 mismatch", key=KEY)
    # contents changed and CRC fixed up: the MAC still catches it
    forged = bytearray(make(key=KEY))
    forged[60] ^= 1
    crc_at = len(forged) - MAC_SIZE - 4
    struct.pack_into("<I", forged, crc_at, zlib.crc32(bytes(forged[:crc_at])))
    rejects(bytes(forged), "HMAC-SHA256 mismatch", key=KEY)


def test_key_validation() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        seal(Kind.VAR, b"x" * 40, DEV, key=b"short")
    with pytest.raises(ValueError, match="at least 16"):
        opened(make(key=KEY), key=b"short")
    with pytest.raises(TypeError):
        opened(make(key=KEY), key="k" * 32)


def test_seal_argument_checks() -> None:
    with pytest.raises(ValueError):
        seal(Kind.VAR, b"", DEV)
    with pytest.raises(ValueError):
        seal(7, b"x", DEV)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        seal(Kind.UMEM, b"x", DEV, flags=FLAG_TLP_VAR)
    with pytest.raises(ValueError):
        seal(Kind.VAR, b"x", DEV, flags=0x100)
    with pytest.raises(ValueError):
        seal(Kind.VAR, b"x", DeviceIdentity("n" * 256, 1, "rdma", None))
    with pytest.raises(ValueError):
        seal(Kind.VAR, b"x", DeviceIdentity("n", 1 << 64, "rdma", None))
    with pytest.raises(TypeError):
        seal(Kind.VAR, "x", DEV)  # type: ignore[arg-type]


def test_peek_kind_checks_crc_only() -> None:
    other = DeviceIdentity("mlx5_9", 9, "sim", "1.0")
    assert peek_kind(make(Kind.DEVX_OBJ, device=other, key=KEY)) is Kind.DEVX_OBJ
    with pytest.raises(ExportFormatError, match="CRC mismatch"):
        blob = bytearray(make())
        blob[50] ^= 4
        peek_kind(bytes(blob))
    with pytest.raises(ExportFormatError, match="too short"):
        peek_kind(b"MLX5")


def test_describe() -> None:
    d = describe(make(Kind.VAR, key=KEY))
    assert d["kind"] == "VAR" and d["flag_names"] == ["TLP_VAR"] and d["keyed"]
    assert d["device"] == {
        "name": "mlx5_0",
        "node_guid": "0x0c42a10300ab12cd",
        "backend": "rdma",
        "rdma_core_version": "63.0",
    }
    assert d["crc_ok"] and len(d["mac_hex"]) == 64 and d["raw_size"] == 40
    blob = bytearray(make())
    blob[60] ^= 1
    assert describe(bytes(blob))["crc_ok"] is False
    with pytest.raises(ExportFormatError):
        describe(b"garbage")
    with pytest.raises(ExportFormatError):
        describe(None)  # type: ignore[arg-type]


# --- corruption: exhaustive and fuzzed ---------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_every_single_bit_flip_is_refused(key: bytes | None) -> None:
    blob = make(Kind.VAR, key=key)
    for bit in range(len(blob) * 8):
        b = bytearray(blob)
        b[bit // 8] ^= 1 << (bit % 8)
        try:
            opened(bytes(b), key=key)
        except ExportFormatError:
            continue
        except Exception as exc:  # pragma: no cover - the failure we are looking for
            pytest.fail(f"bit {bit}: {type(exc).__name__}: {exc}")
        pytest.fail(f"bit {bit}: a corrupted envelope was accepted")


def _blobs() -> list[bytes]:
    other = DeviceIdentity("mlx5_1", 5, "sim", None)
    return [
        make(Kind.VAR),
        make(Kind.UMEM, key=KEY),
        make(Kind.DEVX_OBJ),
        make(Kind.VAR, device=other, key=KEY),
    ]


BLOBS = _blobs()

_edit = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("ins"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("del"), st.integers(0, 10_000), st.integers(1, 8)),
    st.tuples(st.just("splice"), st.integers(0, 10_000), st.integers(0, len(BLOBS) - 1)),
)


def _apply(blob: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    b = bytearray(blob)
    for op, pos, arg in edits:
        p = pos % (len(b) + 1)
        if op == "set" and b:
            b[p % len(b)] = arg
        elif op == "ins":
            b[p:p] = arg
        elif op == "del":
            del b[p : p + arg]
        elif op == "splice":
            other = BLOBS[arg]
            b = b[:p] + other[p % (len(other) + 1) :]
    return bytes(b)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.integers(0, len(BLOBS) - 1),
    edits=st.lists(_edit, min_size=1, max_size=6),
    use_key=st.booleans(),
    expected=st.sampled_from([None, *Kind]),
)
def test_mutated_blobs_only_raise_export_format_error(
    base: int, edits: list[tuple[str, int, Any]], use_key: bool, expected: Kind | None
) -> None:
    original = BLOBS[base]
    mutated = _apply(original, edits)
    key = KEY if use_key else None
    try:
        env = opened(mutated, key=key, expected_kind=expected)
    except ExportFormatError:
        pass
    else:
        # Only possible when the edits cancelled out (or spliced in an equivalent blob).
        assert mutated in BLOBS, "a mutated envelope was accepted"
        assert env.raw == raw_for(env.kind)
    for fn in (peek_kind, describe):
        with contextlib.suppress(ExportFormatError):
            fn(mutated)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_export_format_error(data: bytes) -> None:
    with pytest.raises(ExportFormatError):
        opened(data)
    with pytest.raises(ExportFormatError):
        opened(MAGIC + b"\x01\x00" + data)


# ---- the core's accept-only fast path agrees with this reference ----


def _recrc(blob: bytes) -> bytes:
    """`blob` with its CRC recomputed where its header says the CRC is (if it can)."""
    if len(blob) < HEADER_SIZE:
        return blob
    f = struct.unpack_from("<8sHHIIHHHBBIQ", blob, 0)
    crc_at = HEADER_SIZE + f[5] + f[6] + f[7] + f[4]
    if crc_at + 4 > len(blob):
        return blob
    return blob[:crc_at] + struct.pack("<I", zlib.crc32(blob[:crc_at])) + blob[crc_at + 4:]


def _mutations(blob: bytes) -> list[bytes]:
    out = [blob, blob[:-1], blob + b"\0"]
    for i in range(len(blob)):
        for value in (0, 0xFF, blob[i] ^ 1, blob[i] ^ 0x80):
            edited = blob[:i] + bytes([value]) + blob[i + 1:]
            out += [edited, _recrc(edited)]  # the CRC-valid forgeries test the other checks
    return out


def test_fast_path_accepts_exactly_what_the_reference_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlx5tlp import _core
    from mlx5tlp import envelope as env_mod

    assert env_mod._accept is _core.envelope_accept  # the fast path is in use here
    other = DeviceIdentity("mlx5_1", DEV.node_guid, "rdma", "63.0")
    blobs = [make(k) for k in Kind] + [make(Kind.VAR, key=KEY), make(Kind.UMEM, flags=0),
                                       make(Kind.VAR, flags=0), make(Kind.UMEM, device=other)]
    checked = accepted = 0
    for blob in (m for b in blobs for m in _mutations(b)):
        for kind in Kind:
            fast = _core.envelope_accept(blob, int(kind), SIZES[kind], b"mlx5_0", DEV.node_guid,
                                         b"rdma", b"63.0")
            monkeypatch.setattr(env_mod, "_accept", None)  # the Python reference alone
            try:
                ref: Envelope | None = opened(blob, expected_kind=kind)
            except ExportFormatError:
                ref = None
            finally:
                monkeypatch.undo()
            checked += 1
            if ref is None:
                assert fast is None, (blob.hex(), kind)
            else:  # an unkeyed envelope the reference accepts: the fast path accepts it too
                assert fast == (ref.flags, ref.raw), (blob.hex(), kind)
                assert opened(blob, expected_kind=kind) == ref  # and open_envelope with it
                accepted += 1
    assert checked > 10_000 and accepted >= len(Kind) + 2
