"""Writing TLP completions into a TLP response gateway page: direct writes or the doorbell loop.

The record layout of a real gateway page is defined by NVIDIA firmware and is not public. The
layout is therefore one named, replaceable piece (``GatewayLayout`` in the C++ core):

* ``"sim"``: the software device's page, a ring of fixed-size slots with a producer count (the
  doorbell) and a consumer count from the device model, which is where credits come from.
* ``"raw_tlp[:<slot bytes>][:store8|:store64]"``: a PROVISIONAL hardware layout: the completion
  TLP in PCIe wire order in rotating slots, written as whole 64-byte chunks (zero-padded) with a
  single-copy-atomic 64-byte store where the CPU has one (x86 MOVDIR64B, Arm ST64B; chosen at
  run time, see :attr:`Gateway.store_path`; ``$MLX5TLP_STORE64=0`` or ``:store8`` forces the
  fallback) or eight aligned 8-byte stores, and a store fence per record. It is a placeholder
  for the firmware format, not a statement of it. Its page is mapped write-only.

C++ callers can supply their own layout (subclass ``mlx5tlp::GatewayLayout``).

Lifecycle: ``open`` -> ``closing`` -> ``draining`` -> ``closed`` (:attr:`Gateway.state`).
``close()`` always ends within the drain timeout: producers blocked in ``post``/``post_batch``
are woken and fail with :class:`~mlx5tlp.InvalidHandleError` (``EBADF``), flushers are woken,
accepted records are drained, and what could not be written is counted in ``lost`` and
reported. At interpreter exit, gateways still open are closed with a drain limit of at most
:data:`EXIT_DRAIN_TIMEOUT` seconds; records that could not be delivered are reported with a
:class:`RecordsDroppedWarning` naming how many, for which page, instead of a silent stall.
"""

from __future__ import annotations

import atexit
import errno
import math
import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

from mlx5tlp import _core
from mlx5tlp._closing import Closing
from mlx5tlp.errors import Error, InvalidArgumentError, ResourceExhaustedError
from mlx5tlp.records import Batch, Records, as_batch

if TYPE_CHECKING:
    from mlx5tlp.records import Buffer
    from mlx5tlp.tlp import Tlp
    from mlx5tlp.var import Var

__all__ = [
    "EXIT_DRAIN_TIMEOUT",
    "MAX_RING_SLOTS",
    "Batch",
    "Gateway",
    "PostedCompletions",
    "Records",
    "RecordsDroppedWarning",
]

MAX_RING_SLOTS = 1 << 30
"""The largest ``ring_slots`` a loop-mode gateway takes (the ring's capacity limit)."""

EXIT_DRAIN_TIMEOUT = 1.0
"""Seconds a gateway still open at interpreter exit gives the device to take its records."""


class PostedCompletions(NamedTuple):
    """What :meth:`Gateway.post_completions` queued."""

    requests: int
    """Requests whose completions are all queued: a prefix of the input (requests without
    completions, such as posted writes or refused ones, count)."""
    completions: int
    """Completion records queued."""
    errors: bytes
    """One status byte per request of the call: 0, or why that request got no completion
    (as :attr:`mlx5tlp.tlp.BulkCompletions.errors`; nonzero only with ``skip_bad``)."""


class RecordsDroppedWarning(RuntimeWarning):
    """Posted records a gateway could not write before interpreter exit (shown by default)."""


BytesLike = Union[bytes, bytearray, memoryview]


