"""``prunekit`` command line: demo, prune, eval, report, env.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

# command name -> module under prunekit.cli (one line each, imported when the parser is built)
COMMANDS = {
    "demo": "demo",
    "prune": "prune",
    "eval": "evaluate",
    "report": "report",
    "env": "env",
    "export": "export",
    "sensitivity": "sensitivity",
    "advise": "advise",
    "lottery": "lottery",
}


def _command(name: str):
    return importlib.import_module(f"{__package__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune PyTorch models and prove they got "
                                     "smaller and faster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (to stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = _command(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _command(args.command).run(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        # user errors: one clear line, not a traceback (use -v to see where it came from)
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"prunekit {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
