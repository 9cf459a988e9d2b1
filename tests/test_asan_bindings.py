"""The Python binding tests under AddressSanitizer (issue 10: hostile buffers under ASan).

The extension and the software device are rebuilt with ``-fsanitize=address`` (the
``MLX5TLP_SANITIZE`` CMake option tests/test_native.py uses for the C++ tests; build tree
``build/python-asan``), staged as a package next to a copy of the Python sources, and the
hostile-buffer and bulk tests run against it in a subprocess:

* ``LD_PRELOAD`` of the compiler's ``libasan.so``, then ``libstdc++.so.6``: the interpreter is
  not instrumented, so the runtime must come first, and ASan's ``__cxa_throw`` interceptor
  needs libstdc++ loaded when ASan starts (else the first C++ exception aborts the run);
* ``PYTHONMALLOC=malloc``: every Python object (the bytes, bytearrays and arrays the tests pass
  in) comes from ASan's malloc with redzones, so reading past a buffer is caught even for
  small objects (pymalloc's arenas are not poisoned);
* ``ASAN_OPTIONS=detect_leaks=0`` (CPython keeps its objects at exit by design),
  ``halt_on_error=1``: the first bad access aborts the run, which fails this test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "python-asan"

# The tests whose inputs are hostile buffers, mutated during the call, or hostile bytes
# (envelopes, TLPs), and the gateway's batch paths. Not tests/test_errors.py: its RLIMIT_AS
# child cannot run under ASan's shadow memory.
SUITES = ["tests/test_boundary.py", "tests/test_tlp_completions.py", "tests/test_tlp.py",
          "tests/test_gateway.py", "tests/test_gateway_completions.py", "tests/test_envelope.py",
          "tests/test_export_import.py",
          # The load generator and the host's configuration requests against hostile
          # functions (wrong answers, a function that stops taking requests), and the
          # engine's request rules (poisoned and oversized writes).
          "tests/test_sim_load.py", "tests/test_sim_load_stall.py",
          "tests/test_host_config.py", "tests/test_engine_pcie_rules.py",
          # The SIGBUS guard: a fault handled inside an instrumented memcpy, and chaining.
          "tests/test_sigbus_guard.py",
          # Closes racing threads blocked in the engine (wait_first_answer: a use after free
          # before the binding kept the engine alive for them) and hostile control peers.
          "tests/test_hostile_handover.py"]


def _run(cmd: list[str], env: dict[str, str],
         timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _check(out: subprocess.CompletedProcess[str], what: str) -> None:
    if out.returncode != 0:
        pytest.fail(f"{what} failed ({out.returncode}):\n{out.stdout[-6000:]}\n"
                    f"{out.stderr[-6000:]}")


def _runtime(name: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        pytest.fail(f"{cxx} has no {name} (got {path!r}): install the compiler's runtime")
    return os.path.realpath(path)


def build_asan_package() -> Path:
    """Build _core and libmlx5tlp_sim.so under ASan; return a directory to put on PYTHONPATH."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is required (pip install cmake)")
    try:
        import pybind11
    except ImportError:
        pytest.fail("pybind11 is required to build the extension (pip install '.[test]')")
    env = dict(os.environ)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _check(_run([cmake, "-S", str(ROOT), "-B", str(BUILD), *gen,
                 "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DMLX5TLP_SANITIZE=address",
                 "-DMLX5TLP_BUILD_PYTHON=ON", "-DMLX5TLP_BUILD_BENCHMARKS=OFF",
                 "-DMLX5TLP_BUILD_TESTS=OFF", "-DMLX5TLP_INSTALL_CMAKE_PACKAGE=OFF",
                 "-DMLX5TLP_WERROR=ON", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], env), "cmake configure")
    _check(_run([cmake, "--build", str(BUILD), "-j", "2", "--target", "_core", "mlx5tlp_sim"],
                env), "cmake build")
    stage = BUILD / "stage"
    pkg = stage / "mlx5tlp"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(ROOT / "python" / "mlx5tlp", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    built = [*sorted(BUILD.glob("_core*.so")), BUILD / "libmlx5tlp_sim.so"]
    for lib in built:
        if not lib.exists():
            pytest.fail(f"the ASan build made no {lib.name}")
        shutil.copy2(lib, pkg / lib.name)
    return stage


def asan_env(stage: Path, logs: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(stage),
        "LD_PRELOAD": f"{_runtime('libasan.so')} {_runtime('libstdc++.so.6')}",
        "PYTHONMALLOC": "malloc",
        # Reports go to files: pytest captures fd 2, and ASan exits before it is shown.
        "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:exitcode=86:log_path={logs}/asan",
        "MLX5TLP_SIM_LIB": str(stage / "mlx5tlp" / "libmlx5tlp_sim.so"),
    })
    env.pop("MLX5TLP_SIM_DIR", None)  # the subprocess's conftest makes its own
    return env


def _reports(logs: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[:6000] for p in sorted(logs.glob("asan*")))


@pytest.mark.slow
def test_binding_tests_pass_under_asan(tmp_path: Path) -> None:
    if not (ROOT / "CMakeLists.txt").exists():
        pytest.fail("the ASan run builds from a source checkout")
    stage = build_asan_package()
    env = asan_env(stage, tmp_path)
    # The run must use the instrumented build, not the installed package.
    probe = _run([sys.executable, "-c",
                  "import mlx5tlp._core as c, mlx5tlp.sim as s; print(c.__file__)"], env, 120)
    _check(probe, "importing the ASan build")
    assert probe.stdout.strip().startswith(str(stage)), probe.stdout
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                "not slow", *SUITES], env)
    reports = _reports(tmp_path)
    assert not reports, f"AddressSanitizer reported (exit {out.returncode}):\n{reports}"
    _check(out, "the binding tests under ASan")
    summary = out.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
