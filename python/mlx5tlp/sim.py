"""The software mlx5 device (``libmlx5tlp_sim.so``): devices and the PCIe host model.

The software device implements the rdma-core subset mlx5tlp uses, with the same C ABI and
symbol versions, across real processes (see docs/sim.md). Select it with ``backend="sim"`` or
``MLX5TLP_BACKEND=sim``. Devices live under ``$MLX5TLP_SIM_DIR`` (default
``/dev/shm/mlx5tlp-sim-<uid>``); ``mlx5_sim0`` exists without set-up.

:class:`Host` plays the PCIe host: it sends request TLPs to the emulated function and collects
every completion written into any TLP gateway page of the device, from any process, checking
each against its request (requester id + tag, byte count, lower address, status).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from mlx5tlp import _core
from mlx5tlp._closing import Closing
from mlx5tlp._host_config import ConfigOverTlp
from mlx5tlp._load import ERROR_KINDS, LoadOp, LoadRange, LoadResult, load_args
from mlx5tlp.context import Context

__all__ = [
    "DEFAULT_DEVICE",
    "ERROR_KINDS",
    "FAULT_OPS",
    "Claim",
    "Completion",
    "Host",
    "LoadOp",
    "LoadRange",
    "LoadResult",
    "PROGRESS_ALL",
    "claim_request",
    "create_device",
    "device_config",
    "device_dir",
    "device_stats",
    "inject_fault",
    "mark_answered",
    "recover_requests",
    "remove_device",
    "reset_device",
    "retire_request",
    "take_request",
]

DEFAULT_DEVICE = "mlx5_sim0"
CHANNELS = 8
#: Operations :func:`inject_fault` can make fail.
FAULT_OPS = (
    "umem_dereg",
    "devx_obj_destroy",
    "devx_obj_query",
    "devx_obj_modify",
    "devx_obj_create",
)

# sim_abi.h: M5A_SIM_DEV_* device flags and M5A_SIM_CLAIM_* claim flags.
_DEV_NO_VAR = 1 << 0
_DEV_NO_VAR_FLAGS_ATTR = 1 << 1
_CLAIM_REDELIVERED = 1 << 0
_CLAIM_MARKED = 1 << 1
_CLAIM_PUBLISHED = 1 << 2
_CLAIM_PAGE_GONE = 1 << 3
_CLAIM_PARTIAL = 1 << 4
PROGRESS_ALL = 0xFFFF_FFFF
"""``mark_answered(after=...)``: the whole answer (sim_abi.h ``M5A_SIM_PROGRESS_ALL``)."""


def create_device(
    name: str,
    *,
    tlp: bool = True,
    gw_pages: int = 8,
    gw_log_stride: int = 0,
    virtio_pages: int = 16,
    slot_size: int = 256,
    bar_offset: int = 0x200000,
    node_guid: int = 0,
    var_support: bool = True,
    var_flags_attr: bool = True,
) -> None:
    """Create a software device.

    Args:
        name: letters, digits, ``_`` and ``-``; at most 63 characters.
        tlp: whether it has TLP emulation (``tlp_device_emulation_manager``).
        gw_pages: TLP gateway pages, 1..15 (the PRM field is 4 bits).
        gw_log_stride: gateway page stride is ``4096 << gw_log_stride`` bytes, 0..4.
        virtio_pages: VirtIO VAR pages, 0..256.
        slot_size: gateway ring slot size in bytes (power of two, 64..1024).
        bar_offset: reported ``tlp_rsp_gw_pages_bar_offset``.
        node_guid: 0 derives a stable GUID from the name.
        var_support: False emulates a device/kernel without VAR support: every
            ``alloc_var`` fails with ``EPROTONOSUPPORT``.
        var_flags_attr: False emulates a kernel that does not know the VAR alloc flags
            attribute: ``alloc_var(tlp=True)`` fails with ``EPROTONOSUPPORT`` (VirtIO VARs work).

    Raises:
        Error: ``EEXIST`` when it exists; ``EINVAL`` for a value out of range; the device
            directory's problems (not ours, group/world-writable, full: ``EACCES``, ``ENOSPC``)
            with the path in the message.
    """
    for what, value, lo, hi in (
        ("gw_pages", gw_pages, 1, 15),
        ("gw_log_stride", gw_log_stride, 0, 4),
        ("virtio_pages", virtio_pages, 0, 256),
        ("slot_size", slot_size, 64, 1024),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"{what} must be an int in {lo}..{hi}, not {value!r}")
    if slot_size & (slot_size - 1):
        raise ValueError(f"slot_size must be a power of two, not {slot_size}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    flags = (0 if var_support else _DEV_NO_VAR) | (0 if var_flags_attr else _DEV_NO_VAR_FLAGS_ATTR)
    _core.sim.create_device(
        name, bool(tlp), gw_pages, gw_log_stride, virtio_pages, slot_size, bar_offset, node_guid,
        flags,
    )


def remove_device(name: str) -> None:
    """Remove a software device. Refused (``EBUSY``) while a context or host is attached."""
    _core.sim.remove_device(name)


def device_config(name: str = DEFAULT_DEVICE) -> dict[str, Any]:
    """The device's configuration (as given to :func:`create_device`)."""
    cfg, _stats = _core.sim.query_device(name)
    return dict(cfg)


