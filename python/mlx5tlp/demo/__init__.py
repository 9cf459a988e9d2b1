"""``mlx5tlp demo``: a multi-process emulated PCIe endpoint on the software device.

* The **control process** (this one) opens the device, checks TLP emulation, allocates one TLP
  gateway VAR per worker, registers a UMEM holding the function's BAR contents (a memfd, so
  workers can map the same bytes), creates a DEVX object standing for the emulated function,
  exports everything and hands the context fd plus the envelopes to each worker over a UNIX
  socket (SCM_RIGHTS).
* Each **worker** (``endpoint.serve``) imports them, maps its gateway and answers the requests
  for its share of the BAR through the lock-free doorbell loop.
* The **host** (the device model, driven from this process) sends a seeded mix of requests and
  checks every completion (data against the BAR, byte counts, lower addresses, tags, status).

Teardown: workers unimport, the control process frees, and the device model confirms that no
device object of the run is left.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import mlx5tlp
from mlx5tlp import share, sim
from mlx5tlp.demo import endpoint
from mlx5tlp.demo.host import Checker, RequestMix
from mlx5tlp.demo.progress import Progress

__all__ = ["Options", "run"]

BAR_BASE = 0xF000_0000
TAGS = 1024  # 10-bit tags


@dataclass
class Options:
    """What ``mlx5tlp demo`` runs (see ``mlx5tlp demo --help``)."""

    requests: int = 5000
    workers: int = 2
    read_size: int = 256
    seed: int = 1
    device: str = sim.DEFAULT_DEVICE
    bar_size: int = 64 * 1024
    max_payload: int = 128
    rcb: int = 64
    window: int = 64
    timeout: float = 120.0
    json: bool = False
    kill_worker_after: Optional[int] = None  # fault injection: SIGKILL worker 0 after N requests


def run(opts: Options) -> tuple[dict[str, Any], int]:
    """Runs the demo; returns the report and the exit code (0: verified, 0 errors).

    Ctrl-C (SIGINT) at any point ends the run at the next step and still tears down cleanly:
    the handler only records the request, so no set-up or teardown step is cut in half.
    """
    _validate(opts)
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda _sig, _frame: stop.set())
    try:
        return _run(opts, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(opts: Options, stop: threading.Event) -> tuple[dict[str, Any], int]:
    baseline = sim.device_stats(opts.device)
    report: dict[str, Any] = {"device": opts.device, "workers": opts.workers, "seed": opts.seed}
    with mlx5tlp.open_device(opts.device, backend="sim") as ctx:
        caps = ctx.query_tlp_caps()
        if not caps.supported:
            raise mlx5tlp.NotSupportedError(95, f"{opts.device} has no TLP emulation", "demo")
        if caps.gw_num_pages < opts.workers:
            raise mlx5tlp.ResourceExhaustedError(
                12, f"{opts.device} has {caps.gw_num_pages} gateway pages for {opts.workers} "
                "workers", "demo")
        bar = random.Random(opts.seed).randbytes(opts.bar_size)
        memfd = os.memfd_create("mlx5tlp-demo-bar")
        try:
            report.update(_run_with(ctx, opts, bar, memfd, stop))
        finally:
            os.close(memfd)
    after = sim.device_stats(opts.device)
    report["leaked_objects"] = sum(
        max(0, after[k] - baseline[k]) for k in ("tlp_vars", "umems", "devx_objs", "contexts"))
    ok = report["errors"] == 0 and not report.get("interrupted") and report["leaked_objects"] == 0
    return report, 0 if ok else (130 if report.get("interrupted") else 1)


def _run_with(
    ctx: mlx5tlp.Context, opts: Options, bar: bytes, memfd: int, stop: threading.Event
) -> dict[str, Any]:
    buf = mlx5tlp.alloc_umem_buffer(len(bar), fd=memfd)
    buf[: len(bar)] = bar
    vars_ = [ctx.alloc_var(tlp=True) for _ in range(opts.workers)]
    umem = ctx.reg_umem(buf)
    function = ctx.create_devx_obj(bytes([0x0A, 0, 0, 0, 0, 0, 0, 0x7F]) + bytes(8), 16)
    share_bytes = opts.bar_size // opts.workers
    mp = multiprocessing.get_context("spawn")
    procs, socks = [], []
    try:
        for i, var in enumerate(vars_):
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            p = mp.Process(target=endpoint.serve, args=(child,), name=f"mlx5tlp-worker-{i}")
            p.start()
            child.close()
            cfg = {"index": i, "channel": i, "bar_size": len(bar), "bar_base": BAR_BASE,
                   "share_lo": i * share_bytes, "share_hi": (i + 1) * share_bytes,
                   "completer_id": endpoint_id(), "max_payload": opts.max_payload,
                   "rcb": opts.rcb}
            # Context fd + BAR memfd, then the config and the envelopes.
            share.send_fds(parent, [ctx.cmd_fd, memfd],
                           [json.dumps(cfg).encode(), var.export(), umem.export(),
                            function.export()])
            procs.append(p)
            socks.append(parent)
        for p, s in zip(procs, socks, strict=True):  # the clock starts once every worker serves
            s.settimeout(60)
            if s.recv(5) != b"ready":
                raise mlx5tlp.Error(None, f"{p.name} did not start (exit code {p.exitcode})",
                                    "demo")
        if not opts.json:
            print(f"{opts.workers} workers ready on {opts.device}; sending {opts.requests} "
                  "requests", file=sys.stderr, flush=True)
        mix = RequestMix(opts.seed, bar, BAR_BASE, opts.workers, share_bytes, opts.read_size)
        with sim.Host(opts.device) as host:
            result = _drive(host, mix, opts, procs, stop)
            # Stop the workers while the host still consumes: a worker's gateway drains what it
            # queued before it closes (an interrupted run leaves completions in flight).
            result["workers_report"] = _stop_workers(procs, socks, host)
            result["model"] = host.stats()
    finally:
        for s in socks:
            s.close()
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        # The control process owns everything: it frees (importers only unimported).
        for obj in (function, umem, *vars_):
            obj.close()
        buf.close()
    return result


def endpoint_id() -> int:
    """The emulated function's completer ID (bus 1, device 0, function 0)."""
    return 0x0100


