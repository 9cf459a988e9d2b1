"""Handover of a function served by the native engine (:class:`mlx5tlp.engine.Device`).

The protocol is the one of :mod:`mlx5tlp.handover` (lease, control socket, sealed summary);
what differs is who serves. The engine's lanes take, answer and retire requests on their own
threads, so the primary's Python thread only answers the control socket, and a planned
handover is: ``pause`` (the lanes stop taking and finish what they took: answered, in the page,
retired) → ``drain_deferred`` (a deferred callback read is answered by its region or, at its
deadline, Completer Abort — a living process's claims cannot move to a successor, so it
finishes them) → ``release_gateways`` (the page committers go) → commit. Rollback:
``reattach_gateways`` + ``resume``. A successor builds its own engine on the imported VARs and
the shared state, and starts it only after the commit; its lanes ``recover`` every claim a dead
predecessor left before they write to a page (engine.cpp ``Lane::run``).

What a successor continues from (docs/handover.md, "Function state that survives"):

* configuration space, MSI-X table and pending bits: the handover state block (shared memfd);
* memory regions: their memfds (shared);
* register files: their values' memfds (shared, :attr:`mlx5tlp.engine.RegisterRegion.fd`);
* callback regions: whatever their handler keeps — the application's, not ours; the layout
  (BAR, offset, size) is checked.

The objects message carries, after the command fd and the state memfd, one memfd per memory
or register region (region order), and one keyed VAR envelope per gateway page.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Optional

from mlx5tlp import engine
from mlx5tlp.context import Context
from mlx5tlp.errors import Error
from mlx5tlp.function import FunctionSpec
from mlx5tlp.handover import _fields
from mlx5tlp.handover.errors import HandoverError, HandoverProtocolError, StateMismatchError
from mlx5tlp.handover.node import Events, bind_listener
from mlx5tlp.handover.state import (
    STATE_VERSION,
    SharedState,
    check_region_fds,
    check_shared_fds,
    state_size,
)
from mlx5tlp.var import Var

if TYPE_CHECKING:
    from mlx5tlp.handover.primary import Primary

__all__ = ["EngineNode", "EngineServer", "create_primary", "region_layout", "serve_device"]

_PAUSE_TIMEOUT = 1.0   # the lanes finish a batch; far less unless the host stopped consuming
_DRAIN_TIMEOUT = 1.0   # deferred reads expire at their deadline (50 ms by default) anyway
_FIRST_ANSWER_WAIT = 2e-3  # after (re)starting the lanes, see EngineServer.recover


def region_layout(regions: Sequence[engine.Region]) -> list[dict[str, Any]]:
    """What a successor must declare the same way: kind, BAR, offset, size (and registers)."""
    out: list[dict[str, Any]] = []
    for r in regions:
        c = r._core
        d: dict[str, Any] = {"kind": str(c.kind), "name": r.name, "bar": int(c.bar),
                             "offset": int(c.offset), "size": int(c.size)}
        if isinstance(r, engine.RegisterRegion):
            d["registers"] = [[g.name, g.offset, g.width, g.reset, g.access]
                              for g in r.registers]
        out.append(d)
    return out


def _shared_fd(r: engine.Region) -> Optional[int]:
    if isinstance(r, (engine.MemoryRegion, engine.RegisterRegion)):
        return r.fd
    return None


def _shared_needs(layout: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(bytes, which memfd) of each memory / register region's memfd, in message order."""
    out: list[tuple[int, str]] = []
    for i, d in enumerate(layout):
        try:
            kind = d.get("kind")
            if kind == "memory":
                out.append((int(d["size"]), f"memory memfd of regions[{i}] ({d['name']!r})"))
            elif kind == "registers":
                # One u64 per register (at least one): RegisterRegion's layout (regions.cpp).
                out.append((8 * max(len(d["registers"]), 1),
                            f"register memfd of regions[{i}] ({d['name']!r})"))
        except (KeyError, TypeError, ValueError) as exc:
            raise HandoverError(errno.EPROTO, f"objects message: regions[{i}] is malformed "
                                f"({exc!r})", "handover") from exc
    return out


