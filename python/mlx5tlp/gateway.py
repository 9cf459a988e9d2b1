"""Writing TLP completions into a TLP response gateway page: direct writes or the doorbell loop.

The record layout of a real gateway page is defined by NVIDIA firmware and is not public. The
layout is therefore one named, replaceable piece (``GatewayLayout`` in the C++ core):

* ``"sim"``: the software device's page, a ring of fixed-size slots with a producer count (the
  doorbell) and a consumer count from the device model, which is where credits come from.
* ``"raw_tlp[:<slot bytes>]"``: a PROVISIONAL hardware layout: the completion TLP in PCIe wire
  order, written with aligned 8-byte stores into rotating slots, and a store fence per record.
  It is a placeholder for the firmware format, not a statement of it.

C++ callers can supply their own layout (subclass ``mlx5tlp::GatewayLayout``).
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from mlx5tlp import _core
from mlx5tlp._closing import Closing

if TYPE_CHECKING:
    from mlx5tlp.var import Var

__all__ = ["Gateway", "Records"]

BytesLike = Union[bytes, bytearray, memoryview]
# A batch: a sequence of records, or an object with ``buffer`` and ``offsets`` (n + 1 uint32
# offsets, as built by mlx5tlp.tlp.build_completions), or a (buffer, offsets) pair.
Records = Union[Sequence[BytesLike], Any, tuple[BytesLike, "array.array[int]"]]


def _as_batch(records: Records) -> tuple[BytesLike, Any]:
    if hasattr(records, "buffer") and hasattr(records, "offsets"):
        return records.buffer, records.offsets
    if (
        isinstance(records, tuple)
        and len(records) == 2
        and isinstance(records[0], (bytes, bytearray, memoryview))
        and not isinstance(records[1], (bytes, bytearray, memoryview))
    ):
        return records[0], records[1]
    parts = [bytes(r) for r in records]
    offsets = array.array("I", [0])
    total = 0
    for p in parts:
        total += len(p)
        offsets.append(total)
    return b"".join(parts), offsets


class Gateway(Closing):
    """A writer into one TLP gateway page. Open with :meth:`mlx5tlp.Var.gateway`.

    Loop mode (default): any number of threads ``post()``/``post_batch()`` into a bounded
    lock-free ring; one writer thread drains it into the page, one doorbell per batch. Direct
    mode (``direct=True``): one thread ``write()``/``write_batch()`` straight into the page.

    Back-pressure: ``timeout=0`` never blocks (False / fewer records when full), a number blocks
    up to that many seconds, ``None`` blocks until there is room. ``flush()`` waits until every
    record posted before it is in the page. ``close()`` drains and stops the writer; it raises
    :class:`~mlx5tlp.ResourceExhaustedError` if the device stopped consuming and records could
    not be written. One gateway per page, in any process (a second one gets ``EBUSY``). After
    ``fork()`` the child cannot use its parent's gateway (``InvalidHandleError``): it opens its
    own. Thread-safety: post/post_batch/flush/stats from any thread.
    """

    __slots__ = ("_core", "_var")

    def __init__(self, core: Any, var: Var) -> None:
        self._core = core
        self._var = var

    @property
    def var(self) -> Var:
        """The VAR whose page this gateway writes (kept alive by the gateway)."""
        return self._var

    @property
    def layout(self) -> str:
        """The record layout's name: ``"sim"`` or ``"raw_tlp"``."""
        return str(self._core.layout)

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
        """Queue one record for the writer. False if the ring stayed full for `timeout`."""
        return bool(self._core.post(record, timeout))

    def post_batch(self, records: Records, timeout: Optional[float] = None) -> int:
        """Queue many records (reserving ring slots in bulk); returns how many were queued.

        Fewer than all only when the ring stayed full for `timeout`: the rest were not queued
        (a prefix is always what was queued, so retry with the remainder).
        """
        data, offsets = _as_batch(records)
        return int(self._core.post_batch(data, offsets, timeout))

    def write(self, record: BytesLike, timeout: Optional[float] = None) -> bool:
        """Direct mode: write one record now (waiting up to `timeout` for a device credit)."""
        return bool(self._core.write(record, timeout))

    def write_batch(self, records: Records, timeout: Optional[float] = None) -> int:
        """Direct mode: write many records, one doorbell per batch; returns how many."""
        data, offsets = _as_batch(records)
        return int(self._core.write_batch(data, offsets, timeout))

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything posted before this call is in the page. False on timeout."""
        return bool(self._core.flush(timeout))

    def stats(self) -> dict[str, int]:
        """posted, written, batches, max_batch, full_waits, credit_waits, lost."""
        return {k: int(v) for k, v in self._core.stats().items()}

    def close(self) -> None:
        """Drain, stop the writer, unmap and release the page; idempotent."""
        self._core.close()


    def __repr__(self) -> str:
        mode = "direct" if self.direct else "loop"
        state = "closed" if self.closed else f"page {self._var.page_id}"
        return f"<mlx5tlp.Gateway {self.layout} {mode} {state}>"


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
    if not isinstance(ring_slots, int) or ring_slots < 2 or ring_slots & (ring_slots - 1):
        raise ValueError(f"ring_slots must be a power of two >= 2, not {ring_slots!r}")
    if not isinstance(batch_max, int) or batch_max < 1:
        raise ValueError(f"batch_max must be >= 1, not {batch_max!r}")
    core = _core.Gateway.open(
        var._core, layout or "", bool(direct), ring_slots, batch_max, drain_timeout
    )
    return Gateway(core, var)
