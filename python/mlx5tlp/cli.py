"""The ``mlx5tlp`` command: ``info`` (and, as they land, ``demo`` and ``bench``)."""

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
            {"name": d.name, "node_guid": d.node_guid, "mlx5": d.mlx5}
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
        print(f"  {d['name']:<16} {d['node_guid']}  {'mlx5' if d['mlx5'] else 'not mlx5'}")
    for line in rep["diagnostics"]:
        print(f"note: {line}")


def _cmd_info(args: argparse.Namespace) -> int:
    rep = _info_report(args.backend)
    if args.json:
        print(json.dumps(rep, indent=None if args.compact else 2))
    else:
        _print_info(rep)
    return 0


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
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``mlx5tlp`` console script. Returns the exit code."""
    commands: dict[str, Command] = {"info": _cmd_info}
    args = _parser(commands).parse_args(argv)
    try:
        return int(args.func(args))
    except Error as exc:
        print(f"mlx5tlp {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mlx5tlp {args.command}: interrupted", file=sys.stderr)
        return 130
