"""The software device through the core's loader: devices, pages, capabilities, lifetimes."""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import struct
import subprocess
import sys
import tempfile

import pytest

import mlx5tlp
from mlx5tlp import sim


def test_default_device_exists_without_setup() -> None:
    with tempfile.TemporaryDirectory() as d:
        code = "import mlx5tlp; print([x.name for x in mlx5tlp.list_devices('sim')])"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "MLX5TLP_SIM_DIR": d},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "['mlx5_sim0']"
        assert os.path.isdir(os.path.join(d, "mlx5_sim0"))


def test_create_and_remove(device: str) -> None:
    cfg = sim.device_config(device)
    assert cfg["tlp"] is True and cfg["gw_pages"] == 8 and cfg["slot_size"] == 256
    with pytest.raises(mlx5tlp.Error) as exc:
        sim.create_device(device)
    assert exc.value.errno == 17  # EEXIST
    for bad in ({"gw_pages": 0}, {"gw_pages": 16}, {"gw_log_stride": 5}, {"slot_size": 96}):
        with pytest.raises(ValueError):
            sim.create_device("x", **bad)  # type: ignore[arg-type]
    with pytest.raises(mlx5tlp.Error) as exc:
        sim.create_device("bad/name")
    assert exc.value.errno == 22
    with mlx5tlp.open_device(device):
        with pytest.raises(mlx5tlp.Error) as exc:
            sim.remove_device(device)  # a live context holds it
        assert exc.value.errno == 16  # EBUSY


def _query_cap(ctx: mlx5tlp.Context, cap_type: int) -> bytes:
    cmd = struct.pack(">HHHH", 0x100, 0, 0, (cap_type << 1) | 1) + bytes(8)
    return ctx.devx_general_cmd(cmd, 0x10 + 0x1000)[0x10:]


def test_query_hca_cap_bit_layout() -> None:
    # Positions from the kernel's include/linux/mlx5/mlx5_ifc.h: cmd_hca_cap bit 0x398
    # tlp_device_emulation_manager; tlp_dev_emu_capabilities: log_tlp_rsp_gw_page_stride at
    # bits 0x33..0x37, tlp_rsp_gw_num_pages at 0x10c..0x10f, tlp_rsp_gw_pages_bar_offset 0x1c0.
    sim.create_device("caps", gw_pages=13, gw_log_stride=3, bar_offset=0x0123456789ABC000)
    try:
        with mlx5tlp.open_device("caps") as ctx:
            gen = _query_cap(ctx, 0)
            assert gen[0x70:0x74] == b"\x00\x00\x00\x80"
            tlp = _query_cap(ctx, 0x2A)
            assert struct.unpack(">I", tlp[4:8])[0] == 3 << 8
            assert struct.unpack(">I", tlp[0x20:0x24])[0] == 13 << 16
            assert struct.unpack(">Q", tlp[0x38:0x40])[0] == 0x0123456789ABC000
            caps = ctx.query_tlp_caps()
            assert (caps.supported, caps.gw_num_pages, caps.gw_page_stride) == (True, 13, 32768)
    finally:
        sim.remove_device("caps")


def test_no_tlp_emulation(notlp_device: str) -> None:
    with mlx5tlp.open_device(notlp_device) as ctx:
        assert _query_cap(ctx, 0)[0x70:0x74] == bytes(4)
        assert ctx.query_tlp_caps() == mlx5tlp.TlpCaps(False, 0, 0, 0, 0)
        with pytest.raises(mlx5tlp.NotSupportedError) as exc:
            ctx.alloc_var(tlp=True)
        assert exc.value.errno == 95  # EOPNOTSUPP
        assert "no TLP emulation" in str(exc.value)
        with pytest.raises(mlx5tlp.DevxCommandError) as dexc:
            _query_cap(ctx, 0x2A)
        assert dexc.value.status == 3  # BAD_PARAM: no such capability page