def device_stats(name: str = DEFAULT_DEVICE) -> dict[str, int]:
    """Live contexts and objects, free pages, pending requests and reclaimed objects.

    Querying first reclaims the objects of contexts whose last fd was closed anywhere.
    """
    _cfg, stats = _core.sim.query_device(name)
    return dict(stats)


def reset_device(name: str = DEFAULT_DEVICE) -> dict[str, int]:
    """Discard what a previous run left on a device nobody is attached to.

    Queued and claimed requests, unconsumed completions of freed gateway pages (their pages
    return to the pool) and armed injected faults are discarded; objects of closed contexts
    are reclaimed.

    Returns:
        What was discarded: ``requests``, ``claims``, ``completions``, ``pages``, ``faults``,
        ``objects``.

    Raises:
        Error: ``EBUSY`` while a context is open anywhere or a :class:`Host` is attached;
            ``ENODEV`` for no such device.

    Thread-safety: any thread or process; the device mutex serialises it with the rest.
    """
    return {str(k): int(v) for k, v in _core.sim.reset_device(name).items()}


def inject_fault(device: str, op: str, err: int, count: int = 1) -> None:
    """Make the next `count` calls of `op` on `device` fail with errno `err`, in any process.

    The object stays alive, as after a kernel or firmware refusal. For ``EREMOTEIO`` on a
    command with an outbox (``devx_obj_query``/``_modify``/``_create``) the outbox carries
    firmware status 0x05 (BAD_RESOURCE_STATE) and syndrome ``0x5a5a0000 | failures left``.
    ``count=0`` clears the fault.

    Args:
        op: one of :data:`FAULT_OPS`.
        err: a positive errno, e.g. ``errno.EBUSY``.

    Raises:
        ValueError: an unknown `op` or a bad `err`/`count`.
        Error: ``ENODEV`` for no such device.

    Thread-safety: any thread or process (the fault is in the device's state file).
    """
    if op not in FAULT_OPS:
        raise ValueError(f"op must be one of {', '.join(FAULT_OPS)}, not {op!r}")
    if not isinstance(err, int) or not 0 < err < 4096:
        raise ValueError(f"err must be a positive errno, not {err!r}")
    if not isinstance(count, int) or not 0 <= count < 2**32:
        raise ValueError(f"count must be an int in 0..2**32-1, not {count!r}")
    _core.sim.inject_fault(device, op, err, count)


def device_dir() -> str:
    """The directory holding the software devices."""
    return str(_core.sim.device_dir())