class EngineServer:
    """The serving side of a :class:`~mlx5tlp.handover.Primary` whose engine serves.

    Same interface as :class:`~mlx5tlp.handover.server.Server` (``open``, ``recover``,
    ``close_gateway``, counters); ``serve`` returns 0 because the lanes serve by themselves.
    Thread-safety: the primary's thread (the lanes are the engine's).
    """

    native = True

    def __init__(self, node: EngineNode) -> None:
        self.node = node
        self._released = False
        self._base = 0
        self.steps_ns: list[int] = []  # the last close_gateway(): pause, drain, release done

    @property
    def device(self) -> Optional[engine.Device]:
        return self.node.device

    def _stat(self, key: str) -> int:
        d = self.node.device
        return 0 if d is None or d.closed else int(d.stats()[key])

    @property
    def served(self) -> int:
        """Requests answered (or applied) by this process since the counter was last set."""
        d = self.node.device
        if d is None or d.closed:
            return 0
        return d.answered - self._base

    @served.setter
    def served(self, value: int) -> None:
        self._base += self.served - value

    @property
    def recovered(self) -> int:
        """Requests a dead predecessor left that the lanes resolved."""
        return self._stat("redelivered")

    @property
    def retired_published(self) -> int:
        """...of which the answer had reached the host: retired without answering."""
        return self._stat("already_published")

    @property
    def first_served_ns(self) -> int:
        """``CLOCK_MONOTONIC`` of the first answer since the engine (re)started; 0: none."""
        d = self.node.device
        return 0 if d is None or d.closed else d.first_answer_ns

    def serve(self, budget: int = 16) -> int:
        """Nothing to do here: the lanes serve."""
        return 0

    def open(self) -> None:
        """Build the engine (not started: it takes nothing before :meth:`recover`), or take the
        pages' gateways back after a release (rollback)."""
        d = self.node.device
        if d is None or not self.node._attached:
            self.node.build_device()
        elif self._released:
            d.reattach_gateways()
            self._released = False

    def recover(self) -> int:
        """Start (or resume) serving. The lanes resolve what a dead predecessor claimed before
        they write to a page; how many: :attr:`recovered`."""
        d = self.node.device
        assert d is not None, "open() first"
        if d.state == "created":
            d.start()
        elif d.state == "paused":
            d.prepare_pause(False)  # a rolled-back handover: take whole batches again
            d.resume()
        else:
            return 0
        # The host waits for these answers: let the lanes have the CPU for them before this
        # thread goes on with its bookkeeping (bounded: a host may have nothing in flight).
        d.wait_first_answer(_FIRST_ANSWER_WAIT)
        return 0

    def prepare_pause(self, on: bool) -> None:
        """A handover was asked for: lanes take only what their page can take until the pause
        (:meth:`mlx5tlp.engine.Device.prepare_pause`)."""
        d = self.node.device
        if d is not None and not d.closed:
            d.prepare_pause(on)

    def close_gateway(self) -> None:
        """Stop taking requests, finish the taken and the deferred ones, give the pages back.

        Raises:
            HandoverError: the lanes did not pause or deferred requests stayed open
                (``ETIMEDOUT``); the engine serves again.
        """
        d = self.node.device
        if d is None or self._released:
            return
        if d.state == "created":  # built for a handover that did not commit: nothing served
            d.close()
            self.node.device = None
            self.node._attached = False
            return
        t0 = time.monotonic_ns()
        if not d.pause(_PAUSE_TIMEOUT):
            d.resume()
            raise HandoverError(errno.ETIMEDOUT, f"the engine's lanes did not pause within "
                                f"{_PAUSE_TIMEOUT} s (the host takes no completions?)", "handover")
        t1 = time.monotonic_ns()
        if not d.drain_deferred(_DRAIN_TIMEOUT):
            d.resume()
            raise HandoverError(errno.ETIMEDOUT, f"deferred requests still open after "
                                f"{_DRAIN_TIMEOUT} s", "handover")
        t2 = time.monotonic_ns()
        d.release_gateways()
        self._released = True
        self.steps_ns = [t0, t1, t2, time.monotonic_ns()]


