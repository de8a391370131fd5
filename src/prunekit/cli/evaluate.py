"""``prunekit eval``: measure a saved model: accuracy, sizes, MACs, latency."""
from __future__ import annotations

import json
import sys

from prunekit.cli._common import DATA_FORMS, add_threads, add_trust, check_data, dataset_names, listed, pct, trusted
from prunekit.errors import PrunekitError

HELP = "evaluate a saved prunekit model folder: accuracy, params, MACs, size, latency"
PERCENT = ("accuracy", "top5")   # fractions, printed as percentages (98.04%) in the tables


def add_arguments(p) -> None:
    p.add_argument("model", help="a model folder written by prunekit (e.g. runs/prune/model)")
    p.add_argument("--data", default=None, help=f"dataset: {listed(dataset_names())}, or your own: "
                   f"{', '.join(DATA_FORMS)}, read as the training data was (default: the one the model was trained "
                   "on, recorded when it was saved; else mnist)")
    p.add_argument("--limit-test", type=int, help="use only this many test examples")
    p.add_argument("--batch", type=int, default=1, help="batch size of the latency measurement")
    add_threads(p)   # also the latency measurement's (printed as "threads")
    p.add_argument("--seed", type=int, default=0, help="seed (data subset order; your own data without a test "
                                                        "split: the hold-out, as in training)")
    add_trust(p)
    p.add_argument("--layers", action="store_true", help="also print the per-layer table")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables (accuracy and top5 as "
                                                        "fractions in [0, 1]; the tables print percentages)")


def _check_same_data(trained_on, info) -> None:
    """Evaluating on other data than the model saw is allowed (another copy of it, a shifted test set), but it
    is said; data of another shape or more classes cannot be scored and is refused."""
    if not trained_on:
        return
    if list(info["input_shape"]) != list(trained_on["input_shape"]) or info["num_classes"] > trained_on["num_classes"]:
        raise PrunekitError(f"the model was trained on {trained_on['name']} (inputs {trained_on['input_shape']}, "
                            f"{trained_on['num_classes']} classes); {info['name']} has inputs "
                            f"{list(info['input_shape'])} and {info['num_classes']} classes")
    if trained_on.get("classes") and info.get("classes") and list(info["classes"]) != list(trained_on["classes"]):
        raise PrunekitError(f"the model was trained on the classes {trained_on['classes']}; {info['name']} has "
                            f"{info['classes']} (labels would not mean the same classes)")
    if info["name"] != trained_on["name"]:
        print(f"prunekit eval: note: the model was trained on {trained_on['name']}, evaluating on {info['name']}",
              file=sys.stderr)


def _split_seed(data: str, trained_on, seed: int) -> int:
    """Your own data without a test split is held out by a seed: the training run's for the same data, so that
    eval scores the examples training never saw."""
    from pathlib import Path

    recorded = trained_on.get("split_seed")
    if recorded is None or str(Path(data).expanduser().resolve()) != trained_on.get("name"):
        return seed
    return int(recorded)


def run(args) -> int:
    from prunekit.analysis.metrics import format_table, summarize
    from prunekit.deploy import io
    from prunekit.zoo.data import example_batch, get_loaders, recorded_options
    from prunekit.zoo.userdata import is_user_data

    if args.data is not None:
        check_data(args.data)  # a typo is said before anything is read
    trained_on = (io.read_spec(args.model).get("metadata") or {}).get("data") or {}
    data = args.data or trained_on.get("name") or "mnist"
    check_data(data)
    with trusted(args):
        model = io.load(args.model)
    # your own data is read as it was for training: same size, same normalisation (the training split's)
    options = recorded_options(trained_on) if is_user_data(data) else None
    _, test, info = get_loaders(data, seed=_split_seed(data, trained_on, args.seed), limit_test=args.limit_test,
                                limit_train=1, options=options)
    _check_same_data(trained_on, info)
    res = summarize(model, example_batch(info, 1), test, batch=args.batch, threads=args.threads)
    layers = res.pop("layers")
    if args.json:
        print(json.dumps({**res, "layers": layers}, indent=1))
        return 0
    print(format_table([{k: pct(v) if k in PERCENT else v for k, v in res.items()}]))
    if args.layers:
        print()
        print(format_table(layers))
    return 0
