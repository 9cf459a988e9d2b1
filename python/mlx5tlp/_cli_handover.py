"""``mlx5tlp serve SPEC`` / ``serve --control PATH`` / ``serve --standby PATH`` /
``handover PATH``.

``serve SPEC`` serves the function a spec file declares (``mlx5tlp.served``,
docs/spec-format.md) until SIGINT/SIGTERM, printing ``serving`` and ``stopped`` JSON event
lines. ``serve --control`` runs a primary (or, with ``--standby``, a standby that takes over
when the primary dies or is told to hand over) of the default function on a software
device; with ``--events`` it prints one JSON object per event on stdout (``serving``,
``standby``, ``first-served``, ``takeover``, ``handed-over``, ``rollback``, ``stopped``).
After a planned handover the old primary stays as a standby (``--after standby``, the
default) or exits (``--after exit``). ``handover PATH`` asks the primary to hand over to a
standby (``--action stop|status`` for the other operator requests). The key is read from
``--key-file`` (a private file of this user).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any, Optional

from mlx5tlp.errors import InvalidArgumentError

__all__ = ["add_parsers", "read_key"]

Handler = Callable[[argparse.Namespace], int]
_kept: list[Any] = []  # owned objects a handed-over primary must not free (its successor's now)


def read_key(path: str) -> bytes:
    """The operator key from a file that only this user can read (mode 0600 or stricter).

    Raises:
        InvalidArgumentError: unreadable, not ours, readable by others, or under 16 bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgumentError(exc.errno, f"key file {path!r}: {exc.strerror}",
                                   "handover") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise InvalidArgumentError(
                errno.EPERM, f"key file {path!r} must be a regular file of this user that "
                f"nobody else can read (mode {st.st_mode & 0o7777:04o}; use chmod 600)",
                "handover")
        key = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(key) < 16:
        raise InvalidArgumentError(errno.EINVAL, f"key file {path!r} holds {len(key)} bytes; "
                                   "the key must be at least 16", "handover")
    return key


def _emitter(enabled: bool) -> Optional[Callable[[dict[str, Any]], None]]:
    if not enabled:
        return None

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    return emit


