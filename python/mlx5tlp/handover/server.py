"""Answering the host's requests crash-safely: claim -> mark -> write + doorbell -> retire.

The :class:`Server` takes requests from the software device's request channels with claims
(docs/sim.md, "Request channels"), answers them from the function model (configuration space)
and the memory region (a memfd), and writes the completions through one gateway page in direct
mode (this process is the page's one committer). Per request:

1. ``claim_request`` — the request is this process's; if it dies, the claim is redelivered.
2. ``mark_answered(page, doorbell + k)`` — "answered once the page's doorbell reaches that".
3. ``write_batch`` — the k completion records and one doorbell store. An answer with more
   completions than the page holds (a 4 KiB read at 128-byte Max_Payload_Size: 32) goes in
   chunks of one doorbell each, every chunk marked first with its progress (bytes of the read
   out before it and once it is out), so a successor answers only the rest.
4. ``retire_request`` — the slot goes back to the host.

A successor first calls :meth:`Server.recover` — before it writes anything to the page — and
resolves each redelivered claim: marked and *published* (the doorbell reached the mark) means
the host has the answer, so it is retired without answering; *partial* means it has the first
``progress`` bytes, so only the rest is answered (a read of what is left: its Byte Count and
Lower Address continue the host's sequence, PCIe Base 6.x §2.3.1.1); anything else is
answered, then retired. That is exactly once, given three properties of the request source
(the software device has them; on hardware they depend on request-queue semantics that are
not public): claims survive the claimer's death and are redelivered exactly once; a mark is
recorded before the doorbell store it names; and the doorbell of a page with one committer is
monotonic, so "doorbell >= mark" means published.

Posted requests (MWr) are applied to the memory region and retired; a redelivered one is
applied again, which is harmless because a memory write is idempotent.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import struct
import time
from collections.abc import Sequence
from typing import Any, Optional

from mlx5tlp import sim, tlp
from mlx5tlp.context import Context
from mlx5tlp.errors import Error
from mlx5tlp.function import Function
from mlx5tlp.var import Var

__all__ = ["Responder", "Server"]

_DOORBELL = struct.Struct("<Q")
_SLOT_COUNT = struct.Struct("<I")  # docs/sim.md gateway page header: u32 slot count at 0x10
_SLOT_COUNT_OFF = 0x10
HOST_STALL_LIMIT = 30.0  # seconds a completion may wait for room in the page


class Responder:
    """The emulated function's answers: config space from the function model, memory reads and
    writes from the memory region at ``bar_base``, UR for everything else."""

    def __init__(self, function: Function, memory: Any, bar_base: int, completer_id: int) -> None:
        self.function = function
        self.memory = memory
        self.bar_base = bar_base
        self.size = len(memory)
        self.completer_id = completer_id

    def respond(self, req: tlp.Tlp) -> list[tlp.Tlp]:
        """The completions for one request (none for a posted write)."""
        kind = req.kind
        f = self.function
        if kind == "MWr":
            off = req.address - self.bar_base
            if off >= 0 and off + len(req.data) <= self.size:
                self.memory[off : off + len(req.data)] = req.data
            return []
        if kind == "MRd":
            off = req.address - self.bar_base
            n = req.length * 4
            if off >= 0 and off + n <= self.size:
                return self._complete(req, bytes(self.memory[off : off + n]))
        elif kind == "CfgRd0":
            return self._complete(req, f.config_read(req.address & ~3, 4).to_bytes(4, "little"))
        elif kind == "CfgWr0":
            f.config_write_dword(req.address & ~3, int.from_bytes(req.data[:4], "little"),
                                 req.first_be)
            return self._complete(req)
        return self._complete(req, status=tlp.Status.UR)

    def abort(self, req: tlp.Tlp) -> list[tlp.Tlp]:
        """Completer Abort for a request the model refused (none for a posted one)."""
        return [] if req.kind == "MWr" else self._complete(req, status=tlp.Status.CA)

    def _complete(self, req: tlp.Tlp, data: bytes = b"",
                  status: int = tlp.Status.SC) -> list[tlp.Tlp]:
        f = self.function
        return tlp.completions_for(req, data, completer_id=self.completer_id,
                                   max_payload=f.max_payload_size,
                                   rcb=f.read_completion_boundary, status=status)


class Server:
    """One serving process's view: claims on `channels`, answers through `var`'s page.

    :meth:`open` takes the page (its gateway in direct mode: one committer per page, ``EBUSY``
    if another process has it), :meth:`close_gateway` gives it back. Not thread-safe: one
    serving thread.
    """

    def __init__(self, ctx: Context, var: Var, responder: Responder,
                 channels: Sequence[int] = (0,)) -> None:
        self.ctx = ctx
        self.var = var
        self.responder = responder
        self.channels = tuple(channels)
        self.gw: Optional[Any] = None
        self.page: Optional[mmap.mmap] = None
        self.served = 0           # requests answered (or applied) by this process
        self.retired_published = 0
        self.recovered = 0
        self.page_gone = 0
        self.partial = 0          # redelivered answers the host had part of: the rest answered
        self.malformed = 0
        self.first_served_ns = 0  # CLOCK_MONOTONIC of the first answer since open()
        self._next = 0

    def open(self) -> None:
        """Open the page's gateway (direct mode) and a read mapping of its doorbell."""
        if self.gw is None:
            self.gw = self.var.gateway(direct=True)
        if self.page is None:
            self.page = self.var.mmap(mmap.PROT_READ)
        self.first_served_ns = 0

    def prepare_pause(self, on: bool) -> None:
        """Nothing to prepare: this loop takes a few requests at a time (``serve(budget)``)."""

    def close_gateway(self) -> None:
        """Give the page back (its page lock with it): a successor may open it. Idempotent."""
        if self.gw is not None:
            self.gw.close()
            self.gw = None
        if self.page is not None:
            self.page.close()
            self.page = None

    def recover(self) -> int:
        """Resolve every claim of dead claimers (call before the first write); how many."""
        n = 0
        for ch in self.channels:
            for claim in sim.recover_requests(self.ctx, ch):
                self._handle(claim)
                n += 1
        self.recovered += n
        return n

    def serve(self, budget: int = 16) -> int:
        """Answer up to `budget` requests that are waiting; returns how many (0: idle)."""
        done = 0
        chans = self.channels
        idle_channels = 0
        while done < budget and idle_channels < len(chans):
            ch = chans[self._next % len(chans)]
            self._next += 1
            claim = sim.claim_request(self.ctx, ch)
            if claim is None:
                idle_channels += 1
                continue
            idle_channels = 0
            self._handle(claim)
            done += 1
        return done

    def _handle(self, claim: sim.Claim) -> None:
        if claim.redelivered and claim.marked:
            if claim.published:
                sim.retire_request(self.ctx, claim)  # the host has the answer already
                self.retired_published += 1
                return
            if claim.page_gone:
                # The page a dead claimer marked was freed: publication is unknown. Never happens
                # here (standbys keep the page imported); count it and answer (at least once).
                self.page_gone += 1
        try:
            req = tlp.decode(claim.tlp)
        except tlp.TlpError:
            self.malformed += 1  # no completion for a malformed TLP (the host logs it)
            sim.retire_request(self.ctx, claim)
            return
        resume = 0
        if claim.redelivered and claim.partial:
            resume = claim.progress
            if req.kind != "MRd" or resume % 4 or resume >= req.length * 4:
                # What the host has cannot be a part of this request: neither guess nor duplicate.
                self.malformed += 1
                sim.retire_request(self.ctx, claim)
                return
            req = _rest_of_read(req, resume)
            self.partial += 1
        try:
            cpls = self.responder.respond(req)
        except (Error, ValueError):
            # The model refused the access: the completer aborts it rather than the process.
            cpls = self.responder.abort(req)
        if cpls:
            self._publish(claim, cpls, resume)
        sim.retire_request(self.ctx, claim)
        self.served += 1
        if not self.first_served_ns:
            self.first_served_ns = time.monotonic_ns()

    def _publish(self, claim: sim.Claim, cpls: list[tlp.Tlp], resume: int) -> None:
        """Write one request's completions: one doorbell for all of them if the page holds
        them, else one per chunk of a page, each chunk marked first with its progress."""
        assert self.gw is not None and self.page is not None, "open() first"
        cap = max(1, _SLOT_COUNT.unpack_from(self.page, _SLOT_COUNT_OFF)[0])
        recs = [c.encode() for c in cpls]
        done = 0
        out = resume  # bytes of the read's DW range the host has
        give_up = time.monotonic() + HOST_STALL_LIMIT
        while done < len(recs):
            end = min(len(recs), done + cap)
            chunk = sum(c.length * 4 for c in cpls[done:end] if c.kind == "CplD")
            after = sim.PROGRESS_ALL if end == len(recs) else out + chunk
            # One committer: nobody else moves the doorbell between this read and our store.
            seq = _DOORBELL.unpack_from(self.page, 0)[0] + (end - done)
            sim.mark_answered(self.ctx, claim, self.var.page_id, seq, before=out, after=after)
            written = 0
            while written == 0:
                # A full page waits for the host to consume (15 records of 256 bytes in 4 KiB):
                # a host busy elsewhere for a while is no reason for a successor to die.
                # whole: the chunk under one doorbell or nothing, so that the mark ("`after`
                # once the doorbell reaches seq, else `before`") is exact.
                written = self.gw.write_batch(recs[done:end], 0.5, whole=True)
                if written == 0 and time.monotonic() > give_up:
                    # The host stopped consuming: leave the claim (marked, unpublished) to be
                    # redelivered rather than retire a request whose answer is not out.
                    raise Error(errno.ETIMEDOUT, f"the device took no completion for "
                                f"{HOST_STALL_LIMIT:.0f} s", "write_batch")
            if written != end - done:
                raise Error(errno.EIO, f"the gateway split a chunk of {end - done} records "
                            f"(wrote {written})", "write_batch")
            done = end
            out += chunk


def _rest_of_read(req: tlp.Tlp, skip: int) -> tlp.Tlp:
    """The part of memory read `req` after its first `skip` bytes (a multiple of 4: the end of
    a completion on an RCB boundary): completing it gives the Byte Count (bytes still to be
    returned) and Lower Address the host expects next (PCIe Base 6.x §2.3.1.1)."""
    length = req.length - skip // 4
    if length == 1:
        return dataclasses.replace(req, address=req.address + skip, length=1,
                                   first_be=req.last_be, last_be=0)
    return dataclasses.replace(req, address=req.address + skip, length=length, first_be=0xF)
