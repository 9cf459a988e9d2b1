"""``mlx5tlp handover-demo``: planned handovers and SIGKILLed primaries under load, all checked.

The host (this process, the software device's host model) keeps a window of requests in flight
— memory reads of the function's memory region, configuration reads and writes of its scratch
registers (so the shared function state must survive every change of primary) — and checks
every completion (:class:`mlx5tlp.demo.host.Checker`: status, byte counts, lower address,
data). Meanwhile it makes the primary hand over every ``handover_every`` requests
(``handover.request``; the old primary stays as a standby), and SIGKILLs the primary at a random
point of every ``kill_every`` requests (its standby takes over; a new standby is started).

Measured: ``handover_pause_*``: from the old primary stopping taking requests to the successor
answering its first one (both ``CLOCK_MONOTONIC``, reported by the processes); ``takeover_gap``:
from just before the SIGKILL to the successor's first answer. ``lost``: requests never
answered; ``duplicated``: answers the host model found unexpected (a second answer);
``unexpected``: completions that failed a check. ``leaked``: contexts, gateway VARs and claims
left on the device after every process exited.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from mlx5tlp import sim, tlp
from mlx5tlp.demo.host import FUNCTION_ID, REQUESTER_ID, Checker, Pending, RequestMix
from mlx5tlp.errors import TimedOutError
from mlx5tlp.function import Function
from mlx5tlp.handover.lease import Lease
from mlx5tlp.handover.node import DEFAULT_BAR_BASE, DEFAULT_BAR_SIZE, default_spec, memory_pattern
from mlx5tlp.handover.operator import request
from mlx5tlp.realtime import ordinary

__all__ = ["failed", "run"]


def failed(report: dict[str, Any]) -> bool:
    """Whether a report shows a lost, duplicated or unexpected completion or a leak."""
    return bool(report["lost"] or report["duplicated"] or report["unexpected"]
                or any(report["leaked"].values()))


class _Mix(RequestMix):
    """The demo's request mix, with configuration accesses on the default function."""

    def __init__(self, seed: int, read_size: int) -> None:
        super().__init__(seed, memory_pattern(DEFAULT_BAR_SIZE), DEFAULT_BAR_BASE,
                         [(0, DEFAULT_BAR_SIZE)], read_size)
        with Function(default_spec()) as f:
            self.config_space = bytearray(f.config_bytes())
            cap = int(f._layout["vendor_caps"][0])
        self.scratch = list(range(cap + 4, cap + 32, 4))

    def next(self, tag: int) -> Pending:
        r = self.rng.random()
        if r < 0.8:
            return self._mem_read(tag)
        if r < 0.9:
            reg = self.rng.choice([0, 8, *self.scratch])
            req = tlp.Tlp.cfg_read(FUNCTION_ID, reg, requester_id=REQUESTER_ID, tag=tag)
            return Pending(req, 0, tlp.Status.SC, bytes(self.config_space[reg : reg + 4]), 4)
        reg = self.rng.choice(self.scratch)
        data = self.rng.randbytes(4)
        req = tlp.Tlp.cfg_write(FUNCTION_ID, reg, data, requester_id=REQUESTER_ID, tag=tag)
        self.config_space[reg : reg + 4] = data  # channel order = the order the function applies
        return Pending(req, 0, tlp.Status.SC, b"", 4)