def take_request(ctx: Context, channel: int = 0) -> Optional[bytes]:
    """The next request TLP the host sent on `channel` (the emulated function's side), or None.

    Any process with a context of the device may take requests; each request goes to exactly
    one taker. Claim and retire in one call (at most once: a taker killed after this returns
    loses the request); see :func:`claim_request` for crash-safe answering.
    """
    _check_channel(channel)
    out = _core.sim.function_poll(ctx._core, channel)
    return None if out is None else bytes(out)


@dataclass(frozen=True)
class Claim:
    """A request claimed by :func:`claim_request`: it stays claimed until retired.

    Attributes:
        claim: the claim id (for :func:`mark_answered` and :func:`retire_request`).
        channel: the channel it came from.
        tlp: the request TLP bytes.
        redelivered: it was claimed by a process that died; it is now this process's.
        marked: (redelivered) the dead claimer marked it answered at ``page_id``/``seq``.
        published: (marked) that page's doorbell had reached ``seq``: the answer reached the
            host, so retire it without answering again.
        page_gone: (marked) that page was freed or reallocated since: publication unknown.
        partial: (marked) part of the answer reached the host (an answer published by several
            doorbells): answer only what comes after ``progress``.
        page_id: the mark's gateway page (when marked).
        seq: the mark's doorbell count (when marked).
        progress: (marked) how much of the answer the host has for certain, in the marker's
            units (:func:`mark_answered` ``before``/``after``); :data:`PROGRESS_ALL`: all.
    """

    claim: int
    channel: int
    tlp: bytes
    redelivered: bool = False
    marked: bool = False
    published: bool = False
    page_gone: bool = False
    page_id: int = 0
    seq: int = 0
    partial: bool = False
    progress: int = 0


def claim_request(ctx: Context, channel: int = 0) -> Optional[Claim]:
    """Claim the next request on `channel` (the emulated function's side), or None.

    Claims of dead claimers come first (flagged ``redelivered``, exactly once each; looked for
    about once a millisecond, at once by :func:`recover_requests`), then fresh requests in
    order. A claim belongs to this process (its claimer session on the
    device), not to the context: processes sharing a context claim separately, and a process
    killed at any point loses nothing: its claims go to the next claimer.

    The crash-safe answer sequence: claim, :func:`mark_answered` (page, doorbell count the
    answer will be published at), write the completion and ring the doorbell, then
    :func:`retire_request`. Thread-safe.

    Raises:
        Error: ``EUSERS`` when every claimer session of the device is taken.
    """
    _check_channel(channel)
    return _claim(channel, _core.sim.function_claim(ctx._core, channel))


def recover_requests(ctx: Context, channel: int = 0) -> list[Claim]:
    """Take every claim of dead claimers on `channel` now (all flagged ``redelivered``).

    :func:`claim_request` finds them too, but looks only about once a millisecond per process. A
    successor that takes over a dead claimer's gateway pages calls this first, before it
    writes to those pages: a claim's ``published`` flag is judged against the doorbell the
    dead claimer left, and is exact only if nothing was written to its page since.

    Returns:
        The claims, now this process's (retire each once resolved). Thread-safe.
    """
    _check_channel(channel)
    out: list[Claim] = []
    while (got := _core.sim.function_recover(ctx._core, channel)) is not None:
        claim = _claim(channel, got)
        assert claim is not None
        out.append(claim)
    return out


def _claim(channel: int, got: Any) -> Optional[Claim]:
    if got is None:
        return None
    claim, flags, tlp, page_id, seq, progress = got
    return Claim(
        claim=int(claim),
        channel=channel,
        tlp=bytes(tlp),
        redelivered=bool(flags & _CLAIM_REDELIVERED),
        marked=bool(flags & _CLAIM_MARKED),
        published=bool(flags & _CLAIM_PUBLISHED),
        page_gone=bool(flags & _CLAIM_PAGE_GONE),
        page_id=int(page_id),
        seq=int(seq),
        partial=bool(flags & _CLAIM_PARTIAL),
        progress=int(progress),
    )


