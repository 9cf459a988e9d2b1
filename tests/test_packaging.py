"""The release artefacts, checked here as CI would (no Docker on these machines).

* ``python -m build``: the sdist, and a wheel built *from that sdist* (what PyPI users and
  ``pip install mlx5tlp`` from source get);
* the wheel's only external libraries are glibc's and the C++ runtime's (``auditwheel show`` and
  every ELF file's NEEDED entries): rdma-core is loaded at run time, never linked;
* the wheel installed into a fresh venv outside the source tree runs ``mlx5tlp --version``,
  ``info`` and ``demo``, and the cibuildwheel test command of ``pyproject.toml`` passes there;
* ``cibuildwheel --print-build-identifiers`` lists exactly the intended builds;
* an editable install finds its CMake package (``mlx5tlp.cmake_dir()``).

Building takes about a minute per build on these machines: the whole module is ``slow``.
"""

from __future__ import annotations

import email.parser
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: cibuildwheel brings tomli
    import tomli as tomllib

import mlx5tlp

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYPROJECT.exists(), reason="needs a source checkout"),
]

# glibc (split into several libraries before 2.34, as on manylinux_2_28), the C++ runtime and
# the dynamic loader. Nothing of rdma-core: libibverbs/libmlx5 are dlopen()ed at run time.
ALLOWED_NEEDED = re.compile(
    r"^(libc\.so\.6|libm\.so\.6|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libpthread\.so\.0|"
    r"libdl\.so\.2|librt\.so\.1|ld-linux-(x86-64|aarch64)\.so\.[12])$"
)
ELF_MAGIC = b"\x7fELF"


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 900) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} failed ({out.returncode}):\n"
                    f"{out.stdout[-6000:]}\n{out.stderr[-6000:]}")
    return out


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLX5TLP_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it (``python -m build`` does exactly that)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("mlx5tlp-*.whl")
    return wheel


def _sdist(dist: Path) -> Path:
    (sdist,) = dist.glob("mlx5tlp-*.tar.gz")
    return sdist


def test_sdist_has_the_sources_and_no_build_output(dist: Path) -> None:
    sdist = _sdist(dist)
    assert sdist.name == f"mlx5tlp-{mlx5tlp.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", "CHANGELOG.md",
                   "python/mlx5tlp/_version.py", "cpp/include/mlx5tlp/context.hpp",
                   "cpp/sim/libmlx5tlp_sim.map", "cmake/mlx5tlpConfig.cmake.in",
                   "tests/conftest.py", "examples/native/CMakeLists.txt", "docs/conf.py",
                   ".ci/run", "PKG-INFO"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("build/", "dist/")) or n.endswith(".so")]


def test_wheel_metadata_has_one_version_license_and_urls(dist: Path) -> None:
    wheel = _wheel(dist)
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    assert meta["Version"] == mlx5tlp.__version__
    assert meta["License-Expression"] == "BSD-2-Clause"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert not [c for c in meta.get_all("Classifier") if c.startswith("License ::")]


def _elf_files(wheel: Path, into: Path) -> dict[str, Path]:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(into)
    return {str(p.relative_to(into)): p for p in into.rglob("*")
            if p.is_file() and p.read_bytes()[:4] == ELF_MAGIC}


def test_wheel_links_only_libc_and_the_cxx_runtime(dist: Path, tmp_path: Path) -> None:
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    elves = _elf_files(_wheel(dist), tmp_path)
    names = {Path(n).name for n in elves}
    assert "libmlx5tlp_sim.so" in names
    assert any(n.startswith("_core.") and n.endswith(".so") for n in names)
    assert {"bench_gateway", "bench_ring", "bench_tlp"} <= names  # the bundled programs
    for rel, path in elves.items():
        with path.open("rb") as f:
            needed = [tag.needed for sec in ELFFile(f).iter_sections()
                      if isinstance(sec, DynamicSection)
                      for tag in sec.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]
        assert needed, f"{rel}: no NEEDED entries at all?"
        bad = [n for n in needed if not ALLOWED_NEEDED.match(n)]
        assert bad == [], f"{rel} needs {bad}"

    shown = _run([sys.executable, "-m", "auditwheel", "show", str(_wheel(dist))], cwd=tmp_path)
    report = " ".join(shown.stdout.split())
    assert re.search(r'consistent with the following platform tag: "manylinux_2_\d+_', report)
    assert "external shared libraries are required" not in report
    system = set(re.findall(r"([\w+.-]+\.so\.\d+) with versions", report))
    assert system and all(ALLOWED_NEEDED.match(n) for n in system), system
    assert "ibverbs" not in report and "mlx5.so" not in report


