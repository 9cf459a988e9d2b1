"""Python completion building: the bulk C++ path against a per-record Python loop.

Prints one JSON object (records/s for each, and the ratio). ``--quick`` runs a smaller set.
Run from the repository with ``PYTHONPATH=python python benchmarks/bench_tlp.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

from mlx5tlp.tlp import Tlp, build_completions, completions_for, decode


def make_requests(n: int) -> tuple[list[bytes], bytes]:
    """A request mix (1-DW reads, 16-DW reads, config reads, posted writes) and its data."""
    reqs: list[bytes] = []
    data = bytearray()
    for i in range(n):
        tag = i & 1023
        m = i % 8
        if m < 4:
            t = Tlp.mem_read(0x10000 + (i % 1024) * 4, 1, requester_id=0x0100, tag=tag)
        elif m < 6:
            t = Tlp.mem_read(0x20000 + (i % 64) * 64, 16, requester_id=0x0100, tag=tag)
        elif m == 6:
            t = Tlp.cfg_read(0x0100, (i % 64) * 4, requester_id=0x0100, tag=tag)
        else:
            t = Tlp.mem_write(0x30000, bytes(8), requester_id=0x0100, tag=tag)
        if t.kind != "MWr":
            data += bytes([i & 0xFF]) * (t.length * 4)
        reqs.append(t.encode())
    return reqs, bytes(data)


def median_rate(n: int, runs: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main() -> None:
    """Run the benchmark and print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer records and runs")
    args = ap.parse_args()
    n = 5_000 if args.quick else 50_000
    runs = 3 if args.quick else 5
    reqs, data = make_requests(n)
    stream = b"".join(reqs)

    def bulk() -> object:
        return build_completions(stream, data, completer_id=0x0200)

    def per_record() -> object:
        out: list[bytes] = []
        pos = 0
        for raw in reqs:
            req = decode(raw)
            if req.kind == "MWr":
                continue
            need = req.length * 4
            for c in completions_for(req, data[pos : pos + need], completer_id=0x0200):
                out.append(c.encode())
            pos += need
        return out

    bulk_rate = median_rate(n, runs, bulk)
    loop_rate = median_rate(n, runs, per_record)
    print(
        json.dumps(
            {
                "benchmark": "tlp_python",
                "quick": args.quick,
                "records": n,
                "runs": runs,
                "bulk_records_per_s": round(bulk_rate),
                "per_record_loop_records_per_s": round(loop_rate),
                "ratio": round(bulk_rate / loop_rate, 1),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
