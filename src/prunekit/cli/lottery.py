"""``prunekit lottery``: lottery tickets (iterative magnitude pruning with rewinding) vs random re-init.

    prunekit lottery --model lenet300 --rounds 4 --final-sparsity 0.95 --rewind 200 --epochs 6 --out runs/lottery

Trains a bundled model (``lenet300``, ``vgg_small``, ...) on a bundled dataset with
:func:`prunekit.train.lottery.lottery_ticket`: round 0 trains the dense network, each
later round prunes the surviving weights by global magnitude, rewinds them to
``--rewind`` (``init`` or an optimizer step of round 0) and trains again; in every
round a copy with the same masks and a fresh random init is trained the same way
(the control). Writes into ``--out``: ``lottery.json`` (every round's numbers,
:class:`prunekit.train.lottery.LotteryRecord`), ``lottery.png`` (accuracy vs sparsity,
ticket vs control, dense dashed), ``ticket/`` (the last round's ticket,
:func:`prunekit.save`) and ``config.yaml`` (every setting, resolved). ``prunekit report <out>``
renders it as HTML. ``--recipe FILE``: a YAML mapping of the same settings (``rounds: 4``,
``final_sparsity: 0.95``, ...), as for ``prunekit prune``; flags override it.
"""
from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any, Dict, Union

from prunekit.cli._common import (
    add_threads,
    check_data,
    check_model,
    dataset_names,
    listed,
    model_names,
    pct,
    quick_value,
    write_yaml,
)
from prunekit.errors import PrunekitError

HELP = "lottery tickets: iterative magnitude pruning with rewinding vs the same masks randomly re-initialised"

# SGD as in benchmarks/lottery_mnist.py: LeNet-300-100 reaches ~98.2% on MNIST in 6 epochs
TRAIN = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine"}
# every setting (argparse dest = recipe field): defaults <- --recipe <- --quick <- flags
DEFAULTS: Dict[str, Any] = {
    "model": "lenet300", "data": "mnist", "seed": 0, "rounds": 4, "final_sparsity": 0.95, "rewind": "init",
    "epochs": 2, "lr": TRAIN["lr"], "batch_size": 128, "limit_train": None, "limit_test": None,
    "out": "runs/lottery"}
_TEXT, _INT, _NUMBER = ((str,), "a string"), ((int,), "an integer"), ((int, float), "a number")
TYPES: Dict[str, Any] = {"model": _TEXT, "data": _TEXT, "seed": _INT, "rounds": _INT, "final_sparsity": _NUMBER,
                         "rewind": ((str, int), "'init' or a step"), "epochs": _INT, "lr": _NUMBER,
                         "batch_size": _INT, "limit_train": _INT, "limit_test": _INT, "out": _TEXT}
# --quick: at most these (smaller recipe values and flags stand): seconds
QUICK = {"limit_train": 1000, "limit_test": 300, "epochs": 1, "rounds": 2, "final_sparsity": 0.8}


def add_arguments(p) -> None:
    p.add_argument("--recipe", help="YAML mapping of these settings (model, data, seed, rounds, final_sparsity, "
                                    "rewind, epochs, lr, batch_size, limit_train, limit_test, out); flags override "
                                    "its fields; the resolved settings go to <out>/config.yaml")
    p.add_argument("--model", help=f"built-in model: {listed(model_names(), DEFAULTS['model'])}")
    p.add_argument("--data", help=f"dataset: {listed(dataset_names(), DEFAULTS['data'])} "
                                  "(idx: a folder of IDX files)")
    p.add_argument("--seed", type=int, help="seed of the ticket's init and of training (control: seed+1) "
                                            f"(default: {DEFAULTS['seed']})")
    p.add_argument("--rounds", type=int, help=f"pruning rounds after the dense one (default: {DEFAULTS['rounds']})")
    p.add_argument("--final-sparsity", type=float,
                   help=f"sparsity after the last round; each round prunes the same share of the survivors "
                        f"(default: {DEFAULTS['final_sparsity']})")
    p.add_argument("--rewind", help="'init' or an optimizer step of round 0 to rewind the survivors to, e.g. 200 "
                                    f"(default: {DEFAULTS['rewind']})")
    p.add_argument("--epochs", type=int, help=f"training epochs per round (default: {DEFAULTS['epochs']})")
    p.add_argument("--lr", type=float, help="SGD learning rate (cosine schedule per round) "
                                            f"(default: {DEFAULTS['lr']})")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default: {DEFAULTS['batch_size']})")
    p.add_argument("--limit-train", type=int, help="use only this many training examples")
    p.add_argument("--limit-test", type=int, help="use only this many test examples")
    p.add_argument("--out", help=f"output folder (default: {DEFAULTS['out']})")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny setting (seconds): at most {QUICK['limit_train']} train / {QUICK['limit_test']} test "
                        f"images, {QUICK['rounds']} rounds to {QUICK['final_sparsity']:.0%}%, {QUICK['epochs']} epoch "
                        "each (smaller recipe values and flags still stand)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads(p)


def _rewind(text: Any) -> Union[str, int]:
    if text == "init":
        return "init"
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise PrunekitError(f"--rewind {text!r} must be 'init' or an optimizer step >= 0, e.g. 200")
    return step