class Gateway(Closing):
    """A writer into one TLP gateway page. Open with :meth:`mlx5tlp.Var.gateway`.

    Loop mode (default): any number of threads ``post()``/``post_batch()`` into a bounded
    lock-free ring; one writer thread drains it into the page, one doorbell per batch, and
    blocks (without polling) while idle. Direct mode (``direct=True``): one thread
    ``write()``/``write_batch()`` straight into the page.

    Back-pressure: ``timeout=0`` never blocks (False / fewer records when full), a number blocks
    up to that many seconds, ``None`` blocks until there is room. A blocked producer sleeps and
    is woken when the writer frees slots. ``flush()`` waits until every record posted before it
    is in the page. ``close()`` drains and stops the writer, within the drain timeout even while
    other threads are blocked (they get :class:`~mlx5tlp.InvalidHandleError`); it raises
    :class:`~mlx5tlp.ResourceExhaustedError` (``ETIMEDOUT``) if the device stopped consuming and
    records could not be written (``stats()["lost"]`` says how many). One gateway per page, in
    any process (a second one gets ``EBUSY``), keyed by the page's mmap offset. After ``fork()``
    the child cannot use its parent's gateway (``InvalidHandleError``): it opens its own.

    Thread-safety: post/post_batch/flush/stats/close from any thread; write/write_batch from one
    thread at a time. The gateway keeps its :class:`~mlx5tlp.Var` alive.
    """

    __slots__ = ("__weakref__", "_core", "_drain_timeout", "_var")

    def __init__(self, core: Any, var: Var, drain_timeout: Optional[float] = None) -> None:
        self._core = core
        self._var = var
        self._drain_timeout = drain_timeout
        _open_gateways.add(self)

    @property
    def var(self) -> Var:
        """The VAR whose page this gateway writes (kept alive by the gateway)."""
        return self._var

    @property
    def layout(self) -> str:
        """The record layout's name: ``"sim"`` or ``"raw_tlp"``."""
        return str(self._core.layout)

    @property
    def store_path(self) -> str:
        """How records reach the page: ``"movdir64b"``, ``"st64b"`` or ``"store8"``."""
        return str(self._core.store_path)

    @property
    def state(self) -> str:
        """``"open"``, ``"closing"``, ``"draining"`` or ``"closed"``."""
        return str(self._core.state)

    @property
    def max_record(self) -> int:
        """Largest record in bytes (a completion header plus payload must fit)."""
        return int(self._core.max_record)

    @property
    def direct(self) -> bool:
        """True in direct mode."""
        return bool(self._core.direct)

    @property
    def closed(self) -> bool:
        """True once closed."""
        return bool(self._core.closed)

    def post(self, record: BytesLike, timeout: Optional[float] = None) -> bool:
        """Queue one record for the writer. False if the ring stayed full for `timeout`.

        Raises:
            InvalidHandleError: the gateway is closed, or was closed while this call waited.
            InvalidArgumentError: the record is empty or longer than :attr:`max_record`.
        """
        return bool(self._core.post(record, timeout))

    def post_batch(self, records: Batch, timeout: Optional[float] = None) -> int:
        """Queue many records (reserving ring slots in bulk); returns how many were queued.

        `records` is a :class:`~mlx5tlp.Records` (e.g. what ``tlp.build_completions``
        returns) or a sequence of bytes-like records; a bare ``(buffer, offsets)`` pair is
        refused with a ``TypeError`` naming :class:`~mlx5tlp.Records` (it would read as two
        records).

        Fewer than all when the ring stayed full for `timeout` (the timeout bounds the whole
        call), or when the gateway was closed while the call waited: the rest were not queued
        (a prefix is always what was queued, so retry with the remainder).

        Raises:
            InvalidHandleError: the gateway is closed (or was closed before anything was queued).
            InvalidArgumentError: a record is empty or longer than :attr:`max_record`, or the
                offsets are out of order or beyond the buffer (nothing is queued).
            TypeError: `records` is neither a :class:`~mlx5tlp.Records` nor a sequence of
                bytes-like records.
        """
        data, offsets = as_batch(records)
        return int(self._core.post_batch(data, offsets, timeout))

    def post_completions(
        self,
        requests: Union[Buffer, Sequence[Union[Buffer, Tlp]]],
        data: Buffer = b"",
        *,
        completer_id: int,
        max_payload: int = 256,
        rcb: int = 64,
        status: int = 0,
        statuses: Optional[Union[Buffer, Sequence[int]]] = None,
        timeout: Optional[float] = None,
        skip_bad: bool = False,
    ) -> PostedCompletions:
        """Build the completions for many requests straight into the ring and queue them.

        The fused form of ``post_batch(tlp.build_completions(requests, data, ...))``: the same
        arguments, the same checks and byte-identical records in the same order, but built in
        C++ with the GIL released directly into the ring's slots (no intermediate records
        object, no copy, no allocation per record).

        It works in two passes: the first checks every request and counts its completions
        without posting anything; the second builds and queues them. So when request ``k`` of
        ``n`` is bad (it would get no completion from ``build_completions``: malformed, a
        completion, a rule broken, ...), **nothing is posted** and
        :class:`~mlx5tlp.tlp.RequestsRefusedError` names every refused request (``index``,
        ``refused``, ``errors``). With ``skip_bad=True`` the good requests are posted and the
        refused ones get nothing, as ``build_completions`` + ``post_batch`` would do; their
        codes are in the result's ``errors``. Posted writes (MWr) get no completion and are
        not refused.

        The completions of one request are never split: a `timeout` (bounding the whole
        call) or a ``close()`` ends the call between two requests, and the result's
        ``requests`` says how many were queued entirely (a prefix: retry with the rest).

        Args:
            requests, data, completer_id, max_payload, rcb, status, statuses: as for
                :func:`mlx5tlp.tlp.build_completions`. A bytes object is read in place; any
                other buffer (and ``statuses``) is copied once, so another thread changing it
                meanwhile cannot make the two passes disagree. ``data`` is read while the call
                runs (its contents are carried as they are then).
            timeout: seconds to wait for ring room in all; ``None``: no limit.
            skip_bad: post the good requests and skip the refused ones instead of raising.

        Returns:
            :class:`PostedCompletions` ``(requests, completions, errors)``.

        Raises:
            TlpError: what ``build_completions`` raises for the whole call (input not ending
                on a TLP boundary, ``data`` not consumed exactly, ``statuses`` of the wrong
                length, a bad parameter); nothing is posted.
            RequestsRefusedError: (a ``TlpError``) some requests got no completion and
                ``skip_bad`` is false; nothing is posted.
            InvalidArgumentError: a completion is longer than :attr:`max_record`, or one
                request has more completions than the ring holds (``ring_slots``), or this is
                a direct-mode gateway; nothing is posted.
            InvalidHandleError: the gateway is closed (or was closed before anything was
                queued).

        Thread-safety: any thread, like :meth:`post_batch`; records of one call keep their
        order, but another thread's records may come between two requests.
        """
        from mlx5tlp.tlp import RequestsRefusedError, TlpError, _bulk_inputs

        reqs, st = _bulk_inputs(requests, statuses)
        code, n_req, n_cpl, errors = self._core.post_completions(
            reqs, data, st, completer_id, max_payload, rcb, int(status), timeout, skip_bad
        )
        if code == -1:
            raise RequestsRefusedError(errors)
        if code != 0:
            raise TlpError(code)
        return PostedCompletions(int(n_req), int(n_cpl), errors)

    def write(self, record: BytesLike, timeout: Optional[float] = None) -> bool:
        """Direct mode: write one record now (waiting up to `timeout` for a device credit)."""
        return bool(self._core.write(record, timeout))

    def write_batch(self, records: Batch, timeout: Optional[float] = None, *,
                    whole: bool = False) -> int:
        """Direct mode: write many records, one doorbell per batch; returns how many.

        `records` as for :meth:`post_batch`. ``whole``: under one doorbell or not at all (it
        waits for credits for all of them; more records than the page holds are split,
        unavoidably) — e.g. every completion of one request, so that a crash leaves it
        published entirely or not (docs/handover.md).
        """
        data, offsets = as_batch(records)
        return int(self._core.write_batch(data, offsets, timeout, whole))

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything posted before this call is in the page.

        Returns False at the timeout, or when the gateway was closed before all of them could be
        written. Blocks without polling (the writer wakes it).
        """
        return bool(self._core.flush(timeout))

    def stats(self) -> dict[str, int]:
        """posted, written, batches, max_batch, full_waits, credit_waits, lost,
        producer_sleeps (futex sleeps on a full ring), writer_parks (idle writer blocks)."""
        return {k: int(v) for k, v in self._core.stats().items()}

    def close(self, drain_timeout: Optional[float] = None) -> None:
        """Drain, stop the writer, unmap and release the page; idempotent.

        Args:
            drain_timeout: seconds the device gets to take what is queued; ``None``: the
                gateway's own ``drain_timeout``.

        Raises:
            ResourceExhaustedError: ``ETIMEDOUT``: records could not be written (counted in
                ``stats()["lost"]``); the gateway is closed all the same.
        """
        if drain_timeout is None:
            self._core.close()
        else:
            self._core.close(drain_timeout)

    def _close_at_exit(self, limit: float) -> None:
        """Close with at most `limit` seconds of drain; warn about what was dropped."""
        if self.closed:
            return
        if self._drain_timeout is not None:
            limit = min(limit, self._drain_timeout)
        try:
            self._core.close(limit)
        except ResourceExhaustedError:
            lost = self.stats().get("lost", 0)
            warnings.warn(
                f"mlx5tlp: {lost} posted completion record(s) for TLP gateway page "
                f"{self._var.page_id} of device {self._var.context.name} were dropped at "
                f"interpreter exit: the device took none within {limit:g} s "
                "(flush() or close() the gateway before exiting)",
                RecordsDroppedWarning,
                stacklevel=1,
            )
        except Error:
            pass  # e.g. a gateway of the parent process in a forked child: nothing to drain

    def __repr__(self) -> str:
        mode = "direct" if self.direct else "loop"
        state = "closed" if self.closed else f"page {self._var.page_id}"
        return f"<mlx5tlp.Gateway {self.layout} {mode} {state}>"


_open_gateways: weakref.WeakSet[Gateway] = weakref.WeakSet()


@atexit.register
def _close_open_gateways() -> None:
    """Interpreter exit: bounded, reported closes instead of a silent drain per gateway."""
    for gw in list(_open_gateways):
        gw._close_at_exit(EXIT_DRAIN_TIMEOUT)


def open_gateway(
    var: Var,
    layout: Optional[str] = None,
    *,
    direct: bool = False,
    ring_slots: int = 1024,
    batch_max: int = 64,
    drain_timeout: Optional[float] = 10.0,
) -> Gateway:
    """See :meth:`mlx5tlp.Var.gateway`."""
    if layout is not None and not isinstance(layout, str):
        raise TypeError("layout must be a layout name such as 'sim' or 'raw_tlp:512'")
    if (
        not isinstance(ring_slots, int)
        or not 2 <= ring_slots <= MAX_RING_SLOTS
        or ring_slots & (ring_slots - 1)
    ):
        raise InvalidArgumentError(
            errno.EINVAL,
            f"ring_slots must be a power of two in [2, 2**30], not {ring_slots!r}",
            "open gateway",
        )
    if not isinstance(batch_max, int) or batch_max < 1:
        raise ValueError(f"batch_max must be >= 1, not {batch_max!r}")
    core = _core.Gateway.open(
        var._core, layout or "", bool(direct), ring_slots, batch_max, drain_timeout
    )
    limit = None
    if isinstance(drain_timeout, (int, float)) and not isinstance(drain_timeout, bool):
        limit = None if math.isinf(drain_timeout) else float(drain_timeout)
    return Gateway(core, var, limit)
