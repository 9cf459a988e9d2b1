"""The one place that knows the object kinds and the open contexts of this process.

* Object kinds: each kind's class (:class:`~mlx5tlp.Var`, :class:`~mlx5tlp.Umem`,
  :class:`~mlx5tlp.DevxObj`) registers itself with :func:`register_kind` where it is defined;
  ``import_blob``, unpickling and ``Context.import_*`` find it with :func:`kind_class`, so none
  of them imports every class (and no module imports another in a circle: tests/test_imports.py).
* Open contexts: pickling a Var/Umem/DevxObj produces its export envelope; unpickling must
  import it onto a context of this process that shares the exporter's kernel objects. Every
  Context registers itself here; see :func:`candidates` for the order in which they are tried.

This module imports nothing of the package at run time.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from mlx5tlp._object import DeviceObject
    from mlx5tlp.context import Context
    from mlx5tlp.envelope import DeviceIdentity, Kind

__all__ = ["candidates", "kind_class", "register", "register_kind"]

_T = TypeVar("_T", bound="type[DeviceObject]")
_kinds: dict[int, type[DeviceObject]] = {}


def register_kind(cls: _T) -> _T:
    """Class decorator: `cls` (a DeviceObject subclass with ``KIND``) imports that kind."""
    _kinds[int(cls.KIND)] = cls
    return cls


def kind_class(kind: Kind) -> type[DeviceObject]:
    """The class that imports `kind` (every kind is registered when mlx5tlp is imported)."""
    return _kinds[int(kind)]

_lock = threading.Lock()
_contexts: list[weakref.ReferenceType[Context]] = []


def register(ctx: Context) -> None:
    """Remember `ctx` (weakly) as a candidate for unpickling objects of its device."""
    with _lock:
        _contexts[:] = [r for r in _contexts if (c := r()) is not None and not c.closed]
        _contexts.append(weakref.ref(ctx))


def candidates(device: DeviceIdentity) -> list[Context]:
    """Open contexts of `device` in this process, most likely to share its objects first.

    Contexts made by ``Context.import_fd`` come first (they exist to share another process's
    objects), then the others; newest first within each group. The envelope names the device,
    not the exporter's context, so a caller that can check (a VAR: probe its mapping) tries
    them in this order.
    """
    with _lock:
        live = [c for r in _contexts if (c := r()) is not None and not c.closed]
    same = [
        c
        for c in reversed(live)
        if (c.identity.backend, c.identity.name, c.identity.node_guid)
        == (device.backend, device.name, device.node_guid)
    ]
    return [c for c in same if c.imported] + [c for c in same if not c.imported]
