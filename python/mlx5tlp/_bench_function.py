"""The function side of ``mlx5tlp bench``'s function benchmarks, run as its own process.

``python -m mlx5tlp._bench_function KIND DEVICE`` serves the benchmark function
(:func:`bench_spec`) on software device DEVICE (in ``$MLX5TLP_SIM_DIR``) until its stdin
closes, then prints its counters as one JSON line. It prints ``ready`` once it serves. KIND:

* ``engine``: :class:`mlx5tlp.engine.Device`, BAR 0 a :class:`~mlx5tlp.engine.MemoryRegion`
  served natively, one lane.
* ``callback``: the same BAR range as a :class:`~mlx5tlp.engine.CallbackRegion`: a Python
  handler called once per engine batch.
* ``python``: the Python-per-TLP baseline, written as a competent user would: one
  ``sim.take_request`` per TLP (the only way Python gets a request), a ``struct`` peek at the
  header, then per batch ONE bulk build (``tlp.build_completions``, C++) and ONE
  ``gw.post_batch``; configuration requests go to a :class:`mlx5tlp.function.Function` model.

The memory (:data:`MEMORY` bytes at BAR 0 offset 0) holds :func:`pattern` in every kind, so
the host checks the same contents.
"""

from __future__ import annotations

import json
import select
import struct
import sys
import time
from typing import Any

from mlx5tlp import engine, open_device, sim, tlp
from mlx5tlp import function as fn

__all__ = ["MEMORY", "bench_spec", "main", "pattern"]

MEMORY = 1 << 16
BATCH = 64


def bench_spec() -> fn.FunctionSpec:
    """The benchmark function: one 1 MiB 32-bit memory BAR, MPS up to 512."""
    return fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x058000),
        bars=[fn.Bar(0, "mem32", 1 << 20)],
        pcie=fn.PciExpress(max_payload_supported=512))


def pattern() -> bytes:
    """The memory's contents at start."""
    return bytes((i * 7 + (i >> 8) * 13 + 3) & 0xFF for i in range(MEMORY))


def _stdin_closed() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and sys.stdin.readline() == ""


def _serve_engine(ctx: Any, kind: str) -> dict[str, Any]:
    data = pattern()
    if kind == "engine":
        mem = engine.MemoryRegion(0, 0, MEMORY)
        mem.write(0, data)
        region: engine.Region = mem
    else:
        def handler(reqs: list[engine.Request]) -> list[bytes | None]:
            return [data[r.offset:r.offset + r.length] if r.kind == "MRd" else None
                    for r in reqs]
        region = engine.CallbackRegion(0, 0, MEMORY, handler)
    with engine.Device(ctx, bench_spec(), [region], pages=1, batch=BATCH) as dev:
        print("ready", flush=True)
        while not _stdin_closed():
            time.sleep(0.05)
        st = dev.stats()
    return {"requests": st["requests"], "completions": st["completions"],
            "batches": st["batches"], "ur": st["ur"], "ca": st["ca"]}


_HDR = struct.Struct(">III")


def _serve_python(ctx: Any) -> dict[str, Any]:
    mem = bytearray(pattern())
    model = fn.Function(bench_spec())
    var = ctx.alloc_var(tlp=True)
    take, unpack = sim.take_request, _HDR.unpack_from
    served = batches = 0
    base, cid, mps, rcb = 0, 0, 128, 64
    try:
        with var.gateway() as gw:
            print("ready", flush=True)
            idle = 0
            while True:
                reqs: list[bytes] = []
                data: list[bytes] = []
                for ch in range(sim.CHANNELS):
                    while len(reqs) < BATCH:
                        raw = take(ctx, ch)
                        if raw is None:
                            break
                        dw0, _dw1, dw2 = unpack(raw, 0)
                        ft = dw0 >> 24
                        if ft in (0x00, 0x20, 0x40, 0x60):  # MRd / MWr, 3DW or 4DW header
                            addr = (dw2 << 32 | _HDR.unpack_from(raw, 4)[2]) if ft & 0x20 else dw2
                            off = (addr & ~3) - base
                            n = 4 * ((dw0 & 0x3FF) or 1024)
                            if ft & 0x40:  # a write: whole DWs in this benchmark
                                hdr = 16 if ft & 0x20 else 12
                                mem[off:off + n] = raw[hdr:hdr + n]
                            else:
                                reqs.append(raw)
                                data.append(bytes(mem[off:off + n]))
                            continue
                        # The rare rest (configuration at start): decoded, answered by the model.
                        req = tlp.decode(raw)
                        if req.kind == "CfgWr0":
                            model.config_write_dword(req.address,
                                                     int.from_bytes(req.data, "little"),
                                                     req.first_be)
                            cid = req.dest_id & 0xFFF8  # §2.2.6.2: captured Bus/Device Numbers
                            base, mps = model.bar_base(0), model.max_payload_size
                            rcb = model.read_completion_boundary
                            cpls = tlp.completions_for(req, completer_id=cid)
                        elif req.kind == "CfgRd0":
                            value = model.config_read(req.address)
                            cpls = tlp.completions_for(req, value.to_bytes(4, "little"),
                                                       completer_id=cid)
                        else:
                            cpls = tlp.completions_for(req, completer_id=cid,
                                                       status=tlp.Status.UR)
                        gw.post_batch([c.encode() for c in cpls])
                if reqs:
                    cpl = tlp.build_completions(b"".join(reqs), b"".join(data), completer_id=cid,
                                                max_payload=mps, rcb=rcb)
                    gw.post_batch(cpl)
                    served += len(reqs)
                    batches += 1
                    idle = 0
                    continue
                idle += 1
                if idle % 256 == 0 and _stdin_closed():
                    break
                if idle > 64:
                    time.sleep(0)  # let the host run (2 CPUs shared)
            gw.flush(10.0)
    finally:
        var.close()
        model.close()
    return {"reads": served, "batches": batches}


def main(argv: list[str]) -> int:
    """Entry point: ``KIND DEVICE``."""
    kind, device = argv
    if kind not in ("engine", "callback", "python"):
        raise SystemExit(f"kind must be engine, callback or python, not {kind!r}")
    with open_device(device, backend="sim") as ctx:
        out = _serve_python(ctx) if kind == "python" else _serve_engine(ctx, kind)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
