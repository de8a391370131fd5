"""``prunekit`` command line: demo, prune, eval, report, env.

Each subcommand lives in its own module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``,
named in ``COMMANDS``. ``prunekit --help``, ``prunekit <command> --help`` and argparse's errors never import
torch: a command module imports only light modules at its top (``prunekit.cli._common`` and ``_names``,
``prunekit.errors``; the names its flags list come from ``_names``) and the library inside ``run`` (checked by
``tests/unit/test_cli_light.py`` for every command). ``-v`` is taken before or after the command; a command
that computes calls ``_common.add_threads(parser)``, and ``--threads`` is applied here, before ``run``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from typing import List, Optional

from prunekit.cli._common import apply_threads, no_progress
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
    "llm": "llm",
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


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help: ``(default: X)`` unless the help already says it, or there is none
    (None, False: the option is off or resolved at run time, and its help says how)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or not action.option_strings or d is None or d is False or d == [] \
                or d is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


VERBOSE_HELP = "log more (to stderr); a user's error also shows its traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune PyTorch models and prove they got "
                                     "smaller and faster.", formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = _command(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        # also after the command; SUPPRESS: not given here, the value before the command stands
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        module.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(no_progress(getattr(args, "no_progress", False)))
            if hasattr(args, "threads"):  # a command that computes: its torch threads, set before any work
                args.threads = stack.enter_context(apply_threads(args.threads))
            return _command(args.command).run(args)
    except Exception as e:
        # a user's mistake: one clear line, not a traceback (use -v to see where it came from); a bug: re-raised
        if args.verbose or not is_user_error(e):
            raise
        print(f"prunekit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
