"""Checked reads of the fields of a peer's control message.

A message that passed its HMAC comes from a key holder, but its JSON body is still that peer's
word: every field the standby reads goes through one of these, so a missing field or one of
the wrong type or range is a :class:`~mlx5tlp.handover.errors.HandoverProtocolError`
(``EPROTO``) naming the message and the field — not a KeyError, ValueError or TypeError from
deep inside the takeover.
"""

from __future__ import annotations

import errno
import json
from typing import Any, NoReturn, TypeGuard

from mlx5tlp.function import FunctionSpec
from mlx5tlp.handover.errors import HandoverProtocolError

__all__ = ["integer", "int_list", "layout", "spec", "text"]

U64 = (1 << 64) - 1
_MISSING = object()


def _bad(message: str, name: str, want: str, value: object) -> NoReturn:
    got = "missing" if value is _MISSING else f"{type(value).__name__} {_short(value)}"
    raise HandoverProtocolError(errno.EPROTO, f"the peer's {message!r} message: field "
                                f"{name!r} must be {want}, got {got}", "handover")


def _short(value: object) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1


def integer(fields: dict[str, Any], name: str, message: str, lo: int = 0, hi: int = U64) -> int:
    """``fields[name]``, an int in ``lo..hi``."""
    v = fields.get(name, _MISSING)
    if not _is_int(v) or not lo <= v <= hi:
        _bad(message, name, f"an integer in {lo}..{hi}", v)
    return int(v)


def text(fields: dict[str, Any], name: str, message: str, default: str | None = None) -> str:
    """``fields[name]``, a string (`default` when missing, if given)."""
    v = fields.get(name, _MISSING)
    if v is _MISSING and default is not None:
        return default
    if not isinstance(v, str):
        _bad(message, name, "a string", v)
    return v


def int_list(fields: dict[str, Any], name: str, message: str, lo: int, hi: int,
             max_len: int) -> list[int]:
    """``fields[name]``, a list of 1..`max_len` ints in ``lo..hi``."""
    v = fields.get(name, _MISSING)
    if not isinstance(v, list) or not 1 <= len(v) <= max_len \
            or not all(_is_int(x) and lo <= x <= hi for x in v):
        _bad(message, name, f"a list of 1..{max_len} integers in {lo}..{hi}", v)
    return [int(x) for x in v]


def spec(fields: dict[str, Any], message: str) -> FunctionSpec:
    """``fields["spec"]``: a function spec as JSON text (docs/function-spec.md)."""
    raw = text(fields, "spec", message)
    try:
        return FunctionSpec.from_dict(json.loads(raw))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        _bad(message, "spec", f"a function spec ({exc})", raw)


_REGION_KINDS = ("memory", "registers", "callback")


def layout(fields: dict[str, Any], message: str) -> list[dict[str, Any]]:
    """``fields["engine"]``: the engine's regions (engine_node.region_layout), each checked."""
    v = fields.get("engine", _MISSING)
    if not isinstance(v, list) or not 1 <= len(v) <= 256:
        _bad(message, "engine", "a list of 1..256 regions", v)
    for i, d in enumerate(v):
        where = f"engine[{i}]"
        if not isinstance(d, dict):
            _bad(message, where, "a region (an object)", d)
        kind = text(d, "kind", message)
        if kind not in _REGION_KINDS:
            _bad(message, f"{where}.kind", f"one of {_REGION_KINDS}", kind)
        text(d, "name", message)
        for k, hi in (("bar", 5), ("offset", U64), ("size", U64)):
            x = d.get(k, _MISSING)
            if not _is_int(x) or not 0 <= x <= hi:
                _bad(message, f"{where}.{k}", f"an integer in 0..{hi}", x)
        regs = d.get("registers", [] if kind != "registers" else _MISSING)
        if not isinstance(regs, list) or not all(
                isinstance(g, list) and len(g) == 5 and isinstance(g[0], str)
                and all(_is_int(x) and 0 <= x <= U64 for x in g[1:4]) and isinstance(g[4], str)
                for g in regs):
            _bad(message, f"{where}.registers", "a list of [name, offset, width, reset, "
                 "access]", regs)
    return v
