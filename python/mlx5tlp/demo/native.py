"""The demo's function on the native engine: its declaration, the worker, the host's setup.

Every worker serves the same declared function (:func:`demo_spec`) with
:class:`mlx5tlp.engine.Device` on its one gateway page and its one request channel: memory
reads of BAR 0 come from the control process's BAR memfd (a :class:`~mlx5tlp.engine.
MemoryRegion` over it, answered in C++), configuration requests from the engine's compiled
function model, and everything else gets Unsupported Request, as the PCIe Base Specification
says. Each worker's function starts from reset (Memory Space disabled, BAR 0 unassigned), so
the host programs it as a root complex would — BAR 0, Max_Payload_Size, Read Completion
Boundary, Memory Space Enable — with configuration writes on the worker's channel before the
run (:func:`setup_requests`).

The host predicts every configuration read with its own compiled copy of the same spec
(:class:`SpecConfig`), fed the same writes in channel order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

from mlx5tlp import engine
from mlx5tlp import function as fn
from mlx5tlp.context import Context
from mlx5tlp.demo.endpoint import check_bar_memfd
from mlx5tlp.share import recv_fds

__all__ = ["SCRATCH", "SpecConfig", "demo_spec", "serve", "setup_requests"]

VENDOR_CAP = 0xC0  # a vendor-specific capability whose data is the host's scratch area
SCRATCH = range(VENDOR_CAP, 0x100, 4)  # its DWs: header bytes RO, data bytes RW


def demo_spec(bar_size: int) -> fn.FunctionSpec:
    """The emulated function: a network controller (class 0280h) with one 32-bit memory BAR,
    Max_Payload_Size up to 4096 bytes and a writable vendor capability for the host's
    configuration writes."""
    return fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x7F10, class_code=0x028000),
        bars=[fn.Bar(0, "mem32", bar_size)],
        pcie=fn.PciExpress(max_payload_supported=4096),
        vendor_caps=[fn.VendorCap(data=bytes(0x100 - VENDOR_CAP - 3),
                                  writable=[(0, 0x100 - VENDOR_CAP - 3)], offset=VENDOR_CAP)],
    )


class SpecConfig:
    """The host's model of a worker's configuration space: a compiled copy of the spec."""

    def __init__(self, spec: fn.FunctionSpec) -> None:
        self.model = fn.Function(spec)
        self.reads = [0x0, 0x8, *SCRATCH]
        self.writes = list(SCRATCH)

    def read(self, reg: int) -> bytes:
        """The 4 bytes a Configuration Read of DW ``reg`` must return now."""
        return self.model.config_read(reg).to_bytes(4, "little")

    def write(self, reg: int, data: bytes) -> None:
        """Apply a Configuration Write of the full DW ``reg`` (all byte enables)."""
        self.model.config_write(reg, int.from_bytes(data, "little"))


def setup_requests(config: SpecConfig, bar_base: int, max_payload: int, rcb: int
                   ) -> list[tuple[int, bytes]]:
    """The configuration writes that bring a function from reset to serving, as ``(register,
    data)``; applied to ``config`` as well. Order matters: BAR 0 and the PCI Express settings
    first, Memory Space Enable (Command bit 1, §7.5.1.1.3) last."""
    m = config.model
    pcie = m.capability_offset("pcie")
    devctl = m.config_read(pcie + 8)
    devctl = (devctl & ~(0x7 << 5)) | ((max_payload.bit_length() - 8) << 5)  # MPS, §7.5.3.4
    linkctl = m.config_read(pcie + 0x10)
    linkctl = (linkctl & ~0x8) | (0x8 if rcb == 128 else 0)  # RCB, §7.5.3.7
    writes = [(0x10, bar_base), (pcie + 8, devctl), (pcie + 0x10, linkctl),
              (0x04, m.config_read(0x04) | 0x2)]
    out = []
    for reg, value in writes:
        data = value.to_bytes(4, "little")
        config.write(reg, data)
        out.append((reg, data))
    return out


def serve(sock: socket.socket) -> None:
    """Worker process entry point (multiprocessing target): the engine serves the worker's
    channel until the control process says ``stop``; the report goes back on ``sock``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the control process decides
    with sock:
        fds, payloads, _peer = recv_fds(sock, max_fds=2, timeout=30)
        cfg = json.loads(payloads[0])
        try:
            # The control process sealed the BAR memfd: checked before it is mapped.
            check_bar_memfd(fds[1], int(cfg["bar_size"]))
            ctx = Context.import_fd(fds[0], backend="sim")
            bar_fd = os.dup(fds[1])
        finally:
            for fd in fds:
                os.close(fd)
        try:
            report = _serve(ctx, bar_fd, cfg, payloads[1:], sock)
        finally:
            os.close(bar_fd)
        sock.sendall(json.dumps(report).encode())


def _serve(ctx: Context, bar_fd: int, cfg: dict[str, Any], blobs: list[bytes],
           sock: socket.socket) -> dict[str, Any]:
    with ctx:
        var = ctx.import_var(blobs[0])
        umem = ctx.import_umem(blobs[1])
        function_obj = ctx.import_devx_obj(blobs[2])
        bar = engine.MemoryRegion(0, 0, int(cfg["bar_size"]), fd=bar_fd, name="bar0")
        spec = demo_spec(int(cfg["bar_size"]))
        with engine.Device(ctx, spec, [bar], gateway_vars=[var],
                           channels=[[int(cfg["channel"])]]) as dev:
            sock.sendall(b"ready")
            while sock.recv(16) not in (b"", b"stop"):
                pass
            dev.stop()  # answers taken requests, drains nothing more from the channel
            stats = dev.stats()
        # Importers unimport; the control process frees.
        for obj in (function_obj, umem, var):
            obj.unimport()
    requests = stats["requests"]
    return {"index": cfg["index"], "served": sum(requests.values()),
            "malformed": stats["malformed"], "engine": {
                k: stats[k] for k in ("requests", "batches", "completions", "ur", "ca",
                                      "latency_ns_log2")}}

