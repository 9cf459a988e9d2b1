"""The native load generator's Python side (re-exported by :mod:`mlx5tlp.sim`).

:meth:`mlx5tlp.sim.Host.load` sends an open-loop stream of memory reads and writes to the
emulated function and checks every completion in C++ (docs/sim.md, "The load generator").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = ["ERROR_KINDS", "LoadOp", "LoadRange", "LoadResult", "load_args"]

Buffer = Union[bytes, bytearray, memoryview]

#: The kinds of error the generator tells apart (keys of :attr:`LoadResult.errors_by_kind`).
ERROR_KINDS = (
    "data",           # payload differs from the expected contents
    "byte_count",     # Byte Count is not the bytes still to be returned
    "lower_address",  # Lower Address does not follow the data returned so far
    "tag",            # requester ID + tag of no outstanding read (an unexpected completion)
    "completer",      # Completer ID differs from the function's
    "status",         # a status other than Successful Completion
    "format",         # not a CplD, payload length vs record length, data on a failed completion
    "split",          # payload above Max_Payload_Size, non-final completion off an RCB boundary
    "timeout",        # no complete answer within the timeout, or no request taken for it
    "record",         # a garbage record in a gateway page
)

_MAX_WINDOW = 512
_MAX_SECONDS = 2**63 / 1e9  # the C side counts nanoseconds in 64 bits
#: The lowest non-zero rate: one request per ~11.6 days (the schedule's period, in ns, must
#: fit 64 bits: a rate of 1e-300 made it infinite, an undefined conversion in C).
MIN_RATE = 1e-6
_KINDS = {"read": 0, "write": 1}


@dataclass(frozen=True)
class LoadOp:
    """One kind of request in the mix.

    Attributes:
        kind: ``"read"`` (a Memory Read, non-posted: it takes a tag of the window) or
            ``"write"`` (a Memory Write, posted).
        size: bytes, 1..4096 (writes: a multiple of 4, at most ``max_payload``: a larger
            payload is a Malformed TLP, PCIe Base 2.2.2).
        weight: relative frequency in the mix, >= 1.
        align: address alignment, a power of two 1..4096; 0 means ``size`` rounded up to a
            power of two (so no request crosses 4 KiB). Below 4 exercises byte enables.
    """

    kind: str
    size: int
    weight: int = 1
    align: int = 0


@dataclass(frozen=True)
class LoadRange:
    """An address range the generator targets and the bytes it must read back.

    Attributes:
        address: bus address of the first byte (an assigned BAR address plus an offset).
        expected: the range's contents when the load starts (any contiguous bytes-like object,
            e.g. a memoryview of the function's shared memory). It is copied when the run
            starts; the generator then applies its own writes to its copy, so the function's
            memory is never used to check itself.
    """

    address: int
    expected: Buffer


@dataclass(frozen=True)
class LoadResult:
    """What a load run sent and what every completion check found.

    Attributes:
        sent, reads, writes: requests sent (reads + writes).
        flush_reads: 4-byte reads the run added after the last write of each channel (not in
            ``sent``): when :meth:`Host.load` returns, every write it sent has reached the
            function (a read does not pass an earlier posted write, PCIe Base 2.4.1).
        completed: reads answered completely and correctly.
        completions: completion records collected.
        interrupts: Memory Write records the function wrote meanwhile (MSI-X messages, PCIe
            Base 7.7.2): not completions, not errors.
        bytes_read: payload bytes checked against the expected contents.
        errors: failed checks in all (a completion counts once: its first failed check).
        errors_by_kind: per kind of :data:`ERROR_KINDS`.
        first_errors: descriptions of the first few errors.
        late: open loop: sends more than 1 ms behind their schedule (the window was full).
        elapsed_s: first send to the last completion.
        cpu_s: CPU time of the host's thread.
        achieved_rps: requests sent per second of ``elapsed_s``.
        latency_us: read latency, send to last completion: ``min``, ``p50``, ``p90``, ``p99``,
            ``p99.9``, ``max``, ``mean`` (microseconds; percentiles within ~3%).
        sched_latency_us: the same from each read's scheduled send time (``p50``, ``p99``,
            ``p99.9``, ``max``): with a target rate this includes waiting for the window, so
            a saturated function cannot hide its queueing (no coordinated omission).
    """

    sent: int
    reads: int
    writes: int
    flush_reads: int
    completed: int
    completions: int
    interrupts: int
    bytes_read: int
    errors: int
    errors_by_kind: dict[str, int]
    first_errors: tuple[str, ...]
    late: int
    elapsed_s: float
    cpu_s: float
    achieved_rps: float
    latency_us: dict[str, float] = field(default_factory=dict)
    sched_latency_us: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every read was answered completely and correctly."""
        return self.errors == 0 and self.completed == self.reads

    @property
    def cpu_us_per_request(self) -> float:
        """Host CPU per request sent, in microseconds."""
        return self.cpu_s * 1e6 / self.sent if self.sent else math.nan

    @classmethod
    def _from_native(cls, d: dict[str, Any]) -> LoadResult:
        lat = [x / 1000.0 for x in d["latency_ns"]]
        sched = [x / 1000.0 for x in d["sched_latency_ns"]]
        return cls(
            sent=int(d["sent"]), reads=int(d["reads"]), writes=int(d["writes"]),
            flush_reads=int(d["flush_reads"]),
            completed=int(d["completed"]), completions=int(d["completions"]),
            interrupts=int(d["interrupts"]),
            bytes_read=int(d["bytes_read"]), errors=int(d["errors"]),
            errors_by_kind={str(k): int(v) for k, v in d["errors_by_kind"].items()},
            first_errors=tuple(str(e) for e in d["first_errors"]), late=int(d["late"]),
            elapsed_s=d["elapsed_ns"] / 1e9, cpu_s=d["cpu_ns"] / 1e9,
            achieved_rps=float(d["achieved_rps"]),
            latency_us=dict(zip(("min", "p50", "p90", "p99", "p99.9", "max", "mean"), lat,
                                strict=True)),
            sched_latency_us=dict(zip(("p50", "p99", "p99.9", "max"), sched, strict=True)),
        )


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, not {value}")
    return value


