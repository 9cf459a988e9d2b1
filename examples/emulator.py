"""A minimal emulated PCIe function, start to finish, on the software device.

Run: python examples/emulator.py   (no set-up; uses the default software device mlx5_sim0)

The same flow as `mlx5tlp demo`, in one process and without the checks: open the device, check
TLP emulation, allocate a TLP response gateway page, export it, import it onto a second context
sharing the device objects (what a worker process does after receiving the fd), then answer the
host's requests through the gateway's doorbell loop.
"""

from __future__ import annotations

import mlx5tlp
from mlx5tlp import sim, tlp

BAR_BASE = 0xF000_0000
BAR = bytes(range(256)) * 16  # the function's 4 KiB BAR contents
COMPLETER_ID = 0x0100  # bus 1, device 0, function 0


def answer(req: tlp.Tlp) -> list[tlp.Tlp]:
    """What the function returns for one request."""
    if req.kind == "MRd":
        off = req.address - BAR_BASE
        data = BAR[off : off + req.length * 4]
        return tlp.completions_for(req, data, completer_id=COMPLETER_ID, max_payload=128)
    # This function implements nothing else: Unsupported Request.
    return tlp.completions_for(req, completer_id=COMPLETER_ID, status=tlp.Status.UR)


def main() -> int:
    with mlx5tlp.open_device(backend="sim") as ctx, sim.Host(ctx.name) as host:
        caps = ctx.query_tlp_caps()
        print(f"{ctx.name}: TLP emulation {caps.supported}, {caps.gw_num_pages} gateway pages")

        # Control side: allocate a gateway page and export it (an envelope, safe to send).
        var = ctx.alloc_var(tlp=True)
        envelope = var.export()

        # Worker side: a context sharing the device objects (here in-process; across processes
        # the fd travels with mlx5tlp.share.send/recv), the page imported from its envelope.
        with mlx5tlp.Context.import_fd(ctx.cmd_fd, backend="sim") as worker:
            page = worker.import_var(envelope)
            with page.gateway() as gw:
                # The host sends a few requests: reads of the BAR, and an IO read.
                requests = [
                    tlp.Tlp.mem_read(BAR_BASE + 64 * i, 16, requester_id=0, tag=i)
                    for i in range(8)
                ] + [tlp.Tlp.io_read(0x100, requester_id=0, tag=8)]
                for r in requests:
                    host.send_request(r.encode())

                # The function takes each request and posts its completion(s).
                while (raw := sim.take_request(worker)) is not None:
                    gw.post_batch([c.encode() for c in answer(tlp.decode(raw))])
                gw.flush()

            got = host.completions(timeout=1.0)
            page.unimport()
        stats = host.stats()
        var.free()
        print(f"{len(got)} completions, {stats['retired']} requests answered, "
              f"{stats['errors']} errors")
        return 0 if stats["errors"] == 0 and stats["retired"] == len(requests) else 1


if __name__ == "__main__":
    raise SystemExit(main())
