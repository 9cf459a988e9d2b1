"""The host side of the demo: a seeded mix of requests and a checker for every completion."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

from mlx5tlp import tlp
from mlx5tlp.demo.endpoint import WRITABLE, initial_config_space

__all__ = ["Checker", "ConfigModel", "LegacyConfig", "Pending", "RequestMix"]

REQUESTER_ID = 0x0000  # the root port
FUNCTION_ID = 0x0100   # bus 1, device 0, function 0


@dataclass
class Pending:
    """A non-posted request waiting for its completion(s)."""

    request: tlp.Tlp
    channel: int
    status: int              # the status the completer must return
    expect: bytes            # memory/config read: the bytes the host must get back
    remaining: int           # bytes still to come (byte count of the next completion)
    sent_ns: int = 0
    got: bytearray = field(default_factory=bytearray)


class ConfigModel(Protocol):
    """What the host knows of the function's configuration space: which DWs the mix reads
    and writes, and what a read returns after the writes so far (applied in channel order)."""

    reads: list[int]
    writes: list[int]

    def read(self, reg: int) -> bytes:
        """The 4 bytes a Configuration Read of DW ``reg`` must return now."""
        ...

    def write(self, reg: int, data: bytes) -> None:
        """Apply a Configuration Write of the full DW ``reg``."""
        ...


class LegacyConfig:
    """The Python-per-TLP worker's configuration space (``endpoint.Function``): a minimal
    header, and a scratch area at 40h..7Fh that is the only writable part."""

    def __init__(self) -> None:
        self.space = initial_config_space()
        self.reads = [0x0, 0x8, *range(0x40, 0x80, 4)]
        self.writes = list(range(0x40, 0x80, 4))

    def read(self, reg: int) -> bytes:
        return bytes(self.space[reg : reg + 4])

    def write(self, reg: int, data: bytes) -> None:
        for i in range(4):
            if reg + i in WRITABLE:
                self.space[reg + i] = data[i]


class RequestMix:
    """Generates requests: memory reads over the BAR (split per worker share), config reads and
    writes of function 0, and IO reads the function does not support (answered with UR)."""

    def __init__(self, seed: int, bar: bytes, base: int, shares: list[tuple[int, int]],
                 read_size: int, config: Optional[ConfigModel] = None) -> None:
        """`shares`: each worker's ``[lo, hi)`` part of the BAR (worker i serves channel i);
        `config`: the model of worker 0's configuration space (configuration requests go to
        channel 0), by default the Python worker's."""
        self.rng = random.Random(seed)
        self.bar, self.base, self.shares = bar, base, shares
        self.workers = len(shares)
        self.read_size = read_size
        self.config: ConfigModel = LegacyConfig() if config is None else config

    def next(self, tag: int) -> Pending:
        r = self.rng.random()
        if r < 0.80:
            return self._mem_read(tag)
        if r < 0.90:
            reg = self.rng.choice(self.config.reads)
            req = tlp.Tlp.cfg_read(FUNCTION_ID, reg, requester_id=REQUESTER_ID, tag=tag)
            return Pending(req, 0, tlp.Status.SC, self.config.read(reg), 4)
        if r < 0.95:
            reg = self.rng.choice(self.config.writes)
            data = self.rng.randbytes(4)
            req = tlp.Tlp.cfg_write(FUNCTION_ID, reg, data, requester_id=REQUESTER_ID, tag=tag)
            self.config.write(reg, data)  # the function applies writes in channel order
            return Pending(req, 0, tlp.Status.SC, b"", 4)
        req = tlp.Tlp.io_read(self.rng.randrange(0, 0x1000, 4), requester_id=REQUESTER_ID,
                              tag=tag)
        return Pending(req, self.rng.randrange(self.workers), tlp.Status.UR, b"", 4)

    def _mem_read(self, tag: int) -> Pending:
        rng = self.rng
        worker = rng.randrange(self.workers)
        lo, hi = self.shares[worker]
        size = min(rng.randint(1, self.read_size), hi - lo)
        start = lo + rng.randrange(hi - lo - size + 1)
        if start % 4096 + size > 4096:  # a request must not cross a 4 KiB boundary
            size = 4096 - start % 4096
        first_dw, last_dw = start // 4, (start + size - 1) // 4
        length = last_dw - first_dw + 1
        head, tail = start % 4, (start + size - 1) % 4
        if length == 1:
            first_be, last_be = ((0xF << head) & (0xF >> (3 - tail))) & 0xF, 0
        else:
            first_be, last_be = (0xF << head) & 0xF, 0xF >> (3 - tail)
        if rng.random() < 0.01:  # a zero-length read: 1 DW, no byte enabled
            size, length, first_be, last_be = 1, 1, 0, 0
        req = tlp.Tlp.mem_read(self.base + first_dw * 4, length, requester_id=REQUESTER_ID,
                               tag=tag, first_be=first_be, last_be=last_be)
        expect = b"" if first_be == 0 else self.bar[start : start + size]
        return Pending(req, worker, tlp.Status.SC, expect, size)


class Checker:
    """Matches completions to requests and checks status, byte counts, lower address, data."""

    def __init__(self) -> None:
        self.outstanding: dict[int, Pending] = {}
        self.completions_verified = 0
        self.requests_verified = 0
        self.errors: list[str] = []
        self.latencies_ns: list[int] = []

    def sent(self, p: Pending) -> None:
        p.sent_ns = time.perf_counter_ns()
        self.outstanding[p.request.tag] = p

    def completion(self, raw: bytes) -> Optional[int]:
        """Checks one completion; returns the tag it retired, if any."""
        try:
            c = tlp.decode(raw)
        except tlp.TlpError as e:
            self.errors.append(f"malformed completion: {e}")
            return None
        p = self.outstanding.get(c.tag)
        if p is None or c.requester_id != REQUESTER_ID:
            self.errors.append(
                f"unexpected completion: requester {c.requester_id:04x} tag {c.tag} ({c!r})")
            return None
        req = p.request
        if c.status != p.status:
            return self._fail(p, f"{req.kind} tag {c.tag}: status {c.status}, want {p.status}")
        if c.byte_count != p.remaining:
            return self._fail(p, f"{req.kind} tag {c.tag}: byte count {c.byte_count}, "
                                 f"want {p.remaining}")
        if req.kind == "MRd" and p.status == tlp.Status.SC:
            want_la = (req.address + _first(req.first_be) + len(p.got)) & 0x7F
            if c.lower_address != want_la:
                return self._fail(p, f"MRd tag {c.tag}: lower address {c.lower_address}, "
                                     f"want {want_la}")
            lead = c.lower_address & 3
            take = min(c.byte_count, len(c.data) - lead)
            p.got += c.data[lead : lead + take]
            p.remaining -= take
        elif p.expect:  # config read
            p.got += c.data[:4]
            p.remaining = 0
        else:
            p.remaining = 0
        self.completions_verified += 1
        if p.remaining > 0:
            return None
        if p.expect and bytes(p.got) != p.expect:
            return self._fail(p, f"{req.kind} tag {c.tag}: data differs from the BAR contents")
        del self.outstanding[c.tag]
        self.requests_verified += 1
        self.latencies_ns.append(time.perf_counter_ns() - p.sent_ns)
        return c.tag

    def _fail(self, p: Pending, msg: str) -> int:
        del self.outstanding[p.request.tag]
        self.errors.append(msg)
        return p.request.tag


def _first(be: int) -> int:
    for i in range(4):
        if be >> i & 1:
            return i
    return 0
