"""The error hierarchy and the mapping of core errors onto it."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import mlx5tlp
from mlx5tlp import _core
from mlx5tlp.gateway import MAX_RING_SLOTS

_BIND_ERRORS = Path(__file__).resolve().parents[1] / "cpp" / "bindings" / "bind_errors.cpp"

# ErrorKind values of cpp/include/mlx5tlp/error.hpp, and the class each maps to.
KINDS = [
    (0, mlx5tlp.Error),
    (1, mlx5tlp.NotSupportedError),
    (2, mlx5tlp.LibraryNotFoundError),
    (3, mlx5tlp.DeviceNotFoundError),
    (4, mlx5tlp.ResourceExhaustedError),
    (5, mlx5tlp.InvalidHandleError),
    (6, mlx5tlp.ExportFormatError),
    (7, mlx5tlp.DevxCommandError),
    (8, mlx5tlp.InvalidArgumentError),
]


@pytest.mark.parametrize(("kind", "cls"), KINDS)
def test_core_errors_map_to_the_hierarchy(kind: int, cls: type[mlx5tlp.Error]) -> None:
    with pytest.raises(cls) as exc:
        _core._raise_for_test(kind, errno.EINVAL, "some_call")
    e = exc.value
    assert type(e) is cls
    assert isinstance(e, mlx5tlp.Error) and isinstance(e, OSError)
    assert e.errno == errno.EINVAL
    assert e.operation == "some_call"
    assert str(e).startswith("some_call failed: Invalid argument (errno 22)")


def test_no_errno_is_none() -> None:
    with pytest.raises(mlx5tlp.LibraryNotFoundError) as exc:
        _core._raise_for_test(2, 0, "load x")
    assert exc.value.errno is None


def test_hierarchy() -> None:
    assert issubclass(mlx5tlp.LibraryNotFoundError, mlx5tlp.NotSupportedError)
    assert issubclass(mlx5tlp.InvalidArgumentError, ValueError)
    for _kind, cls in KINDS:
        assert issubclass(cls, mlx5tlp.Error)


def test_errors_pickle_with_their_attributes() -> None:
    e = mlx5tlp.DevxCommandError(errno.EREMOTEIO, "bad status", "mlx5dv_devx_general_cmd")
    e.status, e.syndrome = 2, 0x1234
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is mlx5tlp.DevxCommandError
    assert (back.errno, back.operation, back.status, back.syndrome) == (121, e.operation, 2, 0x1234)
    assert str(back) == "bad status"


# ---- one error model: nothing escapes as RuntimeError or a bare C++ exception (issue 10 E) ----

# What each family of C++ exception reaching a binding becomes (cpp/bindings/bind_errors.cpp).
STD_EXCEPTIONS = [
    ("bad_alloc", mlx5tlp.ResourceExhaustedError, errno.ENOMEM),
    ("system_error", mlx5tlp.ResourceExhaustedError, errno.EAGAIN),  # std::thread's failure
    ("system_error_eperm", mlx5tlp.Error, errno.EPERM),
    ("invalid_argument", mlx5tlp.InvalidArgumentError, errno.EINVAL),
    ("length_error", mlx5tlp.InvalidArgumentError, errno.EINVAL),
    ("out_of_range", mlx5tlp.InvalidArgumentError, errno.ERANGE),
    ("runtime_error", mlx5tlp.Error, errno.EIO),
    ("unknown", mlx5tlp.Error, errno.EIO),  # `throw 42`: pybind11 alone says RuntimeError
]


@pytest.mark.parametrize(("what", "cls", "err"), STD_EXCEPTIONS)
def test_std_exceptions_become_library_errors(what: str, cls: type[mlx5tlp.Error],
                                              err: int) -> None:
    with pytest.raises(mlx5tlp.Error) as exc:
        _core._throw_for_test(what)
    assert type(exc.value) is cls, type(exc.value)
    assert exc.value.errno == err
    assert not isinstance(exc.value, RuntimeError)


def test_argument_exceptions_stay_type_errors() -> None:
    # pybind11's cast_error is a RuntimeError by default: a value that does not convert is a
    # wrong argument type.
    for what in ("cast_error", "type_error"):
        with pytest.raises(TypeError):
            _core._throw_for_test(what)


def test_translator_is_module_local() -> None:
    # A global translator would change how every other pybind11 module's std::exceptions
    # surface; ours only sees our bindings' (pybind11's own test hook is not one of them).
    assert "register_local_exception_translator" in _BIND_ERRORS.read_text()
    assert "register_exception_translator(" not in _BIND_ERRORS.read_text()


def test_ring_size_above_the_maximum(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    for bad in (MAX_RING_SLOTS * 2, 1 << 40, 3, 1):
        with pytest.raises(mlx5tlp.InvalidArgumentError, match="ring_slots"):
            var.gateway(ring_slots=bad)
    # The core checks it too (native callers, and the binding called directly).
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="capacity must be a power of two"):
        _core.Gateway.open(var._core, "", False, MAX_RING_SLOTS * 2, 64, 1.0)
    with var.gateway(ring_slots=2) as gw:  # the page was not left locked by the refusals
        assert gw.state == "open"
    var.free()


# A child process runs out of address space (RLIMIT_AS just above what it uses) before each
# call; the limit also bounds pthread_create's stack mmap, so thread creation fails with EAGAIN
# (pthread_create(3)). RLIMIT_NPROC would be ignored: the tests run as root in CI.
_LIMITS_SCRIPT = r"""
import errno, json, os, resource, sys
import mlx5tlp
from mlx5tlp import engine, sim
from mlx5tlp import function as fn

