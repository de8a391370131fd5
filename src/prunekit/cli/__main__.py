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

from prunekit.errors import PrunekitError

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


# A user's mistakes: prunekit's own errors (PrunekitError, UnknownNameError included) and a path that is not
# there. They print as one line and exit 2 (argparse's own errors exit 2 too). Anything else is a bug: it
# propagates with its traceback.
USER_ERRORS = (PrunekitError, FileNotFoundError)

def is_user_error(e: BaseException) -> bool:
    """True for the exceptions the CLI prints as one line (USER_ERRORS); anything else is a bug."""
    return isinstance(e, USER_ERRORS)


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
    except Exception as e:
        # a user's mistake: one clear line, not a traceback (use -v to see where it came from); a bug: re-raised
        if args.verbose or not is_user_error(e):
            raise
        print(f"prunekit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
