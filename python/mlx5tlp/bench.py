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

import array
import json
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

__all__ = ["PROGRAMS", "TARGETS", "find_program", "run"]

PROGRAMS = ("bench_ring", "bench_gateway")

# Key -> (comparison, threshold). Informational: the benchmark reports, it does not fail.
TARGETS: dict[str, tuple[str, float]] = {
    "bulk_vs_naive_python": (">=", 20.0),
    "lockfree_vs_mutex_2p": (">=", 2.0),
    "direct_vs_raw_store": (">=", 0.5),
    "post_call_us": ("<=", 1.0),
}

# The headline keys every report has (a number, or null with a reason).
HEADLINE_KEYS = (
    "bulk_vs_naive_python",
    "lockfree_vs_mutex_2p",
    "direct_vs_raw_store",
    "post_call_us",
    "latency_p50_us",
    "latency_p99_us",
)

RECORD_BYTES = 32
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
@contextmanager
def _private_device() -> Iterator[str]:
    """A software device in a private directory (64 KiB gateway pages), removed afterwards."""
    from mlx5tlp import sim

    old = os.environ.get("MLX5TLP_SIM_DIR")
    tmp = tempfile.mkdtemp(prefix="mlx5tlp-bench-")
    os.environ["MLX5TLP_SIM_DIR"] = tmp
    name = f"bench{os.getpid()}"
    try:
        sim.create_device(name, gw_pages=4, gw_log_stride=4, virtio_pages=0, slot_size=64)
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


def _bulk_vs_naive(ctx: Any, sz: _Sizes) -> dict[str, Any]:
    """Python bulk post through the doorbell loop vs a struct.pack + mmap slice loop."""
    n = sz.bulk_records
    records = [_record(i) for i in range(n)]
    buffer = b"".join(records)
    offsets = array.array("I", range(0, RECORD_BYTES * n + 1, RECORD_BYTES))
    var = ctx.alloc_var(tlp=True)
    try:
        mm = var.mmap()
        slots = var.length // RAW_SLOT
        pack_into_page = struct.pack
        fmt = RECORD_FORMAT

        def naive() -> None:
            # What a pyverbs user writing the mmapped page does: pack, then store into the slot.
            for i in range(n):
                off = (i % slots) * RAW_SLOT
                mm[off : off + RECORD_BYTES] = pack_into_page(
                    fmt,
                    0x4A000005,
                    0x02000014,
                    0x01000000 | ((i & 0xFF) << 8),
                    i & 0xFFFFFFFF,
                    0xA0A1A2A3A4A5A6A7,
                    i,
                )

        out: dict[str, Any] = {}
        try:
            for label, ring in (("bulk", n), ("bulk_default_ring", 1024)):
                with var.gateway(f"raw_tlp:{RAW_SLOT}", ring_slots=ring) as gw:

                    def bulk(gw: Any = gw) -> None:
                        if gw.post_batch((buffer, offsets), timeout=None) != n:
                            raise RuntimeError("post_batch queued fewer records than given")
                        if not gw.flush(timeout=30.0):
                            raise RuntimeError("flush timed out")

                    rate, runs = _median_rate(n, sz.runs, bulk)
                    out[f"{label}_records_per_s"] = rate
                    out[f"{label}_runs"] = runs
                    stats = gw.stats()
                    if stats["written"] != stats["posted"]:
                        raise RuntimeError(f"gateway wrote {stats['written']} of {stats['posted']}")
            out["naive_records_per_s"], out["naive_runs"] = _median_rate(n, sz.runs, naive)
        finally:
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


