"""A planned handover of a function whose memory region is a file of the application's (a
spec's ``shared`` file, ``MemoryRegion(fd=)``): such a file cannot be sealed, so the successor
maps it under the SIGBUS guard (docs/handover.md, "Size-sealed memfds"; docs/engine.md, "Shared
backing files") and serves the same bytes — what the host wrote before the handover is read
back from the successor, and what it writes after lands in the file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from handover_rig import (
    REQUESTER,
    EventProc,
    cfg_write,
    collect,
    engine_primary,
    private_control,
)
from mlx5tlp import handover, sim, tlp
from mlx5tlp.function import Bar, FunctionSpec, Identity

BAR_BASE = 0xE000_0000

def spec() -> FunctionSpec:
    return FunctionSpec(identity=Identity(vendor_id=0x15B3, device_id=0x7F22, class_code=0x028000),
                        bars=[Bar(0, "mem32", 1 << 16)])


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    with private_control(tmp_path) as ctl:
        yield ctl


def test_a_region_backed_by_an_unsealable_file_is_handed_over(
        setup: tuple[str, bytes, dict[str, str]], device: str, tmp_path: Path) -> None:
    path, key, env = setup
    backing = tmp_path / "bar0.bin"
    backing.write_bytes(bytes(range(256)) * 16)  # a regular file: F_ADD_SEALS is refused
    argv = engine_primary(
        "test_handover_shared_file", device=device, path=path, key=key,
        setup=f"fd = os.open({str(backing)!r}, os.O_RDWR | os.O_CLOEXEC)",
        regions='[engine.MemoryRegion(0, 0, 0x1000, fd=fd, name="mem")]')
    primary = EventProc("primary", argv, env)
    try:
        primary.wait_event("serving")
        with sim.Host(device) as host:
            assert host.send_request(cfg_write(0x10, BAR_BASE, 1))
            assert host.send_request(cfg_write(0x04, 0x0006, 2))
            assert [c.status for c in collect(host, 2)] == [tlp.Status.SC] * 2
            write = tlp.Tlp.mem_write(BAR_BASE + 0x80, b"\xde\xad\xbe\xef",
                                      requester_id=REQUESTER, tag=3)
            assert host.send_request(write.encode())
            sb = handover.Standby(path, key, spec=spec())
            try:
                new = sb.promote()
            finally:
                sb.close()
            try:
                assert primary.wait_event("handed-over")["successor"] == os.getpid()

                def read(off: int, tag: int) -> bytes:
                    req = tlp.Tlp.mem_read(BAR_BASE + off, 1, requester_id=REQUESTER, tag=tag)
                    assert host.send_request(req.encode())
                    (cpl,) = collect(host, 1)
                    assert cpl.status == tlp.Status.SC, cpl
                    return bytes(cpl.data)

                assert read(0x80, 4) == b"\xde\xad\xbe\xef"  # the primary's write, in the file
                assert read(0x10, 5) == bytes(range(16, 20))  # the file's own bytes
                after = tlp.Tlp.mem_write(BAR_BASE + 0x100, b"\x01\x02\x03\x04",
                                          requester_id=REQUESTER, tag=6)
                assert host.send_request(after.encode())
                assert read(0x100, 7) == b"\x01\x02\x03\x04"  # ordered after the write
                assert backing.read_bytes()[0x100:0x104] == b"\x01\x02\x03\x04"
                st = host.stats()
                assert (st["outstanding"], st["unexpected"], st["errors"]) == (0, 0, 0), st
            finally:
                new.stop()
                new.close()
        assert primary.wait_event("outcome")["outcome"] == "handed-over"
    finally:
        primary.close()
    ds = sim.device_stats(device)
    assert (ds["requests_claimed"], ds["requests_pending"]) == (0, 0), ds
