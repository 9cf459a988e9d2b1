"""The host side of ``mlx5tlp bench``'s function benchmarks (``function_*``, ``callback_rps``).

Host and function run in separate processes: this process is the PCIe host (``sim.Host``; its
native load generator, :meth:`mlx5tlp.sim.Host.load`, on one thread with the GIL released),
and ``python -m mlx5tlp._bench_function KIND`` is the function (the native engine, a Python
callback region, or the Python-per-TLP baseline). The host enumerates the function through
configuration TLPs (BAR assignment, Memory Space Enable, Max_Payload_Size 256) and then
drives it open loop, checking every completion in C++. CPU per request is the generator
thread's CPU time plus the function process's (``/proc/PID/stat`` utime + stime, all
threads) over the run, divided by the requests sent.
"""

from __future__ import annotations

import errno
import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from mlx5tlp import sim, tlp
from mlx5tlp._bench_function import MEMORY, pattern
from mlx5tlp.errors import Error
from mlx5tlp.sim import LoadOp, LoadRange, LoadResult

__all__ = ["FIXED_RATE", "WINDOW", "WORKLOADS", "by_workload", "headline", "load_of", "measure"]

WINDOW = 128  # reads outstanding in the throughput runs
FIXED_RATE = 50_000.0  # requests/s offered for the latency-at-fixed-load runs
MAX_PAYLOAD = 256  # bench.py's method text repeats these three
COMPLETER_ID = 0x0100  # 01:00.0: the Bus/Device Numbers of the host's CfgWr0 (§2.2.6.2)

WORKLOADS: dict[str, tuple[LoadOp, ...]] = {
    "4": (LoadOp("read", 4),),
    "64": (LoadOp("read", 64),),
    "256": (LoadOp("read", 256),),
    "4096": (LoadOp("read", 4096),),
    "mixed": (LoadOp("read", 64, weight=50), LoadOp("read", 4, weight=20),
              LoadOp("read", 256, weight=15), LoadOp("read", 4096, weight=5),
              LoadOp("write", 64, weight=10)),
}


def _failed(what: str) -> Error:
    """A check of the benchmark failed: one error model, an mlx5tlp.Error."""
    return Error(errno.EIO, f"function benchmark: {what}", "bench")


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs."""

    runs: int  # measured runs after one warm-up (median reported)
    seconds: float  # sending time of a throughput / fixed-load run
    window1_count: int  # reads of a window-1 run
    python_seconds: float


def plan(quick: bool) -> Plan:
    """Short runs for ``--quick`` (CI smoke), longer for the full run."""
    if quick:
        return Plan(runs=1, seconds=0.1, window1_count=2000, python_seconds=0.2)
    return Plan(runs=3, seconds=0.5, window1_count=20_000, python_seconds=1.0)


class Function:
    """A function process: started, enumerated by `host`, stopped (its counters returned)."""

    def __init__(self, kind: str, device: str, host: sim.Host) -> None:
        self.kind = kind
        self.written = False  # a run wrote to its memory: it no longer holds pattern()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx5tlp._bench_function", kind, device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = self._line(60.0)
            if line.strip() != "ready":
                raise _failed(f"{kind} function did not start: {line!r} {self._stderr()}")
            host.config_timeout = 10.0
            e = host.enumerate()
            if e.problems:
                raise _failed(f"{kind} function enumerated with problems: {e.problems}")
            bar = e.bar(0)
            pcie = e.capability(0x10)
            assert bar is not None and pcie is not None
            devctl = host.config_read(pcie.offset + 8, 2)  # Device Control (§7.5.3.4)
            host.config_write(pcie.offset + 8, (devctl & ~0xE0) | (1 << 5), 2)  # MPS 256
            self.base = bar.address
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise _failed(f"{self.kind} function: no answer within {timeout} s")
        return self.proc.stdout.readline()

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()[-500:]

    def cpu_s(self) -> float:
        """CPU seconds the process used so far (every thread: /proc/PID/stat fields 14, 15)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, Any]:
        """Ends the process; its own counters."""
        try:
            out, err = self.proc.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise _failed(f"{self.kind} function did not stop") from None
        if self.proc.returncode != 0:
            raise _failed(f"{self.kind} function exited {self.proc.returncode}: {err[-500:]}")
        last = out.strip().splitlines()[-1]
        return dict(json.loads(last))


