"""The declarative API: a device in ~30 lines, the spec file format, validation errors that
name the field, and the function state as bytes that outlive the process."""

from __future__ import annotations

import errno
import json
import mmap
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import function as fn


def declare() -> fn.FunctionSpec:
    # A NIC-like function: 64-bit prefetchable BAR0 for queues, BAR2 for registers and the
    # MSI-X structures, an expansion ROM, AER, a serial number and a vendor capability.
    return fn.FunctionSpec(
        identity=fn.Identity(
            vendor_id=0x15B3, device_id=0x1021, subsystem_vendor_id=0x15B3,
            subsystem_id=0x0007, revision=1, class_code=0x020000, interrupt_pin=1,
        ),
        bars=[
            fn.Bar(0, "mem64", 32 << 20, prefetchable=True),
            fn.Bar(2, "mem64", 64 << 10),
        ],
        expansion_rom=fn.ExpansionRom(size=128 << 10),
        pcie=fn.PciExpress(max_payload_supported=512, max_link_speed=4, max_link_width=16),
        msix=fn.Msix(vectors=32, table_bar=2, table_offset=0x8000, pba_offset=0xC000),
        aer=fn.Aer(),
        serial_number=fn.SerialNumber(0xB8CEF603000A1B2C),
        vendor_caps=[fn.VendorCap(data=b"\x01\x00mlx5tlp\x00", writable=[(0, 2)])],
    )


def test_a_device_in_thirty_lines_enumerates_as_declared() -> None:
    f = fn.Function(declare())
    e = fn.enumerate_function(f)
    assert e.problems == ()
    assert (e.vendor_id, e.device_id, e.class_code) == (0x15B3, 0x1021, 0x020000)
    assert [(c.id, c.extended) for c in e.capabilities] == [
        (0x10, False), (0x01, False), (0x11, False), (0x09, False), (0x01, True), (0x03, True)]
    assert [(b.index, b.kind, b.size) for b in e.bars] == [(0, "mem64", 32 << 20),
                                                          (2, "mem64", 64 << 10)]
    assert e.rom is not None and e.rom.size == 128 << 10
    assert e.msix == fn.MsixInfo(f.capability_offset("msix"), 32, 2, 0x8000, 2, 0xC000)
    # MSI-X masking through the assigned BAR address: masked -> pending, unmask -> sent.
    bar2 = e.bar(2)
    assert bar2 is not None
    f.config_write(e.msix.offset + 2, 0x8000, 2)
    entry = bar2.address + 0x8000 + 16 * 4
    assert f.memory_write(entry, struct.pack("<QI", 0xFEE0_1000, 0x31)) == "undefined_size"
    assert f.memory_write(entry, struct.pack("<Q", 0xFEE0_1000)) == "ok"
    assert f.memory_write(entry + 8, struct.pack("<I", 0x31)) == "ok"
    assert f.raise_msix(4) == "pending"
    assert f.memory_write(entry + 12, b"\0\0\0\0") == "ok"
    assert f.take_interrupts() == [(0xFEE0_1000, 0x31)]


def test_json_and_toml_round_trip(tmp_path: Path) -> None:
    spec = declare()
    d = spec.to_dict()
    assert d["format"] == "mlx5tlp.function" and d["version"] == 1
    assert d["vendor_caps"][0]["data"] == "01006d6c7835746c7000"
    assert fn.FunctionSpec.from_json(spec.to_json()) == spec
    assert fn.FunctionSpec.from_toml(spec.to_toml()) == spec
    for name in ("dev.json", "dev.toml"):
        fn.dump(spec, tmp_path / name)
        assert fn.load(tmp_path / name) == spec
    assert "[[bars]]" in (tmp_path / "dev.toml").read_text()
    assert json.loads((tmp_path / "dev.json").read_text())["identity"]["vendor_id"] == 0x15B3


def test_spec_file_with_hex_strings_and_defaults() -> None:
    text = """{"identity": {"vendor_id": "0x15b3", "device_id": "0x1234"},
               "bars": [{"index": 2, "kind": "mem32", "size": 4096}],
               "msix": {"vectors": 4, "table_bar": 2}}"""
    spec = fn.FunctionSpec.from_json(text)
    assert spec.identity.vendor_id == 0x15B3 and spec.pcie == fn.PciExpress()
    assert spec.msix == fn.Msix(vectors=4, table_bar=2, table_offset=0, pba_bar=2, pba_offset=64)
    fn.Function(spec)


