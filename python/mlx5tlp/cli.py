"""The ``mlx5tlp`` command: ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, Optional

from mlx5tlp.backend import list_devices, memlock_limit, rdma_info
from mlx5tlp.errors import Error

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]


def _info_report(backend: Optional[str]) -> dict[str, Any]:
    info = rdma_info(backend)
    devices: list[dict[str, Any]] = []
    if info.loaded:
        devices = [
            {"name": d.name, "node_guid": d.node_guid, "mlx5": d.mlx5,
             **(_tlp_caps(d.name, info.backend) if d.mlx5 else {})}
            for d in list_devices(info.backend)
        ]
    limit = memlock_limit()
    return {
        "backend": info.backend,
        "libraries": info.libraries,
        "rdma_core_version": info.rdma_core_version,
        "capabilities": info.capabilities,
        "devices": devices,
        "fork_status": info.fork_status,
        "memlock_limit": limit,
        "load_error": info.load_error,
        "diagnostics": _diagnose(info.load_error, info.capabilities, devices, limit),
    }


def _tlp_caps(name: str, backend: str) -> dict[str, Any]:
    """The device's TLP emulation capabilities, or why they could not be read."""
    from mlx5tlp.context import open_device

    try:
        with open_device(name, backend=backend) as ctx:
            caps = ctx.query_tlp_caps()
    except Error as exc:
        return {"tlp_emulation": None, "tlp_error": str(exc)}
    return {"tlp_emulation": caps.supported, "gw_pages": caps.gw_num_pages,
            "gw_page_stride": caps.gw_page_stride}


def _diagnose(
    load_error: Optional[str],
    caps: dict[str, bool],
    devices: list[dict[str, Any]],
    memlock: Optional[int],
) -> list[str]:
    """One actionable line per problem found."""
    out: list[str] = []
    if load_error is not None:
        out.append(f"rdma-core not loaded: {load_error}")
        return out
    if not caps.get("var_export"):
        out.append(
            "export/import (mlx5dv_*_export, MLX5_1.27) missing: needs rdma-core >= 63; "
            "sharing objects between processes is unavailable"
        )
    if not caps.get("tlp_var"):
        out.append(
            "MLX5DV_VAR_ALLOC_FLAG_TLP not understood by this rdma-core (needs >= 63): "
            "TLP gateway VARs cannot be allocated"
        )
    if not devices:
        out.append("no RDMA devices found (is the mlx5_ib kernel module loaded?)")
    elif not any(d["mlx5"] for d in devices):
        out.append("no device is an mlx5 device (mlx5dv_is_supported is false for all)")
    for d in devices:
        if d.get("tlp_emulation") is False:
            out.append(
                f"{d['name']}: firmware does not enable tlp_device_emulation_manager: "
                "TLP gateway VARs fail with EOPNOTSUPP on this device"
            )
        elif d.get("tlp_error"):
            out.append(f"{d['name']}: could not query TLP capabilities: {d['tlp_error']}")
    if memlock is not None and memlock < (64 << 20):
        out.append(
            f"RLIMIT_MEMLOCK is {memlock} bytes: UMEM registration may fail with ENOMEM; "
            "raise it (ulimit -l, or --ulimit memlock=-1 for containers)"
        )
    return out


