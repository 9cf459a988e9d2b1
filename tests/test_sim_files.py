"""The software device's files as hostile input, and errors that name the real cause.

- D1: a device directory another user made or can write is refused; a planted symlink is
  refused, never followed (root: a second uid plays the attacker in a forked child).
- D2: a damaged state file is refused with EPROTO naming the file and the field; random
  damage never crashes a process that opens the device (fuzzed in a subprocess).
- D3: device files are allocated up front: a full filesystem fails at creation (ENOSPC).
- D8: RLIMIT_MEMLOCK counts the process's total registered pages.
- D9: an unusable MLX5TLP_SIM_DIR or fd exhaustion is reported as such, with the path.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import sim

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mlx5tlp.__file__)))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a second uid; mount)")


def as_user(uid: int, fn: Callable[[], Any], env: dict[str, str | None] | None = None) -> Any:
    """Run fn() in a forked child as `uid` (setgid + setuid, no exec); its result or error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            for k, v in (env or {}).items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out: list[Any] = ["ok", fn()]
        except BaseException as exc:  # report everything to the parent
            out = ["err", type(exc).__name__, getattr(exc, "errno", None), str(exc)]
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return json.loads(data)


@contextmanager
def use_sim_dir(monkeypatch: pytest.MonkeyPatch, path: str) -> Iterator[str]:
    monkeypatch.setenv("MLX5TLP_SIM_DIR", path)
    yield path


def refused(call: Callable[[], object]) -> mlx5tlp.Error:
    with pytest.raises(mlx5tlp.Error) as exc:
        call()
    assert "no device named" not in str(exc.value)
    return exc.value


ATTACKER = 40000 + os.getpid() % 10000


# -- D1: directories and files of other users -------------------------------------------------


@needs_root
def test_refuses_a_device_directory_of_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o1777)  # a shared place, like /tmp
        root = os.path.join(base, "devices")
        assert as_user(ATTACKER, lambda: os.mkdir(root, 0o755)) == ["ok", None]
        with use_sim_dir(monkeypatch, root):
            err = refused(lambda: mlx5tlp.list_devices("sim"))
            assert err.errno == errno.EACCES
            assert root in str(err) and f"owned by uid {ATTACKER}" in str(err)
            assert os.listdir(root) == []  # nothing of ours was put there


@needs_root
def test_refuses_group_or_world_writable_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as root, use_sim_dir(monkeypatch, root):
        for mode in (0o777, 0o770, 0o722):
            os.chmod(root, mode)
            err = refused(lambda: sim.device_stats())
            assert err.errno == errno.EACCES and root in str(err) and oct(mode)[2:] in str(err)
        os.chmod(root, 0o755)  # readable by others is the user's choice for MLX5TLP_SIM_DIR
        assert sim.device_stats()["contexts"] == 0


