"""Hostile spec files for ``mlx5tlp serve SPEC`` / ``mlx5tlp.served.load``.

Every bad file is refused with an ``InvalidArgumentError`` naming the file and the key, when
the file is read and before anything is allocated; nothing crashes, hangs or is left behind.
The shared-file rules are the usual ones for a privileged process opening a path it was given
(symbolic links: open(2) O_NOFOLLOW; another user's file; posix_fallocate(3) so a full file
system is an error, not a SIGBUS when the mapped page is first touched: mmap(2) "SIGBUS").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import served
from test_serve import _MEM, _REG, _spec_with

_CB = {"kind": "callback", "bar": 0, "offset": 0, "size": 64, "handler": "m:f"}


@pytest.mark.parametrize("regions, top, message", [
    # Sizes and offsets are bounded by the BAR the function declares (BAR 0: 64 KiB here),
    # before the region is mapped: a 2^62-byte region never reaches mmap.
    ([{**_MEM, "size": 2**62}], {}, "regions[0]: [0x0, 0x4000000000000000) is outside BAR 0 "
     "of 0x10000 bytes"),
    ([{**_MEM, "offset": "0x" + "f" * 30 + "0"}], {}, "is outside BAR 0 of 0x10000 bytes"),
    ([{**_MEM, "offset": 0xF000, "size": 0x2000}], {}, "regions[0]: [0xf000, 0x11000) is "
     "outside BAR 0"),
    ([{**_MEM, "bar": 2}], {}, "regions[0].bar: the function declares no BAR 2 (BARs: 0)"),
    ([{**_MEM, "bar": 6}], {}, "regions[0].bar: the function declares no BAR 6"),
    ([_MEM, {**_MEM, "offset": 0xFFC, "size": 8}], {}, "regions[1]: overlaps regions[0] in BAR 0"),
    ([{**_REG, "offset": 0}, _MEM], {}, "overlaps regions[0] in BAR 0"),
    ([{**_REG, "size": 4, "registers": [{"name": "a", "offset": 4}]}], {},
     "regions[0].registers[0].offset: 0x4 + 4 bytes is past the region's size 0x4"),
    ([{**_REG, "registers": [{"name": "a", "offset": 2**64}]}], {}, "is outside BAR 0"),
    ([{**_REG, "registers": [{"name": "a", "offset": 0, "reset": 2**80}]}], {},
     "regions[0].registers[0].reset: 0x100000000000000000000 does not fit 4 bytes"),
    ([{**_REG, "registers": [{"name": "a", "offset": 0, "width": 1, "reserved": 0x100}]}], {},
     "regions[0].registers[0].reserved: 0x100 does not fit 1 bytes"),
    ([{**_CB, "deadline": 10**400}], {}, "regions[0].deadline: 1000000"),
    ([{**_CB, "deadline": float("nan")}], {}, "regions[0].deadline: nan is not 0 < seconds"),
    ([{**_MEM, "kind": ["memory"]}], {}, "regions[0].kind: ['memory'] is not one of memory"),
    ([{**_MEM, "kind": {"a": 1}}], {}, "regions[0].kind: {'a': 1} is not one of memory"),
    ([{**_MEM, "kind": None}], {}, "regions[0].kind: None is not one of memory"),
    ([], {"version": True}, "version: this package reads version 1, not True"),
    ([], {"version": 1.0}, "version: this package reads version 1, not 1.0"),
])
def test_hostile_fields_are_refused_when_the_file_is_read(
        tmp_path: Path, regions: Any, top: dict[str, Any], message: str) -> None:
    path = _spec_with(tmp_path, regions, **top)
    with pytest.raises(mlx5tlp.InvalidArgumentError) as info:
        served.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


@pytest.mark.parametrize("name, text", [
    ("deep.json", "[" * 200_000 + "]" * 200_000),
    ("deepobj.json", '{"a":' * 100_000 + "1" + "}" * 100_000),
    ("deep.toml", "a = " + "[" * 200_000 + "]" * 200_000),
])
def test_deep_nesting_is_a_syntax_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="nested too deeply"):
        served.load(path)


def test_huge_and_special_files_are_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(served.MAX_SPEC_BYTES + 1)  # sparse: refused by its size, never read
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="4194305 bytes, more than the 4194304"):
        served.load(big)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="/dev/zero: not a regular file"):
        served.load("/dev/zero")  # endless: would be read until memory ran out
    fifo = tmp_path / "spec.json"
    os.mkfifo(fifo)  # no writer: a blocking open would hang
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="not a regular file"):
        served.load(fifo)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="not a regular file"):
        served.load(tmp_path)


def _shared_spec(tmp_path: Path, shared: Path, **mem: Any) -> Path:
    return _spec_with(tmp_path, [{**_MEM, "shared": str(shared), **mem}])


def test_a_shared_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    link = tmp_path / "bar0.bin"
    link.symlink_to(victim)
    spec = served.load(_shared_spec(tmp_path, link, fill=0xA5))
    with pytest.raises(mlx5tlp.InvalidArgumentError, match=r"regions\[0\]\.shared: .*bar0.bin"):
        spec.regions_for_engine()
    assert victim.read_bytes() == b"keep me"  # neither grown nor overwritten


def test_a_shared_fifo_or_another_users_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="not a regular file"):
        served.load(_shared_spec(tmp_path, fifo)).regions_for_engine()
    if os.geteuid() != 0:
        return  # only root can give a file to another user; the FIFO part ran
    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"\x00" * 16)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="owned by uid 65534"):
        served.load(_shared_spec(tmp_path, theirs, fill=1)).regions_for_engine()
    assert theirs.read_bytes() == b"\x00" * 16 and theirs.stat().st_size == 16


def test_a_shared_file_on_a_full_file_system_is_an_error_not_sigbus(tmp_path: Path) -> None:
    # A 64 KiB tmpfs cannot hold a 1 MiB region: with a sparse ftruncate the fill (or the
    # first host write) would touch an unbacked page and the server would die of SIGBUS.
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(8) to make a small file system")
    try:
        spec = _spec_with(tmp_path, [{**_MEM, "size": 1 << 20, "shared": str(mnt / "b.bin"),
                                      "fill": 0xA5}],
                          bars=[{"index": 0, "kind": "mem32", "size": 1 << 20}])
        probe = ("import sys; from mlx5tlp import served\n"
                 "try:\n    served.load(sys.argv[1]).regions_for_engine()\n"
                 "except Exception as e:\n    print(type(e).__name__, e)\n")
        run = subprocess.run([sys.executable, "-c", probe, str(spec)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, (run.returncode, run.stderr)  # -7 was SIGBUS
        assert "InvalidArgumentError" in run.stdout and "No space left on device" in run.stdout
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_large_fill_is_written_in_chunks(tmp_path: Path) -> None:
    size = 3 * (1 << 20) + 4096  # a few chunks and a partial one
    spec = served.load(_spec_with(
        tmp_path, [{**_MEM, "size": size, "fill": 0x5A, "contents": "0102"}],
        bars=[{"index": 0, "kind": "mem32", "size": 4 << 20}]))
    (region,) = spec.regions_for_engine()
    assert isinstance(region, mlx5tlp.engine.MemoryRegion)
    assert region.read(0, 4) == b"\x01\x02\x5a\x5a"
    assert region.read(size - 8, 8) == b"\x5a" * 8
    assert region.read((1 << 20) - 2, 4) == b"\x5a" * 4


def test_the_spec_directory_is_not_left_on_sys_path(tmp_path: Path) -> None:
    # A spec's directory is searched for its hooks only: left first on sys.path, a spec in a
    # shared directory would shadow modules the process imports later.
    (tmp_path / "myhooks.py").write_text("def f(requests):\n    return None\n")
    (tmp_path / "surprise_module_x.py").write_text("raise SystemExit('imported')\n")
    spec = served.load(_spec_with(tmp_path, [{**_CB, "handler": "myhooks:f"}]))
    before = list(sys.path)
    (region,) = spec.regions_for_engine()
    assert sys.path == before
    with pytest.raises(ModuleNotFoundError):
        __import__("surprise_module_x")
    del region
    sys.modules.pop("myhooks", None)


def test_hook_names_that_import_surprising_things_are_named(tmp_path: Path) -> None:
    for handler, message in [("..rel:f", "cannot import module '..rel'"),
                             ("os:path.nope", "module 'os' has no 'path.nope'"),
                             ("json:__name__", "'json:__name__' is not callable")]:
        spec = served.load(_spec_with(tmp_path, [{**_CB, "handler": handler}]))
        with pytest.raises(mlx5tlp.InvalidArgumentError, match=r"regions\[0\].handler: "):
            try:
                spec.regions_for_engine()
            except mlx5tlp.InvalidArgumentError as e:
                assert message in str(e), str(e)
                raise


def test_serve_refuses_a_hostile_file_on_one_line(tmp_path: Path) -> None:
    path = _spec_with(tmp_path, [{**_MEM, "size": 2**62}])
    run = subprocess.run([sys.executable, "-m", "mlx5tlp", "serve", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "outside BAR 0" in run.stderr, run.stderr
    json.dumps(run.stderr)


def test_two_registers_of_one_name_are_refused(tmp_path: Path) -> None:
    # Hooks and region[name] address registers by name: with two "a", a hooked read of the
    # second set the first one's value.
    path = _spec_with(tmp_path, [{**_REG, "registers": [
        {"name": "a", "offset": 0}, {"name": "a", "offset": 4, "on_read": "m:f"}]}])
    with pytest.raises(mlx5tlp.InvalidArgumentError,
                       match=r"regions\[0\]\.registers\[1\]\.name: 'a' is the name of "
                             r"registers\[0\] too"):
        served.load(path)  # when the file is read, before any hook is imported
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="is the name of registers"):
        mlx5tlp.engine.RegisterRegion(0, 0, [mlx5tlp.engine.Register("x", 0),
                                             mlx5tlp.engine.Register("x", 4)])


def test_huge_max_seconds_are_refused_before_serving(tmp_path: Path) -> None:
    # threading's waits overflow time_t beyond ~9.2e9 s: --max-seconds 1e10 raised
    # OverflowError after `serving` was printed.
    path = _spec_with(tmp_path, [_MEM])
    for value in ("1e10", "inf", "nan", "0"):
        run = subprocess.run([sys.executable, "-m", "mlx5tlp", "serve", str(path),
                              "--max-seconds", value], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2 and run.stdout == "", (value, run.stderr)
        assert "--max-seconds: must be a number of seconds > 0 and <= 1e+09" in run.stderr
    spec = served.load(path)
    for bad in (1e10, float("nan"), 0, -1, True):
        with pytest.raises(ValueError, match="max_seconds must be None or seconds"):
            served.serve(spec, device="unused", max_seconds=bad)