def test_gateway_page_through_cmd_fd(ctx: mlx5tlp.Context, device: str) -> None:
    var = ctx.alloc_var(tlp=True)
    # Exactly what a pyverbs user does: mmap(cmd_fd, length, offset=mmap_off).
    m = mmap.mmap(ctx.cmd_fd, var.length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                  offset=var.mmap_off)
    try:
        # The device wrote the ring header at allocation: magic, geometry, page id.
        magic, ver_slot, count, page = struct.unpack_from("<IIII", m, 8)
        assert magic == 0x5747354D and ver_slot == (256 << 16) | 1
        assert count == (4096 - 128) // 256 and page == var.page_id
        m[3000:3004] = b"abcd"
        with var.mmap(mmap.PROT_READ | mmap.PROT_WRITE) as m2:
            assert m2[3000:3004] == b"abcd"
    finally:
        m.close()
    var.free()
    # Freed: the page is scrubbed, and mapping it through the object is refused.
    v2 = ctx.alloc_var(tlp=True)
    with v2.mmap(mmap.PROT_READ | mmap.PROT_WRITE) as m3:
        assert m3[3000:3004] == bytes(4)
    assert sim.device_stats(device)["tlp_vars"] == 1


def _open_alloc_close(device: str, rounds: int) -> None:
    for _ in range(rounds):
        with mlx5tlp.open_device(device) as c:
            v = c.alloc_var(tlp=True)
            u = c.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
            v.free()
            u.free()


def test_concurrent_opens_from_many_processes(device: str) -> None:
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_open_alloc_close, args=(device, 15)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    st = sim.device_stats(device)
    assert st["contexts"] == 0 and st["tlp_vars"] == 0 and st["umems"] == 0
    assert st["gw_pages_free"] == 8


def _hold(device: str, ready: multiprocessing.synchronize.Event) -> None:
    c = mlx5tlp.open_device(device)
    keep = [c.alloc_var(tlp=True), c.alloc_var(tlp=True), c.alloc_var(tlp=False),
            c.reg_umem(mlx5tlp.alloc_umem_buffer(4096))]
    keep.append(c.create_devx_obj(bytes([0x0A, 0, 0, 0, 0, 0, 0, 0x42]) + bytes(8), 16))
    ready.set()
    import time

    time.sleep(600)


def test_sigkill_reclaims_everything(device: str) -> None:
    mp = multiprocessing.get_context("spawn")
    ready = mp.Event()
    p = mp.Process(target=_hold, args=(device, ready))
    p.start()
    try:
        assert ready.wait(60)
        st = sim.device_stats(device)
        live = (st["contexts"], st["tlp_vars"], st["virtio_vars"], st["umems"], st["devx_objs"])
        assert live == (1, 2, 1, 1, 1)
        assert st["gw_pages_free"] == 6
    finally:
        p.kill()
        p.join(30)
    st = sim.device_stats(device)
    live = (st["contexts"], st["tlp_vars"], st["virtio_vars"], st["umems"], st["devx_objs"])
    assert live == (0, 0, 0, 0, 0)
    assert st["gw_pages_free"] == 8 and st["virtio_pages_free"] == 16
    assert st["reclaimed"] == 5


# -- the kernel's errnos per kernel/firmware variant --------------------------------------


def test_var_alloc_errnos_like_the_kernel() -> None:
    # rdma-core v63 providers/mlx5/verbs.c (libmlx5) and the kernel's TLP VAR series
    # (drivers/infiniband/hw/mlx5/main.c): see cpp/sim/dv_var.cpp for each case.
    variants = {
        "k_novar": {"var_support": False},
        "k_noattr": {"var_flags_attr": False},
        "k_notlp": {"tlp": False},
        "k_small": {"gw_pages": 1, "virtio_pages": 1},
    }
    for name, opts in variants.items():
        sim.create_device(name, **opts)  # type: ignore[arg-type]
    try:
        assert sim.device_config("k_novar")["var_support"] is False
        assert sim.device_config("k_noattr")["var_flags_attr"] is False
        assert sim.device_config("k_small")["var_support"] is True
        with mlx5tlp.open_device("k_novar") as ctx:
            for tlp in (True, False):
                with pytest.raises(mlx5tlp.NotSupportedError) as exc:
                    ctx.alloc_var(tlp=tlp)
                assert exc.value.errno == errno.EPROTONOSUPPORT
        with mlx5tlp.open_device("k_noattr") as ctx:
            with pytest.raises(mlx5tlp.NotSupportedError) as exc:
                ctx.alloc_var(tlp=True)
            assert exc.value.errno == errno.EPROTONOSUPPORT
            ctx.alloc_var(tlp=False).free()  # no flags attribute needed for VirtIO
        with mlx5tlp.open_device("k_notlp") as ctx:
            with pytest.raises(mlx5tlp.NotSupportedError) as exc:
                ctx.alloc_var(tlp=True)
            assert exc.value.errno == errno.EOPNOTSUPP
        with mlx5tlp.open_device("k_small") as ctx:
            keep = [ctx.alloc_var(tlp=True), ctx.alloc_var(tlp=False)]
            for tlp in (True, False):
                with pytest.raises(mlx5tlp.ResourceExhaustedError) as exc:
                    ctx.alloc_var(tlp=tlp)
                assert exc.value.errno == errno.ENOSPC
            for v in keep:
                v.free()
    finally:
        for name in variants:
            sim.remove_device(name)