def _seconds_ns(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or not 0 < value < _MAX_SECONDS:
        raise ValueError(f"{name} must be a finite number of seconds in (0, {_MAX_SECONDS:g}), "
                         f"not {value}")
    return max(1, int(value * 1e9))


def load_args(
    ranges: Sequence[LoadRange],
    ops: Sequence[LoadOp],
    *,
    window: int,
    rate: float,
    count: Optional[int],
    duration: Optional[float],
    timeout: float,
    channels: int,
    requester_id: int,
    completer_id: Optional[int],
    max_payload: int,
    rcb: int,
    seed: int,
) -> dict[str, Any]:
    """Checks the arguments of :meth:`Host.load` and converts them for ``_core``.

    Raises:
        TypeError: a value of the wrong Python type.
        ValueError: a value out of range (the rule in the message).
    """
    if isinstance(ops, LoadOp) or isinstance(ranges, LoadRange):
        raise TypeError("ops and ranges are sequences: pass [LoadOp(...)], [LoadRange(...)]")
    if not ops:
        raise ValueError("ops must name at least one LoadOp")
    if not ranges:
        raise ValueError("ranges must name at least one LoadRange")
    native_ops = []
    for i, op in enumerate(ops):
        if not isinstance(op, LoadOp):
            raise TypeError(f"ops[{i}] must be a LoadOp, not {type(op).__name__}")
        if op.kind not in _KINDS:
            raise ValueError(f"ops[{i}].kind must be 'read' or 'write', not {op.kind!r}")
        native_ops.append((_KINDS[op.kind], _int(f"ops[{i}].size", op.size, 1, 4096),
                           _int(f"ops[{i}].align", op.align, 0, 4096),
                           _int(f"ops[{i}].weight", op.weight, 1, 1 << 24)))
    native_ranges = []
    for i, r in enumerate(ranges):
        if not isinstance(r, LoadRange):
            raise TypeError(f"ranges[{i}] must be a LoadRange, not {type(r).__name__}")
        _int(f"ranges[{i}].address", r.address, 0, 2**64 - 1)
        try:
            view = memoryview(r.expected).cast("B")  # any C-contiguous buffer, as bytes
        except TypeError as e:
            raise TypeError(f"ranges[{i}].expected must be a C-contiguous bytes-like object, "
                            f"not {type(r.expected).__name__} ({e})") from None
        native_ranges.append((r.address, view))
    if count is None and duration is None:
        raise ValueError("give count, duration or both")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"rate must be a number, not {type(rate).__name__}")
    if not math.isfinite(rate) or rate < 0 or 0 < rate < MIN_RATE:
        raise ValueError(f"rate must be 0 or a finite number of requests/s >= {MIN_RATE:g}, "
                         f"not {rate}")
    return {
        "ops": native_ops,
        "ranges": native_ranges,
        "window": _int("window", window, 1, _MAX_WINDOW),
        "rate": float(rate),
        "count": 0 if count is None else _int("count", count, 1, 2**63 - 1),
        "duration_ns": 0 if duration is None else _seconds_ns("duration", duration),
        "timeout_ns": _seconds_ns("timeout", timeout),
        "channels": _int("channels", channels, 1, 8),
        "requester_id": _int("requester_id", requester_id, 0, 0xFFFF),
        "completer_id": -1 if completer_id is None else _int("completer_id", completer_id, 0,
                                                               0xFFFF),
        "max_payload": _int("max_payload", max_payload, 128, 4096),
        "rcb": _int("rcb", rcb, 64, 128),
        "seed": _int("seed", seed, 0, 2**64 - 1),
    }
