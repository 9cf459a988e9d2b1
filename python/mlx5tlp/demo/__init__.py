"""``mlx5tlp demo``: a multi-process emulated PCIe endpoint on the software device.

* The **control process** (this one) opens the device, checks TLP emulation, allocates one TLP
  gateway VAR per worker, registers a UMEM holding the function's BAR contents (a memfd, so
  workers can map the same bytes), creates a DEVX object standing for the emulated function,
  exports everything and hands the context fd plus the envelopes to each worker over a UNIX
  socket (SCM_RIGHTS).
* Each **worker** imports them and serves its request channel on its gateway page. By default
  (``--engine native``, ``native.serve``) the native engine answers (:class:`mlx5tlp.engine.
  Device`: memory reads from the BAR memfd, configuration requests from the compiled function
  model, UR for the rest), without Python per TLP; the host first programs each worker's
  function from reset (BAR 0, Max_Payload_Size, RCB, Memory Space Enable) with configuration
  writes. ``--engine python`` (``endpoint.serve``) is the Python-per-TLP baseline: it decodes
  and answers each request in Python through the lock-free doorbell loop.
* The **host** (the device model, driven from this process) sends a seeded mix of requests and
  checks every completion (data against the BAR, byte counts, lower addresses, tags, status,
  configuration reads against a model of the function).

Teardown: workers unimport, the control process frees, and the device model confirms that no
device object of the run is left.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
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
from mlx5tlp import share, sim, tlp
from mlx5tlp._memfd import sealed_memfd
from mlx5tlp.demo import endpoint, native
from mlx5tlp.demo.host import (
    FUNCTION_ID,
    REQUESTER_ID,
    Checker,
    ConfigModel,
    LegacyConfig,
    Pending,
    RequestMix,
)
from mlx5tlp.demo.progress import Progress

__all__ = ["ENGINES", "OptionError", "Options", "completion_payload", "run", "shares"]

ENGINES = ("native", "python")  # who answers in the workers: the engine, or Python per TLP

BAR_BASE = 0xF000_0000
TAGS = 1024  # 10-bit tags
CPL_HEADER = 12  # a completion has a 3 DW header (PCIe Base Spec, 2.2.9), no digest here


class OptionError(ValueError):
    """An option of the demo is out of range, or does not fit the device: the message says
    which and what the rule is. Raised before any worker starts."""


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
    engine: str = "native"  # "native": mlx5tlp.engine.Device; "python": the per-TLP baseline


def shares(bar_size: int, workers: int) -> list[tuple[int, int]]:
    """Each worker's part of the BAR, ``[lo, hi)``: contiguous, DW-aligned, covering it all.

    Any worker count works (no divisibility rule): the boundaries are rounded down to whole
    DWs, so every request starts inside exactly one share.
    """
    cuts = [(i * bar_size // workers) & ~3 for i in range(workers)] + [bar_size]
    return list(itertools.pairwise(cuts))


def completion_payload(max_payload: int, rcb: int, max_record: int) -> int:
    """The largest completion payload the workers use: at most `max_payload` (the
    Max_Payload_Size), a power of two (the codec's rule) and with its 3 DW header no larger
    than a gateway record (`max_record`).

    Below Max_Payload_Size is allowed: a completer may split a read into several completions
    at Read Completion Boundaries (PCIe Base Spec, 2.3.1.1), and a power of two >= 128 is a
    multiple of any RCB.

    Raises:
        OptionError: not even a 128-byte payload fits a record.
    """
    size = max_payload
    while size >= 128 and size + CPL_HEADER > max_record:
        size //= 2
    if size < 128 or size < rcb:
        raise OptionError(
            f"--max-payload {max_payload}: a gateway record of this device holds at most "
            f"{max_record} bytes, less than a completion with the smallest payload "
            f"({CPL_HEADER} + 128 bytes); use a device with a larger slot size "
            "(mlx5tlp sim create NAME --slot-size 512)"
        )
    return size


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
    if opts.device not in (d.name for d in mlx5tlp.list_devices("sim")):
        from mlx5tlp._cli_sim import unknown_device_message

        raise mlx5tlp.DeviceNotFoundError(19, unknown_device_message(opts.device), "demo")
    baseline = sim.device_stats(opts.device)
    report: dict[str, Any] = {"device": opts.device, "engine": opts.engine,
                              "workers": opts.workers, "seed": opts.seed,
                              "max_payload": opts.max_payload}
    with mlx5tlp.open_device(opts.device, backend="sim") as ctx:
        caps = ctx.query_tlp_caps()
        if not caps.supported:
            raise mlx5tlp.NotSupportedError(
                95, f"{opts.device} has no TLP emulation (created with --no-tlp?)", "demo")
        if caps.gw_num_pages < opts.workers:
            raise OptionError(
                f"--workers {opts.workers}: {opts.device} has {caps.gw_num_pages} TLP gateway "
                "pages, one per worker is needed")
        bar = random.Random(opts.seed).randbytes(opts.bar_size)
        # Sealed at its (page-rounded) size: the workers map it (see mlx5tlp._memfd).
        page = mmap.PAGESIZE
        memfd = sealed_memfd("mlx5tlp-demo-bar", (opts.bar_size + page - 1) // page * page)
        try:
            report.update(_run_with(ctx, opts, bar, memfd, stop))
        finally:
            os.close(memfd)
    after = sim.device_stats(opts.device)
    report["leaked_objects"] = sum(
        max(0, after[k] - baseline[k]) for k in ("tlp_vars", "umems", "devx_objs", "contexts"))
    ok = report["errors"] == 0 and not report.get("interrupted") and report["leaked_objects"] == 0
    return report, 0 if ok else (130 if report.get("interrupted") else 1)


def _fit_payload(vars_: list[mlx5tlp.Var], opts: Options) -> int:
    """Checks --max-payload against the gateway layout before any worker starts."""
    # A direct-mode gateway has no writer thread: opening one only maps the page and reads the
    # layout; it is closed again before the worker opens its own (one gateway per page).
    with vars_[0].gateway(direct=True) as gw:
        max_record = gw.max_record
    return completion_payload(opts.max_payload, opts.rcb, max_record)


def _run_with(
    ctx: mlx5tlp.Context, opts: Options, bar: bytes, memfd: int, stop: threading.Event
) -> dict[str, Any]:
    buf = mlx5tlp.alloc_umem_buffer(len(bar), fd=memfd)
    buf[: len(bar)] = bar
    vars_: list[mlx5tlp.Var] = []
    umem: Optional[mlx5tlp.Umem] = None
    function: Optional[mlx5tlp.DevxObj] = None
    procs: list[Any] = []
    socks: list[socket.socket] = []
    try:
        vars_ = [ctx.alloc_var(tlp=True) for _ in range(opts.workers)]
        payload = _fit_payload(vars_, opts)
        umem = ctx.reg_umem(buf)
        function = ctx.create_devx_obj(bytes([0x0A, 0, 0, 0, 0, 0, 0, 0x7F]) + bytes(8), 16)
        parts = shares(opts.bar_size, opts.workers)
        mp = multiprocessing.get_context("spawn")
        target = native.serve if opts.engine == "native" else endpoint.serve
        for i, var in enumerate(vars_):
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(parent)
            p = mp.Process(target=target, args=(child,), name=f"mlx5tlp-worker-{i}")
            p.start()
            procs.append(p)
            child.close()
            cfg = {"index": i, "channel": i, "bar_size": len(bar), "bar_base": BAR_BASE,
                   "share_lo": parts[i][0], "share_hi": parts[i][1],
                   "completer_id": endpoint_id(), "max_payload": payload, "rcb": opts.rcb}
            # Context fd + BAR memfd, then the config and the envelopes.
            share.send_fds(parent, [ctx.cmd_fd, memfd],
                           [json.dumps(cfg).encode(), var.export(), umem.export(),
                            function.export()])
        for p, s in zip(procs, socks, strict=True):  # the clock starts once every worker serves
            s.settimeout(60)
            if s.recv(5) != b"ready":
                raise mlx5tlp.Error(None, f"{p.name} did not start (exit code {p.exitcode})",
                                    "demo")
        if not opts.json:
            print(f"{opts.workers} workers ready on {opts.device}; sending {opts.requests} "
                  "requests", file=sys.stderr, flush=True)
        config: ConfigModel = LegacyConfig()
        setup: list[tuple[int, int, bytes]] = []
        if opts.engine == "native":
            spec_config = native.SpecConfig(native.demo_spec(len(bar)))
            writes = native.setup_requests(spec_config, BAR_BASE, opts.max_payload, opts.rcb)
            # Every worker's function gets the same writes on its own channel.
            setup = [(w, reg, data) for w in range(opts.workers) for reg, data in writes]
            config = spec_config
        mix = RequestMix(opts.seed, bar, BAR_BASE, parts, opts.read_size, config)
        with sim.Host(opts.device) as host:
            done = _setup(host, setup, procs)
            result = _drive(host, mix, opts, procs, stop)
            result["setup_requests"] = len(setup)
            result["completions_verified"] += done
            # Stop the workers while the host still consumes: a worker's gateway drains what it
            # queued before it closes (an interrupted run leaves completions in flight).
            result["workers_report"] = _stop_workers(procs, socks, host)
            result.update(_engine_latency(result["workers_report"]))
            result["model"] = host.stats()
        result["completion_payload"] = payload
        result["stale_requests_discarded"] = _discard_requests(ctx, opts.workers)
    finally:
        for s in socks:
            s.close()
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        # Requests a dead or stopped worker never took must not reach the next run's workers.
        with contextlib.suppress(mlx5tlp.Error):
            _discard_requests(ctx, opts.workers)
        # The control process owns everything: it frees (importers only unimported).
        for obj in (function, umem, *vars_):
            if obj is not None:
                obj.close()
        buf.close()
    return result


def _setup(host: sim.Host, writes: list[tuple[int, int, bytes]], procs: list[Any]) -> int:
    """Sends the configuration writes ``(channel, register, data)`` that enable each worker's
    function, one at a time in order, and checks each completion (SC, byte count 4).

    Returns:
        The completions verified.

    Raises:
        Error: a completion is wrong or missing, or a worker died.
    """
    checker = Checker()
    for i, (channel, reg, data) in enumerate(writes):
        req = tlp.Tlp.cfg_write(FUNCTION_ID, reg, data, requester_id=REQUESTER_ID,
                                tag=i % TAGS)
        p = Pending(req, channel, tlp.Status.SC, b"", 4)
        deadline = time.perf_counter() + 30
        while not host.send_request(p.request.encode(), channel=p.channel):
            if time.perf_counter() > deadline:
                raise mlx5tlp.Error(None, f"set-up: channel {p.channel} stayed full", "demo")
        checker.sent(p)
        while checker.outstanding and not checker.errors:
            for rec in host.completion_records(timeout=0.01):
                checker.completion(rec.tlp)
            dead = [q.name for q in procs if q.exitcode is not None]
            if dead or time.perf_counter() > deadline:
                raise mlx5tlp.Error(None, f"set-up: no completion for configuration write "
                                    f"{i} ({', '.join(dead) or 'timed out'})", "demo")
        if checker.errors:
            raise mlx5tlp.Error(None, f"set-up: {checker.errors[0]}", "demo")
    return checker.completions_verified


def _engine_latency(reports: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """The engines' own latency (take -> completion in the page, without the host's Python):
    p50/p99 of the workers' log2 histograms, as the upper bound of the bucket (so within a
    factor of two above). None for the Python workers, which keep no histogram."""
    hist: list[int] = []
    for rep in reports:
        for b, n in enumerate(rep.get("engine", {}).get("latency_ns_log2", [])):
            hist += [0] * (b + 1 - len(hist))
            hist[b] += n
    total = sum(hist)
    out: dict[str, Optional[float]] = {}
    for key, q in (("engine_latency_p50_us", 0.50), ("engine_latency_p99_us", 0.99)):
        out[key] = None
        seen = 0
        for b, n in enumerate(hist):
            seen += n
            if total and seen >= q * total:
                out[key] = round((1 << (b + 1)) / 1000, 3)
                break
    return out


def _discard_requests(ctx: mlx5tlp.Context, workers: int) -> int:
    """Takes (and drops) every request still queued on the run's channels — claims a dead
    worker left included; how many."""
    n = 0
    for channel in range(workers):
        for claim in sim.recover_requests(ctx, channel):
            sim.retire_request(ctx, claim)
            n += 1
        while sim.take_request(ctx, channel) is not None:
            n += 1
    return n


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
    progress.done(checker.requests_verified, len(checker.errors))
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
    """The same rules as ``mlx5tlp demo``'s argument parser, for callers of :func:`run`."""
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = [
        (is_int(o.requests) and o.requests >= 1, f"--requests must be >= 1, not {o.requests}"),
        (is_int(o.workers) and 1 <= o.workers <= sim.CHANNELS,
         f"--workers must be 1..{sim.CHANNELS}, not {o.workers}"),
        (is_int(o.read_size) and 1 <= o.read_size <= 4096,
         f"--read-size must be 1..4096 bytes, not {o.read_size}"),
        (is_int(o.max_payload) and 128 <= o.max_payload <= 4096
         and not o.max_payload & (o.max_payload - 1),
         f"--max-payload must be a power of two in 128..4096, not {o.max_payload}"),
        (o.rcb in (64, 128), f"--rcb must be 64 or 128, not {o.rcb}"),
        (is_int(o.window) and 1 <= o.window <= TAGS,
         f"--window must be 1..{TAGS}, not {o.window}"),
        (isinstance(o.timeout, (int, float)) and math.isfinite(o.timeout) and o.timeout > 0,
         f"--timeout must be a number of seconds > 0, not {o.timeout}"),
        (o.kill_worker_after is None
         or (is_int(o.kill_worker_after) and 1 <= o.kill_worker_after <= o.requests),
         f"--kill-worker-after must be 1..--requests ({o.requests}), not {o.kill_worker_after}"),
        (o.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}, not {o.engine!r}"),
        (is_int(o.bar_size) and o.bar_size >= 4096 * o.workers and o.bar_size % 4096 == 0,
         f"bar_size must be a multiple of 4096 of at least 4096 per worker, not {o.bar_size}"),
        (o.engine != "native" or not o.bar_size & (o.bar_size - 1),
         f"bar_size must be a power of two for a BAR (PCIe Base 7.5.1.2.1), not {o.bar_size}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise OptionError(msg)


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
    payload = report.get("completion_payload", report.get("max_payload"))
    if payload is not None and payload != report.get("max_payload"):
        print(f"  completions split to {payload}-byte payloads (Max_Payload_Size "
              f"{report['max_payload']}): that is what one gateway record holds", file=out)
    for msg in report.get("error_messages", [])[:10]:
        print(f"  error: {msg}", file=out)
