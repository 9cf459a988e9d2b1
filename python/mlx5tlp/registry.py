"""Per-process registry of open contexts, so that unpickling an object finds its device.

Pickling a Var/Umem/DevxObj produces its export envelope; unpickling must import it onto a
context of this process that shares the exporter's kernel objects. Every Context registers
itself here; the most recently opened one that is still open wins.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from mlx5tlp.context import Context
    from mlx5tlp.envelope import DeviceIdentity

__all__ = ["find", "register"]

_lock = threading.Lock()
_contexts: list[weakref.ReferenceType[Context]] = []


def register(ctx: Context) -> None:
    """Remember `ctx` (weakly) as a candidate for unpickling objects of its device."""
    with _lock:
        _contexts[:] = [r for r in _contexts if (c := r()) is not None and not c.closed]
        _contexts.append(weakref.ref(ctx))


def find(device: DeviceIdentity, *, imported_only: bool = False) -> Optional[Context]:
    """The newest open context of `device` in this process, or None."""
    with _lock:
        for ref in reversed(_contexts):
            ctx = ref()
            if ctx is None or ctx.closed:
                continue
            ident = ctx.identity
            if (ident.backend, ident.name, ident.node_guid) == (
                device.backend,
                device.name,
                device.node_guid,
            ) and (ctx.imported or not imported_only):
                return ctx
    return None
