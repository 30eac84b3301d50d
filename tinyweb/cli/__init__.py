"""The ``tinyweb`` command: parse the command line and hand it to one module per command."""

import argparse
import sys
from typing import List, Optional

from tinyweb import __version__
from tinyweb.cli import new, serve

__all__ = ["main"]

COMMANDS = (new, serve)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tinyweb",
        description="Make and run tinyweb apps: one app.py served as CGI, under mod_python, "
        "as FastCGI, or by the dev server.",
    )
    parser.add_argument("--version", action="version", version="tinyweb %s" % __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command in ``argv`` (default: sys.argv[1:]); return 0 ok, 1 failed, 2 usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse reported
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)