class _Procs:
    """`mlx5tlp serve` processes and one queue of their JSON events."""

    def __init__(self, path: str, key_file: str, device: str, env: dict[str, str],
                 engine: str, realtime: Optional[int]) -> None:
        self.path, self.key_file, self.device, self.env = path, key_file, device, env
        self.engine = engine
        self.realtime = [] if realtime is None else ["--realtime", str(realtime)]
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.procs: dict[int, subprocess.Popen[str]] = {}

    def spawn(self, *args: str) -> int:
        # A child inherits the forking thread's policy: at this host's real-time priority a
        # child's interpreter start-up and join took a CPU for ~100 ms ahead of the handover
        # being measured (the mixed run's pause tail). The child takes `--realtime` itself.
        with ordinary():
            p = subprocess.Popen(
                [sys.executable, "-m", "mlx5tlp", "serve", *args, "--key-file", self.key_file,
                 "--device", self.device, "--events", "--engine", self.engine, *self.realtime],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)
        self.procs[p.pid] = p
        threading.Thread(target=self._read, args=(p,), daemon=True).start()
        return p.pid

    def _read(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        with p.stdout:
            for line in p.stdout:
                with contextlib.suppress(ValueError):
                    self.events.put(json.loads(line))

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        p = self.procs.pop(pid, None)
        if p is not None:
            p.wait(30)

    def close(self) -> None:
        for pid in list(self.procs):
            p = self.procs[pid]
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(pid)
        self.procs.clear()


# Where a planned handover's pause goes: each step's time after the old primary stopped
# taking requests (CLOCK_MONOTONIC in both processes), p50 / p99 over the handovers.
_OLD_STEPS = {
    "native": ["paused", "drained", "released", "closed", "sealed", "lease_released",
               "commit_sent", "done_received"],
    "python": ["gateway_closed", "sealed", "lease_released", "commit_sent", "done_received"],
}
_NEW_STEPS = ["commit_received", "checked", "lease_taken", "engine_ready", "serving",
              "done_sent", "primary_ready", "first_answer"]


def _steps_report(old: list[list[float]], new: list[list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rows, names, who in ((old, None, "old"), (new, _NEW_STEPS, "new")):
        if not rows:
            continue
        n = len(rows[0])
        labels = names or _OLD_STEPS["native" if n == 8 else "python"]
        for i in range(min(n, len(labels))):
            col = [r[i] for r in rows if len(r) > i]
            out[f"{who}.{labels[i]}"] = [_pct(col, 0.50), _pct(col, 0.99)]
    return out


def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1)


def run(*, requests: int = 2000, handover_every: int = 0, kill_every: int = 0, seed: int = 1,
        window: int = 16, read_size: int = 64, timeout: float = 600.0,
        engine: str = "native", realtime: Optional[int] = None) -> dict[str, Any]:
    """Run the demo; returns the report (see the module docstring). `engine`: who serves in
    each primary, ``"native"`` (the engine's lanes) or ``"python"``. `realtime`: run the
    serving processes (``serve --realtime``) under ``SCHED_FIFO`` at that priority, and this
    process — the host model — one below it (:func:`mlx5tlp.realtime.use_fifo`; the calling thread
    keeps the policy afterwards, so a library caller runs this in a thread of its own)."""
    if realtime is not None:
        from mlx5tlp.realtime import use_fifo

        # The host model stands in for another machine: one priority below the serving
        # processes, so it never holds a CPU a successor's thread is woken for (at equal
        # SCHED_FIFO priority a woken thread waits until the running one blocks).
        use_fifo(max(1, realtime - 1))
    rng = random.Random(seed ^ 0x5EED)
    work = tempfile.mkdtemp(prefix="mlx5tlp-handover-")  # 0700
    key = os.urandom(32).hex().encode()
    key_file = os.path.join(work, "key")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, key)
    os.close(fd)
    os.mkdir(os.path.join(work, "locks"), 0o700)
    env = dict(os.environ, MLX5TLP_LOCK_DIR=os.path.join(work, "locks"),
               SKBUILD_EDITABLE_VERBOSE="0")
    device = f"handover_demo_{os.getpid()}"
    path = os.path.join(work, "ctl")
    sim.create_device(device)
    procs = _Procs(path, key_file, device, env, engine, realtime)
    report: dict[str, Any] = {}
    # The host model's loop rarely blocks while requests flow, so the operator's request
    # thread would wait for the GIL up to the default switch interval (5 ms) at each of its
    # protocol steps: a planned handover took 5-48 ms to be asked for. 100 us bounds that.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(100e-6)
    try:
        with sim.Host(device) as host, Lease(path + ".lease") as lease:
            report = _drive(host, lease, procs, key, path, requests, handover_every,
                            kill_every, rng, _Mix(seed, read_size), window, timeout)
            report["host"] = {k: v for k, v in host.stats().items() if k != "last_error"}
            report["engine"] = engine
            report["realtime"] = realtime
        procs.close()
        deadline = time.monotonic() + 10
        while True:
            ds = sim.device_stats(device)
            if ds["contexts"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        report["leaked"] = {k: ds[k] for k in ("contexts", "tlp_vars", "requests_claimed",
                                                "requests_pending")}
    finally:
        sys.setswitchinterval(switch)
        for pid in list(procs.procs):
            procs.kill(pid)
        with contextlib.suppress(Exception):
            sim.remove_device(device)
        shutil.rmtree(work, ignore_errors=True)
    return report


# At most this many sends between two looks at the page: a real host takes completions while it
# sends; this loop, refilling a window of 64, would leave the page full ~0.6 ms.
_SEND_BURST = 8


def _drive(host: sim.Host, lease: Lease, procs: _Procs, key: bytes, path: str, requests: int,
           handover_every: int, kill_every: int, rng: random.Random, mix: _Mix, window: int,
           timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    primary = procs.spawn("--control", path)
    standbys: set[int] = set()
    serving: set[int] = set()
    took_over: list[int] = []
    first_served: dict[int, dict[str, Any]] = {}

    def pump_events(block: float = 0.0) -> None:
        try:
            ev = procs.events.get(timeout=block) if block else procs.events.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, pid = ev.get("event"), int(ev.get("pid", 0))
            if kind == "standby" and "primary" in ev:
                standbys.add(pid)
            elif kind == "serving":
                standbys.discard(pid)
                serving.add(pid)
                first_served.pop(pid, None)  # a new tenure: its first answer is still to come
            elif kind == "takeover":
                took_over.append(pid)
            elif kind == "handed-over":
                old_steps.append([float(x) for x in ev.get("steps_us", [])])
            elif kind == "first-served":
                first_served[pid] = ev
                if ev.get("how") == "handover" and "steps_us" in ev:
                    new_steps.append([float(x) for x in ev["steps_us"]] +
                                     [(ev["first_ns"] - ev["t_stop"]) / 1000])
                due = awaiting.get(pid)
                if due is not None and ev.get("how") == due[0]:
                    # Resolved here, so that request gates close again at once.
                    del awaiting[pid], first_served[pid]
                    if due[0] == "handover":
                        pauses.append((ev["first_ns"] - ev["t_stop"]) / 1000)
                    else:
                        gaps.append((ev["first_ns"] - due[1]) / 1000)
            try:
                ev = procs.events.get_nowait()
            except queue.Empty:
                return

    def wait_for(cond: Any, what: str) -> None:
        while not cond():
            if time.monotonic() > end:
                raise TimedOutError(errno.ETIMEDOUT, f"handover demo: timed out waiting for {what}",
                                    "handover-demo")
            # Short: the host model must keep sending meanwhile (a new standby starts here,
            # right after a takeover whose first answer may wait for the next request).
            pump_events(0.0005)
            pump_host()

    checker = Checker()
    awaiting: dict[int, tuple[str, int]] = {}  # pid -> (how, t0 ns): its first answer is due
    pauses: list[float] = []
    old_steps: list[list[float]] = []  # the old primary's step times (us after it stopped)
    new_steps: list[list[float]] = []  # the successor's, then its first answer
    gaps: list[float] = []
    handovers = takeovers = 0
    handover_failures: list[str] = []
    next_handover: Optional[int] = handover_every if handover_every else None
    next_kill: Optional[int] = rng.randrange(1, kill_every + 1) if kill_every else None
    pending_ho: Optional[threading.Thread] = None
    sent = 0
    held: list[Pending] = []  # made by the mix, refused by a full channel: sent next
    enumerated = False
    tags = list(range(256))
    rng.shuffle(tags)

    ho_gen = 0  # the lease's generation when the handover in flight was asked for
    ho_base = 0  # requests sent (or its due point, if later) when it was asked for

    def committed() -> bool:
        rec = lease.read()
        return rec is not None and (rec.successor != 0 or rec.generation > ho_gen)

    def pump_host() -> None:
        nonlocal sent
        # Hold new requests at a due event until it starts (it needs a ready standby).
        limit = requests if enumerated else sent
        if any(how == "takeover" for how, _ in awaiting.values()):
            pass  # a killed primary's successor's first answer is due: requests must flow
        elif next_handover is not None:
            if pending_ho is None and not awaiting:
                limit = min(limit, next_handover)  # the next handover starts there
            else:
                # Each interval of requests gets its own handover: while one is in flight
                # the old primary serves no further than one interval past where it started.
                # But once it has stopped taking requests (the lease names its successor),
                # requests flow again, as a host's do — held back, the successor found nothing
                # to answer until the operator's reply reached this loop (2-4 ms at load:
                # that was the pause p99) — one window more, enough for the successor's first
                # answers without letting the interval run on. Counted from where it started,
                # not from its due point: a host that ran past a due point must not be held
                # back for the whole handover.
                cap = ho_base + handover_every
                if awaiting or (sent >= cap and committed()):
                    cap += window
                limit = min(limit, cap)
        if next_kill is not None and not awaiting and pending_ho is None:
            # (Not while a handover is in flight: the kill waits for it to finish, and holding
            # requests back meanwhile would leave its successor nothing to answer.)
            limit = min(limit, next_kill)
        burst = 0
        while sent < limit and len(checker.outstanding) < window and burst < _SEND_BURST:
            burst += 1
            tag = tags[sent % 256]
            if tag in checker.outstanding:
                break
            # The mix's model of configuration space changes when it makes a write: a request
            # the full channel refused is kept and sent next, never made again.
            p = held.pop() if held else mix.next(tag)
            if not host.send_request(p.request.encode(), p.channel):
                held.append(p)
                break
            checker.sent(p)
            sent += 1
        got = host.completion_records(timeout=0.0)
        for c in got:
            checker.completion(c.tlp)
        if not got and burst < _SEND_BURST:
            # The host shares the two cores with the processes it measures: a spinning host
            # would steal the successor's CPU and lengthen the very pause being measured.
            time.sleep(20e-6)

    wait_for(lambda: primary in serving, "the primary")
    # Enumeration, as a host does: BAR 0 at its base, then Memory Space Enable (PCIe Base
    # 6.x §7.5.1.1.3: memory requests to a function with it clear are Unsupported Requests).
    # Both live in the shared configuration space, so every successor decodes the same BAR.
    for reg, value in ((0x10, DEFAULT_BAR_BASE), (0x04, 0x0006)):
        tag = tags[sent % 256]
        req = tlp.Tlp.cfg_write(FUNCTION_ID, reg, value.to_bytes(4, "little"),
                                requester_id=REQUESTER_ID, tag=tag)
        while not host.send_request(req.encode()):
            pump_host()
        checker.sent(Pending(req, 0, tlp.Status.SC, b"", 4))
        sent += 1
    wait_for(lambda: not checker.outstanding, "the enumeration writes")
    enumerated = True
    procs.spawn("--standby", path)
    wait_for(lambda: len(standbys) >= 1, "a standby")
    ho_result: dict[str, Any] = {}
    t_start = time.monotonic()

    while (sent < requests or checker.outstanding or awaiting or pending_ho is not None) \
            and time.monotonic() < end:
        pump_host()
        pump_events()
        if awaiting and sent >= requests and not checker.outstanding:
            break  # no request left to show the successor's first answer
        # A kill that is due goes first: requests flow past it during handovers, and the next
        # handover would otherwise always start before it (no kill in a short run).
        kill_due = next_kill is not None and sent >= next_kill
        if next_handover is not None and sent >= next_handover and pending_ho is None \
                and standbys and not awaiting and not kill_due:
            ho_result.clear()

            def do_handover() -> None:
                try:
                    ho_result.update(request(path, key, "handover", timeout=30))
                except Exception as exc:  # reported, not fatal: a rollback is a result too
                    ho_result["error"] = str(exc)

            rec = lease.read()
            ho_gen = rec.generation if rec is not None else 0
            ho_base = max(next_handover, sent)
            pending_ho = threading.Thread(target=do_handover, daemon=True)
            pending_ho.start()
        if pending_ho is not None and not pending_ho.is_alive():
            succ = int(ho_result.get("successor", 0))
            if succ:
                awaiting[succ] = ("handover", 0)
                ev = first_served.pop(succ, None)
                if ev is not None and ev.get("how") == "handover":  # it answered already
                    del awaiting[succ]
                    pauses.append((ev["first_ns"] - ev["t_stop"]) / 1000)
                standbys.discard(succ)
                primary = succ
                handovers += 1
            else:
                handover_failures.append(str(ho_result.get("error", "?")))
            pending_ho = None
            if next_handover is not None:
                next_handover += handover_every
        if next_kill is not None and sent >= next_kill and pending_ho is None and standbys \
                and not awaiting:
            t_kill = time.monotonic_ns()
            procs.kill(primary)
            first_served.pop(primary, None)
            next_kill = (next_kill // kill_every + 1) * kill_every + rng.randrange(0, kill_every)
            # Requests flow until the successor is known (pid 0: not yet), as after it.
            awaiting[0] = ("takeover", t_kill)
            pump_events()
            # The successor is whichever standby takes the lease: the first "takeover" event.
            while True:
                pump_host()
                pump_events(0.0002)  # the host keeps draining the page for the successor
                taker = took_over.pop(0) if took_over else None
                if taker is not None or time.monotonic() > end:
                    break
            del awaiting[0]
            if taker is None:
                break
            awaiting[taker] = ("takeover", t_kill)
            ev = first_served.pop(taker, None)
            if ev is not None and ev.get("how") == "takeover":  # it answered already
                del awaiting[taker]
                gaps.append((ev["first_ns"] - t_kill) / 1000)
            standbys.discard(taker)
            primary = taker
            takeovers += 1
            procs.spawn("--standby", path)
            wait_for(lambda: len(standbys) >= 1, "a new standby")
    # Late duplicates would arrive now.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        for c in host.completion_records(timeout=0.05):
            checker.completion(c.tlp)
    elapsed = time.monotonic() - t_start
    if pending_ho is not None:
        pending_ho.join(30)
    try:
        request(path, key, "stop", timeout=30)
    except Exception as exc:
        ho_result["stop_error"] = str(exc)
    st = host.stats()
    unexpected_msgs = [e for e in checker.errors if e.startswith("unexpected")]
    return {
        "requests": sent,
        "verified": checker.requests_verified,
        "seconds": round(elapsed, 3),
        "handovers": handovers,
        "takeovers": takeovers,
        "handovers_rolled_back": len(handover_failures),
        "rollback_reasons": handover_failures[:3],
        "handover_pause_p50_us": _pct(pauses, 0.50),
        "handover_pause_p99_us": _pct(pauses, 0.99),
        "handover_pause_max_us": _pct(pauses, 1.0),
        "takeover_gap_p50_us": _pct(gaps, 0.50),
        "takeover_gap_p99_us": _pct(gaps, 0.99),
        "takeover_gap_max_us": _pct(gaps, 1.0),
        "handover_steps_us": _steps_report(old_steps, new_steps),
        "lost": len(checker.outstanding),
        "duplicated": max(int(st["unexpected"]), len(unexpected_msgs)),
        "unexpected": len(checker.errors) - len(unexpected_msgs) + int(st["errors"]),
        "errors": checker.errors[:5],
        "load": list(os.getloadavg()),
    }
