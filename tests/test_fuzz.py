"""Coverage-guided fuzzing in CI: every target briefly, every committed crash replayed.

The targets, their properties and the long-run command are in docs/fuzzing.md; this test is
the short run of tests/fuzz/run.py: build the libFuzzer targets (clang, ASan + UBSan), replay
tests/fuzz/crashes/<target>/ and the seeds, then fuzz each target for FUZZ_SECONDS. Any crash,
sanitizer report or violated property fails the test and names the saved input. Skips only
when clang with libFuzzer is absent (.ci/run installs clang-14 and libclang-rt-14-dev, so CI
never skips).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ_SECONDS = int(os.environ.get("MLX5TLP_FUZZ_SECONDS", "12"))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_fuzz_{name}", ROOT / "tests" / "fuzz" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load("run")


@pytest.fixture(scope="module")
def build_dir() -> Path:
    cxx = run.clang()
    if cxx is None or not run.libfuzzer_available(cxx):
        pytest.skip(
            "clang with libFuzzer is not installed (apt-get install clang-14 libclang-rt-14-dev)"
        )
    d = ROOT / "build" / "fuzz"
    try:
        run.build(d, cxx)
    except Exception as exc:  # CalledProcessError: show the compiler's output
        out = getattr(exc, "stdout", "") or ""
        err = getattr(exc, "stderr", "") or ""
        pytest.fail(f"building the fuzz targets failed:\n{out[-6000:]}\n{err[-6000:]}")
    return d


@pytest.mark.slow
@pytest.mark.parametrize("target", run.TARGETS)
def test_replay_regressions_and_seeds(target: str, build_dir: Path) -> None:
    res = run.replay(target, build_dir)
    assert res.ok, f"{target}: a committed regression input or seed fails again:\n{res.log[-6000:]}"
    crashes = list((ROOT / "tests" / "fuzz" / "crashes" / target).glob("*"))
    seeds = list((ROOT / "tests" / "fuzz" / "corpus" / target).glob("*"))
    assert res.executions == len(crashes) + len(seeds) and seeds, f"{target}: no seeds replayed"


@pytest.mark.slow
@pytest.mark.parametrize("target", run.TARGETS)
def test_fuzz_briefly(target: str, build_dir: Path) -> None:
    res = run.fuzz(target, FUZZ_SECONDS, build_dir)
    saved = (
        f"; input saved as {res.artifact} (add it to tests/fuzz/crashes/{target}/)"
        if res.artifact
        else ""
    )
    assert res.ok, f"{target} crashed or violated a property{saved}:\n{res.log[-8000:]}"
    # It really fuzzed: libFuzzer reported its final statistics and covered code.
    assert res.executions >= 20 and res.coverage > 0, (
        f"{target}: {res.executions} runs, cov {res.coverage}"
    )


def test_seeds_are_reproducible() -> None:
    """The committed seeds of the pure targets are exactly what make_corpus.py generates."""
    mc = _load("make_corpus")
    for target, seeds in (
        ("fuzz_tlp_decode", mc.tlps()),
        ("fuzz_completions", mc.completion_streams()),
        ("fuzz_config_space", mc.config_sequences()),
    ):
        committed = {
            p.read_bytes() for p in (ROOT / "tests" / "fuzz" / "corpus" / target).iterdir()
        }
        assert committed == {data for _, data in seeds}, (
            f"{target}: rerun python -m tests.fuzz.make_corpus"
        )


def test_completions_at_the_top_of_the_64bit_space() -> None:
    """Regression found by fuzz_completions (crashes/fuzz_completions/mrd-near-top-of-64bit-space):
    the builder computed RCB boundaries as absolute addresses, which wrap at 2^64, so a read at
    0xFFFFFFFFFFFFFF00 got malformed completions and one ending exactly at 2^64 got none. PCIe
    Base §2.3.1.1: completions of a read return all its bytes, split only at RCB boundaries."""
    from mlx5tlp.tlp import Tlp, completions_for

    for address, length in ((0xFFFFFFFFFFFFFF00, 32), (0xFFFFFFFFFFFFF000, 1024)):
        req = Tlp.mem_read(address, length, first_be=0x6 if length > 1 else 0xF, last_be=0x2)
        data = bytes(range(256)) * (length * 4 // 256 + 1)
        cpls = completions_for(
            req, data[: length * 4], completer_id=0x0100, max_payload=512, rcb=128
        )
        assert b"".join(c.data for c in cpls) == data[: length * 4]
        assert all(len(c.data) <= 512 for c in cpls)
        # Byte Count: what remains from each completion's first byte (first_be 0110b skips 1,
        # last_be 0010b drops the last 2 bytes).
        total = length * 4 - 1 - 2
        assert cpls[0].byte_count == total and cpls[0].lower_address == (address + 1) & 0x7F
        sent = 0
        for prev, c in itertools.pairwise(cpls):
            sent += len(prev.data)
            assert (address + sent) % 128 == 0  # every completion but the last ends on the RCB
            assert c.byte_count == length * 4 - sent - 2
            assert c.lower_address == (address + sent) & 0x7F
