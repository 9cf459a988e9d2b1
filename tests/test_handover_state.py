"""The handover state block: shared across processes, versioned, and sealed snapshots checked."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx5tlp import handover
from mlx5tlp.errors import InvalidArgumentError
from mlx5tlp.function import Bar, FunctionSpec, Identity
from mlx5tlp.handover.node import default_spec
from mlx5tlp.handover.state import HEADER_SIZE, SharedState, open_snapshot, seal_snapshot

KEY = b"s" * 32


@pytest.fixture
def state() -> Iterator[SharedState]:
    st = SharedState.create(default_spec(), generation=3)
    yield st
    st.close()


def scratch(st: SharedState) -> int:
    assert st.function is not None
    return int(st.function._layout["vendor_caps"][0]) + 4


def test_sealed_snapshot_round_trip(state: SharedState) -> None:
    blob = seal_snapshot(state.snapshot(), KEY, 3)
    assert open_snapshot(blob, KEY, generation=3, digest=state.digest) == state.snapshot()


def test_forged_snapshot_is_refused(state: SharedState) -> None:
    blob = bytearray(seal_snapshot(state.snapshot(), KEY, 3))
    with pytest.raises(handover.AuthenticationError) as exc:
        open_snapshot(bytes(blob), b"x" * 32, generation=3, digest=state.digest)
    assert exc.value.errno == errno.EBADMSG and "HMAC" in str(exc.value)
    blob[32 + 8 + HEADER_SIZE + 100] ^= 1  # one bit of the configuration space
    with pytest.raises(handover.AuthenticationError) as exc:
        open_snapshot(bytes(blob), KEY, generation=3, digest=state.digest)
    assert exc.value.errno == errno.EBADMSG
    with pytest.raises(handover.AuthenticationError):
        open_snapshot(bytes(blob[:50]), KEY, generation=3, digest=state.digest)


def test_stale_snapshot_is_refused(state: SharedState) -> None:
    old = seal_snapshot(state.snapshot(), KEY, 3)
    with pytest.raises(handover.AuthenticationError) as exc:
        open_snapshot(old, KEY, generation=4, digest=state.digest)  # the lease moved on
    assert exc.value.errno == errno.ESTALE and "generation 3" in str(exc.value)
    # A snapshot sealed for generation 4 over a header still at 3 is refused as well.
    with pytest.raises(handover.AuthenticationError) as exc:
        open_snapshot(seal_snapshot(state.snapshot(), KEY, 4), KEY, generation=4,
                      digest=state.digest)
    assert exc.value.errno == errno.ESTALE


def test_snapshot_of_another_version_or_function_is_refused(state: SharedState) -> None:
    blob = seal_snapshot(state.snapshot(), KEY, 3)
    with pytest.raises(handover.StateMismatchError) as exc:
        open_snapshot(blob, KEY, generation=3, digest=state.digest, version=2)
    assert exc.value.errno == errno.EPROTO and "migrate" in str(exc.value)
    with pytest.raises(handover.StateMismatchError) as exc:
        open_snapshot(blob, KEY, generation=3, digest=state.digest ^ 1)
    assert exc.value.errno == errno.EINVAL and "digest" in str(exc.value)


def test_attach_refuses_another_function(state: SharedState) -> None:
    other = FunctionSpec(identity=Identity(vendor_id=1, device_id=2, class_code=0),
                         bars=[Bar(0, "mem32", 4096)])
    with pytest.raises(handover.StateMismatchError) as exc:
        SharedState.attach(os.dup(state.fd), other)
    assert exc.value.errno == errno.EINVAL


ADOPT = """
import os, sys
from mlx5tlp.handover.node import default_spec
from mlx5tlp.handover.state import SharedState
st = SharedState.attach(int(sys.argv[1]), default_spec())
f = st.adopt(4)
print(hex(f.config_read(int(sys.argv[2]), 4)))
f.config_write(int(sys.argv[2]), 0x0BADF00D, 4)
st.close()
"""


def test_another_process_continues_from_the_shared_state(state: SharedState) -> None:
    assert state.function is not None
    reg = scratch(state)
    state.function.config_write(reg, 0x12345678, 4)
    out = subprocess.run([sys.executable, "-c", ADOPT, str(state.fd), str(reg)],
                         pass_fds=(state.fd,), capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, SKBUILD_EDITABLE_VERBOSE="0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0x12345678"
    # ... and what the successor wrote is here, with its generation in the header.
    assert state.function.config_read(reg, 4) == 0x0BADF00D
    assert state.header()[0] == 4


def test_summary_hashes_the_block_in_place(state: SharedState) -> None:
    from mlx5tlp.handover.state import state_summary

    assert state.summary() == state_summary(state.snapshot())
    before = state.summary()
    assert state.function is not None
    off = scratch(state)
    state.function.config_write(off, 0x5A5A5A5A, 4)
    assert state.summary() != before and state.summary() == state_summary(state.snapshot())


def test_lease_reclaim_keeps_the_generation_nobody_took(tmp_path: Path) -> None:
    """A planned handover releases the lease naming the successor; the old primary takes it
    back at the same generation when the successor never took it, and at a new one when the
    successor took it and gave it back (docs/handover.md, "Planned handover")."""
    d = os.path.join(str(tmp_path), "ctl")
    os.mkdir(d, 0o700)
    path = os.path.join(d, "fn.lease")
    a = handover.Lease(path)
    try:
        assert a.acquire(0.0) == 1
        a.release(successor=os.getpid())
        assert a.reclaim(1, 0.0) == 1 and a.held
        rec = a.read()
        assert rec is not None and (rec.generation, rec.successor) == (1, 0)
        # The successor (another open file description: another OFD lock owner) takes it...
        a.release(successor=os.getpid())
        b = handover.Lease(path)
        try:
            assert b.acquire(0.0) == 2
            with pytest.raises(handover.LeaseHeldError) as exc:
                a.reclaim(1, 0.0)  # ...and serves: the old primary must step down
            assert exc.value.errno == errno.EBUSY
            b.release(successor=os.getpid())  # ...or gives it back
            assert a.reclaim(1, 0.0) == 3
        finally:
            b.close()
    finally:
        a.close()


@pytest.mark.parametrize("bad", [math.nan, -1e-9, -math.inf, "soon"])
def test_lease_waits_refuse_nan_negative_and_non_numbers(tmp_path: Path, bad: Any) -> None:
    """The lease's waits take seconds as the core's Deadline does (deadline.hpp): NaN and
    negative values are an error naming the parameter, never a wait that cannot end (a NaN
    deadline never compares as expired)."""
    d = os.path.join(str(tmp_path), "ctl")
    os.mkdir(d, 0o700)
    holder = handover.Lease(os.path.join(d, "fn.lease"))
    other = handover.Lease(os.path.join(d, "fn.lease"))
    try:
        assert holder.acquire(0.0) == 1
        for call in (lambda: other.acquire(bad), lambda: other.reclaim(1, bad)):
            with pytest.raises(InvalidArgumentError, match="lease timeout") as exc:
                call()
            assert exc.value.errno == errno.EINVAL
        # A huge timeout is "no limit", not an overflow: the holder goes, the wait ends.
        t = threading.Timer(0.05, holder.close)
        t.start()
        assert other.acquire(1e300) == 2
        t.join()
    finally:
        holder.close()
        other.close()


def test_connect_refuses_a_nan_timeout_before_trying(tmp_path: Path) -> None:
    from mlx5tlp.handover.standby import connect

    with pytest.raises(InvalidArgumentError, match="connect timeout is NaN"):
        connect(str(tmp_path / "nobody"), math.nan)
    with pytest.raises(handover.HandoverError) as exc:  # 0: one attempt, then the error
        connect(str(tmp_path / "nobody"), 0.0)
    assert exc.value.errno == errno.ENOENT


def test_no_gc_holds_collection_off_and_restores_what_was() -> None:
    import gc

    from mlx5tlp.handover.gcpause import no_gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_gc():
        assert not gc.isenabled()
        raise RuntimeError("a failed step re-enables it too")
    assert gc.isenabled()
    gc.disable()  # a process that runs without automatic collection keeps it so
    try:
        with no_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