@needs_root
def test_planted_device_of_another_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user plants mlx5_sim0 whose `bar` is a symlink to a file of the victim."""
    with tempfile.TemporaryDirectory() as root, use_sim_dir(monkeypatch, root):
        precious = Path(root).parent / f"precious-{os.getpid()}"
        precious.write_bytes(b"the victim's data" * 1000)
        try:
            os.chmod(root, 0o777)  # a window in which the attacker could write

            def plant() -> None:
                dev = os.path.join(root, "mlx5_sim0")
                os.mkdir(dev, 0o755)
                Path(dev, "state").write_bytes(b"\0" * 4096)
                os.symlink(precious, os.path.join(dev, "bar"))

            assert as_user(ATTACKER, plant) == ["ok", None]
            os.chmod(root, 0o700)
            err = refused(lambda: mlx5tlp.open_device())
            assert err.errno == errno.EACCES and f"owned by uid {ATTACKER}" in str(err)
            # Even in a directory of ours a symlinked device file is refused, not followed.
            dev = os.path.join(root, "mlx5_sim0")
            shutil.rmtree(dev)
            sim.create_device("planted")
            bar = os.path.join(root, "planted", "bar")
            os.unlink(bar)
            os.symlink(precious, bar)
            err = refused(lambda: mlx5tlp.open_device("planted"))
            assert err.errno == errno.EACCES and "symbolic link" in str(err) and bar in str(err)
            assert precious.read_bytes() == b"the victim's data" * 1000
        finally:
            precious.unlink()


@needs_root
def test_precreated_default_directory_of_another_user() -> None:
    """/dev/shm/mlx5tlp-sim-<victim uid> made by someone else first: never used."""
    victim = ATTACKER + 1
    default = f"/dev/shm/mlx5tlp-sim-{victim}"
    no_env: dict[str, str | None] = {"MLX5TLP_SIM_DIR": None}
    shutil.rmtree(default, ignore_errors=True)
    try:
        # Without an attacker: created by the victim, private.
        got = as_user(victim, lambda: [d.name for d in mlx5tlp.list_devices("sim")], no_env)
        assert got == ["ok", ["mlx5_sim0"]]
        st = os.stat(default)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (victim, 0o700)
        for f in ("state", "bar"):
            fst = os.stat(os.path.join(default, "mlx5_sim0", f))
            assert (fst.st_uid, stat.S_IMODE(fst.st_mode)) == (victim, 0o600)
        shutil.rmtree(default)
        # The attacker was first: a world-writable directory, or a symlink to its own.
        for kind in ("dir", "symlink"):
            theirs = f"/dev/shm/mlx5tlp-attacker-{os.getpid()}"

            def precreate(k: str = kind, t: str = theirs) -> None:
                if k == "dir":
                    os.mkdir(default, 0o777)
                    os.chmod(default, 0o777)
                else:
                    os.mkdir(t, 0o777)
                    os.symlink(t, default)

            assert as_user(ATTACKER, precreate) == ["ok", None]
            got = as_user(victim, lambda: sim.device_stats(), no_env)
            assert got[0] == "err" and got[2] in (errno.EACCES, errno.ENOTDIR), got
            assert default in got[3]
            if kind == "dir":
                assert os.listdir(default) == []  # the victim's BAR never went there
                shutil.rmtree(default)
            else:
                assert os.listdir(theirs) == []
                os.unlink(default)
                shutil.rmtree(theirs)
    finally:
        if os.path.islink(default):
            os.unlink(default)
        shutil.rmtree(default, ignore_errors=True)


# -- D2: damaged state -----------------------------------------------------------------------


def test_damaged_state_is_refused_naming_file_and_field(device: str, sim_dir: str) -> None:
    path = os.path.join(sim_dir, device, "state")
    with open(path, "r+b") as f:
        f.seek(16 + 4 * 4)  # m5a_sim_device_config.gw_slot_size (a divisor of the host model)
        f.write(struct.pack("<I", 0))
    # A fresh process opens the file anew (this one keeps its validated mapping).
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {PYTHON_DIR!r})
        import mlx5tlp
        from mlx5tlp import sim
        for call in (lambda: sim.device_stats({device!r}), lambda: mlx5tlp.open_device({device!r}),
                     lambda: sim.Host({device!r})):
            try:
                call()
                print("opened")
            except mlx5tlp.Error as e:
                print(e.errno, e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.startswith(f"{errno.EPROTO} ") and path in line and "slot_size" in line, line
    with open(path, "r+b") as f:  # repair it so the fixture can remove the device
        f.seek(16 + 4 * 4)
        f.write(struct.pack("<I", 256))


FUZZ = """
import os, random, sys
sys.path.insert(0, {python_dir!r})
import mlx5tlp
from mlx5tlp import sim
random.seed({seed})
root = os.environ["MLX5TLP_SIM_DIR"]
sim.create_device("base")
ctx = mlx5tlp.open_device("base")
host = sim.Host("base")
keep = [ctx.alloc_var(tlp=True), ctx.alloc_var(tlp=False),
        ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))]
host.send_request(bytes([4, 0, 0, 1, 0, 1, 7, 15, 1, 0, 0, 16]))
pristine = open(os.path.join(root, "base", "state"), "rb").read()
opened = refused = 0
for i in range({iterations}):
    name = "fz%d" % i
    sim.create_device(name)
    b = bytearray(pristine)
    for _ in range(random.randint(1, 8)):
        off = random.randrange(0x20000 if random.random() < 0.8 else len(b))
        b[off] = random.randrange(256)
    with open(os.path.join(root, name, "state"), "r+b") as f:
        f.write(b)
    try:
        sim.device_stats(name)
    except mlx5tlp.Error as e:
        assert e.errno == 71 and "state file" in str(e), e
        refused += 1
        continue
    opened += 1
    with mlx5tlp.open_device(name) as c, sim.Host(name) as h:
        try:
            v = c.alloc_var(tlp=True)
            v.free()
        except mlx5tlp.Error:
            pass
        h.completion_records(timeout=0)
        sim.take_request(c, 0)
    sim.reset_device(name)