def _recipe(path: Any) -> Dict[str, Any]:
    """The fields of a ``--recipe`` file (``final-sparsity`` or ``final_sparsity``), checked."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise PrunekitError(f"recipe {path} must be a YAML mapping of fields")
    out = {}
    for key, value in recipe.items():
        field = str(key).replace("-", "_")
        if field not in DEFAULTS:
            raise PrunekitError(f"unknown recipe field {key!r}; allowed: {', '.join(DEFAULTS)}")
        types, what = TYPES[field]
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise PrunekitError(f"recipe field {key!r} must be {what}, got {value!r}")
        out[field] = value
    return out


def resolve(args) -> Dict[str, Any]:
    """Defaults <- recipe <- --quick <- flags: every setting, resolved (what config.yaml records)."""
    config = {**DEFAULTS, **(_recipe(args.recipe) if args.recipe else {})}
    given = {k for k in DEFAULTS if getattr(args, k) is not None}
    if args.quick:
        for field, tiny in QUICK.items():
            if field not in given:
                config[field] = quick_value(config[field], tiny)
    config.update({k: getattr(args, k) for k in given})
    return config


def _settings(args) -> Dict[str, Any]:
    """Resolve and check every setting before any data is loaded or model trained (``args`` gets the
    resolved values)."""
    from prunekit.train.lottery import imp_schedule

    config = resolve(args)
    for field, value in config.items():
        setattr(args, field, value)
    check_model(args.model)   # names the registered models
    check_data(args.data)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--limit-train", args.limit_train), ("--limit-test", args.limit_test)):
        if value is not None and value < 1:
            raise PrunekitError(f"{flag} {value} must be >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise PrunekitError(f"--lr {args.lr} must be > 0")
    schedule = imp_schedule(args.rounds, final_sparsity=args.final_sparsity)  # checks rounds and final sparsity
    return {"schedule": schedule, "rewind": _rewind(args.rewind), "train": {**TRAIN, "lr": args.lr},
            "config": config}


def model_kwargs(name: str, info: Dict[str, Any]) -> Dict[str, Any]:
    """The input and output sizes a built-in model takes, from the dataset's ``info``."""
    from prunekit.zoo.models import MODELS

    params = inspect.signature(MODELS.get(name)).parameters
    shape = tuple(info["input_shape"])   # (C, H, W)
    sizes = {"num_classes": info["num_classes"], "in_features": math.prod(shape), "in_channels": shape[0],
             "input_size": shape[-1]}
    return {k: v for k, v in sizes.items() if k in params}


def run(args) -> int:
    from prunekit.deploy import io
    from prunekit.report.figures import lottery_curve
    from prunekit.train.lottery import lottery_ticket
    from prunekit.zoo.data import get_loaders
    from prunekit.zoo.models import build_model

    s = _settings(args)
    t0 = time.perf_counter()
    train, test, info = get_loaders(args.data, batch_size=args.batch_size, seed=args.seed,
                                    limit_train=args.limit_train, limit_test=args.limit_test)
    kwargs = model_kwargs(args.model, info)
    res = lottery_ticket(lambda: build_model(args.model, **kwargs), train, sparsities=s["schedule"],
                         rewind=s["rewind"], epochs_per_round=args.epochs, criterion="l1", scope="global",
                         seed=args.seed, reinit=True, eval_loader=test,
                         progress=False if args.no_progress else None, **s["train"])
    meta = {"model": args.model, "model_kwargs": kwargs, "data": info["name"], "n_train": info["n_train"],
            "n_test": info["n_test"], "seed": args.seed, "reinit_seed": args.seed + 1, "rewind": s["rewind"],
            "epochs_per_round": args.epochs, "schedule": s["schedule"], "criterion": "l1", "scope": "global",
            "batch_size": args.batch_size, "train": s["train"], "threads": args.threads, "wall_time_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = res.record(meta)
    record.save(out / "lottery.json")
    lottery_curve(record.to_dict(), out / "lottery.png", title=f"Lottery ticket vs random re-init: "
                                                                f"{args.model} on {info['name']}")
    write_yaml(out / "config.yaml", {**s["config"], "threads": args.threads})
    io.save(res.model, out / "ticket", metadata={"accuracy": res.rounds[-1].accuracy})
    _print(record, out)
    return 0


def _print(record, out: Path) -> None:
    from prunekit.analysis.metrics import format_table

    dense = record.dense_accuracy
    rows = [{"round": 0, "sparsity": record.rounds[0].sparsity, "ticket_acc": pct(dense)}]
    rows += [{"round": p["round"], "sparsity": round(p["sparsity"], 4), "ticket_acc": pct(p["ticket"]),
              "reinit_acc": pct(p["reinit"]), "ticket-reinit_pp": None if p["advantage_pp"] is None
              else round(p["advantage_pp"], 2)} for p in record.points()]
    print(format_table(rows))
    print(f"\nwritten: {out / 'lottery.json'}  {out / 'lottery.png'}  {out / 'ticket'}  {out / 'config.yaml'}")
    print(f"HTML report: prunekit report {out}")
