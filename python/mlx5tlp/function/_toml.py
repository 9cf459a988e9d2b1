"""A TOML writer for the function spec format (the standard library only reads TOML).

Writes what :meth:`FunctionSpec.to_dict` produces: top-level scalars, tables of scalars,
arrays of tables, and arrays of integer pairs. Identifiers (``*_id``, ``class_code``,
``serial``, ``offset`` keys) are written as hexadecimal literals, everything else as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_HEX_KEYS = ("_id", "class_code", "serial", "offset")


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value >= 0 and key.endswith(_HEX_KEYS):
            return hex(value)
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for our ASCII values
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(key, v) for v in value) + "]"
    raise TypeError(f"{key}: cannot write {type(value).__name__} as TOML")


def _table(lines: list[str], header: str, table: Mapping[str, Any]) -> None:
    lines.append("")
    lines.append(header)
    for k, v in table.items():
        lines.append(f"{k} = {_scalar(k, v)}")


def dumps(data: Mapping[str, Any]) -> str:
    """TOML text for a mapping of scalars, tables and arrays of tables."""
    lines: list[str] = []
    for k, v in data.items():
        if not isinstance(v, (Mapping, list)) or (isinstance(v, list) and not v):
            lines.append(f"{k} = {_scalar(k, v)}")
    for k, v in data.items():
        if isinstance(v, Mapping):
            _table(lines, f"[{k}]", v)
        elif isinstance(v, list) and v and all(isinstance(t, Mapping) for t in v):
            for t in v:
                _table(lines, f"[[{k}]]", t)
    return "\n".join(lines).lstrip("\n") + "\n"
