"""The errors of the handover protocol (all :class:`mlx5tlp.Error`, with an errno)."""

from __future__ import annotations

from mlx5tlp.errors import Error

__all__ = [
    "AuthenticationError",
    "HandoverAborted",
    "HandoverError",
    "HandoverProtocolError",
    "LeaseHeldError",
    "StateMismatchError",
]


class HandoverError(Error):
    """A handover or takeover step failed; the message names the step and the peer."""


class HandoverProtocolError(HandoverError):
    """A signed message broke the protocol: a field missing or of the wrong type or range
    (``EPROTO``); names the message and the field. (Not a framing error or EOF, which are
    :class:`mlx5tlp.share.ProtocolError`: the peer said something wrong, it did not go away.)"""


class LeaseHeldError(HandoverError):
    """Another process is the function's primary (``EBUSY``); names its pid and generation."""


class AuthenticationError(HandoverError):
    """A control message or state snapshot failed its HMAC, nonce or generation check
    (``EBADMSG``), or the peer's uid is not allowed (``EACCES``)."""


class StateMismatchError(HandoverError):
    """The successor cannot continue from the predecessor's state: another state version
    (``EPROTO``) or another function (spec digest, ``EINVAL``)."""


class HandoverAborted(HandoverError):
    """A planned handover did not commit; the primary kept (or took back) the function."""
