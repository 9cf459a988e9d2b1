"""The primary: holds the lease, serves the function, and hands it over on request.

One thread does everything (serving and the control socket), so a handover needs no locking
with the serving path: the loop answers up to 16 requests, then looks at the control socket
(``select`` with a zero timeout while busy; a short blocking wait while idle — the request
channels have no wake-up of their own). Control messages are handled between requests, so when
the primary pauses, nothing is in flight: every request it claimed is answered and retired.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from mlx5tlp._deadline import Deadline
from mlx5tlp.errors import Error, InvalidArgumentError, InvalidHandleError
from mlx5tlp.function import FunctionSpec
from mlx5tlp.handover._poll import Poller
from mlx5tlp.handover.errors import HandoverError, LeaseHeldError
from mlx5tlp.handover.gcpause import no_gc
from mlx5tlp.handover.lease import Lease, check_socket_path
from mlx5tlp.handover.node import Events, Node, bind_listener, default_spec
from mlx5tlp.handover.state import STATE_VERSION, seal_snapshot
from mlx5tlp.handover.wire import Handshake, Message, Wire, check_key
from mlx5tlp.share import ProtocolError

if TYPE_CHECKING:
    from mlx5tlp.handover.engine_node import EngineNode, EngineServer
    from mlx5tlp.handover.server import Server

__all__ = ["Primary"]

_STEP_TIMEOUT = 2.0  # a peer that does not answer a handover step within this is failed
_MAX_UNWELCOMED = 32  # connections that have not said hello yet, at most (each holds an fd)
_HELLO_TIMEOUT = _STEP_TIMEOUT  # a connection without a whole HELLO this long after accept goes
# A welcomed peer's message not complete this long after its first byte: the peer goes.
_MESSAGE_TIMEOUT = _STEP_TIMEOUT


@dataclass
class _Peer:
    sock: socket.socket
    wire: Optional[Wire] = None
    role: str = "new"      # new -> standby (welcomed) -> ready; or operator
    pid: int = 0
    hello: Optional[Handshake] = None  # until welcomed: the HELLO read so far
    # Monotonic time by which the HELLO (until welcomed; from the accept) or the message
    # begun (after; from its first byte) must be complete; inf: none is under way.
    due: float = math.inf

    def close(self) -> None:
        if self.hello is not None:
            self.hello.close()
        if self.wire is not None:
            self.wire.close_partial()  # the fds of a message that never completed
        with contextlib.suppress(OSError):
            self.sock.close()


class Primary:
    """The serving primary of one function.

    Create the first one with :meth:`create`; a :class:`~mlx5tlp.handover.Standby` becomes one
    with ``promote()`` or ``wait()``. :meth:`run` serves until stopped (``handover.request(path,
    key, "stop")``) or handed over; it returns ``"stopped"`` or ``"handed-over"``.

    After a handover this process no longer serves; call :meth:`close` (it frees nothing: the
    successor owns the objects now). A handed-over *owner* of the gateway VAR must leave it to
    the successor: its finaliser would free it, so such a process ends with ``os._exit`` or
    becomes a standby (:meth:`become_standby`).

    Thread-safety: one thread (the one calling :meth:`run`).
    """

    def __init__(self, path: str, key: bytes, node: Union[Node, EngineNode], lease: Lease,
                 listener: Optional[socket.socket], *, allow_uids: Optional[Collection[int]] = None,
                 events: Optional[Events] = None) -> None:
        self.path = os.path.abspath(path)
        self.key = check_key(key)
        self.node = node
        self.lease = lease
        self.listener = listener
        self.allow_uids = allow_uids
        self.events = events
        self.peers: list[_Peer] = []
        self.generation = lease.generation
        self.outcome = ""
        self.handovers = 0
        self.rollbacks = 0
        self._stop = False
        self._operator: Optional[_Peer] = None
        self._going: Optional[_Peer] = None  # the standby told "go", until it asks
        self._accept_failing = False  # accept() failed (EMFILE...): reported once
        self._due = math.inf  # the earliest `due` of any peer
        # The control socket and every peer, registered once (not per look of the loop).
        self._poller = Poller()
        self._by_fd: dict[int, Optional[_Peer]] = {}
        if listener is not None:
            self._watch(listener, None)
        self._running = threading.Lock()  # held by run(): close() waits for it to return
        self._closed = False
        self.origin: dict[str, Any] = {}  # how this primary started (t_stop / t_detect)
        self.server: Union[Server, EngineServer] = node.make_server()
        self.server.open()
        self.server.recover()
        node.state.mark(self.generation, node.state.served())
        self._emit("serving", generation=self.generation)

    @classmethod
    def create(cls, path: str, key: bytes, *, device: str = "mlx5_sim0",
               spec: Optional[FunctionSpec] = None, memory_size: int = 64 << 10,
               channels: tuple[int, ...] = (0,), allow_uids: Optional[Collection[int]] = None,
               events: Optional[Events] = None, engine: str = "python") -> Primary:
        """The first primary of a function on the software device `device`.

        `engine`: ``"python"`` (this thread answers every request: claim, answer, retire) or
        ``"native"`` (the engine's lanes serve one memory region of `memory_size` bytes at
        BAR 0 and the configuration space; ``channels`` is then every channel).

        Raises:
            LeaseHeldError: the function already has a primary (``EBUSY``).
            InvalidArgumentError: the socket directory is not private to this user.
        """
        key = check_key(key)
        spec = spec or default_spec()
        # Before the lease and the objects: the listener binds `path` + ".<pid>.tmp".
        check_socket_path(os.path.abspath(path), len(f".{os.getpid()}.tmp"))
        if engine == "native":
            from mlx5tlp.handover.engine_node import create_primary

            p: Primary = create_primary(path, key, device=device, spec=spec,
                                        memory_size=memory_size, events=events,
                                        allow_uids=allow_uids)
            return p
        if engine != "python":
            raise InvalidArgumentError(errno.EINVAL, f"engine: {engine!r} is not 'python' or "
                                       "'native'", "serve")
        lease = Lease(path + ".lease", state_version=STATE_VERSION)
        try:
            lease.acquire(0.0)
            node = Node.create(device=device, spec=spec, generation=lease.generation,
                               memory_size=memory_size, channels=channels)
        except BaseException:
            lease.close()
            raise
        try:
            lease.digest = node.state.digest
            node.state.adopt(lease.generation)
            listener = bind_listener(path)
        except BaseException:
            node.close(free=True)
            lease.close()
            raise
        return cls(path, key, node, lease, listener, allow_uids=allow_uids, events=events)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events(dict(fields, event=event, pid=os.getpid(), t_ns=time.monotonic_ns()))

    # ---- the loop ----

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current step (from a signal handler too)."""
        self._stop = True

    def run(self, *, max_seconds: Optional[float] = None) -> str:
        """Serve and answer the control socket until stopped or handed over.

        Raises:
            InvalidHandleError: ``EBADF``: closed. HandoverError: ``EBUSY``: another thread
                runs it.
        """
        end = Deadline.in_seconds(max_seconds, "max_seconds")
        if self._closed:
            raise InvalidHandleError(errno.EBADF, "the primary was closed", "handover")
        if not self._running.acquire(blocking=False):
            raise HandoverError(errno.EBUSY, "another thread runs this primary", "handover")
        try:
            return self._run(end)
        finally:
            self._running.release()

    def _run(self, end: Deadline) -> str:
        server = self.server
        idle = 0
        last_beat = time.monotonic()
        reported = False
        native = getattr(server, "native", False)
        while not self._stop and not self.outcome:
            if native:
                # The engine's lanes serve; this thread answers the control socket (and looks
                # for the first answer of this tenure, reported once).
                if not reported and server.first_served_ns:
                    reported = self._first_served()
                self._poll(200e-6 if not reported else 0.05)
            else:
                n = server.serve(16)
                if n:
                    idle = 0
                    reported = reported or self._first_served()
                    self._poll(0.0)
                    continue
                idle += 1
                if self.listener is None and idle < 64 and not reported:
                    continue  # a fresh successor: answer first, open the control socket after
                self._poll(0.0 if idle < 64 else 50e-6 if idle < 4096 else 1e-3)
            now = time.monotonic()
            if now - last_beat > 0.5:
                self.lease.heartbeat()
                last_beat = now
                if end.expired():
                    break
        if not self.outcome:
            self.outcome = "stopped"
        if self.outcome == "stopped":
            self.node.state.mark(self.generation, self.node.state.served() + server.served)
        return self.outcome

    def _first_served(self) -> bool:
        self._emit("first-served", generation=self.generation,
                   first_ns=self.server.first_served_ns, **self.origin)
        return True

    def _poll(self, timeout: float) -> None:
        if self.listener is None:
            # A successor binds the control socket only after it answered its first request
            # (or went idle): standbys retry their connect meanwhile, the host does not wait.
            self.listener = bind_listener(self.path)
            self._watch(self.listener, None)
        by_fd = self._by_fd
        for fd, _events in self._poller.wait(timeout):
            if self.outcome:
                return
            try:
                peer = by_fd[fd]
            except KeyError:  # dropped earlier in this round
                continue
            if peer is None:
                self._accept()
            elif peer in self.peers:  # not dropped by an earlier message of this round
                self._on_message(peer)
        if self._due <= time.monotonic():
            self._expire()

    def _watch(self, sock: socket.socket, peer: Optional[_Peer]) -> None:
        fd = sock.fileno()
        self._poller.add(fd)
        self._by_fd[fd] = peer

    def _accept(self) -> None:
        try:
            assert self.listener is not None
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EMFILE/ENFILE/ENOBUFS: out of descriptors or memory. Make room by dropping the
            # oldest peer that never said hello; the connection stays queued for the next look.
            # Serving goes on either way (before, this ended run()).
            if not self._accept_failing:
                self._emit("refused", peer_pid=0, error=f"cannot accept a connection: {exc}")
            self._accept_failing = True
            self._evict_unwelcomed()
            return
        self._accept_failing = False
        # Non-blocking until welcomed: the HELLO is read as it arrives, a part per readable
        # poll (Handshake), so a peer that sends half of one and stalls holds up nothing —
        # before, the serving loop blocked up to 0.5 s in its recv, per such peer and round.
        sock.setblocking(False)
        if sum(p.wire is None for p in self.peers) >= _MAX_UNWELCOMED:
            # Connections that never say hello cost nothing while silent, but each holds an
            # fd: at most this many; the oldest goes first.
            self._evict_unwelcomed()
        by = time.monotonic() + _HELLO_TIMEOUT
        peer = _Peer(sock, hello=Handshake(sock, self.key, allow_uids=self.allow_uids),
                     due=by)
        self.peers.append(peer)
        self._watch(sock, peer)
        self._due = min(self._due, by)

    def _expire(self) -> None:
        """Drop the peers whose HELLO or begun message is not complete in time (silent, or
        stalled mid-frame)."""
        now = time.monotonic()
        due = math.inf
        for p in list(self.peers):
            if p.due > now:
                due = min(due, p.due)
                continue
            if p.wire is None:
                why = f"no complete hello within {_HELLO_TIMEOUT:g} s"
            else:
                why = (f"no complete message within {_MESSAGE_TIMEOUT:g} s of its first byte "
                       f"(a {p.role} stalled mid-message)")
            self._emit("refused", peer_pid=p.pid, error=why)
            self._drop(p)
        self._due = due

    def _evict_unwelcomed(self) -> None:
        old = next((p for p in self.peers if p.wire is None), None)
        if old is not None:
            self._drop(old)

    def _drop(self, peer: _Peer) -> None:
        if peer is self._going:  # told to ask for the function, gone before it asked
            self._going = None
            self.server.prepare_pause(False)
            # The operator waiting for this handover would otherwise hear nothing until its
            # own timeout.
            self._tell_operator("error", {"errno": errno.ECANCELED, "message": "the standby "
                                          "went away before it asked for the function"})
        fd = peer.sock.fileno()
        if fd >= 0 and self._by_fd.get(fd) is peer:  # unwatched before its number is reused
            self._poller.remove(fd)
            del self._by_fd[fd]
        peer.close()
        if peer in self.peers:
            self.peers.remove(peer)
        if peer is self._operator:
            self._operator = None

    def _on_message(self, peer: _Peer) -> None:
        try:
            if peer.wire is None:
                assert peer.hello is not None
                hello = peer.hello.step()  # never blocks: what has arrived of the HELLO
                if hello is None:
                    return  # the rest has not arrived yet (bounded by _expire)
                hello.close_fds()
                peer.wire, peer.hello, peer.due = peer.hello.wire, None, math.inf
                # Sends block from here, but bounded: a peer that stops reading must not hold
                # this thread (it serves) in a send once the socket buffer is full — the send
                # fails, the peer is dropped. Receives stay non-blocking (Wire.step; only the
                # handover's wait for "done" blocks, bounded: it is the pause).
                peer.sock.settimeout(_STEP_TIMEOUT)
                peer.pid = peer.wire.peer_pid
                peer.role = str(hello.fields.get("role", "standby"))
                peer.wire.send("welcome", {"generation": self.generation,
                                           "state_version": STATE_VERSION,
                                           "digest": self.node.state.digest,
                                           "pid": os.getpid()})
                return
            # What has arrived of the next message: a key holder that sends half of one and
            # stalls holds up nothing (before: a blocking recv here held the serving loop up
            # to 2 s per such peer and round); _expire bounds it from its first byte.
            got = peer.wire.step()
            if got is None:
                if peer.due == math.inf and peer.wire.receiving:
                    peer.due = time.monotonic() + _MESSAGE_TIMEOUT
                    self._due = min(self._due, peer.due)
                return
            msg, peer.due = got, math.inf
        except (Error, OSError) as exc:
            if not isinstance(exc, ProtocolError):
                self._emit("refused", peer_pid=peer.pid, error=str(exc))
            self._drop(peer)
            return
        msg.close_fds()
        try:
            self._dispatch(peer, msg.type, msg)
        except (ConnectionError, TimeoutError) as exc:
            # The peer hung up before our answer (EPIPE/ECONNRESET: an operator killed after
            # its request, a standby gone after "join") or stopped reading: drop it and serve
            # on — before, this escaped run() and ended the function.
            self._emit("dropped", peer_pid=peer.pid, error=str(exc))
            self._drop(peer)

    def _dispatch(self, peer: _Peer, kind: str, msg: Message) -> None:
        assert peer.wire is not None
        if kind == "join" and peer.role == "standby":
            peer.wire.send("objects", dict(self.node.describe(), generation=self.generation),
                           payloads=self.node.exports(self.key), fds=self.node.fds())
        elif kind == "ready" and peer.role == "standby":
            peer.role = "ready"
            self._emit("standby", standby_pid=peer.pid)
        elif kind == "handover" and peer.role == "ready":
            with no_gc():  # a collection here would be the pause (gcpause.py)
                self._handover(peer)
        elif kind == "request" and peer.role == "operator":
            self._operator_request(peer, str(msg.fields.get("action", "")))
        else:
            peer.wire.send("error", {"errno": errno.EPROTO,
                                     "message": f"unexpected {kind!r} from a {peer.role}"})
            self._drop(peer)

    def _operator_request(self, op: _Peer, action: str) -> None:
        assert op.wire is not None
        if action == "status":
            op.wire.send("status", self.status())
        elif action == "stop":
            for p in list(self.peers):
                # Joined standbys too, not only ready ones: one whose "ready" is still unread
                # would otherwise see the stopped primary's EOF as a death and take over a
                # function whose objects are being freed.
                if p.role in ("standby", "ready") and p.wire is not None:
                    with contextlib.suppress(OSError):
                        p.wire.send("shutdown", {"generation": self.generation})
                    self._drop(p)
            self._stop = True
            op.wire.send("stopped", self.status())
        elif action == "handover":
            if self._operator is not None:
                # One at a time: a second request replaced the first operator, who then never
                # heard how its handover went.
                op.wire.send("error", {"errno": errno.EBUSY, "message": "a handover is already "
                                       "in progress"})
                return
            standby = next((p for p in self.peers if p.role == "ready"), None)
            if standby is None or standby.wire is None:
                op.wire.send("error", {"errno": errno.ENOENT,
                                       "message": "no standby is connected and ready"})
                return
            # The standby asks (protocol), the operator only tells it to. Meanwhile the lanes
            # take only what the page can take, so that the coming pause waits for little.
            self._going = standby
            self.server.prepare_pause(True)
            try:
                standby.wire.send("go", {"generation": self.generation})
            except (ConnectionError, TimeoutError) as exc:
                self._drop(standby)  # gone: the operator hears why, and may ask again
                op.wire.send("error", {"errno": errno.ENOENT,
                                       "message": f"the ready standby went away: {exc}"})
                return
            self._operator = op
        else:
            op.wire.send("error", {"errno": errno.EINVAL, "message": f"unknown action {action!r}"})

    def status(self) -> dict[str, Any]:
        """What this primary did: generation, requests answered, handovers, rollbacks."""
        s = self.server
        return {"generation": self.generation, "pid": os.getpid(), "served": s.served,
                "recovered": s.recovered, "retired_published": s.retired_published,
                "handovers": self.handovers, "rollbacks": self.rollbacks,
                "standbys": sum(p.role == "ready" for p in self.peers)}

    # ---- planned handover ----

    def _handover(self, peer: _Peer) -> None:
        wire = peer.wire
        assert wire is not None
        state = self.node.state
        t_stop = time.monotonic_ns()  # stop taking: nothing is in flight between requests
        self._going = None  # (a rollback's server.recover() ends lean taking)
        try:
            # Python server: nothing queued (direct mode), the page lock goes. Engine: pause,
            # finish deferred requests, release the gateways (engine_node.EngineServer).
            self.server.close_gateway()
        except (Error, OSError) as exc:
            self.server.prepare_pause(False)  # serving on: whole batches again
            self.rollbacks += 1
            self._emit("rollback", generation=self.generation, error=str(exc), committed=False)
            self._tell_operator("error", {"errno": errno.ECANCELED,
                                          "message": f"handover rolled back: {exc}"})
            with contextlib.suppress(Error, OSError):
                wire.send("abort", {"message": str(exc)})
            return
        t_closed = time.monotonic_ns()
        state.mark(self.generation, state.served() + self.server.served, paused=True)
        self.server.served = 0
        snapshot = seal_snapshot(state.summary(), self.key, self.generation)
        self._steps = [t_stop, *getattr(self.server, "steps_ns", [])[1:], t_closed,
                       time.monotonic_ns()]
        try:
            # Commit in one message: the lease names the standby as the only process that may
            # take it next, and the sealed summary goes with the commit. The standby checks
            # the summary and takes the lease — or refuses without touching it, and then this
            # process takes its own generation back (Lease.reclaim).
            self.lease.release(successor=peer.pid)
            self._steps.append(time.monotonic_ns())
            wire.send("commit", {"generation": self.generation, "t_stop": t_stop},
                      payloads=[snapshot])
            self._steps.append(time.monotonic_ns())
            done = wire.recv(timeout=_STEP_TIMEOUT)
            self._steps.append(time.monotonic_ns())
            done.close_fds()
            if done.type != "done":
                why = done.fields.get("message", "")
                raise HandoverError(errno.ECANCELED, f"the standby answered {done.type!r}"
                                    + (f": {why}" if why else ""), "handover")
        except (Error, OSError) as exc:
            self._drop(peer)
            # Take the function back unless the successor holds the lease (then it serves and
            # this process steps down). Nobody took it since the commit: the same generation
            # (the handover did not happen); the successor took it and let it go: a new one.
            try:
                gen = self.lease.reclaim(self.generation, 0.5)
            except LeaseHeldError:
                self._handed_over(peer.pid)
                return
            committed = gen != self.generation
            self.generation = gen
            self.rollbacks += 1
            self.server.open()
            self.server.recover()
            state.mark(self.generation, state.served())
            self._emit("rollback", generation=self.generation, error=str(exc),
                       committed=committed)
            self._tell_operator("error", {"errno": errno.ECANCELED,
                                          "message": f"handover rolled back: {exc}"})
            return
        self._handed_over(peer.pid)

    def _handed_over(self, successor: int) -> None:
        self.handovers += 1
        self.node.state.release_function()
        self.node.server = None
        self.outcome = "handed-over"
        self._tell_operator("handed-over", {"generation": self.generation + 1,
                                            "successor": successor})
        for p in list(self.peers):
            if p.wire is not None and p.role == "ready":
                with contextlib.suppress(OSError):
                    p.wire.send("moved", {"generation": self.generation})
            self._drop(p)
        if self.listener is not None:
            self._poller.remove(self.listener)
            self.listener.close()  # the path is the successor's now: do not unlink it
        steps = getattr(self, "_steps", [])
        self._emit("handed-over", generation=self.generation, successor=successor,
                   steps_us=[(t - steps[0]) // 1000 for t in steps[1:]])

    def _tell_operator(self, kind: str, fields: dict[str, Any]) -> None:
        op = self._operator
        self._operator = None
        if op is not None and op.wire is not None:
            with contextlib.suppress(OSError):
                op.wire.send(kind, fields)

    # ---- after ----

    def close(self, *, free: Optional[bool] = None) -> Optional[str]:
        """Release everything. `free` (default: when stopped, not handed over) destroys the
        gateway VAR. Returns how the VAR went (see ``Node.close``). Idempotent.

        From another thread while :meth:`run` serves: stops it and waits for it to return
        (its current step ends within a few seconds) before releasing anything — before,
        the objects went away under the serving loop, which failed with whatever it touched
        next.

        Raises:
            HandoverError: ``EBUSY``: :meth:`run` did not return in time; nothing was closed.
        """
        self.stop()
        bound = 2 * _STEP_TIMEOUT + 1.0  # a handover step, then its rollback's reclaim
        if not self._running.acquire(timeout=bound):
            raise HandoverError(errno.EBUSY, f"run() did not return within {bound:g} s: "
                                "nothing was closed", "handover")
        try:
            if self._closed:
                return None
            self._closed = True
            return self._close(free)
        finally:
            self._running.release()

    def _close(self, free: Optional[bool]) -> Optional[str]:
        for p in list(self.peers):
            self._drop(p)
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
        stopped = self.outcome != "handed-over"
        if stopped:
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(self.path):
                    os.unlink(self.path)
        how = self.node.close(free=stopped if free is None else free)
        self.lease.close()
        return how

    def owns_objects(self) -> bool:
        """Whether this process owns (allocated) a gateway VAR and still holds it."""
        return bool(self.node.owns_objects())
