"""Regenerate the committed seed corpora in tests/fuzz/corpus/<target>/.

    python -m tests.fuzz.make_corpus            (needs the package built: pip install -e .)

Every seed is made by the project's own encoders and by a real software device, so the fuzzers
start from inputs the code under test actually produces: encoded TLPs of every kind, request
streams with completion parameters, configuration-write sequences a host driver performs,
patches that turn a fresh device state into a used one, and real export envelopes. The output
is deterministic for a given source tree (no times, pids or random bytes in the seeds except
what the device state itself records); rerunning it replaces the seeds.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# The software device the sim-state target starts from: fuzz_sim_state.cpp creates the same.
SIM_STATE_CONFIG = dict(
    tlp=True,
    gw_pages=8,
    gw_log_stride=0,
    virtio_pages=16,
    slot_size=256,
    bar_offset=0x200000,
    node_guid=0x0002C90300FEED01,
)
FUZZ_KEY = b"mlx5tlp-fuzz-key-0123456789abcdef"  # fuzz_envelope.py re-signs with this key


def _write(target: str, seeds: Iterable[tuple[str, bytes]]) -> int:
    d = CORPUS / target
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    n = 0
    for name, data in seeds:
        digest = hashlib.sha1(data).hexdigest()[:12]
        (d / f"{name}-{digest}").write_bytes(data)
        n += 1
    return n


def tlps() -> list[tuple[str, bytes]]:
    """One encoded TLP of every kind, plus the header variants the decoder branches on."""
    from mlx5tlp.tlp import Tlp

    d8, d64 = bytes(range(8)), bytes(range(64))
    t = [
        ("mrd", Tlp.mem_read(0x1000, 1, requester_id=0x0100, tag=1)),
        ("mrd-multi", Tlp.mem_read(0x1004, 16, tag=0x3FF, first_be=0xE, last_be=0x7, tc=3, attr=7)),
        ("mrd-zero-length", Tlp.mem_read(0x2000, 1, first_be=0)),
        ("mrd-4dw", Tlp.mem_read(0x1_2345_6000, 4)),
        ("mrd-1024dw", Tlp.mem_read(0x4000, 1024)),
        ("mrd-digest", Tlp.mem_read(0x3000, 2, td=True, digest=0xDEADBEEF)),
        ("mrdlk", Tlp.mem_read(0x5000, 2, locked=True)),
        ("mwr", Tlp.mem_write(0x6000, d8, tag=7)),
        ("mwr-4dw", Tlp.mem_write(0x2_0000_0000, d64, ep=True)),
        ("iord", Tlp.io_read(0x100)),
        ("iowr", Tlp.io_write(0x104, b"\x01\x02\x03\x04", first_be=0x3)),
        ("cfgrd0", Tlp.cfg_read(0x0100, 0x10)),
        ("cfgrd1", Tlp.cfg_read(0x0208, 0xFFC, type=1)),
        ("cfgwr0", Tlp.cfg_write(0x0100, 0x04, b"\x06\x00\x00\x00", first_be=0x3)),
        ("cfgwr1", Tlp.cfg_write(0x0300, 0x100, b"\xff\xff\xff\xff", type=1)),
        (
            "cpl-ur",
            Tlp.completion(completer_id=0x0100, requester_id=0, tag=5, status=1, byte_count=4),
        ),
        (
            "cpld",
            Tlp.completion(
                completer_id=0x0100,
                requester_id=0,
                tag=5,
                data=d8,
                byte_count=8,
                lower_address=0x40,
            ),
        ),
        (
            "cpld-partial",
            Tlp.completion(
                completer_id=0x0100, requester_id=0, tag=6, data=d8, byte_count=200, lower_address=3
            ),
        ),
        (
            "cpllk",
            Tlp.completion(
                completer_id=0x0100, requester_id=0, tag=5, status=4, byte_count=8, locked=True
            ),
        ),
        (
            "cpldlk",
            Tlp.completion(
                completer_id=0x0100, requester_id=0, tag=5, data=d8, byte_count=8, locked=True
            ),
        ),
        ("msg", Tlp.message(0x20, routing=4)),
        ("msgd", Tlp.message(0x7F, routing=2, address=0x1122334455667788, data=d8)),
    ]
    out = [(name, tlp.encode()) for name, tlp in t]
    # Headers the decoder must refuse: a TLP prefix, reserved Fmt, an AtomicOp, TH set.
    mrd = t[0][1].encode()
    out += [
        ("prefix", b"\x90\x00\x00\x00" + mrd),
        ("reserved-fmt", b"\xa0" + mrd[1:]),
        ("atomic-fetchadd", b"\x4c" + mrd[1:] + b"\x00" * 4),
        ("th-set", mrd[:1] + b"\x01" + mrd[2:]),
    ]
    return out


def _params(mps_code: int, rcb128: bool, status: int, per_request: bool = False) -> bytes:
    # fuzz_completions.cpp's 8-byte parameter header.
    return struct.pack("<HBBBBBB", 0x0100, mps_code, int(rcb128), status, int(per_request), 0xFF, 0)


def completion_streams() -> list[tuple[str, bytes]]:
    from mlx5tlp.tlp import Tlp

    reads = [
        Tlp.mem_read(0x1000, 1),
        Tlp.mem_read(0x1004, 40, first_be=0xC, last_be=0x3),
        Tlp.mem_read(0x1_0000_0F00, 64),
        Tlp.mem_read(0x8000, 1, first_be=0),
        Tlp.mem_read(0x9000, 1024),
        Tlp.mem_read(0xA040, 8, locked=True),
    ]
    others = [
        Tlp.io_read(0x10),
        Tlp.io_write(0x14, b"\x00" * 4),
        Tlp.cfg_read(0x0100, 0x40),
        Tlp.cfg_write(0x0100, 0x44, b"\x01\x00\x00\x00"),
        Tlp.cfg_read(0x0200, 0, type=1),
        Tlp.mem_write(0x3000, bytes(16)),
        Tlp.message(0x20, routing=4),
    ]
    one = b"".join(t.encode() for t in reads[:1])
    mix = b"".join(t.encode() for t in reads + others)
    return [
        ("single-mrd", _params(1, False, 0) + one),
        ("large-reads", _params(0, True, 0) + b"".join(t.encode() for t in reads)),
        ("mixed-mps512", _params(2, False, 0) + mix),
        ("mixed-ur", _params(1, False, 1) + mix),
        ("mixed-per-request", _params(5, True, 0, per_request=True) + mix),
        ("cfg-crs", _params(1, False, 2) + b"".join(t.encode() for t in others[2:5])),
    ]


def config_sequences() -> list[tuple[str, bytes]]:
    """What a host driver does: size the BARs, enable decode and bus mastering, set MPS/RCB,
    enable MSI-X, go D3hot and back. Ops are fuzz_config_space.cpp's 8-byte records."""

    def cw(off: int, value: int, be: int = 0xF) -> bytes:
        return struct.pack("<BHIB", 0, off, value, be)

    def cr(off: int) -> bytes:
        return struct.pack("<BHIB", 1, off, 0, 0)

    size_bars = b"".join(cw(0x10 + 4 * i, 0xFFFFFFFF) + cr(0x10 + 4 * i) for i in range(6))
    enable = cw(0x04, 0x0007, 0x3) + cw(0x06, 0xFFFF0000, 0xC)  # Command; Status RW1C
    # PCIe capability and MSI-X are found by walking the list: the target resolves
    # "capability-relative" offsets in ops 2/3 (see fuzz_config_space.cpp).
    pcie = struct.pack("<BHIB", 2, 0x08, 0x2810, 0x3) + struct.pack("<BHIB", 2, 0x10, 0x0008, 0x3)
    msix = struct.pack("<BHIB", 3, 0x02, 0xC0000000, 0xC)
    pm_cycle = struct.pack("<BHIB", 4, 0x04, 0x3, 0x3) + struct.pack("<BHIB", 4, 0x04, 0x0, 0x3)
    table = struct.pack("<BHIB", 5, 0x00, 0xFEE00000, 0xF) + struct.pack("<BHIB", 5, 0x0C, 0, 0xF)
    snap = struct.pack("<BHIB", 6, 0, 0, 0)
    return [
        ("size-bars", b"\x00" + size_bars),
        ("enable", b"\x00" + enable + pcie),
        ("msix", b"\x01" + enable + msix + table + snap),
        ("pm-cycle", b"\x02" + enable + pm_cycle + snap),
        ("everything", b"\x03" + size_bars + enable + pcie + msix + table + pm_cycle + snap),
    ]


