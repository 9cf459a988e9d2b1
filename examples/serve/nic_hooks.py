"""The Python parts of examples/serve/nic.toml (``mlx5tlp serve`` imports this module: the spec
file's directory is searched first). Hooks run on an engine lane with the GIL, once per batch.
"""

from __future__ import annotations

from typing import Optional

from mlx5tlp import engine

_rung = 0


def doorbell(name: str, value: int) -> None:
    """A write to ``doorbell``: count it (a real device would start work here)."""
    global _rung
    _rung += 1


def doorbells_rung(name: str) -> int:
    """A read of ``doorbells_rung``: how many doorbell writes arrived."""
    return _rung


def mailbox(requests: list[engine.Request]) -> list[Optional[bytes]]:
    """Reads return each DW's offset XOR 0x5a5a5a5a; writes are accepted and dropped."""
    out: list[Optional[bytes]] = []
    for r in requests:
        if r.data is not None:  # a posted write: nothing to answer
            out.append(None)
            continue
        out.append(b"".join(((r.offset + 4 * i) ^ 0x5A5A5A5A).to_bytes(4, "little")
                            for i in range(r.length // 4)))
    return out
