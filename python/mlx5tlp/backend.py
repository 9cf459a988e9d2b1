"""What the selected backend has: libraries, rdma-core version, capabilities, devices."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from mlx5tlp import _core
from mlx5tlp.errors import LibraryNotFoundError

__all__ = ["DeviceInfo", "RdmaInfo", "list_devices", "load_error", "rdma_info", "resolve_backend"]

CAPABILITY_NAMES = (
    "tlp_var",
    "var_export",
    "devx_obj_export",
    "devx_umem_export",
    "import_device",
    "devx",
)

_FORK_STATES = {0: "disabled", 1: "enabled", 2: "unneeded"}


def resolve_backend(backend: Optional[str] = None) -> str:
    """The backend to use: ``backend`` if given, else ``$MLX5TLP_BACKEND``, else ``"rdma"``.

    Raises:
        InvalidArgumentError: the name (or the environment variable) is not "rdma" or "sim".
    """
    return str(_core.resolve_backend(backend))


@dataclass(frozen=True)
class DeviceInfo:
    """A device as the backend lists it.

    Attributes:
        name: the verbs device name, e.g. ``"mlx5_0"`` or ``"mlx5_sim0"``.
        node_guid: the node GUID formatted as ``ibv_devinfo`` prints it.
        backend: ``"rdma"`` or ``"sim"``.
        mlx5: whether ``mlx5dv_is_supported()`` says it is an mlx5 device.
    """

    name: str
    node_guid: str
    backend: str
    mlx5: bool = True


@dataclass(frozen=True)
class RdmaInfo:
    """What :func:`rdma_info` found.

    Attributes:
        backend: the backend that was probed.
        libraries: real paths of the shared libraries loaded (empty when none could be).
        rdma_core_version: e.g. ``"44.0"`` (from the library's file name), or ``None``.
        capabilities: flag name -> bool; see ``CAPABILITY_NAMES``.
        fork_status: ``ibv_is_fork_initialized()`` as "disabled"/"enabled"/"unneeded", or
            ``None`` when the library cannot tell.
        load_error: why the library could not be loaded, or ``None``.
        mlx5_load_error: why libmlx5 could not be loaded although libibverbs was (its path
            and the ``dlerror()`` text), or ``None``. Devices are still listed (none counts
            as mlx5), and every DV call raises :class:`NotSupportedError` with this text.
    """

    backend: str
    libraries: list[str]
    rdma_core_version: Optional[str]
    capabilities: dict[str, bool] = field(default_factory=dict)
    fork_status: Optional[str] = None
    load_error: Optional[str] = None
    mlx5_load_error: Optional[str] = None

    @property
    def loaded(self) -> bool:
        """True when the backend's library was loaded."""
        return self.load_error is None


def rdma_info(backend: Optional[str] = None) -> RdmaInfo:
    """Describe the backend's library. Never raises for a missing library: it says so.

    Raises:
        InvalidArgumentError: unknown backend name.
    """
    name = resolve_backend(backend)
    try:
        raw = _core.library_info(name)
    except LibraryNotFoundError as exc:
        return RdmaInfo(
            backend=name,
            libraries=[],
            rdma_core_version=None,
            capabilities=dict.fromkeys(CAPABILITY_NAMES, False),
            load_error=str(exc),
        )
    return RdmaInfo(
        backend=raw["backend"],
        libraries=list(raw["libraries"]),
        rdma_core_version=raw["rdma_core_version"],
        capabilities={k: bool(raw["capabilities"][k]) for k in CAPABILITY_NAMES},
        fork_status=_FORK_STATES.get(raw["fork_status"]),
        mlx5_load_error=raw["mlx5_load_error"],
    )


def load_error(backend: Optional[str] = None) -> Optional[str]:
    """Why the backend's libraries (or libmlx5 alone) failed to load, or ``None``.

    The text is the dynamic loader's own (``dlerror()``: a missing file, a missing dependency,
    a wrong architecture), with the path tried; it never guesses at an rdma-core version.

    Raises:
        InvalidArgumentError: unknown backend name.
    """
    info = rdma_info(backend)
    return info.load_error if info.load_error is not None else info.mlx5_load_error


def list_devices(backend: Optional[str] = None) -> list[DeviceInfo]:
    """Every device of the backend (an empty list when there are none).

    Raises:
        LibraryNotFoundError: the backend's library cannot be loaded.
        Error: enumeration failed for another reason (errno set).
    """
    name = resolve_backend(backend)
    return [
        DeviceInfo(name=n, node_guid=_core.format_guid(guid), backend=name, mlx5=bool(mlx5))
        for n, guid, mlx5 in _core.list_devices(name)
    ]


def memlock_limit() -> Optional[int]:
    """RLIMIT_MEMLOCK soft limit in bytes (None = unlimited); UMEM pinning counts against it."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def sim_dir_from_env() -> Optional[str]:
    """``$MLX5TLP_SIM_DIR`` if set."""
    return os.environ.get("MLX5TLP_SIM_DIR") or None