def mark_answered(ctx: Context, claim: Claim, page_id: int, seq: int, *, before: int = 0,
                  after: int = PROGRESS_ALL) -> None:
    """Record that the answer to `claim` is published once gateway page `page_id`'s doorbell
    count reaches `seq`. Call it before ringing that doorbell.

    An answer published by several doorbells (more completions than the page holds) is marked
    before each of them with its progress, in units of the caller's choosing: the first
    `before` are out already, the first `after` (:data:`PROGRESS_ALL`: all of it) once the
    doorbell reaches `seq`. A successor's :class:`Claim` then says ``published`` only for all of
    it and ``partial`` / ``progress`` for part. A new mark replaces the previous one atomically
    (a process killed meanwhile leaves the previous mark whole).

    Raises:
        Error: ``ESTALE`` if the claim was retired or discarded (a new host epoch or a reset),
            ``EPERM`` if it is another claimer's, ``EINVAL`` for no such page, or `before`
            above `after` or equal to :data:`PROGRESS_ALL`.

    Thread-safety: any thread of the claiming process.
    """
    _core.sim.function_mark(ctx._core, claim.channel, claim.claim, page_id, seq, before, after)


def retire_request(ctx: Context, claim: Claim) -> None:
    """Retire `claim`: its slot goes back to the host.

    Raises:
        Error: ``ESTALE`` if it was already retired or discarded, ``EPERM`` if it is another
            claimer's.

    Thread-safety: any thread of the claiming process.
    """
    _core.sim.function_retire(ctx._core, claim.channel, claim.claim)


@dataclass(frozen=True)
class Completion:
    """A completion record collected from a gateway page.

    Attributes:
        page_id: the gateway page it was written to.
        sequence: its record number on that page (from 0 for each allocation of the page).
        tlp: the completion TLP bytes.
    """

    page_id: int
    sequence: int
    tlp: bytes


