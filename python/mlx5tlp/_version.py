"""The one version source of mlx5tlp.

Read by the package metadata (scikit-build-core's regex provider, ``pyproject.toml``), by the
CMake project (``CMakeLists.txt``, hence the installed ``mlx5tlpConfigVersion.cmake``), and
re-exported as ``mlx5tlp.__version__`` (which ``mlx5tlp --version`` prints). Change it here only.
"""

__version__ = "0.1.0"