@pytest.fixture(scope="module")
def fresh_venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new venv, outside the source tree, with only the wheel installed."""
    home = tmp_path_factory.mktemp("fresh")
    env_dir = home / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index",
          "--no-deps", str(_wheel(dist))], cwd=home, env=_clean_env())
    yield env_dir
    shutil.rmtree(env_dir, ignore_errors=True)


def _in_venv(env_dir: Path, *cmd: str, **extra: str) -> subprocess.CompletedProcess[str]:
    home = env_dir.parent
    env = _clean_env(PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                     MLX5TLP_SIM_DIR=str(home / "sim"), **extra)
    return _run(list(cmd), cwd=home, env=env, timeout=600)


def test_fresh_venv_runs_version_info_and_demo(fresh_venv: Path) -> None:
    where = _in_venv(fresh_venv, "python", "-c", "import mlx5tlp; print(mlx5tlp.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(fresh_venv)
    version = _in_venv(fresh_venv, "mlx5tlp", "--version")
    assert version.stdout == f"mlx5tlp {mlx5tlp.__version__}\n"
    info = _in_venv(fresh_venv, "mlx5tlp", "info")  # the default backend: rdma, maybe absent
    assert info.stdout.startswith("backend")
    sim_info = _in_venv(fresh_venv, "mlx5tlp", "info", "--backend", "sim")
    assert "mlx5_sim0" in sim_info.stdout
    demo = _in_venv(fresh_venv, "mlx5tlp", "demo", "--requests", "400")
    assert "mlx5tlp demo on mlx5_sim0: OK" in demo.stdout
    cmake = _in_venv(fresh_venv, "python", "-c", "import mlx5tlp; print(mlx5tlp.cmake_dir())")
    assert (Path(cmake.stdout.strip()) / "mlx5tlpConfigVersion.cmake").read_text().count(
        f'set(PACKAGE_VERSION "{mlx5tlp.__version__}")') == 1  # CMake reads the one version


def _cibw_config() -> dict[str, object]:
    config: dict[str, object] = tomllib.loads(PYPROJECT.read_text())["tool"]["cibuildwheel"]
    return config


def test_cibuildwheel_test_command_passes_in_the_fresh_venv(fresh_venv: Path) -> None:
    # What cibuildwheel runs after installing each wheel (and its test extra), here.
    config = _cibw_config()
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    requires = [r for extra in config["test-extras"] for r in extras[extra]]  # type: ignore[attr-defined]
    _in_venv(fresh_venv, "python", "-m", "pip", "install", "-q", *requires)
    commands = config["test-command"]
    assert isinstance(commands, list)
    script = " && ".join(c.replace("{project}", shlex.quote(str(ROOT))) for c in commands)
    out = _in_venv(fresh_venv, "sh", "-c", script)
    assert "mlx5tlp demo on mlx5_sim0: OK" in out.stdout
    assert re.search(r"^\d+ passed", out.stdout.splitlines()[-1]), out.stdout[-2000:]


def test_cibuildwheel_builds_exactly_the_intended_wheels() -> None:
    out = _run([sys.executable, "-m", "cibuildwheel", "--print-build-identifiers",
                "--platform", "linux"], cwd=ROOT,
               env={k: v for k, v in os.environ.items() if not k.startswith("CIBW_")})
    identifiers = out.stdout.split()
    assert identifiers == [f"cp3{minor}-manylinux_{arch}"
                           for arch in ("x86_64", "aarch64") for minor in range(10, 15)]
    config = _cibw_config()
    assert config["manylinux-x86_64-image"] == config["manylinux-aarch64-image"] \
        == "manylinux_2_28"


def test_wheels_workflow_builds_tests_uploads_and_publishes() -> None:
    text = (ROOT / ".github" / "workflows" / "wheels.yml").read_text()
    for needed in ("pypa/cibuildwheel@", "docker/setup-qemu-action@", "CIBW_ARCHS_LINUX",
                   "x86_64", "aarch64", "actions/upload-artifact@", "python -m build --sdist",
                   "pypa/gh-action-pypi-publish@", "id-token: write", "refs/tags/v"):
        assert needed in text, needed
    # The workflow runs the cibuildwheel this suite checks the configuration with.
    pinned = re.search(r'"cibuildwheel~=([\d.]+)"', PYPROJECT.read_text())
    assert pinned is not None and f"pypa/cibuildwheel@v{pinned.group(1)} " in text


def test_editable_install_finds_its_cmake_package(tmp_path: Path) -> None:
    # A copy of the sources (an editable build writes its build tree into the source tree).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "wheelhouse", "_build", "__pycache__", "*.so", ".*_cache",
        ".hypothesis"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "-e", str(src)], cwd=tmp_path, env=_clean_env())
    out = _run([py, "-c", "import mlx5tlp; print(mlx5tlp.__file__); print(mlx5tlp.cmake_dir())"],
               cwd=tmp_path, env=_clean_env())
    module, cmake_dir = out.stdout.split()
    assert Path(module).is_relative_to(src)  # the code is the source tree's
    assert (Path(cmake_dir) / "mlx5tlpConfig.cmake").is_file()
