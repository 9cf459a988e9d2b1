"""The operator's side of the control socket: ask a primary to hand over, stop, or report."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any

from mlx5tlp.handover.errors import AuthenticationError, HandoverAborted, HandoverError
from mlx5tlp.handover.standby import connect
from mlx5tlp.handover.wire import Wire
from mlx5tlp.share import ProtocolError

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
        AuthenticationError: another key, or the primary's uid is not allowed (``EACCES``;
            a primary that hangs up on our HELLO instead of welcoming us is reported so,
            as the C++ client ``mlx5tlp::handover::request`` does).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    sock = connect(path, timeout)
    with contextlib.closing(sock):
        try:
            wire, welcome = Wire.client(sock, key, {"role": "operator", "pid": os.getpid()},
                                        timeout=timeout)
        except (ProtocolError, ConnectionError) as exc:
            # A primary refuses a HELLO whose MAC fails (another key) or whose uid it does
            # not allow by closing the connection without a word (it tells an unauthenticated
            # peer nothing), so a hang-up here means "refused", not a network fault.
            if isinstance(exc, ProtocolError) and exc.errno != errno.ECONNRESET:
                raise
            raise AuthenticationError(
                errno.EACCES, "the primary closed the connection instead of welcoming us: it "
                "refused our HELLO (another key, or our uid is not allowed)", "handover"
            ) from None
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
