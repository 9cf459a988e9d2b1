"""The emulated PCIe function: one worker process serving its share of the BAR.

A worker imports the control process's context (its command fd) and objects (envelopes), maps
its TLP gateway page and the BAR contents (a memfd shared by the control process: an imported
UMEM carries the id, not the memory), then answers every request the host sends on its channel
through the lock-free doorbell loop until told to stop.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import time
from typing import Any

from mlx5tlp import share, sim, tlp
from mlx5tlp._memfd import check_sealed
from mlx5tlp.context import Context
from mlx5tlp.errors import Error

__all__ = ["Function", "serve"]

CONFIG_SPACE = 4096
WRITABLE = range(0x40, 0x80)  # a scratch area the host may write (everything else is read-only)


def initial_config_space(vendor: int = 0x15B3, device: int = 0x7F10) -> bytearray:
    """A minimal type-0 configuration header: IDs, command/status, class code."""
    cs = bytearray(CONFIG_SPACE)
    cs[0:4] = (vendor | device << 16).to_bytes(4, "little")
    cs[8:12] = (0x02 << 24 | 0x80 << 16).to_bytes(4, "little")  # class: network, other
    return cs


class Function:
    """Answers requests: memory reads from the BAR, config reads/writes, UR for the rest."""

    def __init__(self, bar: Any, cfg: dict[str, Any]) -> None:
        self.bar = bar
        self.base = int(cfg["bar_base"])
        self.lo = int(cfg["share_lo"])
        self.hi = int(cfg["share_hi"])
        self.completer_id = int(cfg["completer_id"])
        self.max_payload = int(cfg["max_payload"])
        self.rcb = int(cfg["rcb"])
        self.config_space = initial_config_space()

    def respond(self, req: tlp.Tlp) -> list[tlp.Tlp]:
        """The completions for one request (none for a posted write)."""
        kind = req.kind
        if kind == "MWr":
            return []
        if kind == "MRd" and self.lo <= req.address - self.base < self.hi:
            off = req.address - self.base
            data = self.bar[off : off + req.length * 4]
            return self._complete(req, data)
        if kind == "CfgRd0":
            return self._complete(req, bytes(self.config_space[req.address : req.address + 4]))
        if kind == "CfgWr0":
            for i in range(4):
                if req.first_be >> i & 1 and req.address + i in WRITABLE:
                    self.config_space[req.address + i] = req.data[i]
            return self._complete(req)
        return self._complete(req, status=tlp.Status.UR)

    def _complete(
        self, req: tlp.Tlp, data: bytes = b"", status: int = tlp.Status.SC
    ) -> list[tlp.Tlp]:
        return tlp.completions_for(
            req, data, completer_id=self.completer_id, max_payload=self.max_payload,
            rcb=self.rcb, status=status,
        )


def check_bar_memfd(fd: int, size: int) -> None:
    """A worker's check of the BAR memfd the control process sealed, before it maps it (both
    worker kinds: this one and :mod:`mlx5tlp.demo.native`).

    Raises:
        Error: ``EPROTO``: not sealed against shrinking, or smaller than `size`.
    """
    check_sealed(fd, size, "the BAR memfd", lambda err, msg: Error(err, msg, "demo worker"))


def serve(sock: socket.socket) -> None:
    """Worker process entry point (multiprocessing target)."""
    # The terminal sends Ctrl-C to the whole process group: the control process decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with sock:
        fds, payloads, _peer = share.recv_fds(sock, max_fds=2, timeout=30)
        cfg = json.loads(payloads[0])
        try:
            # The control process sealed the BAR memfd: checked before it is mapped.
            check_bar_memfd(fds[1], int(cfg["bar_size"]))
            ctx = Context.import_fd(fds[0], backend="sim")
            bar = mmap.mmap(fds[1], int(cfg["bar_size"]), mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            for fd in fds:
                os.close(fd)
        report = _serve(ctx, bar, cfg, payloads[1:], sock)
        bar.close()
        sock.setblocking(True)
        sock.sendall(json.dumps(report).encode())


def _serve(ctx: Context, bar: Any, cfg: dict[str, Any], blobs: list[bytes],
           sock: socket.socket) -> dict[str, Any]:
    served = malformed = 0
    with ctx:
        var = ctx.import_var(blobs[0])
        umem = ctx.import_umem(blobs[1])
        function_obj = ctx.import_devx_obj(blobs[2])
        fn = Function(bar, cfg)
        channel = int(cfg["channel"])
        with var.gateway() as gw:
            sock.sendall(b"ready")
            sock.setblocking(False)
            idle = 0
            while True:
                raw = sim.take_request(ctx, channel)
                if raw is None:
                    idle += 1
                    if idle % 64 == 0 and _stopped(sock):
                        break
                    time.sleep(0 if idle < 256 else 0.0005)
                    continue
                idle = 0
                try:
                    req = tlp.decode(raw)
                except tlp.TlpError:
                    malformed += 1  # a malformed TLP gets no completion (the host logs it)
                    continue
                cpls = fn.respond(req)
                if cpls:
                    gw.post_batch([c.encode() for c in cpls])
                served += 1
            gw.flush(10.0)
            stats = gw.stats()
        # Importers unimport; the control process frees.
        for obj in (function_obj, umem, var):
            obj.unimport()
    return {"index": cfg["index"], "served": served, "malformed": malformed, "gateway": stats}


def _stopped(sock: socket.socket) -> bool:
    try:
        msg = sock.recv(16)
    except BlockingIOError:
        return False
    return msg in (b"", b"stop")