@pytest.mark.parametrize(("data", "exc", "field"), [
    ({"identity": {"vendor_id": 1, "device_id": 2}, "bar": []}, ValueError, "bar:"),
    ({"identity": {"vendor_id": 1, "device_id": 2, "colour": 1}}, ValueError, "identity.colour"),
    ({"identity": {"vendor_id": 1}}, ValueError, "identity.device_id: missing"),
    ({"identity": {"vendor_id": "x", "device_id": 2}}, TypeError, "identity.vendor_id"),
    ({"identity": {"vendor_id": 1, "device_id": 2},
      "bars": [{"index": 0, "kind": "mem32", "size": 4096, "prefetchable": 1}]},
     TypeError, "bars[0].prefetchable"),
    ({"identity": {"vendor_id": 1, "device_id": 2}, "vendor_caps": [{"data": "zz"}]},
     ValueError, "vendor_caps[0].data"),
    ({"identity": {"vendor_id": 1, "device_id": 2}, "version": 2}, ValueError, "version"),
    ({"bars": []}, ValueError, "identity: missing"),
])
def test_file_format_errors_name_the_field(data: dict[str, Any], exc: type, field: str) -> None:
    with pytest.raises(exc, match=field.replace("[", r"\[").replace("]", r"\]")):
        fn.FunctionSpec.from_dict(data)


def _with(**changes: Any) -> fn.FunctionSpec:
    return fn.FunctionSpec(**{**{f: getattr(declare(), f) for f in declare().__dataclass_fields__},
                              **changes})


@pytest.mark.parametrize(("spec", "field"), [
    (_with(bars=[fn.Bar(0, "mem32", 3000)]), "bars[0].size"),
    (_with(bars=[fn.Bar(5, "mem64", 4096)]), "bars[0].index"),  # no upper half in slot 5
    (_with(bars=[fn.Bar(0, "mem64", 4096), fn.Bar(1, "mem32", 4096)]), "bars[1].index"),
    (_with(bars=[fn.Bar(0, "mem32", 4096, prefetchable=True)]), "bars[0].prefetchable"),
    (_with(bars=[fn.Bar(0, "io", 512)]), "bars[0].size"),
    (_with(bars=[fn.Bar(0, "mem16", 4096)]), "bars[0].kind"),  # type: ignore[arg-type]
    (_with(msix=fn.Msix(vectors=2048, table_bar=2, table_offset=0x9000)), "msix.table_bar"),
    (_with(msix=fn.Msix(vectors=2048, table_bar=2, table_offset=0x8000)), "msix.pba_bar"),
    (_with(msix=fn.Msix(vectors=32, table_bar=2, table_offset=0xFFF8)), "msix.table_bar"),
    (_with(msix=fn.Msix(vectors=32, table_bar=1)), "msix.table_bar"),  # upper half of BAR0
    (_with(msix=fn.Msix(vectors=32, table_bar=2, pba_offset=0x100)), "msix.pba_offset"),
    (_with(msix=fn.Msix(vectors=32, table_bar=2, table_offset=4)), "msix.table_offset"),
    (_with(msix=fn.Msix(vectors=0, table_bar=2)), "msix.vectors"),
    (_with(msix=fn.Msix(vectors=8, table_bar=2, offset=0x41)), "msix.offset"),
    (_with(aer=fn.Aer(offset=0x140), serial_number=fn.SerialNumber(1, offset=0x180)),
     "extended capabilities"),  # nothing at 0x100
    (_with(pcie=fn.PciExpress(offset=0x40), msix=fn.Msix(vectors=8, table_bar=2, offset=0x48)),
     "msix.offset"),
    (_with(expansion_rom=fn.ExpansionRom(32 << 20)), "expansion_rom.size"),
    (_with(pcie=fn.PciExpress(max_payload_supported=96)), "pcie.max_payload_supported"),
    (_with(pcie=fn.PciExpress(max_link_width=3)), "pcie.max_link_width"),
    (_with(identity=fn.Identity(vendor_id=0xFFFF, device_id=1)), "identity.vendor_id"),
    (_with(identity=fn.Identity(vendor_id=0x10000, device_id=1)), "identity.vendor_id"),
    (_with(identity=fn.Identity(vendor_id=1, device_id=1, interrupt_pin=2)),
     "identity.interrupt_pin"),
    (_with(vendor_caps=[fn.VendorCap(bytes(253))]), "vendor_caps[0].data"),
    (_with(vendor_caps=[fn.VendorCap(bytes(4), writable=[(2, 4)])]),
     "vendor_caps[0].writable[0]"),
    (_with(vendor_ext_caps=[fn.VendorExtCap(1, revision=16)]), "vendor_ext_caps[0].revision"),
])
def test_compile_errors_name_the_field(spec: fn.FunctionSpec, field: str) -> None:
    with pytest.raises(mlx5tlp.InvalidArgumentError) as ei:
        fn.Function(spec)
    assert ei.value.errno == errno.EINVAL
    assert f"{field}:" in str(ei.value), str(ei.value)


