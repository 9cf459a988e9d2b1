"""mlx5tlp: TLP response gateways on NVIDIA mlx5 devices.

Allocate TLP gateway VAR pages (``mlx5dv_alloc_var(ctx, MLX5DV_VAR_ALLOC_FLAG_TLP)``), share
them and their DEVX objects and UMEMs between processes, and write TLP completions through a
lock-free doorbell loop. rdma-core is loaded at run time; ``backend="sim"`` (or
``MLX5TLP_BACKEND=sim``) selects the bundled software device instead.
"""

from __future__ import annotations

from mlx5tlp.backend import DeviceInfo, RdmaInfo, list_devices, rdma_info, resolve_backend
from mlx5tlp.errors import (
    DeviceNotFoundError,
    DevxCommandError,
    Error,
    ExportFormatError,
    InvalidArgumentError,
    InvalidHandleError,
    LibraryNotFoundError,
    NotSupportedError,
    ResourceExhaustedError,
)

__version__ = "0.1.0"

__all__ = [
    "DeviceInfo",
    "DeviceNotFoundError",
    "DevxCommandError",
    "Error",
    "ExportFormatError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "LibraryNotFoundError",
    "NotSupportedError",
    "RdmaInfo",
    "ResourceExhaustedError",
    "__version__",
    "list_devices",
    "rdma_info",
    "resolve_backend",
]