class Host(ConfigOverTlp, Closing):
    """The PCIe host: sends requests to the emulated function and collects every completion.

    It also reaches the function as a root complex does: :meth:`config_read` /
    :meth:`config_write` over CfgRd0/CfgWr0 TLPs (so :meth:`enumerate`, :meth:`config_dump`
    and :meth:`lspci` walk a served function through TLPs), and :meth:`load` drives it at
    native speed, checking every completion in C++.

    One host per device at a time (a second gets ``EBUSY``): it owns the consumer index of
    every gateway page. Attaching starts a new epoch: requests and unconsumed completions a
    previous host left are discarded and counted (``stats()["stale_requests"]``,
    ``["stale_completions"]``). Not thread-safe: use it from one thread.
    """

    def __init__(self, device: str = DEFAULT_DEVICE) -> None:
        self._h: Optional[Any] = _core.sim.Host(device)
        self.device = device
        self._stashed: list[Completion] = []

    def _host(self) -> Any:
        if self._h is None:
            from mlx5tlp.errors import InvalidHandleError

            raise InvalidHandleError(9, "the device model is closed", "Host")
        return self._h

    def send_request(self, tlp: Union[bytes, bytearray, memoryview], channel: int = 0) -> bool:
        """Queue a request TLP for the function on `channel` (0..7).

        Returns False when the channel is full (64 requests waiting): back-pressure.
        """
        _check_channel(channel)
        data = bytes(tlp)
        if not 12 <= len(data) <= 16 + 4096:
            raise ValueError(f"a request TLP is 12..4112 bytes, not {len(data)}")
        return bool(self._host().send(data, channel))

    def completion_records(self, timeout: float = 0.0, max_records: int = 4096) -> list[Completion]:
        """Every completion written since the last call (up to `max_records`), waiting up to
        `timeout` seconds for the first one."""
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        if self._stashed:  # collected while a configuration request waited for its own
            out, self._stashed = self._stashed[:max_records], self._stashed[max_records:]
            if len(out) < max_records:
                out += self._collect(0.0, max_records - len(out))
            return out
        return self._collect(float(timeout), max_records)

    def _collect(self, timeout: float, max_records: int = 4096) -> list[Completion]:
        got = self._host().poll(max_records, float(timeout))
        return [Completion(int(p), int(s), bytes(t)) for p, s, t in got]

    def _stash(self, records: list[Any]) -> None:
        self._stashed.extend(records)

    def completions(self, timeout: float = 0.0) -> list[bytes]:
        """Every completion TLP written into any gateway page since the last call."""
        return [c.tlp for c in self.completion_records(timeout)]

    def load(
        self,
        ranges: Sequence[LoadRange],
        ops: Sequence[LoadOp] = (LoadOp("read", 64),),
        *,
        window: int = 32,
        rate: float = 0.0,
        count: Optional[int] = None,
        duration: Optional[float] = None,
        timeout: float = 1.0,
        channels: int = CHANNELS,
        requester_id: int = 0,
        completer_id: Optional[int] = None,
        max_payload: int = 256,
        rcb: int = 64,
        seed: int = 1,
    ) -> LoadResult:
        """Run the native load generator: an open-loop host that checks every completion.

        Sends `count` requests (or sends for `duration` seconds) drawn from `ops` at addresses
        in `ranges`, at most `window` reads outstanding, at `rate` requests/s (0: as fast as
        the window allows), then waits until every read is answered or timed out. Every
        completion is checked in C++ without Python per TLP: payload against the expected
        contents (with the run's own writes applied), byte count, lower address, tag and
        requester ID, completer ID (when `completer_id` is given), status, payload size
        against `max_payload` and splits on `rcb` boundaries (PCIe Base Specification 2.2.9,
        2.3.1.1). Writes never target bytes an outstanding read covers, and with writes in the
        mix each 4 KiB page uses one channel, so the order PCIe guarantees (a read does not
        pass an earlier write) is the only order relied on (docs/sim.md). A run with writes
        ends with one flushing read per channel behind its last write: when this returns,
        every write sent has reached the function.

        Args:
            ranges: where to send requests and what they must read back.
            ops: the request mix.
            window: outstanding reads, 1..512 (tags 0..window-1: above 32 they need the
                function's Extended Tag Field support, above 256 its 10-Bit Tag Completer
                support).
            rate: offered requests/s; 0 for as fast as the window allows, else at least
                1e-6 (one request per ~11.6 days).
            count: requests to send. duration: seconds to send for. At least one is needed.
            timeout: seconds after which an unanswered read is an error.
            channels: request channels to spread the requests over (1..8).
            requester_id: the host's Requester ID.
            completer_id: the function's Completer ID, checked when given.
            max_payload, rcb: the function's Max_Payload_Size and Read Completion Boundary.
            seed: makes the op, address and data choices reproducible.

        Returns:
            A :class:`LoadResult`. Failed checks are counted there, not raised.

        Raises:
            TypeError, ValueError: a bad argument (the rule in the message).
            Error: ``EBUSY`` if requests sent with :meth:`send_request` are still
                outstanding; ``EINVAL`` for a spec the generator refuses (e.g. an op that does
                not fit a range), with the reason; ``InvalidHandleError`` when closed.

        Thread-safety: runs on the calling thread with the GIL released; not concurrently
        with other calls on this host.
        """
        args = load_args(ranges, ops, window=window, rate=rate, count=count, duration=duration,
                         timeout=timeout, channels=channels, requester_id=requester_id,
                         completer_id=completer_id, max_payload=max_payload, rcb=rcb, seed=seed)
        return LoadResult._from_native(dict(self._host().load(**args)))

    def stats(self) -> dict[str, Any]:
        """What the model checked: requests, completions, retired, outstanding, errors,
        unexpected, bad_records (garbage in a page: impossible lengths, a doorbell more than a
        ring ahead), status counts, last_error, and this host's epoch with what attaching
        discarded (stale_requests, stale_completions)."""
        return dict(self._host().stats())

    def close(self) -> None:
        """Detach from the device (idempotent)."""
        if self._h is not None:
            self._h.close()
            self._h = None


def _check_channel(channel: int) -> None:
    if not isinstance(channel, int) or not 0 <= channel < CHANNELS:
        raise ValueError(f"channel must be an int in 0..{CHANNELS - 1}, not {channel!r}")
