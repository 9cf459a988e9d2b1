"""Where the installed package keeps the C++ core for native callers.

A wheel of mlx5tlp carries the core's headers, its static library and a CMake package next to
the Python code::

    mlx5tlp/include/mlx5tlp/*.hpp, *.h
    mlx5tlp/lib/libmlx5tlp_core.a
    mlx5tlp/share/cmake/mlx5tlp/mlx5tlpConfig.cmake (+ version and targets files)
    mlx5tlp/libmlx5tlp_sim.so          the software device

so that a C++ program can use it with::

    cmake -Dmlx5tlp_DIR="$(python -c 'import mlx5tlp; print(mlx5tlp.cmake_dir())')" ...

    find_package(mlx5tlp CONFIG REQUIRED)
    target_link_libraries(app PRIVATE mlx5tlp::core)

An editable install (``pip install -e .``) keeps the Python code in the source tree and puts
these files in site-packages: they are found through the installed distribution's file list
(its ``RECORD``). A development tree (``PYTHONPATH=python``) has none of these but the software
device: the functions here raise :class:`~mlx5tlp.NotInstalledError` (a
``FileNotFoundError``) saying so instead of returning a path that does not exist.
"""

from __future__ import annotations

import errno
import importlib.metadata
from pathlib import Path
from typing import Optional

from mlx5tlp.errors import NotInstalledError

__all__ = ["cmake_dir", "include_dir", "sim_library"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _installed(path: Path, what: str) -> Path:
    if not path.exists():
        found = _from_distribution(path.relative_to(_PACKAGE_DIR))
        if found is not None:
            return found
        raise NotInstalledError(
            errno.ENOENT,
            f"{what} not found at {path}: mlx5tlp at {_PACKAGE_DIR} is not an installed "
            "package (an in-place development tree?); install it (pip install mlx5tlp, or "
            "pip install . from a source checkout) to get the C++ headers, the static core "
            "and the CMake package",
            "find " + what,
        )
    return path


def _from_distribution(relative: Path) -> Optional[Path]:
    """`relative` (to the package directory) as the installed distribution lists it, if it
    exists there: where an editable install put the compiled and data files."""
    try:
        dist = importlib.metadata.distribution("mlx5tlp")
    except importlib.metadata.PackageNotFoundError:
        return None
    want = ("mlx5tlp", *relative.parts)
    for entry in dist.files or ():
        if tuple(Path(str(entry)).parts) == want:
            located = Path(str(dist.locate_file(entry))).resolve()
            if located.exists():
                return located
    return None


def cmake_dir() -> str:
    """The directory of the installed CMake package (``mlx5tlpConfig.cmake``): ``mlx5tlp_DIR``.

    Raises:
        NotInstalledError: this mlx5tlp is not an installed package (e.g. a development tree).
    """
    config = _PACKAGE_DIR / "share" / "cmake" / "mlx5tlp" / "mlx5tlpConfig.cmake"
    return str(_installed(config, "the CMake package (mlx5tlpConfig.cmake)").parent)


def include_dir() -> str:
    """The directory to put on the include path: it holds ``mlx5tlp/*.hpp``.

    Raises:
        NotInstalledError: this mlx5tlp is not an installed package (e.g. a development tree).
    """
    header = _PACKAGE_DIR / "include" / "mlx5tlp" / "context.hpp"
    return str(_installed(header, "the C++ headers (mlx5tlp/context.hpp)").parent.parent)


def sim_library() -> str:
    """The software device ``libmlx5tlp_sim.so`` (for ``$MLX5TLP_SIM_LIB`` of native programs).

    Raises:
        NotInstalledError: the package has no software device library (not built).
    """
    library = _PACKAGE_DIR / "libmlx5tlp_sim.so"
    return str(_installed(library, "the software device libmlx5tlp_sim.so"))
