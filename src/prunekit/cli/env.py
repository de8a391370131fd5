"""``prunekit env``: versions and threads, to paste into bug reports."""
from __future__ import annotations

import json

HELP = "print versions, threads and paths (for bug reports)"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from prunekit.experiment import env_info

    info = env_info()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