class EngineNode:
    """The device parts of an engine-served function in this process.

    A primary's come from its :class:`~mlx5tlp.engine.Device` (:func:`serve_device`); a
    standby's from the primary's objects message (:meth:`from_message`): an imported context,
    imported VARs, the state block, the regions' memfds — and no engine until it serves.
    """

    kind = "engine"

    def __init__(self, ctx: Context, vars: list[Var], state: SharedState, spec: FunctionSpec,
                 layout: list[dict[str, Any]], region_fds: list[int], *,
                 regions: Optional[Sequence[engine.Region]] = None,
                 device: Optional[engine.Device] = None, own_ctx: bool = True) -> None:
        self.ctx = ctx
        self.vars = vars
        self.state = state
        self.spec = spec
        self.layout = layout
        self.region_fds = region_fds  # owned; one per memory / register region
        self.regions = regions        # the successor's declarations (hooks, handlers)
        self.device = device
        self.own_ctx = own_ctx
        self.server: Optional[EngineServer] = None
        self.extra: dict[str, Any] = {}
        self._attached = device is not None

    @property
    def var(self) -> Var:
        """The first gateway VAR (lane 0)."""
        return self.vars[0]

    # ---- what a standby is sent ----

    def describe(self) -> dict[str, Any]:
        """The serving configuration a standby needs (sent with the objects)."""
        return {"device": self.ctx.name, "engine": self.layout, "pages": len(self.vars),
                "spec": json.dumps(self.spec.to_dict())}

    def fds(self) -> list[int]:
        """Command fd, state memfd, then one memfd per memory / register region."""
        return [self.ctx.cmd_fd, self.state.fd, *self.region_fds]

    def exports(self, key: bytes) -> list[bytes]:
        """One keyed export envelope per gateway VAR (lane order)."""
        return [v.export(key=key) for v in self.vars]

    def owns_objects(self) -> bool:
        """Whether this process allocated a gateway VAR it still holds."""
        return any(not v.closed and not v.imported for v in self.vars)

    @classmethod
    def from_message(cls, fields: dict[str, Any], fds: list[int], envelopes: list[bytes],
                     key: bytes, spec: Optional[FunctionSpec], state_version: int,
                     regions: Optional[Sequence[engine.Region]]) -> EngineNode:
        """A standby's parts from the primary's objects message (takes ownership of `fds`).

        Raises:
            StateMismatchError: `regions` (or `spec`) do not match what the primary serves
                (``EINVAL``, naming the region), or the state is of another version.
            HandoverError: a malformed message (``EPROTO``).
        """
        try:
            layout = _fields.layout(fields, "objects")
            pages = _fields.integer(fields, "pages", "objects", lo=1, hi=8)
        except HandoverProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        want_fds = 2 + sum(d["kind"] in ("memory", "registers") for d in layout)
        if len(fds) != want_fds or len(envelopes) != pages or not 1 <= pages <= 8:
            for fd in fds:
                os.close(fd)
            raise HandoverError(errno.EPROTO, f"objects message with {len(fds)} fds and "
                                f"{len(envelopes)} envelopes for {len(layout)} regions on "
                                f"{pages} pages", "handover")
        cmd_fd, state_fd, *region_fds = fds
        ctx: Optional[Context] = None
        vars: list[Var] = []
        try:
            if spec is None:
                spec = _fields.spec(fields, "objects")
            if regions is not None:
                check_layout(regions, layout)
            # Before anything is imported or mapped: a peer's memfd it could still shrink
            # would let it kill this process with SIGBUS. The state block is mapped here, so it
            # must be sealed; the regions' files only the engine maps, under the SIGBUS guard
            # when unsealed (so a spec's `shared` file can be handed over).
            of = f"of {want_fds}"
            check_shared_fds([(state_fd, state_size(), f"the state memfd (message fd 2 {of})")])
            check_region_fds([(fd, need, f"the {what} (message fd {3 + i} {of})")
                              for i, (fd, (need, what)) in
                              enumerate(zip(region_fds, _shared_needs(layout), strict=True))])
            ctx = Context.import_fd(cmd_fd, backend="sim")
            os.close(cmd_fd)
            cmd_fd = -1
            for env in envelopes:
                vars.append(ctx.import_var(env, key=key))
            fd, state_fd = state_fd, -1
            state = SharedState.attach(fd, spec, version=state_version)  # owns fd now
        except BaseException:
            for fd in (cmd_fd, state_fd, *region_fds):
                if fd >= 0:
                    os.close(fd)
            for v in vars:
                v.unimport()
            if ctx is not None:
                ctx.close()
            raise
        return cls(ctx, vars, state, spec, layout, region_fds, regions=regions)

    # ---- serving ----

    def adopt(self, generation: int) -> None:
        """Record our generation in the state block (the engine checks and adopts the state
        itself when it is built)."""
        self.state.claim(generation)

    def prebuild(self) -> None:
        """Build this process's engine on the shared regions and VARs, without the state and
        the gateways (its predecessor still serves them): what a handover's pause then costs
        is :meth:`build_device`'s adopt + attach only."""
        if self.device is None:
            self.device = engine.Device(self.ctx, self.spec, self._successor_regions(),
                                        gateway_vars=self.vars, attach=False)
            self._attached = False

    def build_device(self) -> engine.Device:
        """This process's engine on the shared state, regions and VARs, gateways open, not
        started (the predecessor has stopped: paused, or dead)."""
        self.prebuild()
        assert self.device is not None
        self.device.attach(self.state)
        self._attached = True
        return self.device

    def _successor_regions(self) -> list[engine.Region]:
        given = list(self.regions) if self.regions is not None else None
        fds = iter(self.region_fds)
        out: list[engine.Region] = []
        for i, d in enumerate(self.layout):
            kind, name = d["kind"], d["name"]
            bar, off, size = int(d["bar"]), int(d["offset"]), int(d["size"])
            mine = given[i] if given is not None else None
            if kind == "memory":
                out.append(engine.MemoryRegion(bar, off, size, fd=next(fds), name=name))
            elif kind == "registers":
                regs = (mine.registers if isinstance(mine, engine.RegisterRegion) else
                        [engine.Register(n, o, w, r, a) for n, o, w, r, a in d["registers"]])
                out.append(engine.RegisterRegion(bar, off, regs, size=size, name=name,
                                                 fd=next(fds)))
            elif isinstance(mine, engine.CallbackRegion):
                out.append(mine)
            else:
                raise StateMismatchError(errno.EINVAL, f"the primary serves callback region "
                                         f"{name!r}: pass its handler in regions=", "handover")
        return out

    def make_server(self) -> EngineServer:
        """The engine server on these parts."""
        if self.server is None:
            self.server = EngineServer(self)
        return self.server

    def close(self, *, free: bool = False) -> Optional[str]:
        """Release everything this process holds; with `free`, destroy the gateway VARs (the
        function stops for good). Returns ``"freed"``, ``"unimported"`` or None (see
        :meth:`mlx5tlp.handover.node.Node.close`)."""
        if self.device is not None:
            self.device.close()  # stops the lanes; the VARs are ours, not the device's
            self.device = None
        self.server = None
        how: Optional[str] = None
        for v in self.vars:
            if v.closed:
                continue
            if free:
                with contextlib.suppress(Error):
                    v.free()  # an importer that took over frees too (issue 10 A7)
                    how = "freed"
            if not v.closed and v.imported:
                v.unimport()
                how = how or "unimported"
            # An owner that hands over must not free: the object is left to the context.
        self.state.close()
        for fd in self.region_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.region_fds = []
        if self.own_ctx and all(v.closed for v in self.vars):
            self.ctx.close()
        return how


