"""What every participant (primary or standby) holds: the device parts of one function.

A :class:`Node` is the context (the primary's own, or a standby's import of its command fd), the
gateway VAR (allocated, or imported from its envelope), the shared state block, the memory
region memfd, and the serving configuration. A standby holds all of it without serving, so the
kernel objects outlive a crashed primary (they are reclaimed only when the last fd of the
context closes, and the standby holds one).

Ownership: the first primary allocates the VAR (``owned``); everyone else imports it. The
process that finally stops the function frees it: its owner, or an importer (``free()`` on
imported objects, issue 10 A7); if a free is refused it unimports, and the device reclaims the
page when the last process closes its context (kernel semantics).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from mlx5tlp._memfd import sealed_memfd
from mlx5tlp.context import Context, open_device
from mlx5tlp.errors import Error
from mlx5tlp.function import Bar, FunctionSpec, Identity, VendorCap
from mlx5tlp.handover.lease import check_private_dir, check_socket_path
from mlx5tlp.handover.server import Responder, Server
from mlx5tlp.handover.state import SharedState, check_shared_fds, state_size
from mlx5tlp.var import Var

__all__ = ["DEFAULT_BAR_BASE", "DEFAULT_BAR_SIZE", "Node", "default_spec", "memory_pattern",
           "Events", "bind_listener"]

DEFAULT_BAR_BASE = 0xF000_0000
DEFAULT_BAR_SIZE = 64 << 10
COMPLETER_ID = 0x0100

Events = Callable[[dict[str, Any]], None]


def default_spec() -> FunctionSpec:
    """The function the CLI and the demo serve: a network controller with one 64 KiB BAR and a
    vendor capability whose data bytes 1..28 are a writable scratch area."""
    return FunctionSpec(
        identity=Identity(vendor_id=0x15B3, device_id=0x7F10, class_code=0x028000),
        bars=[Bar(0, "mem32", DEFAULT_BAR_SIZE)],
        vendor_caps=[VendorCap(data=bytes(29), writable=[(1, 28)])],
    )


def memory_pattern(size: int) -> bytes:
    """The memory region's initial contents (the demo host checks reads against it)."""
    return bytes((i * 7 + (i >> 8) * 13 + 3) & 0xFF for i in range(size))


def bind_listener(path: str) -> socket.socket:
    """Listen at `path` (mode 0600), replacing what is there atomically (``rename(2)``): the
    socket of a predecessor, dead or alive, stops receiving new connections at once."""
    path = os.path.abspath(path)
    check_private_dir(os.path.dirname(path))
    tmp = f"{path}.{os.getpid()}.tmp"
    check_socket_path(path, len(tmp) - len(path))  # else bind() raises a bare OSError
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            s.bind(tmp)
        finally:
            os.umask(old)
        s.listen(16)
        os.rename(tmp, path)
    except BaseException:
        s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    s.setblocking(False)
    return s