def vmsize():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

def threads():
    return len(os.listdir("/proc/self/task"))

soft, hard = resource.getrlimit(resource.RLIMIT_AS)
def limited(margin_mib, call):
    resource.setrlimit(resource.RLIMIT_AS, (vmsize() + (margin_mib << 20), hard))
    try:
        call()
        return ["ok", None, ""]
    except BaseException as e:
        return [type(e).__name__, getattr(e, "errno", None), str(e)]
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

out = {}
name = sys.argv[1]
sim.create_device(name)
with mlx5tlp.open_device(name, backend="sim") as ctx:
    var = ctx.alloc_var(tlp=True)
    before = threads()
    # 4 MiB of room: the page mappings and small allocations fit, a thread's 8 MiB stack
    # does not (with 1 MiB the mmap of the page itself sometimes failed first).
    out["writer"] = limited(4, lambda: var.gateway(ring_slots=2))
    out["ring"] = limited(64, lambda: var.gateway(ring_slots=1 << 24))
    out["threads_after_gateway"] = threads() - before
    with var.gateway(ring_slots=2) as gw:  # nothing was left holding the page
        out["reopened"] = gw.state
    spec = fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
        bars=[fn.Bar(0, "mem32", 1 << 16)])
    dev = engine.Device(ctx, spec, [engine.MemoryRegion(0, 0, 0x1000)], pages=2, start=False)
    before = threads()
    out["lanes"] = limited(4, dev.start)
    out["engine_state"] = dev.state
    out["threads_after_engine"] = threads() - before
    dev.close()
    var.free()
sim.remove_device(name)
print(json.dumps(out))
"""


def test_resource_limits_raise_library_errors(sim_dir: str) -> None:
    name = f"limits{os.getpid()}"
    env = {**os.environ, "MLX5TLP_SIM_DIR": sim_dir, "MLX5TLP_BACKEND": "sim"}
    run = subprocess.run([sys.executable, "-c", _LIMITS_SCRIPT, name], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # No writer thread: before, std::system_error surfaced as RuntimeError.
    assert out["writer"][:2] == ["ResourceExhaustedError", errno.EAGAIN], out
    assert "refused the VAR" not in out["writer"][2], out
    assert "open gateway" in out["writer"][2] and "thread" in out["writer"][2]
    # No memory for the ring: before, std::bad_alloc surfaced as MemoryError.
    assert out["ring"][:2] == ["ResourceExhaustedError", errno.ENOMEM], out
    assert "create ring" in out["ring"][2]
    assert out["threads_after_gateway"] == 0 and out["reopened"] == "open"
    # An engine whose lane threads cannot start ends stopped, with no lane left running.
    assert out["lanes"][:2] == ["ResourceExhaustedError", errno.EAGAIN], out
    assert "start engine" in out["lanes"][2]
    assert out["engine_state"] == "stopped" and out["threads_after_engine"] == 0, out


def test_library_errors_that_are_also_builtin_os_errors() -> None:
    # The library's own waits, permission checks and missing files: one hierarchy, and still
    # caught by the built-in class a caller may already handle.
    for cls, builtin in ((mlx5tlp.TimedOutError, TimeoutError),
                         (mlx5tlp.PermissionDeniedError, PermissionError),
                         (mlx5tlp.NotInstalledError, FileNotFoundError)):
        assert issubclass(cls, mlx5tlp.Error) and issubclass(cls, builtin)
        e = cls(errno.EPERM, "m", "op")
        assert (e.errno, str(e), e.operation) == (errno.EPERM, "m", "op")
        assert type(pickle.loads(pickle.dumps(e))) is cls


def test_share_timeout_and_peer_refusal_are_library_errors() -> None:
    import socket

    from mlx5tlp import share

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        with pytest.raises(mlx5tlp.TimedOutError) as t:
            share.recv_fds(b, timeout=0.01)
        assert t.value.errno == errno.ETIMEDOUT
        with pytest.raises(mlx5tlp.PermissionDeniedError, match="not allowed"):
            share.recv_fds(b, allow_uids=[os.getuid() + 1], timeout=0.01)