def _drive(
    host: sim.Host, mix: RequestMix, opts: Options, procs: list[Any], stop: threading.Event
) -> dict[str, Any]:
    checker = Checker()
    free_tags = deque(range(TAGS))
    progress = Progress(opts.requests, enabled=not opts.json)
    sent = 0
    unsent = None  # generated but refused by a full channel: sent first next time
    interrupted = False
    failure: Optional[str] = None
    start = time.perf_counter()
    deadline = start + opts.timeout
    while sent < opts.requests or checker.outstanding:
        if stop.is_set():
            interrupted = True
            break
        while sent < opts.requests and len(checker.outstanding) < opts.window and free_tags:
            p = unsent or mix.next(free_tags[0])
            unsent = None
            if not host.send_request(p.request.encode(), channel=p.channel):
                unsent = p  # that worker's channel is full: collect first, then retry
                break
            free_tags.popleft()
            checker.sent(p)
            sent += 1
            if opts.kill_worker_after is not None and sent == opts.kill_worker_after:
                os.kill(procs[0].pid, signal.SIGKILL)
        for rec in host.completion_records(timeout=0.002, max_records=1024):
            tag = checker.completion(rec.tlp)
            if tag is not None:
                free_tags.append(tag)
        progress.update(checker.requests_verified, len(checker.errors))
        dead = [p for p in procs if p.exitcode is not None]
        if dead:
            failure = ", ".join(f"worker {p.name} died (exit code {p.exitcode})" for p in dead)
            break
        if time.perf_counter() > deadline:
            failure = f"timed out with {len(checker.outstanding)} requests unanswered"
            break
    elapsed = time.perf_counter() - start
    progress.done()
    errors = list(checker.errors)
    if failure:
        errors.append(failure)
    if interrupted or failure:
        errors.extend(f"tag {t}: no completion" for t in list(checker.outstanding)[:5])
    lat = sorted(checker.latencies_ns)
    return {
        "requests": sent,
        "requests_verified": checker.requests_verified,
        "completions_verified": checker.completions_verified,
        "errors": len(errors) if not interrupted else len(checker.errors),
        "error_messages": errors[:20],
        "interrupted": interrupted,
        "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(checker.requests_verified / elapsed, 1) if elapsed else 0.0,
        "latency_p50_us": _pct(lat, 0.50),
        "latency_p99_us": _pct(lat, 0.99),
    }


def _pct(sorted_ns: list[int], q: float) -> Optional[float]:
    if not sorted_ns:
        return None
    return round(sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000, 1)


def _stop_workers(
    procs: list[Any], socks: list[socket.socket], host: sim.Host
) -> list[dict[str, Any]]:
    live = [(p, s) for p, s in zip(procs, socks, strict=True) if p.exitcode is None]
    for _p, s in live:
        with contextlib.suppress(OSError):  # it died meanwhile: its report will say so
            s.sendall(b"stop")
        s.setblocking(False)
    replies = {p.name: b"" for p, _ in live}
    pending = dict(live)
    deadline = time.perf_counter() + 60
    while pending and time.perf_counter() < deadline:
        host.completion_records(timeout=0.001)  # keep returning credits to the gateways
        for p, s in list(pending.items()):
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                replies[p.name] += chunk
            else:  # the worker closed its socket: its report is complete
                del pending[p]
    out: list[dict[str, Any]] = []
    for p, _s in live:
        p.join(30)
        try:
            out.append(json.loads(replies[p.name]))
        except ValueError:
            out.append({"error": f"{p.name} sent no report (exit code {p.exitcode})"})
    return out


def _validate(o: Options) -> None:
    checks = [
        (o.requests >= 1, "requests must be >= 1"),
        (1 <= o.workers <= 8, "workers must be 1..8"),
        (1 <= o.read_size <= 4096, "read-size must be 1..4096 bytes"),
        (o.bar_size % (4096 * o.workers) == 0, "bar-size must be a multiple of 4096 * workers"),
        (o.max_payload in (128, 256, 512, 1024, 2048, 4096), "max-payload must be 128..4096"),
        (o.rcb in (64, 128), "rcb must be 64 or 128"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """Prints the final report: one JSON object, or readable lines."""
    if as_json:
        print(json.dumps(report))
        return
    out = sys.stdout
    state = "INTERRUPTED" if report.get("interrupted") else (
        "OK" if report["errors"] == 0 else "FAILED")
    print(f"mlx5tlp demo on {report['device']}: {state}", file=out)
    print(f"  requests {report['requests']}, verified {report['requests_verified']} "
          f"({report['completions_verified']} completions), errors {report['errors']}", file=out)
    print(f"  throughput {report['throughput_rps']} req/s, latency p50 "
          f"{report['latency_p50_us']} us, p99 {report['latency_p99_us']} us", file=out)
    model = report.get("model", {})
    print(f"  device model: {model.get('completions', 0)} completions checked, "
          f"{model.get('errors', 0)} errors; leaked device objects: "
          f"{report['leaked_objects']}", file=out)
    for msg in report.get("error_messages", [])[:10]:
        print(f"  error: {msg}", file=out)
