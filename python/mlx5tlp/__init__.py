"""mlx5tlp: TLP response gateways on NVIDIA mlx5 devices.

Allocate TLP gateway VAR pages (``mlx5dv_alloc_var(ctx, MLX5DV_VAR_ALLOC_FLAG_TLP)``), share
them and their DEVX objects and UMEMs between processes, and write TLP completions through a
lock-free doorbell loop. rdma-core is loaded at run time; ``backend="sim"`` (or
``MLX5TLP_BACKEND=sim``) selects the bundled software device instead.
"""

from __future__ import annotations

from mlx5tlp._object import DeviceObject, import_blob
from mlx5tlp._version import __version__
from mlx5tlp.backend import (
    DeviceInfo,
    RdmaInfo,
    list_devices,
    load_error,
    rdma_info,
    resolve_backend,
)
from mlx5tlp.context import Context, TlpCaps, open_device
from mlx5tlp.devx_obj import DevxObj
from mlx5tlp.errors import (
    DeviceNotFoundError,
    DevxCommandError,
    Error,
    ExportFormatError,
    InvalidArgumentError,
    InvalidHandleError,
    LibraryNotFoundError,
    NotInstalledError,
    NotSupportedError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TimedOutError,
)
from mlx5tlp.native import cmake_dir
from mlx5tlp.records import Records
from mlx5tlp.umem import (
    ACCESS_LOCAL_WRITE,
    ACCESS_REMOTE_READ,
    ACCESS_REMOTE_WRITE,
    Umem,
    alloc_umem_buffer,
)
from mlx5tlp.var import Var

__all__ = [
    "ACCESS_LOCAL_WRITE",
    "ACCESS_REMOTE_READ",
    "ACCESS_REMOTE_WRITE",
    "Context",
    "DeviceInfo",
    "DeviceObject",
    "DevxObj",
    "DeviceNotFoundError",
    "DevxCommandError",
    "Error",
    "ExportFormatError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "LibraryNotFoundError",
    "NotInstalledError",
    "NotSupportedError",
    "PermissionDeniedError",
    "RdmaInfo",
    "Records",
    "ResourceExhaustedError",
    "TimedOutError",
    "TlpCaps",
    "Umem",
    "Var",
    "__version__",
    "alloc_umem_buffer",
    "cmake_dir",
    "import_blob",
    "list_devices",
    "load_error",
    "open_device",
    "rdma_info",
    "resolve_backend",
]
