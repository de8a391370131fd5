"""``prunekit eval``: measure a saved model: accuracy, sizes, MACs, latency."""
from __future__ import annotations

import json

from prunekit.cli._common import check_data, dataset_names, listed

HELP = "evaluate a saved prunekit model folder: accuracy, params, MACs, size, latency"


def add_arguments(p) -> None:
    p.add_argument("model", help="a model folder written by prunekit (e.g. runs/prune/model)")
    p.add_argument("--data", default="mnist", help=f"dataset: {listed(dataset_names(), 'mnist')}")
    p.add_argument("--limit-test", type=int, help="use only this many test examples")
    p.add_argument("--batch", type=int, default=1, help="batch size of the latency measurement")
    p.add_argument("--threads", type=int, help="torch threads for the latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed (data subset order)")
    p.add_argument("--layers", action="store_true", help="also print the per-layer table")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args) -> int:
    from prunekit.analysis.metrics import format_table, summarize
    from prunekit.deploy import io
    from prunekit.zoo.data import example_batch, get_loaders

    check_data(args.data)
    model = io.load(args.model)
    _, test, info = get_loaders(args.data, seed=args.seed, limit_test=args.limit_test, limit_train=1)
    res = summarize(model, example_batch(info, 1), test, batch=args.batch, threads=args.threads)
    layers = res.pop("layers")
    if args.json:
        print(json.dumps({**res, "layers": layers}, indent=1))
        return 0
    print(format_table([res]))
    if args.layers:
        print()
        print(format_table(layers))
    return 0