def test_wrong_python_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="bars"):
        fn.FunctionSpec(identity=fn.Identity(1, 2), bars=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"bars\[0\]\.size"):
        fn.Function(_with(bars=[fn.Bar(0, "mem32", "4096")]))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fn.Function({"identity": {}})  # type: ignore[arg-type]


# ---- state: bytes, in memory another process can map, checked on adoption ----


def test_snapshot_restore_and_refusals() -> None:
    f = fn.Function(declare())
    fn.enumerate_function(f)
    snap = f.snapshot()
    assert len(snap) == fn.STATE_SIZE and snap[:4] == b"M5FN"
    assert struct.unpack_from("<H", snap, 4)[0] == fn.STATE_VERSION
    g = fn.Function(declare())
    g.restore(snap)
    assert g.config_bytes() == f.config_bytes() and g.memory_enabled
    cases = [
        (bytearray(snap[:-1]), errno.EINVAL, "bytes"),
        (bytearray(b"XXXX" + snap[4:]), errno.EINVAL, "magic"),
        (bytearray(snap[:4] + struct.pack("<H", 99) + snap[6:]), errno.EPROTO, "version"),
    ]
    tampered = bytearray(snap)
    tampered[24 + 0x02] ^= 0xFF  # Device ID: read-only
    cases.append((tampered, errno.EINVAL, "config byte 0x2"))
    for data, err, words in cases:
        with pytest.raises(mlx5tlp.InvalidArgumentError) as ei:
            g.restore(bytes(data))
        assert ei.value.errno == err and words in str(ei.value)
    other = fn.Function(_with(identity=fn.Identity(0x15B3, 0x1022)))
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="spec digest"):
        other.restore(snap)
    assert g.config_bytes() == f.config_bytes()  # refused restores changed nothing


CHILD = r"""
import mmap, os, sys
from mlx5tlp import function as fn
spec = fn.FunctionSpec.from_json(sys.argv[2])
with open(sys.argv[1], "r+b") as fh:
    mm = mmap.mmap(fh.fileno(), fn.STATE_SIZE)
f = fn.Function(spec, state=mm)
e = fn.enumerate_function(f)
f.config_write(e.msix.offset + 2, 0x8000, 2)
assert f.raise_msix(3) == "pending"
print(hex(e.bar(0).address), flush=True)
os._exit(0)  # no clean-up: the state must already be where the successor finds it
"""


def test_state_in_shared_memory_survives_the_process(tmp_path: Path) -> None:
    state = tmp_path / "function.state"
    state.write_bytes(bytes(fn.STATE_SIZE))
    spec = declare()
    out = subprocess.run([sys.executable, "-c", CHILD, str(state), spec.to_json()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    bar0 = int(out.stdout.strip(), 16)
    with open(state, "r+b") as fh:
        mm = mmap.mmap(fh.fileno(), fn.STATE_SIZE)
    successor = fn.Function(spec, state=mm, adopt=True)
    assert successor.bar_base(0) == bar0 and successor.memory_enabled
    assert successor.msix_pending(3)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="spec digest"):
        fn.Function(_with(identity=fn.Identity(0x15B3, 0x1022)), state=mm, adopt=True)
    successor.close()
    mm.close()  # BufferError if a Function (even the refused one) still held the mapping
    with pytest.raises(mlx5tlp.InvalidHandleError) as ei:
        successor.config_read(0)
    assert ei.value.errno == errno.EBADF and successor.closed
    successor.close()  # idempotent


def test_context_manager_closes() -> None:
    with fn.Function(declare()) as f:
        assert f.config_read(0, 2) == 0x15B3
    with pytest.raises(mlx5tlp.InvalidHandleError):
        f.raise_msix(0)


def test_state_buffer_checks() -> None:
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="state: buffer of 10 bytes"):
        fn.Function(declare(), state=bytearray(10))
    with pytest.raises(TypeError, match="writable"):
        fn.Function(declare(), state=bytes(fn.STATE_SIZE))  # read-only buffer
    buf = bytearray(fn.STATE_SIZE)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="bad magic"):
        fn.Function(declare(), state=buf, adopt=True)  # zeros are no predecessor's state


DOC = Path(__file__).resolve().parents[1] / "docs" / "function.md"


@pytest.mark.skipif(not DOC.exists(), reason="needs a source checkout (docs/function.md)")
def test_the_examples_in_docs_function_md_work() -> None:
    text = DOC.read_text()
    toml = text.split("```toml\n")[1].split("```")[0]
    spec = fn.FunctionSpec.from_toml(toml)
    assert spec.msix == fn.Msix(vectors=32, table_bar=2, table_offset=0x8000, pba_offset=0xC000)
    assert fn.enumerate_function(fn.Function(spec)).problems == ()
    code = text.split("```python\n")[1].split("```")[0]
    scope: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), scope)
    assert scope["found"].problems == () and scope["spec"] == declare()
