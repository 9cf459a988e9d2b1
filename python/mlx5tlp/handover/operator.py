"""The operator's side of the control socket: ask a primary to hand over, stop, or report."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any

from mlx5tlp.handover.errors import HandoverAborted, HandoverError
from mlx5tlp.handover.standby import connect
from mlx5tlp.handover.wire import Wire

__all__ = ["ACTIONS", "request"]

ACTIONS = ("handover", "stop", "status")


def request(path: str, key: bytes, action: str = "handover", *,
            timeout: float = 10.0) -> dict[str, Any]:
    """Send one operator request to the primary at `path` and return its answer's fields.

    ``"handover"``: the primary tells its first ready standby to ask for the function; returns
    ``{"generation": <new>, "successor": <pid>}`` once committed. ``"stop"``: standbys are told
    to shut down, the primary stops serving (and frees the function's objects as it closes).
    ``"status"``: generation, requests served, handovers, rollbacks, standbys.

    Raises:
        ValueError: unknown action.
        HandoverAborted: the handover rolled back (the old primary serves again).
        HandoverError: no primary, no ready standby (``ENOENT``), or the step failed.
        AuthenticationError: another key, or the primary's uid is not allowed.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    sock = connect(path, timeout)
    with contextlib.closing(sock):
        wire, welcome = Wire.client(sock, key, {"role": "operator", "pid": os.getpid()},
                                    timeout=timeout)
        welcome.close_fds()
        wire.send("request", {"action": action})
        try:
            reply = wire.recv(timeout=timeout)
        except HandoverError as exc:
            if action == "handover" and exc.errno == errno.ECANCELED:
                raise HandoverAborted(exc.errno, str(exc), "handover") from None
            raise
        reply.close_fds()
        return dict(reply.fields)