def read_back(host: sim.Host, base: int) -> bytes:
    """The function's memory now, read through 4096-byte memory reads (checked by the model)."""
    out = bytearray()
    for k in range(MEMORY // 4096):
        tag = k & 0xFF
        if not host.send_request(tlp.Tlp.mem_read(base + 4096 * k, 1024, tag=tag).encode()):
            raise _failed("request channel 0 is full")
        got = 0
        deadline = time.monotonic() + 10
        while got < 4096:
            if time.monotonic() > deadline:
                raise _failed(f"read back of {base + 4096 * k:#x} unanswered")
            for rec in host.completion_records(0.05):
                c = tlp.decode(rec.tlp)
                if c.kind != "CplD" or c.tag != tag:
                    raise _failed(f"read back got {c}")
                out += c.data
                got += len(c.data)
    st = host.stats()
    if st["errors"]:
        raise _failed(f"read back: {st['last_error']}")
    return bytes(out)


def _one(host: sim.Host, f: Function, ops: tuple[LoadOp, ...], expected: bytes,
         **kw: Any) -> tuple[LoadResult, dict[str, float]]:
    load = os.getloadavg()[0]
    c0 = f.cpu_s()
    res = host.load([LoadRange(f.base, expected)], ops, completer_id=COMPLETER_ID,
                    max_payload=MAX_PAYLOAD, rcb=64, timeout=5.0, **kw)
    fn_cpu = f.cpu_s() - c0
    if not res.ok:
        raise _failed(f"{f.kind} function: {res.errors} completion errors "
                           f"{ {k: v for k, v in res.errors_by_kind.items() if v} }: "
                           f"{'; '.join(res.first_errors)}")
    return res, {
        "rps": res.completed / res.elapsed_s if res.writes == 0 else res.sent / res.elapsed_s,
        "cpu_us_per_request": (res.cpu_s + fn_cpu) * 1e6 / res.sent,
        "host_cpu_us_per_request": res.cpu_s * 1e6 / res.sent,
        "function_cpu_us_per_request": fn_cpu * 1e6 / res.sent,
        "latency_p50_us": res.latency_us["p50"],
        "latency_p99_us": res.latency_us["p99"],
        "latency_p999_us": res.latency_us["p99.9"],
        "sched_latency_p50_us": res.sched_latency_us["p50"],
        "sched_latency_p99_us": res.sched_latency_us["p99"],
        "sched_latency_p999_us": res.sched_latency_us["p99.9"],
        "sent": res.sent,
        "late": res.late,
        "load_average_1min": load,
    }


def _median(host: sim.Host, f: Function, ops: tuple[LoadOp, ...], runs: int,
            **kw: Any) -> dict[str, Any]:
    """One warm-up, then the median of `runs` runs of every figure (and each run)."""
    rows = []
    for i in range(runs + 1):
        # Writes change the memory: after one, a run starts from what the function holds now.
        if any(o.kind == "write" for o in ops):
            f.written = True
        expected = read_back(host, f.base) if f.written else _PATTERN
        _res, row = _one(host, f, ops, expected, seed=i + 1, **kw)
        if i:
            rows.append(row)
    out: dict[str, Any] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["runs"] = rows
    return out


_PATTERN = pattern()


def _served(kind: str, device: str, body: Callable[[sim.Host, Function], dict[str, Any]]
            ) -> dict[str, Any]:
    with sim.Host(device) as host:
        f = Function(kind, device, host)
        try:
            out = body(host, f)
        except BaseException:
            f.proc.kill()
            f.proc.wait()
            raise
        out["function_counters"] = f.stop()
        return out


def measure(device: str, quick: bool) -> dict[str, Any]:
    """Every function figure.

    Raises:
        Error: ``EIO`` (the reason in the message) when a completion check or the function
            process failed; the software device's errors as they come.
    """
    p = plan(quick)

    def engine(host: sim.Host, f: Function) -> dict[str, Any]:
        out: dict[str, Any] = {"throughput": {}, "fixed_load": {}}
        for name, ops in WORKLOADS.items():
            out["throughput"][name] = _median(host, f, ops, p.runs, window=WINDOW,
                                              duration=p.seconds)
            # 256: 8-bit tags (Extended Tag Field); the function does not advertise 10-Bit Tag
            # Completer Supported (Device Capabilities 2 bit 16), so no 10-bit tags.
            out["fixed_load"][name] = _median(host, f, ops, p.runs, window=256,
                                              rate=FIXED_RATE, duration=p.seconds)
        out["window1"] = _median(host, f, WORKLOADS["64"], p.runs, window=1,
                                 count=p.window1_count)
        return out

    def python(host: sim.Host, f: Function) -> dict[str, Any]:
        return {
            "throughput": _median(host, f, WORKLOADS["64"], p.runs, window=WINDOW,
                                  duration=p.python_seconds),
            "window1": _median(host, f, WORKLOADS["64"], p.runs, window=1,
                               count=max(200, p.window1_count // 10)),
        }

    def callback(host: sim.Host, f: Function) -> dict[str, Any]:
        return {"throughput": _median(host, f, WORKLOADS["64"], p.runs, window=WINDOW,
                                      duration=p.seconds)}

    return {
        "engine": _served("engine", device, engine),
        "python": _served("python", device, python),
        "callback": _served("callback", device, callback),
        "plan": {"runs": p.runs, "seconds": p.seconds, "window": WINDOW,
                 "fixed_rate": FIXED_RATE, "window1_count": p.window1_count,
                 "python_seconds": p.python_seconds, "max_payload": MAX_PAYLOAD},
    }


def headline(m: dict[str, Any]) -> dict[str, Optional[float]]:
    """The report's keys from :func:`measure`'s result."""
    eng, py, cb = m["engine"], m["python"], m["callback"]
    t64, fixed64 = eng["throughput"]["64"], eng["fixed_load"]["64"]
    return {
        "function_rps": t64["rps"],
        "function_cpu_us_per_request": t64["cpu_us_per_request"],
        "function_latency_p50_us": fixed64["sched_latency_p50_us"],
        "function_latency_p99_us": fixed64["sched_latency_p99_us"],
        "function_latency_p999_us": fixed64["sched_latency_p999_us"],
        "function_vs_python": t64["rps"] / py["throughput"]["rps"],
        "function_window1_latency_p50_us": eng["window1"]["latency_p50_us"],
        "function_window1_latency_p99_us": eng["window1"]["latency_p99_us"],
        "function_window1_latency_p999_us": eng["window1"]["latency_p999_us"],
        "python_rps": py["throughput"]["rps"],
        "python_cpu_us_per_request": py["throughput"]["cpu_us_per_request"],
        "python_window1_latency_p50_us": py["window1"]["latency_p50_us"],
        "python_window1_latency_p99_us": py["window1"]["latency_p99_us"],
        "callback_rps": cb["throughput"]["rps"],
    }


# Where each headline key comes from: (process, measurement, workload or None).
_SOURCE = {
    "function_rps": ("engine", "throughput", "64"),
    "function_cpu_us_per_request": ("engine", "throughput", "64"),
    "function_latency_p50_us": ("engine", "fixed_load", "64"),
    "function_latency_p99_us": ("engine", "fixed_load", "64"),
    "function_latency_p999_us": ("engine", "fixed_load", "64"),
    "function_vs_python": ("engine", "throughput", "64"),
    "function_window1_latency_p50_us": ("engine", "window1", None),
    "function_window1_latency_p99_us": ("engine", "window1", None),
    "function_window1_latency_p999_us": ("engine", "window1", None),
    "callback_rps": ("callback", "throughput", None),
}


def load_of(m: dict[str, Any], key: str) -> float:
    """The 1-minute load average (median over the runs) when `key` was measured."""
    proc, what, workload = _SOURCE[key]
    row = m[proc][what] if workload is None else m[proc][what][workload]
    return float(row["load_average_1min"])


def by_workload(m: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per workload: throughput, CPU per request and latency at the fixed offered load."""
    out = {}
    for name in WORKLOADS:
        t, f = m["engine"]["throughput"][name], m["engine"]["fixed_load"][name]
        out[name] = {
            "rps": t["rps"],
            "cpu_us_per_request": t["cpu_us_per_request"],
            "latency_p50_us": f["sched_latency_p50_us"],
            "latency_p99_us": f["sched_latency_p99_us"],
            "latency_p999_us": f["sched_latency_p999_us"],
            "load_average_1min": t["load_average_1min"],
        }
    return out
