"""``mlx5tlp bench``: the project's performance numbers as one JSON object.

Python measurements run here, on a private software device (a fresh ``$MLX5TLP_SIM_DIR`` that
is removed afterwards); the C++ ones come from the benchmark programs ``bench_ring`` and
``bench_gateway``, run as subprocesses and parsed. A program that cannot be found or fails is
reported with its keys ``null`` and a reason in ``reasons``: numbers are never made up.

Programs are looked up in ``$MLX5TLP_BENCH_BIN`` (a directory) when it is set, else in the
installed package (``mlx5tlp/bin/<name>``), else in the CMake build directories of a
development checkout (``build/*/<name>``, the most recently built one).

Every measurement: one warm-up run, then the median of N runs (N larger without ``quick``).
Ratios are "higher is better".
"""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["PROGRAMS", "TARGETS", "exit_status", "find_program", "missed_targets", "run"]

PROGRAMS = ("bench_ring", "bench_gateway")

# Key -> (comparison, threshold). In full mode ``mlx5tlp bench`` exits non-zero when one is
# missed (or could not be measured) and says which; ``--quick`` is a smoke run and only reports.
TARGETS: dict[str, tuple[str, float]] = {
    "bulk_vs_naive_python": (">=", 20.0),
    "lockfree_vs_mutex_2p": (">=", 2.0),
    "direct_vs_raw_store": (">=", 0.5),
    "post_call_us": ("<=", 1.0),
    "export_import_us": ("<=", 10.0),
    "ring_contended_records_per_s": (">=", 20e6),
    "idle_gateways_cpu_percent": ("<=", 1.0),
    # The emulated function end to end (host and function in separate processes, issue 12):
    # 64-byte reads of a native memory region, the Python-per-TLP path in the same run.
    "function_rps": (">=", 1e6),
    "function_vs_python": (">=", 30.0),
    "function_cpu_us_per_request": ("<=", 2.0),
    "function_window1_latency_p50_us": ("<=", 30.0),
    "function_window1_latency_p99_us": ("<=", 500.0),
    "callback_rps": (">=", 200e3),
}

# The headline keys every report has (a number, or null with a reason).
HEADLINE_KEYS = (
    "bulk_vs_naive_python",
    "lockfree_vs_mutex_2p",
    "direct_vs_raw_store",
    "post_call_us",
    "export_import_us",
    "ring_contended_records_per_s",
    "idle_gateways_cpu_percent",
    "latency_p50_us",
    "latency_p99_us",
)
# The function benchmark's keys (null with a reason when it could not run).
FUNCTION_KEYS = (
    "function_rps",
    "function_cpu_us_per_request",
    "function_latency_p50_us",
    "function_latency_p99_us",
    "function_latency_p999_us",
    "function_vs_python",
    "function_window1_latency_p50_us",
    "function_window1_latency_p99_us",
    "function_window1_latency_p999_us",
    "callback_rps",
)

RECORD_BYTES = 32
# The function benchmark's parameters (mlx5tlp._bench_host), for the method text.
_BENCH_MPS, _BENCH_WINDOW, _BENCH_RATE = 256, 128, 50_000.0
RAW_SLOT = 64  # "raw_tlp:64": one 32-byte record per 64-byte slot, 1024 slots in a 64 KiB page
# A 32-byte record: a CplD header (3 DWs, wire order) and 5 DWs of payload.
RECORD_FORMAT = ">IIIIQQ"
assert struct.calcsize(RECORD_FORMAT) == RECORD_BYTES

# bench_ring row used for lockfree_vs_mutex_2p: both threads really run in parallel ("pinned":
# consumer alone on one CPU, producers on the other), one record per push ("single"): the
# per-record synchronisation a lock pays for on every record, which is what the ring removes.
RING_ROW = {"placement": "pinned", "mode": "single", "producers": 2}


@dataclass(frozen=True)
class _Sizes:
    runs: int
    bulk_records: int  # records per bulk / naive run (also the big ring's size)
    post_calls: int  # post() calls per timed run
    timeout: float  # seconds for each C++ program


