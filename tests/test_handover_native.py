"""A native (C++) process takes part in the lease: cpp/include/mlx5tlp/handover_lease.hpp.

The program is compiled against the header with the project's warning flags; it reads the lease a
Python primary holds, is refused while that primary lives, and becomes primary (generation + 1)
once the primary was SIGKILLed — the kernel dropped the OFD lock with the dead process's fds.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from handover_rig import Rig
from mlx5tlp import handover

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "cpp" / "include"

PROGRAM = r"""
#include "mlx5tlp/handover_lease.hpp"
#include <cstdio>
int main(int argc, char** argv) {
  if (argc != 2) return 2;
  mlx5tlp::handover::Lease lease(std::string(argv[1]) + ".lease");
  auto rec = lease.read();
  if (!rec) return 3;
  std::printf("holder %u generation %llu\n", rec->pid, (unsigned long long)rec->generation);
  const uint64_t gen = lease.try_acquire(mlx5tlp::handover::kStateVersion, rec->digest);
  std::printf("acquired %llu\n", (unsigned long long)gen);
  if (gen != 0) lease.release();
  return 0;
}
"""


@pytest.fixture
def program(tmp_path: Path) -> Iterator[Path]:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or not INCLUDE.exists():
        pytest.fail("needs a C++17 compiler and a source checkout")
    src = tmp_path / "lease.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "lease"
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE),
                    str(src), "-o", str(exe)], check=True, timeout=120)
    yield exe


@pytest.fixture
def rig(tmp_path: Path, device: str) -> Iterator[Rig]:
    r = Rig(tmp_path, device)
    yield r
    r.close()


def test_native_process_reads_and_takes_the_lease(program: Path, rig: Rig) -> None:
    p0 = rig.primary()
    out = subprocess.run([str(program), rig.path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"holder {p0.pid} generation 1", "acquired 0"]
    p0.kill()
    out = subprocess.run([str(program), rig.path], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == [f"holder {p0.pid} generation 1", "acquired 2"]
    # ... and Python sees what the native primary wrote.
    with handover.Lease(rig.path + ".lease") as lease:
        rec = lease.read()
        assert rec is not None and rec.generation == 2 and rec.successor == 0
        assert lease.try_acquire() and lease.generation == 3