def _serve_spec(args: argparse.Namespace) -> int:
    from mlx5tlp import served

    spec = served.load(args.spec)
    # `serve SPEC` always reports its events: a host program waits for "serving".
    served.serve(spec, device=args.device, pages=args.pages, batch=args.batch,
                 max_seconds=args.max_seconds, emit=_emitter(True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from mlx5tlp.handover import HandoverAborted, Primary, Standby

    which = [n for n, v in (("SPEC", args.spec), ("--control", args.control),
                            ("--standby", args.standby)) if v is not None]
    if len(which) != 1:
        args.parser.error("give one of SPEC (serve a function spec file), --control PATH or "
                          f"--standby PATH, not {' and '.join(which) or 'none'}")
    if args.spec is not None:
        if args.key_file is not None or args.after != "standby" or args.engine != "native":
            args.parser.error("--key-file, --after and --engine are for --control/--standby "
                              "only (SPEC is served by the native engine)")
        return _serve_spec(args)
    if args.pages != 1 or args.batch != 32:
        args.parser.error("--pages and --batch are for serve SPEC only")
    if args.key_file is None:
        args.parser.error("--control/--standby need --key-file")
    key = read_key(args.key_file)
    if args.realtime is not None:
        from mlx5tlp.realtime import use_fifo

        # Before any lane exists (they inherit the policy); the interpreter's start-up and
        # imports ran at normal priority.
        use_fifo(args.realtime)
    events = _emitter(args.events)
    path = args.standby or args.control
    primary: Optional[Primary] = None
    if args.standby is None:
        primary = Primary.create(path, key, device=args.device, events=events,
                                 engine=args.engine)
    sb: Optional[Standby] = None
    terminated = False

    def on_sigterm(*_: object) -> None:
        # A primary stops serving; a standby's wait() returns (before, SIGTERM was ignored
        # while standing by: the handler only knew the primary); while connecting, unwind.
        nonlocal terminated
        terminated = True
        if primary is not None:
            primary.stop()
        elif sb is not None:
            sb.interrupt()
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    while True:
        if primary is None:
            if terminated:
                break
            if sb is None:
                sb = Standby(path, key, events=events)
            try:
                got = sb.wait()
            except HandoverAborted as exc:
                # A handover that rolled back (the primary serves on): still a standby. Before,
                # the process exited and the function had one standby fewer.
                if events is not None:
                    events({"event": "handover-aborted", "pid": os.getpid(), "error": str(exc)})
                continue
            if got is None:
                sb.close()
                sb = None
                break
            primary = got
            sb = None
        if terminated:
            primary.stop()  # SIGTERM came between the takeover and this
        outcome = primary.run(max_seconds=args.max_seconds)
        if outcome == "stopped":
            how = primary.close()
            if events is not None:
                events({"event": "stopped", "pid": os.getpid(), "var": how})
            break
        owner = primary.owns_objects()
        if owner:
            _kept.append(primary.node)  # its finaliser would free what the successor serves
        primary.close(free=False)
        primary = None
        if args.after == "exit":
            if owner:
                sys.stdout.flush()
                os._exit(0)  # no finalisers: the successor owns the objects now
            break
    if _kept:
        sys.stdout.flush()
        os._exit(0)
    return 0


def _handover(args: argparse.Namespace) -> int:
    from mlx5tlp.handover import request

    print(json.dumps(request(args.path, read_key(args.key_file), args.action,
                             timeout=args.timeout)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mlx5tlp.handover import demo

    rep = demo.run(requests=args.requests, handover_every=args.handover_every,
                   kill_every=args.kill_primary_every, seed=args.seed, window=args.window,
                   timeout=args.timeout, engine=args.engine, realtime=args.realtime)
    print(json.dumps(rep, indent=None if args.json else 2))
    return 1 if demo.failed(rep) else 0


def add_parsers(sub: argparse._SubParsersAction, run: Callable[[Handler], Handler]) -> None:  # type: ignore[type-arg]
    """Add ``serve`` and ``handover`` to the ``mlx5tlp`` command line."""
    from mlx5tlp.cli import _int_in, _positive_seconds  # cli imports this module lazily
    serve = sub.add_parser(
        "serve", help="serve an emulated function from a spec file until stopped "
        "(docs/spec-format.md), or as primary or standby (live upgrade and crash takeover, "
        "docs/handover.md)",
        description="serve SPEC: run the function a spec file declares (identity, BARs, "
        "capabilities, regions) on a software device until SIGINT/SIGTERM, printing JSON "
        "event lines (serving, stopped). --control/--standby: the handover primary/standby.")
    serve.add_argument("spec", nargs="?", metavar="SPEC",
                       help="function spec file with a regions section (.toml or .json)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="PATH", help="be the primary; control socket path")
    where.add_argument("--standby", metavar="PATH", help="be a standby of the primary at PATH")
    serve.add_argument("--key-file", help="operator HMAC key (a 0600 file; --control/--standby)")
    serve.add_argument("--pages", type=_int_in(1, 8), default=1,
                       help="SPEC: gateway pages (engine lanes), 1..8 (1)")
    serve.add_argument("--batch", type=_int_in(1, 1024), default=32,
                       help="SPEC: requests per engine batch at most, 1..1024 (32)")
    serve.add_argument("--device", default="mlx5_sim0", help="software device (mlx5_sim0)")
    serve.add_argument("--after", choices=["standby", "exit"], default="standby",
                       help="after handing over: stay as a standby or exit (standby)")
    serve.add_argument("--max-seconds", type=_positive_seconds, default=None,
                       help="stop serving after this many seconds (no limit)")
    serve.add_argument("--events", action="store_true",
                       help="JSON event lines on stdout (always on with SPEC)")
    serve.add_argument("--engine", choices=["native", "python"], default="native",
                       help="who answers the requests as primary: the native engine's lanes, or "
                       "a Python loop (native; a standby follows its primary's)")
    serve.add_argument("--realtime", type=_int_in(1, 99), default=None, metavar="PRIO",
                       help="serve under SCHED_FIFO at PRIO (needs CAP_SYS_NICE or "
                       "RLIMIT_RTPRIO): a handover's wake-ups then do not wait for other "
                       "work's time slices (docs/handover.md)")
    serve.set_defaults(func=run(_serve), parser=serve)
    ho = sub.add_parser("handover", help="ask the primary at PATH to hand over (or stop/status)")
    ho.add_argument("path", metavar="PATH")
    ho.add_argument("--key-file", required=True, help="operator HMAC key (a 0600 file)")
    ho.add_argument("--action", choices=["handover", "stop", "status"], default="handover")
    ho.add_argument("--timeout", type=_positive_seconds, default=10.0, help="seconds (10)")
    ho.set_defaults(func=run(_handover))
    dm = sub.add_parser("handover-demo", help="planned handovers and killed primaries under "
                        "load, every completion checked (docs/handover.md)")
    dm.add_argument("--requests", type=int, default=2000, help="requests to send (2000)")
    dm.add_argument("--handover-every", type=int, default=0, metavar="N",
                    help="planned handover every N requests (0: none)")
    dm.add_argument("--kill-primary-every", type=int, default=0, metavar="N",
                    help="SIGKILL the primary at a random point of every N requests (0: none)")
    dm.add_argument("--seed", type=int, default=1, help="seed (1)")
    dm.add_argument("--window", type=int, default=16, help="requests in flight (16)")
    dm.add_argument("--timeout", type=_positive_seconds, default=600.0,
                    help="give up after (600 s)")
    dm.add_argument("--json", action="store_true", help="one line of JSON")
    dm.add_argument("--engine", choices=["native", "python"], default="native",
                    help="who serves in each primary (native)")
    dm.add_argument("--realtime", type=_int_in(1, 99), default=None, metavar="PRIO",
                    help="run the serving processes and the host model under SCHED_FIFO at "
                    "PRIO (see serve --realtime)")
    dm.set_defaults(func=run(_demo))