def _sizes(quick: bool) -> _Sizes:
    if quick:
        return _Sizes(runs=5, bulk_records=1 << 15, post_calls=20_000, timeout=60.0)
    return _Sizes(runs=11, bulk_records=1 << 17, post_calls=50_000, timeout=240.0)


def _record(i: int) -> bytes:
    """Completion ``i``: CplD, 5 DW, completer 0x0200, byte count 20, requester 0x0100, tag."""
    return struct.pack(
        RECORD_FORMAT,
        0x4A000005,
        0x02000014,
        0x01000000 | ((i & 0xFF) << 8),
        i & 0xFFFFFFFF,
        0xA0A1A2A3A4A5A6A7,
        i,
    )


def _median_rate(count: int, runs: int, fn: Callable[[], object]) -> tuple[float, list[float]]:
    fn()  # warm-up
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - t0))
    return statistics.median(rates), rates


# ------------------------------------------------------------------ locating the programs
def find_program(name: str) -> tuple[Optional[Path], str]:
    """The benchmark program `name`, or None and where it was looked for."""
    env = os.environ.get("MLX5TLP_BENCH_BIN")
    if env:
        p = Path(env) / name
        if os.access(p, os.X_OK) and p.is_file():
            return p, str(p)
        return None, f"{name} not found in $MLX5TLP_BENCH_BIN ({env})"
    import mlx5tlp

    pkg = Path(mlx5tlp.__file__).resolve().parent
    installed = pkg / "bin" / name
    if os.access(installed, os.X_OK) and installed.is_file():
        return installed, str(installed)
    root = pkg.parent.parent  # python/mlx5tlp -> the checkout
    looked = [str(installed)]
    if (root / "CMakeLists.txt").is_file():
        builds = [p for p in root.glob(f"build/*/{name}") if p.is_file() and os.access(p, os.X_OK)]
        if builds:
            best = max(builds, key=_build_rank)
            return best, str(best)
        looked.append(str(root / "build" / "*" / name))
    return None, (
        f"{name} not found (looked in {', '.join(looked)}; build with "
        "-DMLX5TLP_BUILD_BENCHMARKS=ON or set MLX5TLP_BENCH_BIN)"
    )