def _patches(base: bytes, used: bytes, gap: int = 32) -> bytes:
    """Patch records of fuzz_sim_state.cpp (<u32 offset><u16 length><bytes>): base -> used."""
    out, i, n = [], 0, len(used)
    while i < n:
        if base[i] == used[i]:
            i += 1
            continue
        j = i
        while (
            j < n
            and j - i < 0xFFFF
            and (used[j] != base[j] or used[j : j + gap] != base[j : j + gap])
        ):
            j += 1
        out.append(struct.pack("<IH", i, j - i) + used[i:j])
        i = j
    return b"".join(out)


def sim_states() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Seeds for fuzz_sim_state (state patches) and fuzz_envelope (real envelopes)."""
    import mlx5tlp
    from mlx5tlp import sim

    sim.create_device("fuzzseed", **SIM_STATE_CONFIG)  # type: ignore[arg-type]
    state = Path(sim.device_dir()) / "fuzzseed" / "state"
    fresh = state.read_bytes()
    states: list[tuple[str, bytes]] = [("header", struct.pack("<IH", 0, 256) + fresh[:256])]
    envelopes: list[tuple[str, bytes]] = []
    buf = mmap_buffer(1 << 16)
    with mlx5tlp.open_device("fuzzseed", backend="sim") as ctx:
        tlp_vars = [ctx.alloc_var(tlp=True) for _ in range(2)]
        virtio = ctx.alloc_var()
        umem = ctx.reg_umem(buf)
        used = state.read_bytes()
        states.append(("used", _patches(fresh, used)))
        states.append(
            ("used-header", struct.pack("<IH", 0, 256) + used[:256] + _patches(fresh, used))
        )
        for name, obj in (
            ("var-tlp", tlp_vars[0]),
            ("var-tlp2", tlp_vars[1]),
            ("var-virtio", virtio),
            ("umem", umem),
        ):
            # fuzz_envelope.py's flag byte: 1 = recompute the CRC, 3 = and re-sign the HMAC.
            envelopes.append((name, b"\x01" + obj.export()))
            envelopes.append((f"{name}-keyed", b"\x03" + obj.export(key=FUZZ_KEY)))
        for o in (umem, virtio, *tlp_vars):
            o.close()
    sim.remove_device("fuzzseed")
    return states, envelopes


def mmap_buffer(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # page aligned, as a UMEM needs


def main() -> int:
    os.environ.setdefault("MLX5TLP_BACKEND", "sim")
    tmp = None
    if "MLX5TLP_SIM_DIR" not in os.environ:
        tmp = tempfile.mkdtemp(prefix="mlx5tlp-corpus-")
        os.environ["MLX5TLP_SIM_DIR"] = tmp
    try:
        counts = {
            "fuzz_tlp_decode": _write("fuzz_tlp_decode", tlps()),
            "fuzz_completions": _write("fuzz_completions", completion_streams()),
            "fuzz_config_space": _write("fuzz_config_space", config_sequences()),
        }
        states, envelopes = sim_states()
        counts["fuzz_sim_state"] = _write("fuzz_sim_state", states)
        counts["fuzz_envelope"] = _write("fuzz_envelope", envelopes)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for target, n in counts.items():
        print(f"{target}: {n} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
