"""Signed control messages between a primary and its standbys (one UNIX stream connection).

Framing and fd passing are :func:`mlx5tlp.share.send_fds` / :func:`~mlx5tlp.share.recv_fds`
(``SCM_RIGHTS``; ``SO_PEERCRED`` checked on every message: the peer's uid must be ours or in
``allow_uids``). Payload 0 of every message is ``HMAC-SHA256 (32 bytes) || JSON body``; the
other payloads (export envelopes, state snapshots) are covered by the same MAC. The MAC is over::

    b"mlx5tlp-handover-1" || direction (b"S>C" or b"C>S") || the receiver's nonce (16 bytes)
    || seq (u64 LE) || for the body and each further payload: u32 LE length || bytes

Replays are refused three ways: each side draws a fresh 16-byte nonce per connection, and every
message after the first is bound to the *receiver's* nonce (a message recorded on another
connection fails the MAC); ``seq`` must be exactly one more than the last one (no reordering,
no repetition within a connection); and messages that change roles carry the lease generation,
which the receiver compares with the lease (a message of an older generation is stale). fds are
not covered by the MAC (they cannot be); they are accepted only from a peer whose credentials
passed, on a connection whose every message passed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import socket
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mlx5tlp import share
from mlx5tlp.handover.errors import AuthenticationError, HandoverError

__all__ = ["MIN_KEY_BYTES", "NONCE_BYTES", "Handshake", "Message", "Wire", "check_key"]

MIN_KEY_BYTES = 16
NONCE_BYTES = 16
_LABEL = b"mlx5tlp-handover-1"
_MAC = 32
_MAX_FDS = 8
# The most payload bytes step() takes in one message on a server's side: everything a client
# sends a server (hello, join, ready, request, handover, done, abort; cpp/src/handover_client.cpp
# too) is a body of well under 1 KiB, and a partial frame the primary keeps for a stalled peer is
# bounded by this, not by share.MAX_PAYLOAD_BYTES (1 MiB): 32 unwelcomed peers, 2 MiB at most.
_MAX_CLIENT_BYTES = 64 << 10


def check_key(key: object) -> bytes:
    """The operator key as bytes.

    Raises:
        TypeError: not bytes-like. ValueError: shorter than :data:`MIN_KEY_BYTES`.
    """
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    k = bytes(key)
    if len(k) < MIN_KEY_BYTES:
        raise ValueError(f"key must be at least {MIN_KEY_BYTES} bytes, got {len(k)}")
    return k


@dataclass
class Message:
    """One received message: its type, fields, extra payloads and fds (owned by the caller)."""

    type: str
    fields: dict[str, Any]
    payloads: list[bytes] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Close every fd that came with the message (idempotent)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _refused(exc: PermissionError) -> AuthenticationError:
    return AuthenticationError(errno.EACCES, f"control connection refused: {exc}", "handover")


def _mac(key: bytes, direction: bytes, nonce: bytes, seq: int, parts: Sequence[bytes]) -> bytes:
    h = hmac.new(key, _LABEL + direction + nonce + struct.pack("<Q", seq), hashlib.sha256)
    for p in parts:
        h.update(struct.pack("<I", len(p)))
        h.update(p)
    return h.digest()


class Wire:
    """One side of an authenticated control connection.

    Use :meth:`client` / :meth:`server` to run the nonce exchange. Not thread-safe: one sender
    and one receiver thread at most (sends and receives use separate counters).
    """

    def __init__(self, sock: socket.socket, key: bytes, *, is_server: bool,
                 allow_uids: Optional[Collection[int]] = None) -> None:
        self.sock = sock
        self.key = check_key(key)
        self.allow_uids = allow_uids
        self._out = b"S>C" if is_server else b"C>S"
        self._in = b"C>S" if is_server else b"S>C"
        self.nonce = os.urandom(NONCE_BYTES)
        self.peer_nonce = b""
        self._send_seq = 0
        self._recv_seq = 0
        self.peer_pid = 0
        self._partial: Optional[share.MessageAssembler] = None  # step(): the message so far

    # ---- handshake ----

    @classmethod
    def client(cls, sock: socket.socket, key: bytes, hello: dict[str, Any], *,
               allow_uids: Optional[Collection[int]] = None,
               timeout: Optional[float] = 10.0) -> tuple[Wire, Message]:
        """Send HELLO (our nonce), receive the server's WELCOME (bound to it)."""
        w = cls(sock, key, is_server=False, allow_uids=allow_uids)
        w.send("hello", dict(hello, nonce=w.nonce.hex()))
        welcome = w.recv(timeout=timeout, first=True)
        return w, welcome

    @classmethod
    def server(cls, sock: socket.socket, key: bytes, *,
               allow_uids: Optional[Collection[int]] = None,
               timeout: Optional[float] = 10.0) -> tuple[Wire, Message]:
        """Receive a client's HELLO; the caller answers with :meth:`send` ("welcome")."""
        w = cls(sock, key, is_server=True, allow_uids=allow_uids)
        hello = w.recv(timeout=timeout, first=True)
        if hello.type != "hello":
            hello.close_fds()
            raise AuthenticationError(errno.EBADMSG, f"expected hello, got {hello.type!r}",
                                      "handover")
        return w, hello

    # ---- messages ----

    def send(self, type: str, fields: Optional[dict[str, Any]] = None, *,
             payloads: Sequence[bytes] = (), fds: Sequence[int] = ()) -> None:
        """Sign and send one message (with optional payloads and fds, which we keep)."""
        body = json.dumps(dict(fields or {}, t=type, nonce=self.nonce.hex()),
                          separators=(",", ":")).encode()
        # The first message (HELLO) cannot know the peer's nonce yet: bound to zeros, and the
        # reply is bound to the nonce it carries, so a replayed HELLO gets nowhere.
        nonce = self.peer_nonce or bytes(NONCE_BYTES)
        mac = _mac(self.key, self._out, nonce, self._send_seq, [body, *payloads])
        self._send_seq += 1
        share.send_fds(self.sock, list(fds), [mac + body, *payloads])

    def recv(self, timeout: Optional[float] = None, *, first: bool = False) -> Message:
        """Receive and check one message.

        Raises:
            AuthenticationError: bad MAC (wrong key, forged or replayed), out-of-order
                sequence, malformed body, or the peer's uid is not allowed (``EACCES``).
            share.ProtocolError: the peer closed the connection (``ECONNRESET``) or framing.
            TimeoutError: nothing within `timeout`.
        """
        try:
            fds, payloads, creds = share.recv_fds(self.sock, max_fds=_MAX_FDS,
                                                  allow_uids=self.allow_uids, timeout=timeout)
        except PermissionError as exc:
            raise _refused(exc) from None
        return self._check(fds, payloads, creds, first)

    def step(self, *, first: bool = False) -> Optional[Message]:
        """:meth:`recv` without blocking: read what has arrived of the next message and keep
        it; the message once all of it is here, else None. For a loop that serves others
        meanwhile (the primary): a peer that sends part of a message and stalls costs it
        nothing but this state; the caller bounds the wait (:attr:`receiving`, then drops the
        peer and calls :meth:`close_partial`). Do not mix with :meth:`recv` mid-message.

        Raises:
            As :meth:`recv`, except TimeoutError (the caller's deadline).
        """
        if self._partial is None:
            # One per message, so the credentials are checked per message (as recv_fds does).
            limit = _MAX_CLIENT_BYTES if self._in == b"C>S" else share.MAX_PAYLOAD_BYTES
            self._partial = share.MessageAssembler(self.sock, max_fds=_MAX_FDS,
                                                   allow_uids=self.allow_uids, max_bytes=limit)
        try:
            got = self._partial.step()
        except PermissionError as exc:
            self._partial = None  # spent: it closed what it had received
            raise _refused(exc) from None
        except BaseException:
            self._partial = None
            raise
        if got is None:
            return None
        self._partial = None
        return self._check(*got, first)

    @property
    def receiving(self) -> bool:
        """Whether :meth:`step` holds part of a message (its first byte has arrived)."""
        return self._partial is not None and self._partial.started

    def close_partial(self) -> None:
        """Close the fds that came with a message :meth:`step` did not finish (idempotent)."""
        if self._partial is not None:
            self._partial.close()
            self._partial = None

    def _check(self, fds: list[int], payloads: list[bytes], creds: share.PeerCredentials,
               first: bool) -> Message:
        """The received frame as a message, once its MAC, nonce and sequence passed."""
        msg = Message("", {}, payloads[1:], fds)
        try:
            if not payloads or len(payloads[0]) <= _MAC:
                raise AuthenticationError(errno.EBADMSG, "control message without a signed "
                                          "body", "handover")
            mac, body = payloads[0][:_MAC], payloads[0][_MAC:]
            # The MAC first, the JSON after: nothing an unauthenticated peer sends is parsed
            # (a deeply nested body made json.loads raise RecursionError, which ended the
            # primary). The MAC is bound to our own nonce, so it needs nothing from the body;
            # the server's first message (HELLO) is bound to zeros (see send()).
            nonce = bytes(NONCE_BYTES) if first and self._in == b"C>S" else self.nonce
            want = _mac(self.key, self._in, nonce, self._recv_seq, [body, *payloads[1:]])
            if not hmac.compare_digest(mac, want):
                raise AuthenticationError(
                    errno.EBADMSG, f"control message from pid {creds.pid} failed its HMAC "
                    "check (another key, a forgery, or a replay from another connection)",
                    "handover")
            try:
                fields = json.loads(body)
                peer_nonce = bytes.fromhex(fields["nonce"])
                mtype = str(fields["t"])
            except (ValueError, KeyError, TypeError, RecursionError):
                raise AuthenticationError(errno.EBADMSG, "malformed control message body",
                                          "handover") from None
            if self.peer_nonce and peer_nonce != self.peer_nonce:
                raise AuthenticationError(errno.EBADMSG, "the peer's nonce changed mid-"
                                          "connection (a spliced replay)", "handover")
        except BaseException:
            msg.close_fds()
            raise
        self.peer_nonce = peer_nonce
        self.peer_pid = creds.pid
        self._recv_seq += 1
        msg.type, msg.fields = mtype, fields
        if mtype == "error":
            msg.close_fds()
            code = fields.get("errno")
            # Signed, but still the peer's word: an errno that is not a small int is EPROTO
            # (int("junk") raised ValueError out of the primary's loop).
            if isinstance(code, bool) or not isinstance(code, int) or not 0 < code < 4096:
                code = errno.EPROTO
            raise HandoverError(code, f"the peer refused: {fields.get('message', '?')}",
                                "handover")
        return msg


