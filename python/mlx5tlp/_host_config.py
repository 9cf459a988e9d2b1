"""Configuration space over TLPs, as a root complex reaches it (mixed into :class:`sim.Host`).

``config_read`` / ``config_write`` send a Configuration Read/Write Type 0 request (CfgRd0 /
CfgWr0) to the emulated function and wait for its completion, so everything that takes a
:class:`mlx5tlp.function.ConfigAccess` — :func:`~mlx5tlp.function.enumerate_function`,
:func:`~mlx5tlp.function.read_config` — walks a served function through TLPs, checked by the
host model like any other completion.

What a root complex returns to software (PCIe Base Specification 2.3.2 and 7.5.1: a
Configuration Read that completes with Unsupported Request or Completer Abort reads as all
ones; Configuration Request Retry Status is retried) is what ``config_read`` returns.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any, Optional

from mlx5tlp import tlp
from mlx5tlp.errors import Error

if TYPE_CHECKING:
    from mlx5tlp.function import Enumeration

__all__ = ["ConfigOverTlp"]

_SIZES = (1, 2, 4)


class ConfigOverTlp:
    """Configuration requests of the host model. Needs ``send_request``/``_collect``."""

    #: The function's Bus/Device/Function number (bus << 8 | device << 3 | function): the
    #: Destination ID of configuration requests. 01:00.0, the first device below a root port.
    function_id: int = 0x0100
    #: The host's Requester ID (the root port, 00:00.0).
    requester_id: int = 0x0000
    #: Seconds to wait for a configuration completion.
    config_timeout: float = 1.0
    _cfg_tag = 0

    def send_request(self, tlp: bytes, channel: int = 0) -> bool:  # provided by Host
        raise NotImplementedError

    def _collect(self, timeout: float) -> list[Any]:  # provided by Host
        raise NotImplementedError

    def _stash(self, records: list[Any]) -> None:  # provided by Host
        raise NotImplementedError

    def _config(self, req: tlp.Tlp, what: str) -> Optional[tlp.Tlp]:
        """Send `req`, return its completion; retries on CRS; None on UR/CA."""
        deadline = time.monotonic() + self.config_timeout
        while True:
            while not self.send_request(req.encode()):
                if time.monotonic() > deadline:
                    raise Error(errno.ETIMEDOUT, f"{what}: request channel 0 stays full",
                                "config request")
                time.sleep(0.0001)
            cpl = self._wait(req.tag, deadline, what)
            if cpl.status == tlp.Status.CRS:
                continue  # the function is not ready yet: a root complex re-issues (2.3.2)
            if cpl.status != tlp.Status.SC:
                return None
            return cpl

    def _wait(self, tag: int, deadline: float, what: str) -> tlp.Tlp:
        others: list[Any] = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Error(errno.ETIMEDOUT, f"{what}: no completion within "
                                f"{self.config_timeout} s (is the function served?)",
                                "config request")
                got = self._collect(min(left, 0.05))
                for i, rec in enumerate(got):
                    c = tlp.decode(rec.tlp)
                    if (c.kind in ("Cpl", "CplD") and c.tag == tag
                            and c.requester_id == self.requester_id):
                        others += got[i + 1:]  # collected with it: not ours either
                        return c
                    others.append(rec)
        finally:
            self._stash(others)  # someone else's: completion_records() still returns them

    def _next_tag(self) -> int:
        self._cfg_tag = (self._cfg_tag + 1) & 0xFF
        return self._cfg_tag

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size not in _SIZES:
            raise ValueError(f"size must be 1, 2 or 4, not {size!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 4096:
            raise ValueError(f"offset must be an int in 0..4095, not {offset!r}")
        if offset % size:
            raise ValueError(f"offset {offset:#x} is not aligned to its size {size}")

    def config_read(self, offset: int, size: int = 4) -> int:
        """Read `size` (1, 2, 4) bytes at `offset` of the function's configuration space with
        a CfgRd0 TLP.

        Returns:
            The value (little-endian, as the register); all ones when the function answers
            Unsupported Request or Completer Abort, as a root complex returns to software.

        Raises:
            ValueError: a bad offset or size.
            Error: ``ETIMEDOUT`` when no completion arrives within :attr:`config_timeout`.

        Thread-safety: as the host (one thread).
        """
        self._check(offset, size)
        lane = offset & 3
        req = tlp.Tlp.cfg_read(self.function_id, offset & ~3, requester_id=self.requester_id,
                               tag=self._next_tag(), first_be=((1 << size) - 1) << lane)
        cpl = self._config(req, f"config read of {size} bytes at {offset:#x}")
        if cpl is None:
            return (1 << (8 * size)) - 1
        return int.from_bytes(cpl.data[lane:lane + size], "little")

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        """Write `value` to `size` (1, 2, 4) bytes at `offset` with a CfgWr0 TLP and wait for
        its completion (configuration writes are non-posted).

        A write the function refuses (UR/CA) is dropped, as a root complex drops it; the host
        model counts the status (``stats()["status_ur"]``).

        Raises:
            ValueError: a bad offset, size or value.
            Error: ``ETIMEDOUT`` when no completion arrives within :attr:`config_timeout`.
        """
        self._check(offset, size)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 8 * size:
            raise ValueError(f"value must be an int of {size} bytes, not {value!r}")
        lane = offset & 3
        data = (value << 8 * lane).to_bytes(4, "little")
        req = tlp.Tlp.cfg_write(self.function_id, offset & ~3, data,
                                requester_id=self.requester_id, tag=self._next_tag(),
                                first_be=((1 << size) - 1) << lane)
        self._config(req, f"config write of {size} bytes at {offset:#x}")

    def enumerate(self, **kwargs: Any) -> Enumeration:
        """Enumerate the function through configuration TLPs, as a root complex does: the
        identity, both capability lists, BAR sizing and assignment, then enable decoding.
        Keyword arguments go to :func:`mlx5tlp.function.enumerate_function`."""
        from mlx5tlp.function import enumerate_function

        return enumerate_function(self, **kwargs)

    def config_dump(self) -> bytes:
        """All 4096 bytes of configuration space, read through 1024 CfgRd0 TLPs."""
        from mlx5tlp.function import read_config

        return read_config(self)

    def lspci(self, slot: Optional[str] = None) -> str:
        """:meth:`config_dump` in ``lspci -xxxx`` text, for ``lspci -F <file> -vvv``.
        `slot` defaults to the function's bus:device.function."""
        from mlx5tlp.function import lspci_dump

        f = self.function_id
        name = slot or f"{f >> 8:02x}:{(f >> 3) & 0x1F:02x}.{f & 7}"
        return lspci_dump(self.config_dump(), name)
