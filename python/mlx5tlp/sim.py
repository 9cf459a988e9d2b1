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

from dataclasses import dataclass
from typing import Any, Optional, Union

from mlx5tlp import _core
from mlx5tlp._closing import Closing
from mlx5tlp.context import Context

__all__ = [
    "DEFAULT_DEVICE",
    "Completion",
    "Host",
    "create_device",
    "device_config",
    "device_dir",
    "device_stats",
    "remove_device",
    "take_request",
]

DEFAULT_DEVICE = "mlx5_sim0"
CHANNELS = 8


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

    Raises:
        Error: ``EEXIST`` when it exists; ``EINVAL`` for a value out of range.
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
    _core.sim.create_device(
        name, bool(tlp), gw_pages, gw_log_stride, virtio_pages, slot_size, bar_offset, node_guid
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


def device_dir() -> str:
    """The directory holding the software devices."""
    return str(_core.sim.device_dir())


def take_request(ctx: Context, channel: int = 0) -> Optional[bytes]:
    """The next request TLP the host sent on `channel` (the emulated function's side), or None.

    Any process with a context of the device may take requests; each request goes to exactly
    one taker.
    """
    _check_channel(channel)
    out = _core.sim.function_poll(ctx._core, channel)
    return None if out is None else bytes(out)


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


class Host(Closing):
    """The PCIe host: sends requests to the emulated function and collects every completion.

    One host per device at a time (a second gets ``EBUSY``): it owns the consumer index of
    every gateway page. Not thread-safe: use it from one thread.
    """

    def __init__(self, device: str = DEFAULT_DEVICE) -> None:
        self._h: Optional[Any] = _core.sim.Host(device)
        self.device = device

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
        got = self._host().poll(max_records, float(timeout))
        return [Completion(int(p), int(s), bytes(t)) for p, s, t in got]

    def completions(self, timeout: float = 0.0) -> list[bytes]:
        """Every completion TLP written into any gateway page since the last call."""
        return [c.tlp for c in self.completion_records(timeout)]

    def stats(self) -> dict[str, Any]:
        """What the model checked: requests, completions, retired, outstanding, errors, ..."""
        return dict(self._host().stats())

    def close(self) -> None:
        """Detach from the device (idempotent)."""
        if self._h is not None:
            self._h.close()
            self._h = None



def _check_channel(channel: int) -> None:
    if not isinstance(channel, int) or not 0 <= channel < CHANNELS:
        raise ValueError(f"channel must be an int in 0..{CHANNELS - 1}, not {channel!r}")
