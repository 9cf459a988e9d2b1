"""One unambiguous batch type: records back to back in one buffer, and their offsets.

A gateway batch (``post_batch`` / ``write_batch``) is either a :class:`Records` or a sequence
of records, each a bytes-like object of bytes. A bare ``(buffer, offsets)`` pair is refused:
with ``offsets`` a ``memoryview`` or any other buffer it is indistinguishable from a sequence
of two records, so it would be written as two records (the offsets' bytes as the second).
:class:`Records` says which it is. ``mlx5tlp.tlp.build_completions`` returns a subclass.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["Batch", "Records", "as_batch"]

Buffer = Union[bytes, bytearray, memoryview]

_OFFSET_FORMATS = ("I", "=I", "<I", "@I")


def _view(obj: object, what: str) -> memoryview:
    try:
        return memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a buffer, not {type(obj).__name__}") from None


@dataclass(frozen=True)
class Records:
    """Records back to back in :attr:`buffer`: record ``k`` is ``buffer[offsets[k]:offsets[k+1]]``.

    Attributes:
        buffer: a bytes-like object (C-contiguous bytes: ``bytes``, ``bytearray``, an ``mmap``,
            a ``memoryview`` of bytes).
        offsets: ``len(self) + 1`` unsigned 32-bit offsets in native byte order
            (``array.array('I')``, or a ``memoryview`` cast to ``'I'``), non-decreasing,
            the last at most ``len(buffer)``. The gateway checks them when it copies them.

    Construction checks the kinds of both (``TypeError`` naming the argument); the bounds are
    checked by the gateway call. Holding a :class:`Records` does not copy the buffers: a
    mutable buffer changed after the call returns does not affect what was queued.

    Thread-safety: immutable itself; the buffers are the caller's.
    """

    buffer: Any
    offsets: Any

    def __post_init__(self) -> None:
        with _view(self.buffer, "Records.buffer") as b:
            if b.itemsize != 1:
                raise TypeError(
                    f"Records.buffer must be a buffer of bytes, not of {b.itemsize}-byte "
                    f"items (format {b.format!r})"
                )
        with _view(self.offsets, "Records.offsets") as o:
            if o.format not in _OFFSET_FORMATS:
                raise TypeError(
                    "Records.offsets must be unsigned 32-bit integers (array.array('I')), "
                    f"not format {o.format!r}"
                )

    @classmethod
    def join(cls, records: Sequence[Buffer]) -> Records:
        """The records of a sequence, concatenated (one copy). Raises TypeError like a batch."""
        buffer, offsets = _join(records)
        return cls(buffer, offsets)

    def __len__(self) -> int:
        """The number of records."""
        return len(self.offsets) - 1

    def record(self, k: int) -> memoryview:
        """Record ``k`` as a view into :attr:`buffer`."""
        return memoryview(self.buffer)[self.offsets[k] : self.offsets[k + 1]]


Batch = Union[Records, Sequence[Buffer]]
"""What ``post_batch`` / ``write_batch`` take."""


def _join(records: object) -> tuple[bytes, array.array[int]]:
    if isinstance(records, (bytes, bytearray, memoryview, str)) or not isinstance(
        records, Sequence
    ):
        raise TypeError(
            "a batch is a sequence of records or an mlx5tlp.Records(buffer, offsets), "
            f"not {type(records).__name__}"
        )
    parts = []
    for i, r in enumerate(records):
        if not isinstance(r, (bytes, bytearray)):
            with _view(r, f"records[{i}]") as v:
                if v.itemsize != 1 or not v.c_contiguous:
                    hint = (
                        ": to pass a (buffer, offsets) pair use mlx5tlp.Records(buffer, offsets)"
                        if len(records) == 2 and i == 1
                        else ""
                    )
                    raise TypeError(
                        f"records[{i}] must be a contiguous buffer of bytes, not of "
                        f"{v.itemsize}-byte items (format {v.format!r}){hint}"
                    )
                r = v.tobytes()
        parts.append(r)
    offsets = array.array("I", [0])
    total = 0
    for p in parts:
        total += len(p)
        offsets.append(total)
    return b"".join(parts), offsets


def as_batch(records: Batch) -> tuple[Any, Any]:
    """(buffer, offsets) of a batch, for the core. Raises TypeError for anything ambiguous."""
    if isinstance(records, Records):
        return records.buffer, records.offsets
    return _join(records)
