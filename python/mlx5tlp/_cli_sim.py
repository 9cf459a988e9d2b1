"""``mlx5tlp sim list|create|remove|reset|stats``: the software device from the command line.

Every subcommand calls the matching :mod:`mlx5tlp.sim` function, so the validation is the same
as from Python: ``create``'s options are generated from the keyword parameters of
:func:`mlx5tlp.sim.create_device` (one ``--option`` per parameter, same defaults), and its
``ValueError`` / :class:`~mlx5tlp.Error` messages are printed as they are, with the parameter
names spelled as the options.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Callable
from typing import Any, Optional

from mlx5tlp import sim
from mlx5tlp.backend import list_devices
from mlx5tlp.errors import DeviceNotFoundError

__all__ = ["add_parser", "known_devices", "unknown_device_message"]

Handler = Callable[[argparse.Namespace], int]


def known_devices() -> list[str]:
    """The software devices that exist in ``mlx5tlp.sim.device_dir()``."""
    return [d.name for d in list_devices("sim")]


def unknown_device_message(name: str) -> str:
    """"no software device named X (devices: ...)" with a hint to create it."""
    names = known_devices()
    there = ", ".join(names) if names else "none"
    return (f"no software device named {name!r} in {sim.device_dir()} (devices: {there}); "
            f"create it with `mlx5tlp sim create {name}`")


def _option(param: str) -> str:
    return "--" + param.replace("_", "-")


def _create_params() -> list[inspect.Parameter]:
    sig = inspect.signature(sim.create_device)
    return [p for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and isinstance(p.default, (bool, int))]


def _arg_help() -> dict[str, str]:
    """Per-parameter help from ``create_device``'s docstring ("name: text" under Args:)."""
    doc = inspect.getdoc(sim.create_device) or ""
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s{4}(\w+): (.+?)(?=^\s{4}\w+: |^\S|\Z)", doc, re.M | re.S):
        out[m.group(1)] = " ".join(m.group(2).split()).replace("``", "").rstrip(".")
    return out


def _spell_options(message: str) -> str:
    """Rewrites parameter names at the start of a message into their option spelling."""
    for p in _create_params():
        if message.startswith(p.name + " "):
            return _option(p.name) + message[len(p.name):]
    return message


def add_parser(sub: Any, run: Callable[[Handler], Handler]) -> None:
    """Adds ``sim`` and its subcommands to the top-level subparsers `sub`."""
    p = sub.add_parser("sim", help="list, create, remove, reset the software devices; stats",
                       description=f"Software devices live in {sim.device_dir()} "
                       "($MLX5TLP_SIM_DIR); mlx5_sim0 exists without set-up.")
    verbs = p.add_subparsers(dest="sim_command", metavar="{list,create,remove,reset,stats}")
    p.set_defaults(func=run(lambda _a: _help(p)))

    lst = verbs.add_parser("list", help="the software devices and their configuration")
    lst.add_argument("--json", action="store_true", help="one JSON object")
    lst.set_defaults(func=run(_list))

    create = verbs.add_parser("create", help="create a software device (mlx5tlp.sim.create_device)")
    create.add_argument("name", help="letters, digits, _ and -; at most 63 characters")
    helps = _arg_help()
    for param in _create_params():
        text = helps.get(param.name, param.name)
        if isinstance(param.default, bool):
            create.add_argument(_option(param.name), dest=param.name, default=param.default,
                                action=argparse.BooleanOptionalAction, help=text)
        else:
            create.add_argument(_option(param.name), dest=param.name, default=param.default,
                                type=_integer, metavar="N",
                                help=f"{text} (default {param.default})")
    create.set_defaults(func=run(_create))

    for verb, text, fn in (
        ("remove", "remove a software device (EBUSY while a context or host is attached)", _remove),
        ("reset", "discard queued requests and reclaim the objects of a device no one is "
                  "attached to (EBUSY otherwise)", _reset),
        ("stats", "live contexts and objects, free pages, pending requests", _stats),
    ):
        v = verbs.add_parser(verb, help=text)
        if verb == "stats":
            v.add_argument("name", nargs="?", default=sim.DEFAULT_DEVICE,
                           help=f"device ({sim.DEFAULT_DEVICE})")
            v.add_argument("--json", action="store_true", help="one JSON object")
        else:
            v.add_argument("name", help="device name")
        v.set_defaults(func=run(fn))


def _integer(text: str) -> int:
    try:
        return int(text, 0)  # 0x200000 as well as 2097152
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 0


def _known(name: str) -> None:
    if name not in known_devices():
        raise DeviceNotFoundError(19, unknown_device_message(name), "sim")


def _list(args: argparse.Namespace) -> int:
    rows = [{"name": n, **sim.device_config(n), **sim.device_stats(n)} for n in known_devices()]
    if args.json:
        print(json.dumps({"device_dir": sim.device_dir(), "devices": rows}))
        return 0
    print(f"software devices in {sim.device_dir()} ({len(rows)}):")
    for r in rows:
        tlp = f"TLP, {r['gw_pages']} gateway pages" if r["tlp"] else "no TLP emulation"
        print(f"  {r['name']:<16} {tlp}, slot {r['slot_size']} bytes, {r['contexts']} contexts")
    return 0


def _create(args: argparse.Namespace) -> int:
    kwargs = {p.name: getattr(args, p.name) for p in _create_params()}
    try:
        sim.create_device(args.name, **kwargs)
    except (ValueError, TypeError) as exc:
        print(f"mlx5tlp sim create: {_spell_options(str(exc))}", file=sys.stderr)
        return 2
    print(f"created {args.name} in {sim.device_dir()}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    _known(args.name)
    sim.remove_device(args.name)
    print(f"removed {args.name}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    _known(args.name)
    reset: Optional[Callable[[str], dict[str, Any]]] = getattr(sim, "reset_device", None)
    if reset is None:
        print("mlx5tlp sim reset: this mlx5tlp.sim has no reset_device()", file=sys.stderr)
        return 1
    discarded = reset(args.name)
    parts = ", ".join(f"{k} {v}" for k, v in discarded.items()) or "nothing"
    print(f"reset {args.name}: discarded {parts}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    _known(args.name)
    rep = {"name": args.name, "config": sim.device_config(args.name),
           "stats": sim.device_stats(args.name)}
    if args.json:
        print(json.dumps(rep))
        return 0
    for section in ("config", "stats"):
        for k, v in rep[section].items():
            print(f"{section} {k:<20} {v}")
    return 0
