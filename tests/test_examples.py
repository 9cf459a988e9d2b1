"""The examples run: the native C++ emulator against the INSTALLED package, and the Python one.

The native example is configured with ``-Dmlx5tlp_DIR=<mlx5tlp.cmake_dir()>``, i.e. through the
CMake package shipped inside the wheel (headers, static core, config files), exactly as a C++
user of ``pip install mlx5tlp`` would build it. An in-place development tree
(``PYTHONPATH=python``) has no such package: the test then skips with the reason, except in CI
(``CI=true``), where it must not silently pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx5tlp import native

ROOT = Path(__file__).resolve().parents[1]
# The emulator's summary line (ctest -V prefixes it with "1: ").
SUMMARY = re.compile(
    r"^(?:\d+: )?native emulator: OK: 4 requests, \d+ completions, 4 retired, 0 errors",
    re.MULTILINE,
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _run(
    cmd: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        tail = f"{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
        pytest.fail(f"{' '.join(cmd)} failed ({out.returncode}):\n{tail}")
    return out


@pytest.mark.slow
def test_native_example_against_installed_package(tmp_path: Path) -> None:
    try:
        cmake_dir = native.cmake_dir()
        sim_lib = native.sim_library()
    except FileNotFoundError as e:
        if _in_ci():
            pytest.fail(f"CI must test the installed package: {e}")
        pytest.skip(f"needs an installed mlx5tlp (pip install .): {e}")
    source = ROOT / "examples" / "native"
    if not (source / "CMakeLists.txt").exists():
        pytest.fail(f"{source} is missing: the examples run from a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is required to build the native example (pip install cmake)")

    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    env = {**os.environ, "MLX5TLP_SIM_DIR": str(sim_dir)}
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([cmake, "-S", str(source), "-B", str(build), *gen, f"-Dmlx5tlp_DIR={cmake_dir}"], env)
    # The package that was found is the installed one, not a build tree.
    found = re.search(r"^mlx5tlp_DIR:\w+=(.*)$", (build / "CMakeCache.txt").read_text(), re.M)
    assert found is not None and Path(found.group(1)).resolve() == Path(cmake_dir).resolve()
    _run([cmake, "--build", str(build), "-j", "2"], env)

    # The program is not next to libmlx5tlp_sim.so: $MLX5TLP_SIM_LIB points the loader at it.
    run = _run([str(build / "emulator")], {**env, "MLX5TLP_SIM_LIB": sim_lib}, timeout=120)
    assert SUMMARY.search(run.stdout), run.stdout

    # The ctest registered by the example gets MLX5TLP_SIM_LIB from the package's config.
    ctest = shutil.which("ctest") or "ctest"
    run = _run([ctest, "--test-dir", str(build), "--output-on-failure", "-V"], env, timeout=120)
    assert SUMMARY.search(run.stdout), run.stdout


@pytest.mark.slow
def test_python_example(tmp_path: Path) -> None:
    script = ROOT / "examples" / "emulator.py"
    if not script.exists():
        pytest.fail(f"{script} is missing")
    env = {**os.environ, "MLX5TLP_SIM_DIR": str(tmp_path)}
    _run([sys.executable, str(script)], env, timeout=300)