def _check_targets(rep: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (op, bound) in TARGETS.items():
        value = rep.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"target": f"{op} {bound:g}", "met": met}
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """Run every benchmark and return the report (see the module docstring)."""
    import mlx5tlp

    sz = _sizes(quick)
    t_start = time.perf_counter()
    rep: dict[str, Any] = dict.fromkeys(HEADLINE_KEYS)
    reasons: dict[str, str] = {}
    details: dict[str, Any] = {}
    programs: dict[str, Optional[str]] = {}
    compiler: Optional[str] = None

    # -- Python: bulk vs naive, post() call cost --
    try:
        with _private_device() as dev, mlx5tlp.open_device(dev, backend="sim") as ctx:
            bulk = _bulk_vs_naive(ctx, sz)
            post = _post_call(ctx, sz)
    except (mlx5tlp.Error, RuntimeError, OSError) as exc:
        for key in ("bulk_vs_naive_python", "post_call_us"):
            reasons[key] = f"python measurement failed: {exc}"
    else:
        rep["bulk_vs_naive_python"] = bulk["bulk_vs_naive_python"]
        rep["bulk_records_per_s"] = bulk["bulk_records_per_s"]
        rep["naive_records_per_s"] = bulk["naive_records_per_s"]
        rep["bulk_default_ring_records_per_s"] = bulk["bulk_default_ring_records_per_s"]
        rep["post_call_us"] = post["post_call_us"]
        details["python"] = {**bulk, **post}

    # -- C++ programs (private sim directory; the package's sim library) --
    env = dict(os.environ)
    sim_lib = Path(mlx5tlp.__file__).resolve().parent / "libmlx5tlp_sim.so"
    if "MLX5TLP_SIM_LIB" not in env and sim_lib.is_file():
        env["MLX5TLP_SIM_LIB"] = str(sim_lib)
    args = ["--quick"] if quick else []
    with tempfile.TemporaryDirectory(prefix="mlx5tlp-bench-") as simdir:
        env["MLX5TLP_SIM_DIR"] = simdir
        ring, why, programs["bench_ring"] = _run_program("bench_ring", args, sz.timeout, env)
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
        rep["latency_p50_us"] = gw["latency"]["p50_us"]
        rep["latency_p99_us"] = gw["latency"]["p99_us"]
        rep["loop_records_per_s"] = {
            f"{r['producers']}p_{r['mode']}": r["records_per_s"] for r in gw.get("loop", [])
        }
        compiler = compiler or gw.get("machine", {}).get("compiler")
        details["gateway"] = {k: v for k, v in gw.items() if k != "machine"}
    else:
        for key in ("direct_vs_raw_store", "latency_p50_us", "latency_p99_us"):
            reasons[key] = why_gw or "bench_gateway failed"

    rep["targets"] = _check_targets(rep)
    rep["reasons"] = reasons
    rep["machine"] = _machine(compiler)
    rep["method"] = {
        "quick": quick,
        "warmup_runs": 1,
        "runs": sz.runs,
        "statistic": "median of the runs (C++ programs: their own runs, see details)",
        "record_bytes": RECORD_BYTES,
        "bulk_vs_naive_python": (
            f"layout raw_tlp:{RAW_SLOT} on a 64 KiB software-device page for both (no consumer "
            f"needed). bulk: gw.post_batch((buffer, offsets)) of {sz.bulk_records} pre-built "
            f"records, timed from the call until flush() returns, ring_slots={sz.bulk_records} "
            "(holds the burst); bulk_default_ring_records_per_s: the same with ring_slots=1024. "
            "naive: per record struct.pack(...) then mm[off:off+32] = ... into var.mmap() at "
            "the same rotating slot offsets. Runs: bulk runs, then naive runs."
        ),
        "post_call_us": (
            f"{sz.post_calls} calls of gw.post(record, timeout=0) per run (raw_tlp:{RAW_SLOT}, "
            "ring_slots=65536: never full; flush between runs, untimed), loop overhead included"
        ),
        "lockfree_vs_mutex_2p": (
            "bench_ring row placement=pinned, mode=single, producers=2: lock-free ring over the "
            "same ring under one mutex, records/s; bench_ring's own median"
        ),
        "direct_vs_raw_store": (
            "bench_gateway: direct-mode Gateway::write_batch of 32-byte records into a "
            "raw_tlp:64 page over a hand-written loop of 4 aligned 8-byte stores + store fence "
            "per record into the same page"
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
        ("bulk_records_per_s", " rec/s"),
        ("naive_records_per_s", " rec/s"),
        ("lockfree_vs_mutex_2p", ""),
        ("direct_vs_raw_store", ""),
        ("post_call_us", " us"),
        ("latency_p50_us", " us"),
        ("latency_p99_us", " us"),
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
    m = rep["machine"]
    print(
        f"machine: {m['arch']}, {m['cpus']} CPUs, Python {m['python']}, "
        f"{m['compiler'] or 'compiler unknown'}, commit {m['commit'] or 'unknown'}",
        file=out,
    )