print(opened, refused)
"""


def test_fuzzed_state_never_crashes() -> None:
    with tempfile.TemporaryDirectory() as root:
        code = FUZZ.format(python_dir=PYTHON_DIR, seed=20240901, iterations=120)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "MLX5TLP_SIM_DIR": root})
    assert out.returncode == 0, f"the fuzzed process died: {out.returncode}\n{out.stderr[-3000:]}"
    opened, refused_ = (int(x) for x in out.stdout.split())
    assert opened + refused_ == 120 and opened > 0 and refused_ > 0


# -- D3 / D9: unusable directories, full filesystems, fd exhaustion --------------------------


@contextmanager
def tmpfs(size: str, *options: str) -> Iterator[str]:
    mnt = tempfile.mkdtemp(prefix="mlx5tlp-tmpfs-")
    os.chmod(mnt, 0o700)
    opts = ",".join((f"size={size}", "mode=0700", *options))
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)


@needs_root
def test_full_filesystem_fails_at_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    with tmpfs("1m") as mnt, use_sim_dir(monkeypatch, mnt):
        err = refused(lambda: sim.create_device("big", gw_pages=15, gw_log_stride=4))
        assert err.errno == errno.ENOSPC and mnt in str(err) and "full" in str(err)
        err = refused(lambda: mlx5tlp.open_device())  # the default device cannot be made
        assert err.errno == errno.ENOSPC and mnt in str(err)
        assert [e for e in os.listdir(mnt) if not e.startswith(".")] == []  # no half device


@needs_root
def test_read_only_directory_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with tmpfs("16m", "ro") as mnt, use_sim_dir(monkeypatch, mnt):
        err = refused(lambda: mlx5tlp.open_device())
        assert err.errno == errno.EROFS and mnt in str(err)


def test_unusable_sim_dir_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with use_sim_dir(monkeypatch, str(a_file)):
        err = refused(lambda: mlx5tlp.open_device())
        assert err.errno == errno.ENOTDIR and str(a_file) in str(err)
        assert "not a directory" in str(err)
    missing = tmp_path / "no" / "such" / "dir"
    with use_sim_dir(monkeypatch, str(missing)):
        err = refused(lambda: mlx5tlp.list_devices("sim"))
        assert err.errno == errno.ENOENT and str(missing) in str(err) and "parent" in str(err)


def test_fd_exhaustion_is_named() -> None:
    code = textwrap.dedent(f"""
        import os, resource, sys
        sys.path.insert(0, {PYTHON_DIR!r})
        import mlx5tlp
        mlx5tlp.list_devices("sim")  # the library and the default device are loaded first
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            mlx5tlp.open_device()
            print("opened")
        except mlx5tlp.Error as e:
            print(e.errno, e)
    """)
    with tempfile.TemporaryDirectory() as root:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "MLX5TLP_SIM_DIR": root})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{errno.EMFILE} "), out.stdout
    assert "too many open files" in out.stdout and "no device named" not in out.stdout


# -- D8: RLIMIT_MEMLOCK on the total ------------------------------------------------------------


MEMLOCK = """
import ctypes, mmap, resource, sys
sys.path.insert(0, {python_dir!r})
import mlx5tlp
# Drop CAP_IPC_LOCK (14) from the effective set: the sim models capable(CAP_IPC_LOCK) so.
class Hdr(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]
libc = ctypes.CDLL(None, use_errno=True)
hdr, data = Hdr(0x20080522, 0), (Data * 2)()
assert libc.capget(ctypes.byref(hdr), data) == 0
data[0].effective &= ~(1 << 14)
assert libc.capset(ctypes.byref(hdr), data) == 0
page = mmap.PAGESIZE
resource.setrlimit(resource.RLIMIT_MEMLOCK, (3 * page, 3 * page))
ctx = mlx5tlp.open_device()
a = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(page))
b = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(page))
try:
    ctx.reg_umem(mlx5tlp.alloc_umem_buffer(2 * page))  # 2 pages alone fit; 4 in total do not
    print("registered")
except mlx5tlp.ResourceExhaustedError as e:
    print(e.errno)
a.free()
c = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(2 * page))  # 1 + 2 pages: fits again
print("ok")
"""


@needs_root
def test_memlock_counts_the_process_total() -> None:
    with tempfile.TemporaryDirectory() as root:
        out = subprocess.run([sys.executable, "-c", MEMLOCK.format(python_dir=PYTHON_DIR)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MLX5TLP_SIM_DIR": root})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(errno.ENOMEM), "ok"]