def check_layout(regions: Sequence[engine.Region], layout: list[dict[str, Any]]) -> None:
    """The successor's regions must be the primary's: same kinds, BARs, offsets, sizes and
    registers (hooks and handlers may differ). Raises StateMismatchError (``EINVAL``)."""
    mine = region_layout(regions)
    if len(mine) != len(layout):
        raise StateMismatchError(errno.EINVAL, f"the primary serves {len(layout)} regions, "
                                 f"this process declares {len(mine)}", "handover")
    for i, (a, b) in enumerate(zip(mine, layout, strict=True)):
        for k in ("kind", "bar", "offset", "size", "registers"):
            if a.get(k) != b.get(k):
                raise StateMismatchError(errno.EINVAL, f"regions[{i}] ({a['name']!r}): {k} "
                                         f"{a.get(k)!r}, the primary serves {b.get(k)!r}",
                                         "handover")


def serve_device(device: engine.Device, path: str, key: bytes, *,
                 events: Optional[Events] = None,
                 allow_uids: Optional[Collection[int]] = None) -> Primary:
    """``Device.serve``: the first primary of a running handover device (see there)."""
    from mlx5tlp.handover.lease import Lease
    from mlx5tlp.handover.primary import Primary as _Primary
    from mlx5tlp.handover.wire import check_key

    key = check_key(key)
    state = device.shared
    assert state is not None
    lease = Lease(path + ".lease", state_version=STATE_VERSION)
    try:
        lease.acquire(0.0)
        lease.digest = state.digest
        state.claim(lease.generation)
        fds: list[int] = []
        try:
            for r in device.regions:
                fd = _shared_fd(r)
                if fd is not None:
                    fds.append(os.dup(fd))
            listener = bind_listener(path)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
    except BaseException:
        lease.close()
        raise
    node = EngineNode(device._ctx, device._give_vars(), state, device.spec,
                      region_layout(device.regions), fds, regions=device.regions,
                      device=device, own_ctx=False)
    device.shared = None  # the node's now: the device must not close it under the engine
    if device.state == "created":
        device.start()
    return _Primary(path, key, node, lease, listener, allow_uids=allow_uids, events=events)


def create_primary(path: str, key: bytes, *, device: str, spec: FunctionSpec,
                   memory_size: int, events: Optional[Events] = None,
                   allow_uids: Optional[Collection[int]] = None) -> Primary:
    """The CLI's first primary on the engine: the function `spec` with one memory region of
    `memory_size` bytes at BAR 0 offset 0 (filled with ``memory_pattern``), served on a
    context of the software device `device` that the primary owns."""
    from mlx5tlp.context import open_device
    from mlx5tlp.handover.node import memory_pattern

    ctx = open_device(device, backend="sim")
    dev: Optional[engine.Device] = None
    try:
        mem = engine.MemoryRegion(0, 0, memory_size, name="memory")
        mem.write(0, memory_pattern(memory_size))
        dev = engine.Device(ctx, spec, [mem], handover=True, start=False)
        primary = serve_device(dev, path, key, events=events, allow_uids=allow_uids)
    except BaseException:
        if dev is not None:
            dev.close()
        ctx.close()
        raise
    assert isinstance(primary.node, EngineNode)
    primary.node.own_ctx = True
    return primary
