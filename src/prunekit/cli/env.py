"""``prunekit env``: versions and threads, to paste into bug reports."""
from __future__ import annotations

import json

from prunekit.cli._common import default_threads

HELP = "print versions, threads and paths (for bug reports)"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from prunekit.experiment import env_info

    info = env_info()
    cli = default_threads()   # what a computing command's --threads is when not given
    info["cli_threads"] = cli if cli is not None else f"torch's default ({info.get('torch_threads')}: OMP_NUM_THREADS)"
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
