"""``prunekit lottery``: lottery tickets (iterative magnitude pruning with rewinding) vs random re-init.

    prunekit lottery --model lenet300 --rounds 4 --final-sparsity 0.95 --rewind 200 --epochs 6 --out runs/lottery

Trains a bundled model (``lenet300``, ``vgg_small``, ...) on a bundled dataset with
:func:`prunekit.train.lottery.lottery_ticket`: round 0 trains the dense network, each
later round prunes the surviving weights by global magnitude, rewinds them to
``--rewind`` (``init`` or an optimizer step of round 0) and trains again; in every
round a copy with the same masks and a fresh random init is trained the same way
(the control). Writes into ``--out``: ``lottery.json`` (every round's numbers,
:class:`prunekit.train.lottery.LotteryRecord`), ``lottery.png`` (accuracy vs sparsity,
ticket vs control, dense dashed) and ``ticket/`` (the last round's ticket,
:func:`prunekit.save`). ``prunekit report <out>`` renders it as HTML.
"""
from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any, Dict, Union

from prunekit.cli._common import (
    add_threads,
    apply_quick,
    check_data,
    check_model,
    dataset_names,
    listed,
    model_names,
)
from prunekit.errors import PrunekitError

HELP = "lottery tickets: iterative magnitude pruning with rewinding vs the same masks randomly re-initialised"

# SGD as in benchmarks/lottery_mnist.py: LeNet-300-100 reaches ~98.2% on MNIST in 6 epochs
TRAIN = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine"}
QUICK = {"limit_train": 1000, "limit_test": 300, "epochs": 1, "rounds": 2, "final_sparsity": 0.8}  # argparse dests
DEFAULTS = {"rounds": 4, "final_sparsity": 0.95, "epochs": 2}


def add_arguments(p) -> None:
    p.add_argument("--model", default="lenet300", help=f"built-in model: {listed(model_names(), 'lenet300')}")
    p.add_argument("--data", default="mnist", help=f"dataset: {listed(dataset_names(), 'mnist')} "
                                                   "(idx: a folder of IDX files)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ticket's init and of training (control: seed+1)")
    p.add_argument("--rounds", type=int, help=f"pruning rounds after the dense one (default {DEFAULTS['rounds']})")
    p.add_argument("--final-sparsity", type=float,
                   help=f"sparsity after the last round; each round prunes the same share of the survivors "
                        f"(default {DEFAULTS['final_sparsity']})")
    p.add_argument("--rewind", default="init",
                   help="'init' (default) or an optimizer step of round 0 to rewind the survivors to, e.g. 200")
    p.add_argument("--epochs", type=int, help=f"training epochs per round (default {DEFAULTS['epochs']})")
    p.add_argument("--lr", type=float, default=TRAIN["lr"], help="SGD learning rate (cosine schedule per round)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--limit-train", type=int, help="use only this many training examples")
    p.add_argument("--limit-test", type=int, help="use only this many test examples")
    p.add_argument("--out", default="runs/lottery", help="output folder (default: runs/lottery)")
    p.add_argument("--quick", action="store_true", help="tiny setting for tests: 1000 train / 300 test images, "
                                                        "2 rounds to 80%%, 1 epoch each (flags still override)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads(p)


def _rewind(text: str) -> Union[str, int]:
    if text == "init":
        return "init"
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise PrunekitError(f"--rewind {text!r} must be 'init' or an optimizer step >= 0, e.g. 200")
    return step


def _settings(args) -> Dict[str, Any]:
    """Resolve and check every flag before any data is loaded or model trained."""
    from prunekit.train.lottery import imp_schedule

    apply_quick(args, QUICK)   # as if these flags were given, unless they were
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    check_model(args.model)   # names the registered models
    check_data(args.data)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--limit-train", args.limit_train), ("--limit-test", args.limit_test)):
        if value is not None and value < 1:
            raise PrunekitError(f"{flag} {value} must be >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise PrunekitError(f"--lr {args.lr} must be > 0")
    schedule = imp_schedule(args.rounds, final_sparsity=args.final_sparsity)  # checks rounds and final sparsity
    return {"schedule": schedule, "rewind": _rewind(args.rewind), "train": {**TRAIN, "lr": args.lr}}


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
    io.save(res.model, out / "ticket", metadata={"accuracy": res.rounds[-1].accuracy})
    _print(record, out)
    return 0


def _print(record, out: Path) -> None:
    from prunekit.analysis.metrics import format_table

    dense = record.dense_accuracy
    rows = [{"round": 0, "sparsity": record.rounds[0].sparsity, "ticket_acc": dense}]
    rows += [{"round": p["round"], "sparsity": round(p["sparsity"], 4), "ticket_acc": p["ticket"],
              "reinit_acc": p["reinit"], "ticket-reinit_pp": None if p["advantage_pp"] is None
              else round(p["advantage_pp"], 2)} for p in record.points()]
    print(format_table(rows))
    print(f"\nwritten: {out / 'lottery.json'}  {out / 'lottery.png'}  {out / 'ticket'}")
    print(f"HTML report: prunekit report {out}")
