"""The ``mlx5tlp`` command: ``info``, ``demo``, ``sim`` and ``bench``.

Exit codes: 0 success; 1 a failure (one line on stderr: ``mlx5tlp <command>: <why>``); 2 a bad
option (argparse's usage line and the rule that was broken); 130 interrupted (Ctrl-C); 141
stdout closed early (``mlx5tlp info | head``), with no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn, Optional

from mlx5tlp._version import __version__
from mlx5tlp.errors import Error

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]

MAX_WORKERS = 8  # the software device's request channels (mlx5tlp.sim.CHANNELS)
TAGS = 1024  # 10-bit tags: at most this many requests in flight


def _cmd_info(args: argparse.Namespace) -> int:
    from mlx5tlp._cli_info import info_report, print_info

    print_info(info_report(args.backend), args.json, args.compact)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mlx5tlp.demo import OptionError, Options, print_report, run

    if args.handover_every is not None or args.kill_primary_every is not None:
        return _demo_handover(args)
    if args.realtime is not None:
        args.parser.error("--realtime applies with --handover-every / --kill-primary-every only")
    opts = Options(
        requests=args.requests, workers=args.workers, read_size=args.read_size, seed=args.seed,
        device=args.device, max_payload=args.max_payload, rcb=args.rcb, window=args.window,
        timeout=args.timeout, json=args.json, kill_worker_after=args.kill_worker_after,
        engine=args.engine,
    )
    try:
        report, code = run(opts)
    except OptionError as exc:
        print(f"mlx5tlp demo: {exc}", file=sys.stderr)
        return 2
    print_report(report, args.json)
    return code


def _demo_handover(args: argparse.Namespace) -> int:
    # One function served by a primary and standbys (`mlx5tlp serve` processes), not workers:
    # docs/handover.md, "Proof under load".
    from mlx5tlp.handover import demo

    for flag, bad in (("--kill-worker-after", args.kill_worker_after is not None),
                      ("--max-payload", args.max_payload != 128), ("--rcb", args.rcb != 64)):
        if bad:
            args.parser.error(f"{flag} does not apply with --handover-every / "
                              "--kill-primary-every (one function, a primary and its standbys)")
    rep = demo.run(requests=args.requests, handover_every=args.handover_every or 0,
                   kill_every=args.kill_primary_every or 0, seed=args.seed,
                   window=min(args.window, 64), read_size=min(args.read_size, 1024),
                   timeout=args.timeout, engine=args.engine, realtime=args.realtime)
    print(json.dumps(rep, indent=None if args.json else 2))
    return 1 if demo.failed(rep) else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mlx5tlp import bench

    rep = bench.run(quick=args.quick)
    if args.json:
        print(json.dumps(rep, indent=None if args.compact else 2))
    else:
        bench.print_table(rep)
    return bench.exit_status(rep)  # full mode: non-zero (and which) when a target is missed


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported on one line (the rule, and where to read more)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: refuse bad values up front, with the rule ----------------------------------
def _int_in(lo: int, hi: Optional[int], what: str = "") -> Callable[[str], int]:
    rule = what or (f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {value}")
        return value

    return parse


def _power_of_two(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _int_in(lo, hi, f"a power of two in {lo}..{hi}")(text)
        if value & (value - 1):
            raise argparse.ArgumentTypeError(f"must be a power of two in {lo}..{hi}, not {value}")
        return value

    return parse


#: The longest a seconds option may ask for (~31.7 years): threading's waits overflow time_t
#: beyond ~9.2e9 s (OverflowError after `serving` was printed, for --max-seconds 1e10).
MAX_OPTION_SECONDS = 1e9


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_OPTION_SECONDS:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 and <= "
                                         f"{MAX_OPTION_SECONDS:g}, not {text}")
    return value


def _add_demo(sub: argparse._SubParsersAction, func: Command) -> None:  # type: ignore[type-arg]
    demo = sub.add_parser(
        "demo",
        help="a multi-process emulated PCIe endpoint on the software device, fully checked",
        description="A control process, worker processes serving the BAR through TLP gateway "
        "pages, and the device model as PCIe host checking every completion.",
    )
    demo.add_argument("--requests", type=_int_in(1, None), default=5000,
                      help="requests to send, >= 1 (5000)")
    demo.add_argument("--workers", type=_int_in(1, MAX_WORKERS), default=2,
                      help=f"worker processes, 1..{MAX_WORKERS}; the device needs as many "
                      "gateway pages (2)")
    demo.add_argument("--read-size", type=_int_in(1, 4096), default=256,
                      help="largest memory read in bytes, 1..4096 (256)")
    demo.add_argument("--seed", type=int, default=1, help="seed of the request mix (1)")
    demo.add_argument("--device", default="mlx5_sim0", help="software device (mlx5_sim0)")
    demo.add_argument("--max-payload", type=_power_of_two(128, 4096), default=128,
                      help="Max_Payload_Size in bytes, a power of two in 128..4096; completions "
                      "are split further (at RCB boundaries) when a gateway record holds less "
                      "(128)")
    demo.add_argument("--rcb", type=int, default=64, choices=[64, 128],
                      help="Read Completion Boundary in bytes (64)")
    demo.add_argument("--window", type=_int_in(1, TAGS), default=64,
                      help=f"requests in flight, 1..{TAGS} (the 10-bit tag space) (64)")
    demo.add_argument("--timeout", type=_positive_seconds, default=120.0,
                      help="give up after this many seconds, > 0 (120)")
    demo.add_argument("--json", action="store_true", help="one JSON object, no progress")
    demo.add_argument("--kill-worker-after", type=_int_in(1, None), default=None, metavar="N",
                      help="fault injection: SIGKILL worker 0 after N requests, 1..--requests")
    demo.add_argument("--engine", choices=["native", "python"], default="native",
                      help="who answers in the workers: the native engine (mlx5tlp.engine."
                      "Device) or the Python-per-TLP baseline (native)")
    demo.add_argument("--handover-every", type=_int_in(1, None), default=None, metavar="N",
                      help="planned handover of the function every N requests: it is then "
                      "served by a primary and standbys (`mlx5tlp serve`), not workers; the "
                      "report adds handovers, handover_pause_p50_us/p99_us, lost, duplicated, "
                      "unexpected (docs/handover.md)")
    demo.add_argument("--kill-primary-every", type=_int_in(1, None), default=None, metavar="N",
                      help="SIGKILL the primary at a random point of every N requests; a "
                      "standby takes over (takeovers, takeover_gap_p99_us)")
    demo.add_argument("--realtime", type=_int_in(1, 99), default=None, metavar="PRIO",
                      help="with --handover-every / --kill-primary-every: the serving "
                      "processes and the host model under SCHED_FIFO at PRIO (needs "
                      "CAP_SYS_NICE or RLIMIT_RTPRIO)")
    demo.set_defaults(func=func, parser=demo)


def _parser(run: Callable[[Command], Command]) -> argparse.ArgumentParser:
    from mlx5tlp import _cli_handover, _cli_sim

    p = _Parser(
        prog="mlx5tlp", description="TLP response gateways on NVIDIA mlx5 devices. "
        "Without hardware, everything runs on the bundled software device: try `mlx5tlp demo`.",
    )
    p.add_argument("--version", action="version", version=f"mlx5tlp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,demo,sim,bench}")
    info = sub.add_parser("info", help="what rdma-core / the software device provides")
    info.add_argument("--backend", choices=["rdma", "sim"], default=None,
                      help="rdma or sim (default: $MLX5TLP_BACKEND, else rdma)")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.add_argument("--compact", action="store_true", help="JSON on one line")
    info.set_defaults(func=run(_cmd_info))
    _add_demo(sub, run(_cmd_demo))
    _cli_sim.add_parser(sub, run)
    _cli_handover.add_parsers(sub, run)
    bench = sub.add_parser(
        "bench", help="run the benchmarks (Python here, C++ programs if built/installed)"
    )
    bench.add_argument("--quick", action="store_true",
                       help="smoke mode: under 30 s, never fails on a missed target")
    bench.add_argument("--json", action="store_true", help="one JSON object")
    bench.add_argument("--compact", action="store_true", help="JSON on one line")
    bench.set_defaults(func=run(_cmd_bench))
    return p


def _guarded(name: Callable[[], str]) -> Callable[[Command], Command]:
    """Wraps a command: an mlx5tlp.Error becomes one line on stderr and exit code 1."""

    def wrap(cmd: Command) -> Command:
        def run(args: argparse.Namespace) -> int:
            try:
                return int(cmd(args))
            except Error as exc:
                print(f"mlx5tlp {name()}: {exc}", file=sys.stderr)
                return 1

        return run

    return wrap


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``mlx5tlp`` console script. Returns the exit code."""
    label = ["mlx5tlp"]
    parser = _parser(_guarded(lambda: label[0]))
    args = parser.parse_args(argv)
    if args.command is None:  # bare `mlx5tlp`: say what there is
        parser.print_help()
        return 0
    label[0] = " ".join(x for x in (args.command, getattr(args, "sim_command", None)) if x)
    if args.command == "demo" and args.kill_worker_after is not None \
            and args.kill_worker_after > args.requests:
        args.parser.error(f"argument --kill-worker-after: must be 1..--requests "
                          f"({args.requests}), not {args.kill_worker_after}")
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print(f"mlx5tlp {label[0]}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mlx5tlp info | head`): say nothing more, like a C program
        # killed by SIGPIPE would. Point stdout at /dev/null so the interpreter's final flush
        # does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