def _print_info(rep: dict[str, Any]) -> None:
    rows = [
        ("backend", rep["backend"]),
        ("libraries", ", ".join(rep["libraries"]) or "(none loaded)"),
        ("rdma-core", rep["rdma_core_version"] or "unknown"),
        ("fork", rep["fork_status"] or "unknown"),
        (
            "memlock",
            "unlimited" if rep["memlock_limit"] is None else f"{rep['memlock_limit']} bytes",
        ),
    ]
    for cap, ok in rep["capabilities"].items():
        rows.append((f"cap {cap}", "yes" if ok else "no"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"devices ({len(rep['devices'])}):")
    for d in rep["devices"]:
        tlp = {True: f"TLP emulation: {d.get('gw_pages')} gateway pages",
               False: "no TLP emulation", None: "TLP emulation unknown"}[d.get("tlp_emulation")]
        kind = "mlx5" if d["mlx5"] else "not mlx5"
        print(f"  {d['name']:<16} {d['node_guid']}  {kind}, {tlp}")
    for line in rep["diagnostics"]:
        print(f"note: {line}")


def _cmd_info(args: argparse.Namespace) -> int:
    rep = _info_report(args.backend)
    if args.json:
        print(json.dumps(rep, indent=None if args.compact else 2))
    else:
        _print_info(rep)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mlx5tlp.demo import Options, print_report, run

    opts = Options(
        requests=args.requests, workers=args.workers, read_size=args.read_size, seed=args.seed,
        device=args.device, max_payload=args.max_payload, rcb=args.rcb, window=args.window,
        timeout=args.timeout, json=args.json, kill_worker_after=args.kill_worker_after,
    )
    try:
        report, code = run(opts)
    except ValueError as exc:
        print(f"mlx5tlp demo: {exc}", file=sys.stderr)
        return 2
    print_report(report, args.json)
    return code


def _cmd_bench(args: argparse.Namespace) -> int:
    from mlx5tlp import bench

    rep = bench.run(quick=args.quick)
    if args.json:
        print(json.dumps(rep, indent=None if args.compact else 2))
    else:
        bench.print_table(rep)
    return bench.exit_status(rep)  # full mode: non-zero (and which) when a target is missed


def _parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx5tlp", description="TLP response gateways on NVIDIA mlx5 devices"
    )
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what rdma-core / the software device provides")
    info.add_argument("--backend", choices=["rdma", "sim"], default=None)
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.add_argument("--compact", action="store_true", help="JSON on one line")
    info.set_defaults(func=commands["info"])
    demo = sub.add_parser(
        "demo",
        help="a multi-process emulated PCIe endpoint on the software device, fully checked",
    )
    demo.add_argument("--requests", type=int, default=5000, help="requests to send (5000)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes, 1..8 (2)")
    demo.add_argument("--read-size", type=int, default=256, help="largest read, bytes (256)")
    demo.add_argument("--seed", type=int, default=1, help="seed of the request mix (1)")
    demo.add_argument("--device", default="mlx5_sim0", help="software device (mlx5_sim0)")
    demo.add_argument("--max-payload", type=int, default=128, help="Max_Payload_Size (128)")
    demo.add_argument("--rcb", type=int, default=64, choices=[64, 128], help="RCB (64)")
    demo.add_argument("--window", type=int, default=64, help="requests in flight (64)")
    demo.add_argument("--timeout", type=float, default=120.0, help="give up after (s)")
    demo.add_argument("--json", action="store_true", help="one JSON object, no progress")
    demo.add_argument("--kill-worker-after", type=int, default=None, metavar="N",
                      help="fault injection: SIGKILL worker 0 after N requests")
    demo.set_defaults(func=commands["demo"])
    bench = sub.add_parser(
        "bench", help="run the benchmarks (Python here, C++ programs if built/installed)"
    )
    bench.add_argument("--quick", action="store_true",
                       help="smoke mode: under 30 s, never fails on a missed target")
    bench.add_argument("--json", action="store_true", help="one JSON object")
    bench.add_argument("--compact", action="store_true", help="JSON on one line")
    bench.set_defaults(func=commands["bench"])
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``mlx5tlp`` console script. Returns the exit code."""
    commands: dict[str, Command] = {"info": _cmd_info, "demo": _cmd_demo, "bench": _cmd_bench}
    args = _parser(commands).parse_args(argv)
    try:
        return int(args.func(args))
    except Error as exc:
        print(f"mlx5tlp {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mlx5tlp {args.command}: interrupted", file=sys.stderr)
        return 130