def _build_rank(program: Path) -> tuple[bool, bool, float]:
    """Prefer builds without a sanitizer, then optimised ones, then the newest."""
    sanitized, optimised = False, False
    try:
        cache = (program.parent / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        cache = ""
    for line in cache.splitlines():
        key, _, value = line.partition("=")
        if key.startswith("MLX5TLP_SANITIZE:"):
            sanitized = value.strip() != ""
        elif key.startswith("CMAKE_BUILD_TYPE:"):
            optimised = value.strip() in ("Release", "RelWithDebInfo", "")
    return (not sanitized, optimised, program.stat().st_mtime)


def _run_program(
    name: str, args: list[str], timeout: float, env: dict[str, str]
) -> tuple[Optional[dict[str, Any]], Optional[str], Optional[str]]:
    """(parsed JSON, None, path) or (None, reason, path)."""
    path, where = find_program(name)
    if path is None:
        return None, where, None
    try:
        out = subprocess.run(
            [str(path), *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{name} did not run: {exc}", str(path)
    try:
        rep = json.loads(out.stdout)
    except json.JSONDecodeError:
        tail = (out.stderr or out.stdout).strip()[-300:]
        return None, f"{name} exited {out.returncode} without JSON: {tail}", str(path)
    if not isinstance(rep, dict):
        return None, f"{name} printed JSON that is not an object", str(path)
    if "error" in rep:
        return None, f"{name} failed: {rep['error']}", str(path)
    if out.returncode != 0 or rep.get("verified") is False:
        return None, f"{name} exited {out.returncode}: its self-check failed", str(path)
    return rep, None, str(path)


# ------------------------------------------------------------------ the Python measurements
def _check_failed(what: str) -> Exception:
    """A benchmark's own check of what it measured failed (one error model: an mlx5tlp.Error)."""
    from mlx5tlp.errors import Error

    return Error(errno.EIO, f"benchmark check failed: {what}", "bench")


@contextmanager
def _private_device(slot_size: int = 64) -> Iterator[str]:
    """A software device in a private directory (64 KiB gateway pages), removed afterwards.

    Processes started meanwhile inherit the directory (``$MLX5TLP_SIM_DIR``)."""
    from mlx5tlp import sim

    old = os.environ.get("MLX5TLP_SIM_DIR")
    tmp = tempfile.mkdtemp(prefix="mlx5tlp-bench-")
    os.environ["MLX5TLP_SIM_DIR"] = tmp
    name = f"bench{os.getpid()}"
    try:
        sim.create_device(name, gw_pages=4, gw_log_stride=4, virtio_pages=0,
                          slot_size=slot_size)
        try:
            yield name
        finally:
            sim.remove_device(name)
    finally:
        if old is None:
            os.environ.pop("MLX5TLP_SIM_DIR", None)
        else:
            os.environ["MLX5TLP_SIM_DIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


COMPLETER_ID = 0x0200
_REQ = struct.Struct(">III")  # a 3DW memory read request header, wire order
_CPL = struct.Struct(">III20s")  # its 32-byte CplD: 3DW header + 5 DW of data


def _requests(n: int) -> tuple[bytes, bytes]:
    """n 5-DW memory reads (encoded, back to back) and the 20 bytes of data each returns."""
    from mlx5tlp import tlp

    one = [
        tlp.Tlp.mem_read(0x10000 + 64 * (i % 256), 5, requester_id=0x0100, tag=i & 0xFF).encode()
        for i in range(256)
    ]
    reqs = b"".join(one[i % 256] for i in range(n))
    data = bytes((i * 7 + 3) & 0xFF for i in range(20 * n))
    return reqs, data


_DATA20 = struct.Struct("20s")


def _naive_completions(mv: memoryview, slots: int, reqs: bytes, data: bytes, n: int) -> None:
    """The fastest competent pure-Python path found: the request headers and the data chunks
    walked by ``Struct.iter_unpack`` (no index arithmetic, no slicing), slot offsets from
    ``itertools.cycle``, one ``Struct.pack_into`` of each CplD straight into the page (a
    memoryview). It beat the ``unpack_from`` / slice / compare-and-wrap loop by 15-40 % here;
    packing 64 records per ``pack_into`` call was slower."""
    pack_into = _CPL.pack_into
    cid = COMPLETER_ID << 16
    offsets = itertools.cycle(range(0, slots * RAW_SLOT, RAW_SLOT))
    for (dw0, dw1, dw2), (chunk,), off, _ in zip(
        _REQ.iter_unpack(reqs), _DATA20.iter_unpack(data), offsets, range(n), strict=False
    ):  # offsets never ends; range(n) bounds the walk
        length = dw0 & 0x3FF
        # CplD: fmt/type 0x4a + length; completer | byte count; requester | tag | lower address
        pack_into(mv, off, 0x4A000000 | length, cid | (length << 2),
                  (dw1 & 0xFFFFFF00) | (dw2 & 0x7C), chunk)


def _bulk_vs_naive(ctx: Any, sz: _Sizes) -> dict[str, Any]:
    """Completions for n reads, record building INCLUDED on both sides: the fused bulk path
    (``gw.post_completions(requests, data)`` + ``flush``, the default 1024-slot ring) against
    the naive per-request ``Struct.pack_into`` into ``var.mmap()``. Both write the same bytes
    into the same raw_tlp:64 slot offsets (checked). Also the two-step path the fused one
    replaces (``tlp.build_completions`` + ``post_batch``), for comparison."""
    from mlx5tlp import tlp

    n = sz.bulk_records
    reqs, data = _requests(n)
    var = ctx.alloc_var(tlp=True)
    out: dict[str, Any] = {}
    try:
        mm = var.mmap(mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(mm)
        slots = var.length // RAW_SLOT
        try:
            # Like with like: the naive record i is exactly the bulk builder's completion i,
            # and the fused path writes those same bytes into the same slots.
            probe = tlp.build_completions(reqs[: 12 * 8], data[: 20 * 8], completer_id=COMPLETER_ID)
            _naive_completions(mv, slots, reqs, data, 8)
            for k in range(8):
                if bytes(mv[k * RAW_SLOT : k * RAW_SLOT + RECORD_BYTES]) != bytes(probe.record(k)):
                    raise _check_failed(f"naive and bulk completions differ at record {k}")
            naive_page = bytes(mv[: 8 * RAW_SLOT])
            mv[: 8 * RAW_SLOT] = bytes(8 * RAW_SLOT)
            with var.gateway(f"raw_tlp:{RAW_SLOT}") as gw:
                gw.post_completions(reqs[: 12 * 8], data[: 20 * 8], completer_id=COMPLETER_ID)
                gw.flush(timeout=30.0)
            for k in range(8):
                a = naive_page[k * RAW_SLOT : k * RAW_SLOT + RECORD_BYTES]
                if bytes(mv[k * RAW_SLOT : k * RAW_SLOT + RECORD_BYTES]) != a:
                    raise _check_failed(f"naive and fused completions differ at record {k}")
            for label, ring, fused in (("bulk", 1024, True), ("bulk_big_ring", n, True),
                                       ("bulk_two_step", 1024, False)):
                with var.gateway(f"raw_tlp:{RAW_SLOT}", ring_slots=ring) as gw:

                    def bulk(gw: Any = gw, fused: bool = fused) -> None:
                        if fused:
                            got = gw.post_completions(reqs, data, completer_id=COMPLETER_ID)
                            queued = got.completions
                        else:
                            cpl = tlp.build_completions(reqs, data, completer_id=COMPLETER_ID)
                            queued = gw.post_batch(cpl, timeout=None)
                        if queued != n:
                            raise _check_failed("the bulk path queued fewer records than given")
                        if not gw.flush(timeout=30.0):
                            raise _check_failed("flush timed out")

                    out[f"{label}_load"] = os.getloadavg()[0]
                    rate, runs = _median_rate(n, sz.runs, bulk)
                    out[f"{label}_records_per_s"] = rate
                    out[f"{label}_runs"] = runs
                    stats = gw.stats()
                    if stats["written"] != stats["posted"]:
                        raise _check_failed(
                            f"gateway wrote {stats['written']} of {stats['posted']}"
                        )
            out["naive_load"] = os.getloadavg()[0]
            out["naive_records_per_s"], out["naive_runs"] = _median_rate(
                n, sz.runs, lambda: _naive_completions(mv, slots, reqs, data, n)
            )
        finally:
            mv.release()
            mm.close()
    finally:
        var.close()
    out["bulk_vs_naive_python"] = out["bulk_records_per_s"] / out["naive_records_per_s"]
    return out


def _post_call(ctx: Any, sz: _Sizes) -> dict[str, Any]:
    """Median microseconds per ``gw.post(record, timeout=0)`` with a ring that never fills."""
    rec = _record(1)
    calls = sz.post_calls
    var = ctx.alloc_var(tlp=True)
    try:
        with var.gateway(f"raw_tlp:{RAW_SLOT}", ring_slots=1 << 16) as gw:
            post = gw.post
            refused = 0

            def once() -> float:
                nonlocal refused
                t0 = time.perf_counter()
                for _ in range(calls):
                    if not post(rec, timeout=0):
                        refused += 1
                dt = time.perf_counter() - t0
                gw.flush(timeout=30.0)  # untimed: the next run starts with an empty ring
                return dt / calls * 1e6

            once()  # warm-up
            per_call = [once() for _ in range(sz.runs)]
    finally:
        var.close()
    return {
        "post_call_us": statistics.median(per_call),
        "post_call_runs_us": per_call,
        "post_refused": refused,
    }


def _export_import(ctx: Any, sz: _Sizes) -> dict[str, Any]:
    """Median microseconds of a TLP gateway VAR's export + import round trip: ``var.export()``
    and ``ictx.import_var(blob)`` into a second context sharing the command fd (what a worker
    process does with a blob it was sent), each pair timed alone; the unimport after each is
    not timed (``export_import_unimport_us`` includes it)."""
    from mlx5tlp import Context

    n = sz.post_calls // 20
    var = ctx.alloc_var(tlp=True)
    try:
        with Context.import_fd(ctx.cmd_fd) as ictx:

            def once() -> tuple[float, float]:
                pair = total = 0
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    imp = ictx.import_var(var.export())
                    t1 = time.perf_counter_ns()
                    imp.unimport()
                    pair += t1 - t0
                    total += time.perf_counter_ns() - t0
                return pair / n / 1e3, total / n / 1e3

            once()  # warm-up
            runs = [once() for _ in range(sz.runs)]
    finally:
        var.free()
    return {
        "export_import_us": statistics.median(r[0] for r in runs),
        "export_import_unimport_us": statistics.median(r[1] for r in runs),
        "export_import_runs_us": [r[0] for r in runs],
        "export_import_round_trips": n,
    }


# ------------------------------------------------------------------ the report
def _git_commit() -> Optional[str]:
    import mlx5tlp

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(mlx5tlp.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _machine(compiler: Optional[str]) -> dict[str, Any]:
    try:
        allowed: Optional[int] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    return {
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "allowed_cpus": allowed,
        "system": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "compiler": compiler,
        "commit": _git_commit(),
    }


def _ring_row(rep: dict[str, Any]) -> Optional[dict[str, Any]]:
    for row in rep.get("results", []):
        if all(row.get(k) == v for k, v in RING_ROW.items()):
            return dict(row)
    return None


def _check_targets(rep: dict[str, Any], loads: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (op, bound) in TARGETS.items():
        value = rep.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"target": f"{op} {bound:g}", "met": met, "load_average_1min": loads.get(key)}
    return out


def missed_targets(rep: dict[str, Any]) -> list[str]:
    """The targets of `rep` that were missed or not measured, as readable lines."""
    lines = []
    for key, t in rep["targets"].items():
        if t["met"] is True:
            continue
        value = rep.get(key)
        why = rep["reasons"].get(key, "not measured") if value is None else f"{value:.4g}"
        lines.append(f"{key}: {why} (target {t['target']}, load {t['load_average_1min']})")
    return lines


def exit_status(rep: dict[str, Any], file: Any = None) -> int:
    """0, or 1 in full mode when a target was missed (each one printed to `file`/stderr)."""
    if rep["method"]["quick"]:
        return 0
    missed = missed_targets(rep)
    for line in missed:
        print(f"mlx5tlp bench: target missed: {line}", file=file or sys.stderr)
    return 1 if missed else 0


def run(quick: bool = False) -> dict[str, Any]:
    """Run every benchmark and return the report (see the module docstring)."""
    import mlx5tlp

    sz = _sizes(quick)
    t_start = time.perf_counter()
    rep: dict[str, Any] = dict.fromkeys(HEADLINE_KEYS + FUNCTION_KEYS)
    reasons: dict[str, str] = {}
    details: dict[str, Any] = {}
    programs: dict[str, Optional[str]] = {}
    compiler: Optional[str] = None

    loads: dict[str, float] = {}
    load_start = os.getloadavg()
    # -- Python: bulk vs naive, post() call cost --
    loads["bulk_vs_naive_python"] = loads["post_call_us"] = os.getloadavg()[0]
    loads["export_import_us"] = loads["post_call_us"]
    try:
        with _private_device() as dev, mlx5tlp.open_device(dev, backend="sim") as ctx:
            bulk = _bulk_vs_naive(ctx, sz)
            post = _post_call(ctx, sz)
            xi = _export_import(ctx, sz)
    except OSError as exc:  # mlx5tlp.Error included
        for key in ("bulk_vs_naive_python", "post_call_us", "export_import_us"):
            reasons[key] = f"python measurement failed: {exc}"
    else:
        rep["bulk_vs_naive_python"] = bulk["bulk_vs_naive_python"]
        rep["bulk_records_per_s"] = bulk["bulk_records_per_s"]
        rep["naive_records_per_s"] = bulk["naive_records_per_s"]
        rep["bulk_big_ring_records_per_s"] = bulk["bulk_big_ring_records_per_s"]
        rep["bulk_two_step_records_per_s"] = bulk["bulk_two_step_records_per_s"]
        rep["post_call_us"] = post["post_call_us"]
        rep["export_import_us"] = xi["export_import_us"]
        rep["export_import_unimport_us"] = xi["export_import_unimport_us"]
        details["python"] = {**bulk, **post, **xi}

    # -- C++ programs (private sim directory; the package's sim library) --
    env = dict(os.environ)
    sim_lib = Path(mlx5tlp.__file__).resolve().parent / "libmlx5tlp_sim.so"
    if "MLX5TLP_SIM_LIB" not in env and sim_lib.is_file():
        env["MLX5TLP_SIM_LIB"] = str(sim_lib)
    args = ["--quick"] if quick else []
    with tempfile.TemporaryDirectory(prefix="mlx5tlp-bench-") as simdir:
        env["MLX5TLP_SIM_DIR"] = simdir
        loads["lockfree_vs_mutex_2p"] = os.getloadavg()[0]
        ring, why, programs["bench_ring"] = _run_program("bench_ring", args, sz.timeout, env)
        loads["direct_vs_raw_store"] = os.getloadavg()[0]
        for key in ("ring_contended_records_per_s", "idle_gateways_cpu_percent"):
            loads[key] = loads["direct_vs_raw_store"]
        gw, why_gw, programs["bench_gateway"] = _run_program("bench_gateway", args, sz.timeout, env)

    row = _ring_row(ring) if ring is not None else None
    if ring is not None and row is None:
        why = f"bench_ring reported no {RING_ROW} row (one CPU only?)"
    if row is not None and ring is not None:
        rep["lockfree_vs_mutex_2p"] = row["lockfree_records_per_s"] / row["mutex_records_per_s"]
        rep["lockfree_2p_records_per_s"] = row["lockfree_records_per_s"]
        rep["mutex_2p_records_per_s"] = row["mutex_records_per_s"]
        compiler = ring.get("machine", {}).get("compiler")
        details["ring"] = {
            "selected": RING_ROW,
            "row": row,
            "machine": ring.get("machine"),
            "method": ring.get("method"),
            "all": [
                {
                    k: r.get(k)
                    for k in ("placement", "mode", "producers", "ratio_lockfree_over_mutex")
                }
                for r in ring.get("results", [])
            ],
        }
    else:
        reasons["lockfree_vs_mutex_2p"] = why or "bench_ring failed"

    if gw is not None:
        d = gw["direct_vs_raw_store"]
        rep["direct_vs_raw_store"] = d["direct_records_per_s"] / d["raw_store_records_per_s"]
        rep["direct_records_per_s"] = d["direct_records_per_s"]
        rep["raw_store_records_per_s"] = d["raw_store_records_per_s"]
        rep["direct_store_path"] = d["store_path"]
        rep["ring_contended_records_per_s"] = gw["ring_contended"]["records_per_s"]
        rep["ring_uncontended_records_per_s"] = gw["ring_uncontended"]["records_per_s"]
        rep["idle_gateways_cpu_percent"] = gw["idle"]["cpu_percent"]
        rep["latency_p50_us"] = gw["latency"]["p50_us"]
        rep["latency_p99_us"] = gw["latency"]["p99_us"]
        rep["loop_records_per_s"] = {
            f"{r['producers']}p_{r['mode']}": r["records_per_s"] for r in gw.get("loop", [])
        }
        compiler = compiler or gw.get("machine", {}).get("compiler")
        details["gateway"] = {k: v for k, v in gw.items() if k != "machine"}
    else:
        for key in ("direct_vs_raw_store", "ring_contended_records_per_s",
                    "idle_gateways_cpu_percent", "latency_p50_us", "latency_p99_us"):
            reasons[key] = why_gw or "bench_gateway failed"

    # -- the emulated function end to end: host and function in separate processes --
    # 512-byte slots: a 256-byte completion payload (MPS 256) and its header fit one slot.
    try:
        from mlx5tlp import _bench_host

        with _private_device(slot_size=512) as dev:
            fmeas = _bench_host.measure(dev, quick)
    except OSError as exc:  # mlx5tlp.Error included
        for key in FUNCTION_KEYS:
            reasons[key] = f"function benchmark failed: {exc}"
    else:
        rep.update(_bench_host.headline(fmeas))
        for key in FUNCTION_KEYS:
            loads[key] = _bench_host.load_of(fmeas, key)
        rep["function_by_workload"] = _bench_host.by_workload(fmeas)
        details["function"] = fmeas

    rep["targets"] = _check_targets(rep, loads)
    rep["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    rep["reasons"] = reasons
    rep["machine"] = _machine(compiler)
    rep["method"] = {
        "quick": quick,
        "warmup_runs": 1,
        "runs": sz.runs,
        "statistic": "median of the runs (C++ programs: their own runs, see details)",
        "record_bytes": RECORD_BYTES,
        "bulk_vs_naive_python": (
            f"{sz.bulk_records} completions for 5-DW memory reads, record building INCLUDED on "
            "both sides, same input (the encoded requests + their data), same bytes into the "
            f"same raw_tlp:{RAW_SLOT} slot offsets of a 64 KiB software-device page (checked). "
            "bulk: gw.post_completions(requests, data) + flush() (fused: completions built in "
            "C++ straight into the ring's slots), default ring_slots=1024 "
            "(bulk_big_ring_records_per_s: a ring holding the burst; "
            "bulk_two_step_records_per_s: tlp.build_completions + gw.post_batch + flush). "
            "naive: headers and data chunks walked by Struct.iter_unpack, one Struct.pack_into "
            "of each CplD straight into a memoryview of var.mmap(), slot offsets from "
            "itertools.cycle."
        ),
        "post_call_us": (
            f"{sz.post_calls} calls of gw.post(record, timeout=0) per run (raw_tlp:{RAW_SLOT}, "
            "ring_slots=65536: never full; flush between runs, untimed), loop overhead included"
        ),
        "export_import_us": (
            f"{sz.post_calls // 20} round trips per run: ictx.import_var(var.export()) of a TLP "
            "VAR into a second context imported from the first one's command fd, each timed "
            "alone (perf_counter_ns); the unimport after each untimed "
            "(export_import_unimport_us: included)"
        ),
        "lockfree_vs_mutex_2p": (
            "bench_ring row placement=pinned, mode=single, producers=2: lock-free ring over the "
            "same ring under one mutex, records/s; bench_ring's own median"
        ),
        "direct_vs_raw_store": (
            "bench_gateway: direct-mode Gateway::write_batch of 32-byte records into a "
            "raw_tlp:64 page over a hand-written loop writing the same bytes (one zero-padded "
            "64-byte chunk per record, the gateway's store path) + store fence per record into "
            "the same page, compare-and-wrap indices (no division per record)"
        ),
        "ring_contended_records_per_s": (
            "bench_gateway: the default gateway (ring_slots=1024, batch_max=64) into raw_tlp:64, "
            "2 C++ producers post_batch(32, no deadline), 2 busy-loop threads competing for the "
            "CPUs meanwhile; released -> flush() returned; median of the runs"
        ),
        "function": (
            "host = this process: sim.Host's native load generator (one thread, GIL released, "
            "every completion checked in C++); function = a separate process "
            "(python -m mlx5tlp._bench_function): engine.Device with a 64 KiB MemoryRegion in "
            "BAR 0 (one lane), the same range as a CallbackRegion (callback_rps), or the "
            "Python-per-TLP worker (take_request per TLP, one tlp.build_completions + "
            "post_batch per batch of up to 64). Enumerated through CfgWr0/CfgRd0 TLPs, "
            f"MPS {_BENCH_MPS}, RCB 64. function_rps / callback_rps / python_rps: 64-byte reads, "
            f"window {_BENCH_WINDOW}, as fast as the window allows; cpu_us_per_request: "
            "generator thread CPU + function process CPU (/proc/PID/stat utime+stime) per "
            "request. function_latency_*: from each read's scheduled send time at a fixed "
            f"offered load of {_BENCH_RATE:g} requests/s (open loop, window 256). window1: one "
            "read outstanding, send to last completion. function_by_workload: the same for "
            "4/64/256/4096-byte reads and a mix (64 B 50%, 4 B 20%, 256 B 15%, 4 KiB 5%, 64 B "
            "writes 10%). Median of the runs after one warm-up; details.function has each run "
            "with its 1-minute load average."
        ),
        "idle_gateways_cpu_percent": (
            "bench_gateway: getrusage(RUSAGE_SELF) user+system CPU over wall time while 4 "
            "gateways are open and idle (each wrote one record first)"
        ),
        "latency": (
            "bench_gateway: post() to the software device's host model having collected the "
            "record (sim layout, one record in flight), percentiles over all samples"
        ),
    }
    rep["details"] = details
    rep["programs"] = programs
    rep["total_seconds"] = time.perf_counter() - t_start
    return rep


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 1e5:
            return f"{value / 1e6:.2f} M{unit}"
        return f"{value:.3g}{unit}"
    return str(value)


def print_table(rep: dict[str, Any], file: Any = None) -> None:
    """A readable summary of `rep` (the JSON has everything)."""
    out = file or sys.stdout
    rows = [
        ("bulk_vs_naive_python", ""),
        ("ring_contended_records_per_s", " rec/s"),
        ("idle_gateways_cpu_percent", " %"),
        ("bulk_records_per_s", " rec/s"),
        ("naive_records_per_s", " rec/s"),
        ("bulk_two_step_records_per_s", " rec/s"),
        ("lockfree_vs_mutex_2p", ""),
        ("direct_vs_raw_store", ""),
        ("post_call_us", " us"),
        ("export_import_us", " us"),
        ("latency_p50_us", " us"),
        ("latency_p99_us", " us"),
        ("function_rps", " req/s"),
        ("function_vs_python", ""),
        ("function_cpu_us_per_request", " us"),
        ("function_latency_p50_us", " us"),
        ("function_latency_p99_us", " us"),
        ("function_latency_p999_us", " us"),
        ("function_window1_latency_p50_us", " us"),
        ("function_window1_latency_p99_us", " us"),
        ("callback_rps", " req/s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, unit in rows:
        target = rep["targets"].get(key)
        note = ""
        if target is not None and target["met"] is not None:
            note = f"  (target {target['target']}: {'met' if target['met'] else 'MISSED'})"
        if key in rep["reasons"]:
            note = f"  ({rep['reasons'][key]})"
        print(f"{key:<{width}}  {_fmt(rep.get(key), unit)}{note}", file=out)
    la = rep["load_average"]
    print(f"load average (1/5/15 min): start {la['start']}, end {la['end']}", file=out)
    m = rep["machine"]
    print(
        f"machine: {m['arch']}, {m['cpus']} CPUs, Python {m['python']}, "
        f"{m['compiler'] or 'compiler unknown'}, commit {m['commit'] or 'unknown'}",
        file=out,
    )
