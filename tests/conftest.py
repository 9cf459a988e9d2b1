"""Shared fixtures: every test runs on the software device in its own device directory."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# Before mlx5tlp is imported anywhere: the whole session uses a private device directory and
# the software device, so tests never touch the user's devices or each other's.
_SIM_DIR = tempfile.mkdtemp(prefix="mlx5tlp-tests-")
os.environ["MLX5TLP_SIM_DIR"] = _SIM_DIR
os.environ["MLX5TLP_BACKEND"] = "sim"

import mlx5tlp  # noqa: E402
from mlx5tlp import sim  # noqa: E402

_names = itertools.count()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SIM_DIR, ignore_errors=True)


@pytest.fixture
def sim_dir() -> str:
    """The session's software device directory ($MLX5TLP_SIM_DIR)."""
    return _SIM_DIR


def _fresh(**config: object) -> Iterator[str]:
    name = f"t{os.getpid()}_{next(_names)}"
    sim.create_device(name, **config)  # type: ignore[arg-type]
    yield name
    # Removal fails with EBUSY if a test leaked an open context: that is a test failure.
    sim.remove_device(name)


@pytest.fixture
def device() -> Iterator[str]:
    """A fresh software device (8 TLP gateway pages of 4 KiB, 16 VirtIO pages)."""
    yield from _fresh()


@pytest.fixture
def notlp_device() -> Iterator[str]:
    """A fresh software device without TLP emulation."""
    yield from _fresh(tlp=False)


@pytest.fixture
def ctx(device: str) -> Iterator[mlx5tlp.Context]:
    """An open context on a fresh device, closed after the test."""
    with mlx5tlp.open_device(device, backend="sim") as c:
        yield c