class Handshake:
    """The server side of the nonce exchange, advanced without blocking: for a loop that
    serves others meanwhile (the primary). :meth:`step` when the socket is readable returns
    the client's HELLO once all of it has arrived; a peer that sends part of it and stalls
    costs that loop nothing but this state — the caller bounds the wait (drops the peer).

    Checks as :meth:`Wire.server`. The caller answers with ``wire.send("welcome", ...)``.
    """

    def __init__(self, sock: socket.socket, key: bytes, *,
                 allow_uids: Optional[Collection[int]] = None) -> None:
        self.wire = Wire(sock, key, is_server=True, allow_uids=allow_uids)

    def step(self) -> Optional[Message]:
        """The HELLO once complete, else None (nothing more has arrived yet).

        Raises:
            AuthenticationError: as :meth:`Wire.recv`, or the first message is not a HELLO.
            share.ProtocolError: the peer closed the connection, or framing.
        """
        hello = self.wire.step(first=True)
        if hello is None:
            return None
        if hello.type != "hello":
            hello.close_fds()
            raise AuthenticationError(errno.EBADMSG, f"expected hello, got {hello.type!r}",
                                      "handover")
        return hello

    def close(self) -> None:
        """Close the fds that came with an unfinished HELLO (idempotent)."""
        self.wire.close_partial()
