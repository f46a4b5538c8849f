"""The ``asyncpool`` command: ``simulate``, ``advise``, ``check``.

``main()`` is the console script. It returns the exit status: 0 on success,
1 when the database cannot be reached or set up, 2 for a bad flag, variable
or value (the message names it), 130 when interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from .. import __version__
from ._args import ArgumentParser, UsageError
from ._database import DatabaseSetupError
from ._report import Output

__all__ = ["build_parser", "main"]

Command = Callable[[Any, Output], int]


def build_parser() -> ArgumentParser:
    from . import advise, check, simulate

    parser = ArgumentParser(
        prog="asyncpool",
        description=(
            "See what a connection pool configuration does under load before production "
            "does: simulate a traffic spike, size a pool, check a database."
        ),
    )
    parser.add_argument("--version", action="version", version=f"asyncpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (simulate, advise, check):
        sub = module.add_parser(commands)
        sub.set_defaults(handler=module.run)
        parser.commands[sub.prog.split()[-1]] = sub
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(stdout)
    handler: Command = args.handler
    try:
        return handler(args, out)
    except UsageError as exc:
        print(f"asyncpool {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DatabaseSetupError as exc:
        print(f"asyncpool {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"asyncpool {args.command}: interrupted", file=sys.stderr)
        return 130
