"""Live upgrade and crash takeover of an emulated function (issue 13).

Roles: one serving :class:`Primary` per function (enforced by the :class:`~.lease.Lease`, an OFD
lock the kernel drops when its holder dies) and any number of :class:`Standby` processes, each
holding a duplicate of the context's command fd, imports of the shared objects and a mapping of
the function's state. Between them, a UNIX control socket with peer-credential checks and
HMAC-signed messages (:mod:`.wire`). Planned handover: ``Standby.promote()`` (or
``request(path, key)``, which makes a standby ask); crash takeover: ``Standby.wait()`` detects the
primary's death and takes over, answering every request the dead primary left exactly once.

The protocol, its assumptions and failure cases: ``docs/handover.md``.
"""

from __future__ import annotations

from mlx5tlp.handover.errors import (
    AuthenticationError,
    HandoverAborted,
    HandoverError,
    HandoverProtocolError,
    LeaseHeldError,
    StateMismatchError,
)
from mlx5tlp.handover.lease import Lease, LeaseRecord
from mlx5tlp.handover.node import default_spec, memory_pattern
from mlx5tlp.handover.operator import request
from mlx5tlp.handover.primary import Primary
from mlx5tlp.handover.standby import Standby
from mlx5tlp.handover.state import STATE_VERSION, SharedState, open_snapshot, seal_snapshot

__all__ = [
    "STATE_VERSION",
    "AuthenticationError",
    "HandoverAborted",
    "HandoverError",
    "HandoverProtocolError",
    "Lease",
    "LeaseHeldError",
    "LeaseRecord",
    "Primary",
    "SharedState",
    "StateMismatchError",
    "Standby",
    "default_spec",
    "memory_pattern",
    "open_snapshot",
    "request",
    "seal_snapshot",
]
