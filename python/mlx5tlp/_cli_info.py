"""``mlx5tlp info``: what the backend provides, and one actionable line per problem found."""

from __future__ import annotations

import json
from typing import Any, Optional

from mlx5tlp.backend import list_devices, memlock_limit, rdma_info
from mlx5tlp.errors import Error

__all__ = ["MEMLOCK_ENOUGH", "diagnose", "has_cap_ipc_lock", "info_report", "print_info"]

MEMLOCK_ENOUGH = 64 << 20
"""Below this RLIMIT_MEMLOCK (bytes) the memlock note is shown, where the limit applies."""

CAP_IPC_LOCK = 14  # include/uapi/linux/capability.h

SIM_HINT = (
    "to use mlx5tlp without mlx5 hardware, use the bundled software device: run "
    "`mlx5tlp demo`, or pass backend=\"sim\" (MLX5TLP_BACKEND=sim, mlx5tlp info --backend sim)"
)


def has_cap_ipc_lock(status_path: str = "/proc/self/status") -> bool:
    """Whether this process has CAP_IPC_LOCK in its effective set (``CapEff``).

    With it the kernel does not hold UMEM pinning to RLIMIT_MEMLOCK: ``ib_umem_get()`` in
    drivers/infiniband/core/umem.c refuses only when ``new_pinned > lock_limit &&
    !capable(CAP_IPC_LOCK)``.
    """
    try:
        with open(status_path, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def info_report(backend: Optional[str]) -> dict[str, Any]:
    """Everything ``mlx5tlp info`` shows, as one JSON-ready dict."""
    info = rdma_info(backend)
    devices: list[dict[str, Any]] = []
    if info.loaded:
        devices = [
            {"name": d.name, "node_guid": d.node_guid, "mlx5": d.mlx5,
             **(_tlp_caps(d.name, info.backend) if d.mlx5 else {})}
            for d in list_devices(info.backend)
        ]
    limit = memlock_limit()
    ipc_lock = has_cap_ipc_lock()
    return {
        "backend": info.backend,
        "libraries": info.libraries,
        "rdma_core_version": info.rdma_core_version,
        "capabilities": info.capabilities,
        "devices": devices,
        "fork_status": info.fork_status,
        "memlock_limit": limit,
        "cap_ipc_lock": ipc_lock,
        "load_error": info.load_error,
        "mlx5_load_error": info.mlx5_load_error,
        "diagnostics": diagnose(info.backend, info.load_error, info.capabilities, devices, limit,
                                ipc_lock, mlx5_load_error=info.mlx5_load_error),
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


def diagnose(
    backend: str,
    load_error: Optional[str],
    caps: dict[str, bool],
    devices: list[dict[str, Any]],
    memlock: Optional[int],
    cap_ipc_lock: bool,
    *,
    mlx5_load_error: Optional[str] = None,
) -> list[str]:
    """One actionable line per problem found.

    When libmlx5 failed to load (``mlx5_load_error``), that is the one line about rdma-core:
    the loader's reason, not a guess that rdma-core is too old.

    The memlock line appears only where the limit applies: some mlx5 device is there to
    register UMEMs on, the limit is below :data:`MEMLOCK_ENOUGH`, and the process lacks
    CAP_IPC_LOCK (which lifts the limit for UMEM pinning).
    """
    out: list[str] = []
    if load_error is not None:
        out.append(f"rdma-core not loaded: {load_error}")
        if backend == "rdma":
            out.append(SIM_HINT)
        return out
    if mlx5_load_error is not None:
        out.append(
            f"libmlx5 not loaded: {mlx5_load_error}: VARs, DEVX objects, UMEMs and "
            "export/import are unavailable (install ibverbs-providers or set MLX5TLP_MLX5_LIB)"
        )
        if backend == "rdma":
            out.append(SIM_HINT)
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
    if backend == "rdma" and not any(d["mlx5"] for d in devices):
        out.append(SIM_HINT)
    for d in devices:
        if d.get("tlp_emulation") is False:
            out.append(
                f"{d['name']}: firmware does not enable tlp_device_emulation_manager: "
                "TLP gateway VARs fail with EOPNOTSUPP on this device"
            )
        elif d.get("tlp_error"):
            out.append(f"{d['name']}: could not query TLP capabilities: {d['tlp_error']}")
    if (memlock is not None and memlock < MEMLOCK_ENOUGH and not cap_ipc_lock
            and any(d["mlx5"] for d in devices)):
        out.append(
            f"RLIMIT_MEMLOCK is {memlock} bytes and this process lacks CAP_IPC_LOCK: UMEM "
            "registration may fail with ENOMEM; raise it (ulimit -l, or --ulimit memlock=-1 "
            "for containers)"
        )
    return out


def print_info(rep: dict[str, Any], as_json: bool = False, compact: bool = False) -> None:
    """Prints the report: aligned rows, or one JSON object."""
    if as_json:
        print(json.dumps(rep, indent=None if compact else 2))
        return
    limit = rep["memlock_limit"]
    rows = [
        ("backend", rep["backend"]),
        ("libraries", ", ".join(rep["libraries"]) or "(none loaded)"),
        ("rdma-core", rep["rdma_core_version"] or "unknown"),
        ("fork", rep["fork_status"] or "unknown"),
        ("memlock", ("unlimited" if limit is None else f"{limit} bytes")
         + (" (CAP_IPC_LOCK: not enforced)" if rep["cap_ipc_lock"] else "")),
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

