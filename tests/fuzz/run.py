"""Build and run the fuzz targets; replay the committed regression inputs.

    python -m tests.fuzz.run --target all --time 3600      # a long run: an hour per target
    python -m tests.fuzz.run --target fuzz_completions --time 60
    python -m tests.fuzz.run --replay                      # crashes/ and corpus/ once, no fuzzing

The C++ targets are built by ``tests/fuzz/CMakeLists.txt`` into ``build/fuzz`` with clang
(libFuzzer, AddressSanitizer, UndefinedBehaviorSanitizer); the Python target
(``fuzz_envelope.py``) runs under atheris. Each run starts from the committed seeds in
``tests/fuzz/corpus/<target>/`` plus what earlier runs found (``build/fuzz/corpus/<target>/``,
never committed) and writes a crashing input to ``build/fuzz/artifacts/<target>/``. Exit status
1 when any target crashed or a regression input fails again. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CPP_TARGETS = tuple(
    t
    for t in ("fuzz_tlp_decode", "fuzz_completions", "fuzz_config_space", "fuzz_sim_state")
    if (HERE / f"{t}.cpp").exists()
)
PY_TARGETS = tuple(t for t in ("fuzz_envelope",) if (HERE / f"{t}.py").exists())
TARGETS = CPP_TARGETS + PY_TARGETS
# Largest input per target: enough for a few full-size TLPs, a config-write sequence, a set of
# state patches or an envelope with every string at its maximum.
MAX_LEN = {
    "fuzz_tlp_decode": 4200,
    "fuzz_completions": 8192,
    "fuzz_config_space": 2048,
    "fuzz_sim_state": 4096,
    "fuzz_envelope": 2048,
}


@dataclasses.dataclass
class Result:
    target: str
    ok: bool
    executions: int = 0
    coverage: int = 0  # libFuzzer "cov": covered edges (C++) / atheris's counters (Python)
    features: int = 0
    corpus: int = 0
    seconds: float = 0.0
    artifact: Optional[Path] = None
    log: str = ""


def clang() -> Optional[str]:
    """The clang++ to build with ($CXX if it is clang, else clang++ or clang++-14), or None."""
    for name in (os.environ.get("MLX5TLP_FUZZ_CXX"), "clang++", "clang++-14"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def libfuzzer_available(cxx: str) -> bool:
    """Whether `cxx` can link a libFuzzer program (clang without libclang-rt-*-dev cannot)."""
    out = subprocess.run(
        [cxx, "-print-file-name=libclang_rt.fuzzer-x86_64.a"], capture_output=True, text=True
    )
    lib = out.stdout.strip()
    if os.path.isabs(lib) and os.path.exists(lib):
        return True
    probe = subprocess.run(
        [cxx, "-fsanitize=fuzzer", "-x", "c++", "-", "-o", os.devnull],
        input='extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }',
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


def build(build_dir: Path, cxx: str) -> None:
    """Configure (once) and build the C++ targets; raises CalledProcessError with the log."""
    venv_bin = str(Path(sys.executable).parent)  # pip's cmake/ninja when the venv is not on PATH
    path = os.pathsep.join([os.environ.get("PATH", ""), venv_bin])
    cmake = shutil.which("cmake", path=path) or "cmake"
    ninja = shutil.which("ninja", path=path)
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    if not (build_dir / "CMakeCache.txt").exists():
        subprocess.run(
            [cmake, "-S", str(HERE), "-B", str(build_dir), *gen, f"-DCMAKE_CXX_COMPILER={cxx}"],
            check=True,
            capture_output=True,
            text=True,
        )
    subprocess.run(
        [cmake, "--build", str(build_dir), "-j", "2"], check=True, capture_output=True, text=True
    )


def _stats(res: Result, log: str) -> None:
    done = re.findall(
        r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)\s+cov: (\d+) ft: (\d+) corp: (\d+)", log
    )
    if done:
        ex, cov, ft, corp = done[-1]
        res.executions, res.coverage, res.features, res.corpus = (
            int(ex),
            int(cov),
            int(ft),
            int(corp),
        )
    m = re.search(r"stat::number_of_executed_units: (\d+)", log)
    if m:
        res.executions = int(m.group(1))
    m = re.search(r"Done (\d+) runs in (\d+) second", log)
    if m:
        res.executions = max(res.executions, int(m.group(1)))
        res.seconds = float(m.group(2))


def _command(target: str, build_dir: Path) -> list[str]:
    if target in PY_TARGETS:
        return [sys.executable, str(HERE / f"{target}.py")]
    return [str(build_dir / target)]


def fuzz(target: str, seconds: int, build_dir: Path, *, runs: Optional[int] = None) -> Result:
    """Fuzz `target` for `seconds` (and at most `runs` executions) from its corpora."""
    work = build_dir / "corpus" / target
    artifacts = build_dir / "artifacts" / target
    work.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = HERE / "corpus" / target
    cmd = [
        *_command(target, build_dir),
        f"-max_total_time={seconds}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-max_len={MAX_LEN[target]}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(work),
    ]
    if runs is not None:
        cmd.insert(1, f"-runs={runs}")
    if seeds.is_dir():
        cmd.append(str(seeds))
    before = set(artifacts.iterdir())
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 300, env=_env()
    )
    log = out.stdout + out.stderr
    res = Result(target, out.returncode == 0, log=log)
    _stats(res, log)
    new = sorted(set(artifacts.iterdir()) - before)
    if new:
        res.ok, res.artifact = False, new[0]
    return res


def replay(target: str, build_dir: Path) -> Result:
    """Run every committed regression input (tests/fuzz/crashes/<target>/) and seed
    (tests/fuzz/corpus/<target>/) of `target` once, without mutation."""
    files = [
        p
        for d in ("crashes", "corpus")
        for p in sorted((HERE / d / target).glob("*"))
        if p.is_file()
    ]
    if not files:
        return Result(target, True)
    out = subprocess.run(
        [*_command(target, build_dir), "-runs=1", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    return Result(target, out.returncode == 0, executions=len(files), log=out.stdout + out.stderr)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Every report is fatal and symbolised; leaks count (detect_leaks is on by default).
    env.setdefault("ASAN_OPTIONS", "abort_on_error=1:detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="all", help=f"all, or one of {', '.join(TARGETS)}")
    ap.add_argument("--time", type=int, default=60, help="seconds per target (default 60)")
    ap.add_argument("--replay", action="store_true", help="only replay crashes/ and corpus/")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "build" / "fuzz")
    args = ap.parse_args(argv)
    targets = (
        TARGETS
        if args.target == "all"
        else (args.target if args.target.startswith("fuzz_") else f"fuzz_{args.target}",)
    )
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r} (known: {', '.join(TARGETS)})")
    if any(t in CPP_TARGETS for t in targets):
        cxx = clang()
        if cxx is None or not libfuzzer_available(cxx):
            print(
                "run: needs clang with libFuzzer (apt-get install clang-14 libclang-rt-14-dev)",
                file=sys.stderr,
            )
            return 2
        try:
            build(args.build_dir, cxx)
        except subprocess.CalledProcessError as exc:
            print(f"run: build failed:\n{exc.stdout}\n{exc.stderr}", file=sys.stderr)
            return 2
    failed = False
    for t in targets:
        runs = [replay(t, args.build_dir)]
        if not args.replay:
            runs.append(fuzz(t, args.time, args.build_dir))
        for res in runs:
            if not res.ok:
                failed = True
                print(res.log[-8000:], file=sys.stderr)
                saved = f", input saved as {res.artifact}" if res.artifact else ""
                print(f"{t}: FAILED{saved}", file=sys.stderr)
        res = runs[-1]
        print(
            f"{t}: {res.executions} executions, cov {res.coverage}, ft {res.features}, "
            f"corpus {res.corpus}, {res.seconds:.0f} s",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
