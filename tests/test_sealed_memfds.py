"""Memfds that another process maps are sealed against shrinking, and receivers check it.

A ``MAP_SHARED`` mapping faults with SIGBUS on a page past the end of its file, so whoever can
``ftruncate`` a memfd a standby maps can kill the standby. memfd_create(2): ``MFD_ALLOW_SEALING``;
fcntl(2), "File Sealing": with ``F_SEAL_SHRINK`` set, an ``ftruncate`` that shrinks the file
fails with ``EPERM`` (``F_SEAL_GROW``: one that grows it), and ``F_SEAL_SEAL`` forbids further
changes to the seals. The creators seal; every receiver checks before ``mmap``. No mocks: real
memfds, real seals, the real message handlers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator

import pytest

from mlx5tlp import engine, handover
from mlx5tlp._memfd import SEALS, sealed_memfd
from mlx5tlp.errors import InvalidHandleError
from mlx5tlp.handover.engine_node import EngineNode, region_layout
from mlx5tlp.handover.node import Node, default_spec
from mlx5tlp.handover.state import STATE_VERSION, SharedState, state_size

SHRINK_GROW_SEAL = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def assert_sealed(fd: int, size: int) -> None:
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SHRINK_GROW_SEAL == SHRINK_GROW_SEAL
    assert os.fstat(fd).st_size == size
    for bad in (0, size - 4096 if size > 4096 else 1, size + 4096):
        with pytest.raises(PermissionError) as exc:  # EPERM: fcntl(2) "File Sealing"
            os.ftruncate(fd, bad)
        assert exc.value.errno == errno.EPERM
    with pytest.raises(PermissionError):  # F_SEAL_SEAL: the seals cannot be taken back
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    assert os.fstat(fd).st_size == size


@pytest.fixture
def state() -> Iterator[SharedState]:
    st = SharedState.create(default_spec(), generation=3)
    yield st
    st.close()


def unsealed_copy(data: bytes, size: int) -> int:
    fd = os.memfd_create("test-unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, data[:size], 0)
    return fd


def test_creators_seal_their_memfds(state: SharedState) -> None:
    assert SEALS == SHRINK_GROW_SEAL
    assert_sealed(state.fd, state_size())
    fd = sealed_memfd("test", 8192)
    try:
        assert_sealed(fd, 8192)
    finally:
        os.close(fd)
    # The native regions' own memfds (regions.cpp), which a handover primary sends.
    mem = engine.MemoryRegion(0, 0, 0x3000, name="mem")
    regs = engine.RegisterRegion(0, 0x4000, [engine.Register("a", 0), engine.Register("b", 8)])
    assert_sealed(mem.fd, 0x3000)
    assert_sealed(regs.fd, 16)  # one u64 per register


def test_attach_refuses_an_unsealed_or_short_state_memfd(state: SharedState) -> None:
    block = state.snapshot() + bytes(state_size() - len(state.snapshot()))
    fd = unsealed_copy(block, state_size())  # a valid state block, but shrinkable
    with pytest.raises(handover.StateMismatchError) as exc:
        SharedState.attach(fd, default_spec())  # takes the fd, closes it on failure
    msg = str(exc.value)
    assert exc.value.errno == errno.EPROTO
    assert "the state memfd" in msg and "not sealed against shrinking" in msg
    assert f"has {state_size()} bytes, {state_size()} needed" in msg
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by attach
    short = sealed_memfd("test-short", 4096)
    with pytest.raises(handover.StateMismatchError) as exc:
        SharedState.attach(short, default_spec())
    assert exc.value.errno == errno.EPROTO
    assert f"has 4096 bytes, {state_size()} needed" in str(exc.value)
    # The real one still attaches.
    SharedState.attach(os.dup(state.fd), default_spec()).close()


def forged_fds(state: SharedState, memory_fd: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), os.dup(state.fd), memory_fd]


def test_objects_message_with_an_unsealed_memory_memfd_is_refused(state: SharedState) -> None:
    fields = {"memory_size": 65536, "bar_base": 0, "channels": [0],
              "spec": json.dumps(default_spec().to_dict())}
    unsealed = unsealed_copy(b"", 65536)
    fds = forged_fds(state, unsealed)
    with pytest.raises(handover.StateMismatchError) as exc:
        Node.from_message(fields, fds, [b""], b"k" * 32, None, STATE_VERSION)
    msg = str(exc.value)
    assert exc.value.errno == errno.EPROTO
    assert "the memory memfd (message fd 3 of 3)" in msg and "not sealed against shrinking" in msg
    assert "has 65536 bytes, 65536 needed" in msg
    for fd in fds:  # the message's fds are the handler's: all closed on the refusal
        with pytest.raises(OSError):
            os.fstat(fd)
    # Sealed but smaller than the memory size the message declares.
    fds = forged_fds(state, sealed_memfd("test-short", 4096))
    with pytest.raises(handover.StateMismatchError) as exc:
        Node.from_message(fields, fds, [b""], b"k" * 32, None, STATE_VERSION)
    assert "the memory memfd (message fd 3 of 3): fd " in str(exc.value)
    assert "has 4096 bytes, 65536 needed" in str(exc.value)
    # An unsealed state memfd in the message is refused the same way.
    block = state.snapshot() + bytes(state_size() - len(state.snapshot()))
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), unsealed_copy(block, state_size()),
           sealed_memfd("test-mem", 65536)]
    with pytest.raises(handover.StateMismatchError) as exc:
        Node.from_message(fields, fds, [b""], b"k" * 32, None, STATE_VERSION)
    assert "the state memfd (message fd 2 of 3)" in str(exc.value)
    assert "not sealed against shrinking" in str(exc.value)


def test_engine_objects_message_checks_every_region_memfd(state: SharedState) -> None:
    mem = engine.MemoryRegion(0, 0, 0x1000, name="mem")
    regs = engine.RegisterRegion(0, 0x1000, [engine.Register("a", 0), engine.Register("b", 4)],
                                 name="regs")
    fields = {"engine": region_layout([mem, regs]), "pages": 1,
              "spec": json.dumps(default_spec().to_dict())}

    def message(reg_fd: int) -> list[int]:
        return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), os.dup(state.fd),
                os.dup(mem.fd), reg_fd]

    # Not a regular file (a pipe): refused before anything is imported.
    r, w = os.pipe()
    os.close(w)
    fds = message(r)
    with pytest.raises(handover.StateMismatchError) as exc:
        EngineNode.from_message(fields, fds, [b""], b"k" * 32, None, STATE_VERSION, None)
    msg = str(exc.value)
    assert exc.value.errno == errno.EPROTO
    assert "the register memfd of regions[1] ('regs') (message fd 4 of 4)" in msg
    assert "is not a regular file" in msg
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    # Unsealed but large enough (a spec's `shared` file is a regular file that cannot be
    # sealed): the engine maps it under the SIGBUS guard, so the check lets it through — this
    # forged message then fails at its command fd (/dev/null), not at the region.
    fds = message(unsealed_copy(b"", 16))
    with pytest.raises(InvalidHandleError, match="is not a device context's command fd"):
        EngineNode.from_message(fields, fds, [b""], b"k" * 32, None, STATE_VERSION, None)
    fds = message(sealed_memfd("test-short", 8))
    with pytest.raises(handover.StateMismatchError) as exc:
        EngineNode.from_message(fields, fds, [b""], b"k" * 32, None, STATE_VERSION, None)
    assert "(message fd 4 of 4): fd " in str(exc.value)
    assert "has 8 bytes, 16 needed" in str(exc.value)
    # A malformed layout entry is a protocol error, not a KeyError.
    bad = dict(fields, engine=[{"kind": "memory", "name": "mem"}, fields["engine"][1]])
    with pytest.raises(handover.HandoverError) as exc:
        EngineNode.from_message(bad, message(os.dup(regs.fd)), [b""], b"k" * 32, None,
                                STATE_VERSION, None)
    # (Named by the standby's field checks, handover/_fields.py: the entry and the field.)
    assert exc.value.errno == errno.EPROTO and "'engine[0].bar'" in str(exc.value), exc.value