@dataclass
class Node:
    """The device parts of one function in this process (see the module docstring)."""

    ctx: Context
    var: Var
    state: SharedState
    memory_fd: int
    memory: mmap.mmap
    bar_base: int
    channels: tuple[int, ...]
    spec: FunctionSpec
    server: Optional[Server] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, *, device: str, spec: FunctionSpec, generation: int,
               memory_size: int = DEFAULT_BAR_SIZE, bar_base: int = DEFAULT_BAR_BASE,
               channels: tuple[int, ...] = (0,)) -> Node:
        """The first primary's parts: open the device, allocate the gateway page, create the
        state block and the memory region (filled with :func:`memory_pattern`)."""
        ctx = open_device(device, backend="sim")
        try:
            var = ctx.alloc_var(tlp=True)
            state = SharedState.create(spec, generation, channels=_mask(channels))
            # Sealed at its size: a standby maps it (see mlx5tlp._memfd).
            mfd = sealed_memfd("mlx5tlp-handover-memory", memory_size)
            mem = mmap.mmap(mfd, memory_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mem[:] = memory_pattern(memory_size)
        except BaseException:
            ctx.close()
            raise
        return cls(ctx, var, state, mfd, mem, bar_base, tuple(channels), spec)

    def describe(self) -> dict[str, Any]:
        """The serving configuration a standby needs (sent with the objects)."""
        return {"device": self.ctx.name, "memory_size": len(self.memory),
                "bar_base": self.bar_base, "channels": list(self.channels),
                "spec": json.dumps(self.spec.to_dict())}

    def fds(self) -> list[int]:
        """The fds a standby needs: command fd, state memfd, memory memfd."""
        return [self.ctx.cmd_fd, self.state.fd, self.memory_fd]

    def exports(self, key: bytes) -> list[bytes]:
        """The gateway VAR's keyed export envelope (sent with the objects)."""
        return [self.var.export(key=key)]

    def owns_objects(self) -> bool:
        """Whether this process allocated the gateway VAR and still holds it."""
        return not self.var.closed and not self.var.imported

    def adopt(self, generation: int) -> None:
        """Continue from the shared function state as `generation` (the Python model)."""
        self.state.adopt(generation)

    @classmethod
    def from_message(cls, fields: dict[str, Any], fds: list[int], envelopes: list[bytes],
                     key: bytes, spec: Optional[FunctionSpec], state_version: int) -> Node:
        """A standby's parts from the primary's objects message (takes ownership of `fds`)."""
        from mlx5tlp.handover import _fields
        from mlx5tlp.handover.errors import HandoverError

        if len(fds) != 3 or len(envelopes) != 1:
            for fd in fds:
                os.close(fd)
            raise HandoverError(71, f"objects message with {len(fds)} fds and {len(envelopes)} "
                                "envelopes (want 3 and 1)", "handover")
        cmd_fd, state_fd, mem_fd = fds
        ctx: Optional[Context] = None
        var: Optional[Var] = None
        try:
            if spec is None:
                spec = _fields.spec(fields, "objects")
            size = _fields.integer(fields, "memory_size", "objects", lo=1, hi=1 << 40)
            # Checked here, before the imports (read at the end, a bad one left them behind).
            bar_base = _fields.integer(fields, "bar_base", "objects")
            channels = tuple(_fields.int_list(fields, "channels", "objects", 0, 63, 64))
            # Before anything is imported or mapped: a peer's memfd it could still shrink
            # would let it kill this process with SIGBUS on the next access.
            check_shared_fds([(state_fd, state_size(), "the state memfd (message fd 2 of 3)"),
                              (mem_fd, size, "the memory memfd (message fd 3 of 3)")])
            ctx = Context.import_fd(cmd_fd, backend="sim")
            os.close(cmd_fd)
            cmd_fd = -1
            var = ctx.import_var(envelopes[0], key=key)
            fd, state_fd = state_fd, -1
            state = SharedState.attach(fd, spec, version=state_version)  # owns fd now
            mem = mmap.mmap(mem_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            for fd in (cmd_fd, state_fd, mem_fd):
                if fd >= 0:
                    os.close(fd)
            if var is not None:
                var.unimport()
            if ctx is not None:
                ctx.close()
            raise
        return cls(ctx, var, state, mem_fd, mem, bar_base, channels, spec)

    def make_server(self) -> Server:
        """The request server on these parts (the function model must be adopted)."""
        if self.server is None:
            fn = self.state.function
            assert fn is not None, "adopt the state first"
            self.server = Server(self.ctx, self.var,
                                 Responder(fn, self.memory, self.bar_base, COMPLETER_ID),
                                 self.channels)
        return self.server

    def close(self, *, free: bool = False) -> Optional[str]:
        """Release everything this process holds. With `free`, destroy the gateway VAR (the
        function stops for good); returns how: ``"freed"``, ``"unimported"`` or None."""
        how: Optional[str] = None
        if self.server is not None:
            self.server.close_gateway()
            self.server = None
        if not self.var.closed:
            if not self.var.imported:
                if free:
                    self.var.free()
                    how = "freed"
                # An owner that hands over must not free: leave the object to the context.
            else:
                try:
                    if free:
                        self.var.free()  # an importer that took over frees (issue 10 A7)
                        how = "freed"
                except Error:
                    pass
                if not self.var.closed:
                    self.var.unimport()
                    how = how or "unimported"
        self.state.close()
        self.memory.close()
        with contextlib.suppress(OSError):
            os.close(self.memory_fd)
        if self.var.closed:
            self.ctx.close()
        return how


def _mask(channels: tuple[int, ...]) -> int:
    m = 0
    for c in channels:
        m |= 1 << c
    return m
