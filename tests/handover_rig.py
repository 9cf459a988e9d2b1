"""Real processes for the handover tests: `mlx5tlp serve` primaries and standbys with events
(served by the native engine or the Python loop: `--engine`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from mlx5tlp import tlp

REQUESTER = 0x0000
FUNCTION = 0x0100
VENDOR_DEVICE = 0x7F10 << 16 | 0x15B3  # the default function's Device ID || Vendor ID dword


def check_clean(host: Any, device: str, requests: int) -> None:
    """Every one of `requests` answered exactly once (the host model counts a second answer as
    unexpected, a missing one stays outstanding) and nothing left claimed or pending."""
    from mlx5tlp import sim

    st = host.stats()
    assert (st["retired"], st["outstanding"], st["unexpected"], st["errors"]) == (
        requests, 0, 0, 0), st
    ds = sim.device_stats(device)
    assert (ds["requests_claimed"], ds["requests_pending"]) == (0, 0), ds


class EventProc:
    """A process printing one JSON event per line on stdout, collected by a thread."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        self.pid = self.p.pid
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self.cond:
                self.events.append(json.loads(line))
                self.cond.notify_all()
        with self.cond:
            self.events.append({"event": "eof"})
            self.cond.notify_all()

    def wait_event(self, name: str, timeout: float = 30.0, after: int = 0,
                   error: str = "") -> dict[str, Any]:
        """The first event `name` at index >= `after` (whose "error" contains `error`: which
        'refused' comes first depends on the order the primary reads its peers in)."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events[after:]:
                    if e["event"] == name and error in str(e.get("error", "")):
                        return e
                    if e["event"] == "eof" and name != "eof":
                        err = self.p.stderr.read() if self.p.stderr else ""
                        raise AssertionError(f"{self.name} exited before {name!r}: {err}")
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {name!r} event in {timeout} s: "
                                         f"{self.events}")
                self.cond.wait(left)

    def count(self, name: str) -> int:
        with self.cond:
            return sum(e["event"] == name for e in self.events)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.p.wait(30)

    def close(self) -> None:
        if self.p.poll() is None:
            self.kill()
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


class Proc(EventProc):
    """One `mlx5tlp serve` process of the rig."""

    def __init__(self, rig: Rig, name: str, args: list[str]) -> None:
        super().__init__(name, [sys.executable, "-m", "mlx5tlp", "serve", *args, "--key-file",
                                str(rig.key_file), "--device", rig.device, "--events",
                                "--engine", rig.engine], rig.env)


class Rig:
    """A private directory (0700) with the key file and the control socket path."""

    def __init__(self, tmp: Path, device: str, engine: str = "native") -> None:
        self.engine = engine  # who serves in a primary: "native" (the engine) or "python"
        self.dir = tmp / "ho"
        self.dir.mkdir(mode=0o700)
        self.key = os.urandom(32).hex().encode()
        self.key_file = self.dir / "key"
        self.key_file.write_bytes(self.key)
        self.key_file.chmod(0o600)
        self.path = str(self.dir / "ctl")
        self.device = device
        locks = self.dir / "locks"
        locks.mkdir(mode=0o700)
        self.env = dict(os.environ, MLX5TLP_LOCK_DIR=str(locks))
        self.procs: list[Proc] = []

    def spawn(self, name: str, *args: str) -> Proc:
        p = Proc(self, name, list(args))
        self.procs.append(p)
        return p

    def primary(self, name: str = "P0") -> Proc:
        p = self.spawn(name, "--control", self.path)
        p.wait_event("serving")
        return p

    def standby(self, name: str, primary: Proc) -> Proc:
        before = primary.count("standby")
        s = self.spawn(name, "--standby", self.path)
        s.wait_event("standby")
        deadline = time.monotonic() + 30
        while primary.count("standby") <= before:  # the primary saw it ready
            assert time.monotonic() < deadline, "the primary never saw the standby"
            time.sleep(0.005)
        return s

    def close(self) -> None:
        for p in self.procs:
            p.close()


@contextlib.contextmanager
def private_control(tmp_path: Path) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """A control socket path in a private (0700) directory, an operator key, and the
    environment for child processes: the page locks in their own private directory, set for
    this process too (a standby that runs in the test's process)."""
    d = tmp_path / "ho"
    d.mkdir(mode=0o700)
    locks = d / "locks"
    locks.mkdir(mode=0o700)
    env = dict(os.environ, MLX5TLP_LOCK_DIR=str(locks))
    os.environ["MLX5TLP_LOCK_DIR"] = str(locks)
    try:
        yield str(d / "ctl"), os.urandom(32).hex().encode(), env
    finally:
        os.environ.pop("MLX5TLP_LOCK_DIR", None)


_ENGINE_PRIMARY = r"""
import json, os, sys, threading, time
from mlx5tlp import engine, open_device
sys.path[:0] = [{tests!r}]
from {module} import {names}

def emit(ev):
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()
{setup}
ctx = open_device({device!r}, backend="sim")
dev = engine.Device(ctx, spec(), {regions}, handover=True)
p = dev.serve({path!r}, {key!r}, events=emit)
emit({{"event": "outcome", "outcome": p.run(max_seconds=120)}})
sys.stdout.flush()
os._exit(0)  # a handed-over owner frees nothing: its successor serves the objects
"""


def engine_primary(module: str, *, device: str, path: str, key: bytes, regions: str,
                   setup: str = "", names: str = "spec") -> list[str]:
    """argv of a primary serving test module `module`'s ``spec()`` (`names`: what it imports
    from there) with the engine regions the Python expression `regions` makes (after `setup`,
    code run first), emitting its events and an ``outcome`` event on stdout."""
    code = _ENGINE_PRIMARY.format(tests=str(Path(__file__).parent), module=module,
                                  names=names, device=device, path=path, key=key,
                                  regions=regions, setup=setup)
    return [sys.executable, "-c", code]


def cfg_read(reg: int, tag: int) -> bytes:
    return tlp.Tlp.cfg_read(FUNCTION, reg, requester_id=REQUESTER, tag=tag).encode()


def cfg_write(reg: int, value: int, tag: int) -> bytes:
    return tlp.Tlp.cfg_write(FUNCTION, reg, value.to_bytes(4, "little"),
                             requester_id=REQUESTER, tag=tag).encode()


def collect(host: Any, want: int, timeout: float = 30.0) -> list[tlp.Tlp]:
    """Wait for `want` completions (and a little more, to see duplicates)."""
    got: list[tlp.Tlp] = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        got += [tlp.decode(c) for c in host.completions(timeout=0.2)]
    got += [tlp.decode(c) for c in host.completions(timeout=0.2)]
    return got


def stop(rig: Rig, timeout: float = 30.0) -> Optional[dict[str, Any]]:
    from mlx5tlp import handover

    return handover.request(rig.path, rig.key, "stop", timeout=timeout)
