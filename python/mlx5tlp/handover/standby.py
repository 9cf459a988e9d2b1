"""A standby: holds everything a successor needs, detects the primary's death, takes over.

Connecting (:class:`Standby`): ``hello`` (role, pid, state version) -> ``welcome`` (the
primary's generation, state version and function digest: another version is refused here) ->
``join`` -> ``objects`` (``SCM_RIGHTS``: the command fd, the state memfd, the memory memfd;
payloads: the gateway VAR's keyed export envelope) -> ``ready``. The standby then holds an
imported context (so the kernel objects outlive the primary), an imported VAR and a mapping of
the state, and serves nothing.

Death detection: the standby waits in ``poll(2)`` on two fds — the control socket (EOF when the
primary's last fd of it closes) and a pidfd of the primary (readable once it has exited). Neither
costs anything while the primary lives. A pidfd becomes readable after the dying process's files
are closed, so its OFD locks (the lease, the gateway page lock) are gone by then; an EOF without
a death (the primary closed the connection) makes the standby reconnect instead. The lease decides
between several standbys: exactly one takes it (``F_OFD_SETLK``), the others reconnect to the
winner. There is no heartbeat timeout: a primary that is alive but stuck is not taken over
automatically (an operator kills it; its death then triggers the takeover).

Takeover: take the lease (generation + 1), open the gateway (its page lock died with the
primary's fds), adopt the function state, ``recover`` every dead claim before writing (see
:mod:`mlx5tlp.handover.server`), bind the control socket, serve.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from mlx5tlp._deadline import Deadline
from mlx5tlp.errors import Error, InvalidHandleError
from mlx5tlp.function import FunctionSpec
from mlx5tlp.handover import _fields
from mlx5tlp.handover._poll import readable as _readable
from mlx5tlp.handover.errors import (
    HandoverAborted,
    HandoverError,
    HandoverProtocolError,
    LeaseHeldError,
    StateMismatchError,
)
from mlx5tlp.handover.gcpause import no_gc
from mlx5tlp.handover.lease import Lease, check_socket_path, own_start_time
from mlx5tlp.handover.node import Events, Node
from mlx5tlp.handover.primary import Primary
from mlx5tlp.handover.state import STATE_VERSION, open_snapshot, seal_snapshot
from mlx5tlp.handover.wire import Wire, check_key
from mlx5tlp.realtime import ordinary
from mlx5tlp.share import ProtocolError

if TYPE_CHECKING:
    from mlx5tlp.engine import Region
    from mlx5tlp.handover.engine_node import EngineNode

__all__ = ["Standby", "connect"]


def connect(path: str, timeout: Optional[float] = 5.0) -> socket.socket:
    """Connect to the control socket at `path`, retrying while nobody listens (a successor may
    be binding it) until `timeout` (None or inf: no limit).

    Raises:
        HandoverError: ``ECONNREFUSED``/``ENOENT`` after the timeout.
        InvalidArgumentError: ``EINVAL``: `timeout` is NaN or negative; ``ENAMETOOLONG``:
            `path` is too long for a UNIX socket.
    """
    deadline = Deadline.in_seconds(timeout, "connect timeout")
    check_socket_path(path)  # else connect() raises a bare OSError
    pause = 1e-4
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            s.close()
            if deadline.expired():
                raise HandoverError(exc.errno, f"no primary listens at {path!r}: "
                                    f"{exc.strerror}", "connect") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        except BaseException:
            s.close()
            raise


class Standby:
    """A standby of the function served at `path`.

    Args:
        path: the primary's control socket.
        key: the operator key (HMAC), at least 16 bytes.
        spec: the function this process would serve (default: the primary's); its digest
            must match the primary's state.
        state_version: the handover state version this process implements (tests pass
            another to check refusal).
        allow_uids: uids allowed besides our own (the primary's credentials are checked).
        regions: for a primary served by the native engine (``Device.serve``): this
            process's region declarations, checked against the primary's (kind, BAR, offset,
            size, registers); memory and register regions continue from the primary's shared
            memfds, callback regions use these handlers. None: rebuilt from the primary's
            layout (memory and register regions only, no hooks).
        events: called with a dict per event (``standby``, ``takeover``, ...).

    Raises:
        StateMismatchError: the primary's state is of another version (``EPROTO``) or
            another function (``EINVAL``), or this process could not serve its regions (a
            callback region without a handler in `regions`: the engine is built on joining).
        AuthenticationError: another key, or the peer's uid is not allowed.
        HandoverError: no primary at `path`.

    Thread-safety: one thread.
    """

    def __init__(self, path: str, key: bytes, *, spec: Optional[FunctionSpec] = None,
                 state_version: int = STATE_VERSION,
                 allow_uids: Optional[Collection[int]] = None,
                 events: Optional[Events] = None, timeout: Optional[float] = 5.0,
                 regions: Optional[Sequence[Region]] = None) -> None:
        self.path = os.path.abspath(path)
        self.key = check_key(key)
        self.spec = spec
        self.state_version = state_version
        self.allow_uids = allow_uids
        self.events = events
        # Each step's bound (connect, every reply), checked here rather than deep in a socket
        # call: NaN/negative refused (EINVAL), None/inf/huge = no limit (None: a huge value
        # would overflow socket.settimeout).
        self.timeout = Deadline.checked(timeout, "standby timeout")
        self.regions = regions
        self.lease = Lease(self.path + ".lease", state_version=state_version)
        self.node: Optional[Union[Node, EngineNode]] = None
        self.sock: Optional[socket.socket] = None
        self.wire: Optional[Wire] = None
        self.primary_pid = 0
        self._pidfd = -1
        self._lease_given = False  # the lease went to the Primary this standby became
        self._shutdown = False     # the primary stopped the function while we joined
        self._late_reply = False   # a handover timed out: its commit or abort may still come
        # close() from another thread wakes a wait() through this eventfd, then waits for it
        # to leave before tearing down the socket and pidfd that wait() polls (closing an fd
        # does not wake a poll(); its number could be reused meanwhile).
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._busy = threading.Lock()  # held by wait()
        self._closed = False
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events(dict(fields, event=event, pid=os.getpid(), t_ns=time.monotonic_ns()))

    def _connect(self) -> None:
        # Joining (the objects' import) is not on a pause's path: a real-time standby does it
        # at ordinary priority, so that it does not take a CPU from a serving primary's lanes
        # or a handover in progress (realtime.ordinary). It waits at its own priority.
        with ordinary():
            generation = self._join()
        if self.node is None:
            return  # the function stopped while we joined
        prebuild = getattr(self.node, "prebuild", None)
        if prebuild is not None:
            # The engine, its lanes parked, now rather than when a handover is asked for (or,
            # in a takeover, after the death): its threads take this thread's policy, the one
            # they serve at — so not under ordinary().
            prebuild()
        self._rehearse()
        assert self.wire is not None
        self.wire.send("ready", {})
        self._emit("standby", primary=self.primary_pid, generation=generation)

    def _join(self) -> int:
        """Connect, check the welcome, import the objects; the primary's generation."""
        self._late_reply = False
        self.sock = connect(self.path, self.timeout)
        self.wire, welcome = Wire.client(
            self.sock, self.key,
            {"role": "standby", "pid": os.getpid(), "state_version": self.state_version},
            allow_uids=self.allow_uids, timeout=self.timeout)
        welcome.close_fds()
        if welcome.type != "welcome":
            raise HandoverProtocolError(errno.EPROTO, f"expected welcome, got {welcome.type!r}",
                                        "handover")
        f = welcome.fields
        version = _fields.integer(f, "state_version", "welcome", hi=0xFFFF_FFFF)
        pid = _fields.integer(f, "pid", "welcome", lo=1, hi=0x7FFF_FFFF)
        generation = _fields.integer(f, "generation", "welcome", lo=1)
        if version != self.state_version:
            raise StateMismatchError(
                errno.EPROTO, f"the primary (pid {pid}) keeps handover state version "
                f"{version}; this process implements version "
                f"{self.state_version}: it cannot be its successor without an explicit "
                "migration", "handover")
        self.wire.send("join", {})
        objs = self.wire.recv(timeout=self.timeout)
        if objs.type == "shutdown":  # the function stopped while we joined: nothing to hold
            objs.close_fds()
            self._shutdown = True
            self._emit("shutdown")
            return generation
        if objs.type != "objects":
            objs.close_fds()
            raise HandoverError(errno.EPROTO, f"expected objects, got {objs.type!r}", "handover")
        fds, objs.fds = objs.fds, []
        if "engine" in objs.fields:
            from mlx5tlp.handover.engine_node import EngineNode

            self.node = EngineNode.from_message(objs.fields, fds, objs.payloads, self.key,
                                                self.spec, self.state_version, self.regions)
        else:
            self.node = Node.from_message(objs.fields, fds, objs.payloads, self.key, self.spec,
                                          self.state_version)
        self.primary_pid = self.wire.peer_pid
        try:
            self._pidfd = os.pidfd_open(self.primary_pid)
        except ProcessLookupError:
            self._pidfd = -1  # already gone: wait() takes over at once
        return generation

    def _rehearse(self) -> None:
        # What a commit runs for the first time in a process — cold code, the state block's
        # pages not yet faulted into this mapping, our start time not yet read from /proc —
        # cost a fresh standby's first handover ~110 µs more pause (p50 655 vs 544 µs in the
        # mixed demo, where every takeover brings a fresh standby). Run it once now, outside
        # any pause: seal and check a summary as a commit does, read the lease.
        node = self.node
        assert node is not None
        summary = node.state.summary()
        with contextlib.suppress(Error):  # nothing is decided here: the commit checks again
            open_snapshot(seal_snapshot(summary, self.key, 0), self.key, generation=0,
                          digest=node.state.digest, version=self.state_version)
            self.lease.read()
        own_start_time()

    def _disconnect(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.wire = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = -1
        if self.node is not None:
            self.node.close(free=False)
            self.node = None

    def _reconnect(self) -> None:
        self._disconnect()
        self._connect()

    # ---- waiting ----

    def _primary_dead(self, wait: float) -> bool:
        if self._pidfd < 0:
            return True
        return bool(_readable([self._pidfd], wait))

    def wait(self, timeout: Optional[float] = None) -> Optional[Primary]:
        """Wait until this standby must act, and act.

        Returns:
            A :class:`Primary` (serving) after a takeover or a planned handover the primary's
            operator started (``go``); None when the primary stopped the function
            (``shutdown``), `timeout` passed, or :meth:`close` was called from another thread.

        A standby that loses the race for a dead primary's lease to another standby
        reconnects to the winner and goes on waiting (an ``outraced`` event).

        Raises:
            HandoverError: a takeover or handover step failed (this process stays standby if it
                can; check :attr:`node`); ``EBUSY``: another thread is in :meth:`wait`.
            InvalidHandleError: ``EBADF``: the standby was closed.
        """
        end = Deadline.in_seconds(timeout, "standby wait timeout")
        if not self._busy.acquire(blocking=False):
            raise HandoverError(errno.EBUSY, "another thread is waiting on this standby",
                                "handover")
        try:
            return self._wait(end)
        finally:
            self._busy.release()

    def _wait(self, end: Deadline) -> Optional[Primary]:
        if self._closed:
            raise InvalidHandleError(errno.EBADF, "the standby was closed", "handover")
        if self._shutdown:
            return None
        while True:
            if self._closed:
                return None
            assert self.sock is not None and self.wire is not None
            left = end.remaining()
            fds: list[Any] = [self.sock, self._wake] + (
                [self._pidfd] if self._pidfd >= 0 else [])
            if self._pidfd < 0:
                won = self._take_over_or_stay()
                if won is None:
                    continue
                return won
            r = _readable(fds, left)
            if self._wake in r:
                with contextlib.suppress(OSError):
                    os.eventfd_read(self._wake)  # consumed: a later wait() waits again
                return None
            if not r:
                return None
            # Dead. But a primary that stopped the function sent "shutdown" before it exited
            # (and freed the objects): read what it left before taking over.
            if self._pidfd in r and self.sock.fileno() not in r \
                    and not _readable([self.sock], 0):
                won = self._take_over_or_stay()
                if won is None:
                    continue
                return won
            try:
                msg = self.wire.recv(timeout=self.timeout)
            except (ProtocolError, ConnectionError):
                # EOF, or a reset: a primary killed with our unread message in its buffer.
                if self._primary_dead(0.2):
                    won = self._take_over_or_stay()
                    if won is None:
                        continue
                    return won
                self._reconnect()  # closed by a living primary: connect again
                continue
            msg.close_fds()
            if self._late_reply and msg.type in ("commit", "abort"):
                # The handover that timed out: not acted on. A commit is refused at once, so
                # that the primary takes its lease back now rather than after its own timeout.
                self._late_reply = False
                if msg.type == "commit":
                    with contextlib.suppress(OSError):
                        self.wire.send("abort", {"message": "the commit came after this "
                                                 "standby's step timeout"})
                continue
            if msg.type == "go":
                try:
                    return self.promote()
                except LeaseHeldError as exc:  # killed mid-handover, and another standby won
                    self._emit("outraced", error=str(exc))
                    continue
            if msg.type == "shutdown":
                self._emit("shutdown")
                return None
            if msg.type == "moved":
                self._reconnect()
                continue
            raise HandoverError(errno.EPROTO, f"unexpected {msg.type!r} from the primary",
                                "handover")

    # ---- crash takeover ----

    def _take_over_or_stay(self) -> Optional[Primary]:
        # Several standbys race for a dead primary's lease: the losers reconnect to the winner
        # (take_over does) and go on standing by — before, wait() raised LeaseHeldError and
        # `mlx5tlp serve --standby` exited, so every crash cost a function one of its standbys.
        try:
            return self.take_over()
        except LeaseHeldError as exc:
            self._emit("outraced", error=str(exc))
            return None

    def take_over(self) -> Primary:
        """The primary is dead: become primary (see the module docstring).

        Raises:
            LeaseHeldError: another standby won (this one reconnects to it and stays standby).
        """
        t_detect = time.monotonic_ns()
        node = self.node
        assert node is not None
        try:
            gen = self.lease.acquire(1.0)
        except LeaseHeldError:
            self._reconnect()
            raise
        self.lease.digest = node.state.digest
        node.adopt(gen)
        self._drop_connection()
        p = Primary(self.path, self.key, node, self.lease, None,
                    allow_uids=self.allow_uids, events=self.events)
        p.origin = {"how": "takeover", "t_detect": t_detect, "dead": self.primary_pid}
        self._emit("takeover", generation=gen, recovered=p.server.recovered,
                   retired_published=p.server.retired_published, t_detect=t_detect)
        self.node = None
        self._lease_given = True
        return p

    def _drop_connection(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.wire = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = -1

    # ---- planned handover ----

    def promote(self) -> Primary:
        """Ask the primary to hand over, and become primary.

        The primary stops, releases the lease naming this process and sends ``commit`` with
        the sealed state summary; this process checks the summary, takes the lease, adopts
        the state, opens the gateways, starts serving and answers ``done``.

        Raises:
            HandoverAborted: the primary could not stop, the commit was malformed, or this
                process could not take the function after it took the lease (it gave the lease
                back to the old primary); the old primary serves again, this process is still
                a standby.
            AuthenticationError / StateMismatchError: the sealed summary failed a check (this
                process refused before taking the lease; the old primary serves again at its
                own generation).
        """
        with no_gc():  # a collection here would be the pause (gcpause.py)
            return self._promote()

    def _promote(self) -> Primary:
        wire, node = self.wire, self.node
        assert wire is not None and node is not None
        try:
            wire.send("handover", {})
            commit = wire.recv(timeout=self.timeout)
        except (ProtocolError, ConnectionError) as exc:
            # Hung up instead of committing: killed while it paused (a crash takeover, its
            # claims recovered as after any death), or a living primary that dropped us.
            if self._primary_dead(0.2):
                return self.take_over()
            raise HandoverAborted(errno.ECANCELED, f"the primary hung up during the handover "
                                  f"({exc})", "handover") from None
        except TimeoutError:
            # Alive but not answering (stopped, or starved): no commit within the step timeout.
            # Nothing was taken. Its commit may still come on this connection: wait() drops it
            # unanswered, and the primary, hearing no "done", takes its own lease back.
            self._late_reply = True
            raise HandoverAborted(errno.ETIMEDOUT, f"the primary did not commit within "
                                  f"{self.timeout} s", "handover") from None
        commit.close_fds()
        marks = [time.monotonic_ns()]  # step times, reported with the first answer
        if commit.type == "abort":
            why = _fields.text(commit.fields, "message", "abort", default="")
            raise HandoverAborted(errno.ECANCELED, f"the primary could not stop: {why}",
                                  "handover")
        taken = opened = False
        try:
            if commit.type != "commit" or len(commit.payloads) != 1:
                raise HandoverAborted(errno.EPROTO, f"expected commit, got {commit.type!r}",
                                      "handover")
            gen = _fields.integer(commit.fields, "generation", "commit", lo=1)
            # Read before anything is taken (it used to be read after the takeover).
            t_stop = _fields.integer(commit.fields, "t_stop", "commit")
            # The primary released the lease naming us; nothing is taken until the summary
            # checks out, so a refusal leaves the primary its own generation.
            rec = self.lease.read()
            if rec is None or rec.generation != gen or rec.pid != self.primary_pid \
                    or rec.successor != os.getpid():
                raise HandoverAborted(errno.ESTALE, f"the primary committed generation {gen} "
                                      f"to this process, the lease says {rec}", "handover")
            state = open_snapshot(commit.payloads[0], self.key, generation=gen,
                                  digest=node.state.digest, version=self.state_version)
            if state != node.state.summary():
                raise HandoverAborted(errno.ESTALE, "the shared state differs from the "
                                      "primary's sealed summary", "handover")
            marks.append(time.monotonic_ns())
            new_gen = self.lease.acquire(1.0)
            taken = True
            marks.append(time.monotonic_ns())
            node.adopt(new_gen)
            server = node.make_server()
            server.open()
            opened = True
            marks.append(time.monotonic_ns())
            if getattr(server, "native", False):
                # The engine's lanes serve from here, while this thread writes the header,
                # answers the old primary and sets up the control socket.
                server.recover()
            node.state.mark(new_gen, node.state.served())
            marks.append(time.monotonic_ns())
        except BaseException as exc:
            if opened and node.server is not None:
                with contextlib.suppress(Error, OSError):
                    node.server.close_gateway()
            node.server = None
            node.state.release_function()
            if taken:
                # Give the function back: only the old primary may take it next.
                self.lease.release(successor=self.primary_pid)
            if isinstance(exc, Error) and self.sock is not None:
                with contextlib.suppress(OSError):
                    wire.send("abort", {"message": str(exc)})
            raise
        with contextlib.suppress(OSError):
            # (A primary killed after its commit cannot hear it: this process holds the lease
            # and serves either way — before, the EPIPE ended promote() with the lanes running.)
            wire.send("done", {"generation": new_gen})
        self._drop_connection()
        marks.append(time.monotonic_ns())
        p = Primary(self.path, self.key, node, self.lease, None,
                    allow_uids=self.allow_uids, events=self.events)
        marks.append(time.monotonic_ns())
        p.origin = {"how": "handover", "t_stop": t_stop,
                    "steps_us": [(m - t_stop) // 1000 for m in marks]}
        self.node = None
        self._lease_given = True
        return p

    def interrupt(self) -> None:
        """Make the :meth:`wait` in progress (or the next one) return None. Safe from a signal
        handler and from another thread (one ``eventfd`` write)."""
        if self._wake >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Disconnect and drop the imports (frees nothing). Idempotent. From another thread
        while one is in :meth:`wait`: wakes it (it returns None) and waits for it to leave
        first — bounded by a step in progress (a takeover or handover step, ``timeout``).

        Raises:
            HandoverError: ``EBUSY``: the thread in :meth:`wait` did not leave within that
                bound (still in a step); nothing was closed — close again later.
        """
        if self._wake < 0:
            return
        self._closed = True
        self.interrupt()
        bound = min(2 * (self.timeout if self.timeout is not None else 5.0) + 1.0, 60.0)
        if not self._busy.acquire(timeout=bound):
            raise HandoverError(errno.EBUSY, f"a thread is still in wait() after {bound:g} s "
                                "(a takeover or handover step): close again after it "
                                "returns", "handover")
        try:
            self._disconnect()
            if not self._lease_given:
                self.lease.close()
            os.close(self._wake)
            self._wake = -1
        finally:
            self._busy.release()