# -- injected faults and reset ---------------------------------------------------------------


def test_injected_fault_from_another_process(ctx: mlx5tlp.Context, device: str) -> None:
    obj = ctx.create_devx_obj(bytes([0x0A, 0, 0, 0, 0, 0, 0, 0x42]) + bytes(8), 16)
    query = struct.pack(">HHHH", 0x0A02, 0, 0, 0x42) + bytes(8)
    code = (f"from mlx5tlp import sim; import errno; "
            f"sim.inject_fault({device!r}, 'devx_obj_query', errno.EREMOTEIO, 2)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for left in (1, 0):  # the syndrome says how many more failures are armed
        with pytest.raises(mlx5tlp.DevxCommandError) as exc:
            obj.query(query, 32)
        assert exc.value.errno == errno.EREMOTEIO
        assert (exc.value.status, exc.value.syndrome) == (0x05, 0x5A5A0000 | left)
    assert obj.query(query, 32)[0] == 0  # the object lived through it
    with pytest.raises(ValueError):
        sim.inject_fault(device, "no_such_op", errno.EBUSY)
    with pytest.raises(ValueError):
        sim.inject_fault(device, "umem_dereg", 0)
    sim.inject_fault(device, "devx_obj_destroy", errno.EBUSY, 3)
    sim.inject_fault(device, "devx_obj_destroy", errno.EBUSY, 0)  # cleared
    obj.free()


def test_reset_device(device: str) -> None:
    # Leave behind what a crashed run leaves: queued and claimed requests, a freed page with
    # unconsumed completions (its host still attached), an armed fault.
    ctx = mlx5tlp.open_device(device)
    host = sim.Host(device)
    for tag in range(3):
        host.send_request(struct.pack(">BBHHBBHH", 0x04, 0, 1, 1, tag, 0x0F, 0x0100, 0x10))
    assert sim.claim_request(ctx) is not None
    var = ctx.alloc_var(tlp=True)
    with var.mmap(mmap.PROT_READ | mmap.PROT_WRITE) as m:
        for i in range(2):
            struct.pack_into("<II", m, 0x80 + i * 256, 16, 0)
        struct.pack_into("<Q", m, 0, 2)
    var.free()
    sim.inject_fault(device, "umem_dereg", errno.EBUSY, 1)
    assert sim.device_stats(device)["gw_pages_draining"] == 1
    for busy in (ctx, host):
        with pytest.raises(mlx5tlp.Error) as exc:
            sim.reset_device(device)
        assert exc.value.errno == errno.EBUSY
        busy.close()
    got = sim.reset_device(device)
    assert got == {"requests": 2, "claims": 1, "completions": 2, "pages": 1, "faults": 1,
                   "objects": 0}
    st = sim.device_stats(device)
    assert (st["requests_pending"], st["requests_claimed"], st["gw_pages_draining"]) == (0, 0, 0)
    assert st["gw_pages_free"] == 8
    assert sim.reset_device(device) == {k: 0 for k in got}
    with pytest.raises(mlx5tlp.Error) as exc:
        sim.reset_device("no_such_device")
    assert exc.value.errno == errno.ENODEV
