"""``prunekit advise``: measure pruning strategies on this machine and recommend one for a target.

    prunekit advise --model lenet300 --target cpu --budget 1.0 --batch 1,256 --out runs/advise

Takes the model and data of ``prunekit prune`` (the same flags, or ``--recipe``:
a built-in model trained or reused from the cache, or ``--checkpoint``), builds
every candidate (dense; structured 25/50/75%; unstructured 50/80/90/95% on CSR
kernels where they pay; 2:4) from a copy, measures latency, size, MACs and
accuracy, prints the table and the recommendation, and writes ``advice.json``
and ``advice.md`` into ``--out``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from prunekit.cli._common import add_threads, listed, percent_columns
from prunekit.cli._names import names
from prunekit.cli.prune import FLAGS, flag_help, resolve_config
from prunekit.errors import PrunekitError

HELP = f"measure pruning strategies on this machine and recommend one for a target: {listed(names('advise_target'))}"

# the flags of `prunekit prune` that say which model and data: the rest concern pruning methods
SHARED = ("model", "checkpoint", "data", "seed", "batch-size", "limit-train", "limit-test", "dense-epochs")
QUICK = {"limit-train": 1000, "limit-test": 300, "dense-epochs": 1}  # --quick: at most these (flags win)


def add_arguments(p) -> None:
    p.add_argument("--recipe", help="a `prunekit prune` YAML recipe (model, data, dense training); flags override")
    for flag in SHARED:
        _, typ, _ = FLAGS[flag]
        p.add_argument(f"--{flag}", type=typ, help=flag_help(flag))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any recipe field, as for `prunekit prune` (value parsed as YAML; repeatable)")
    p.add_argument("--target", default="cpu", choices=names("advise_target"),
                   help="cpu: measured CPU latency; gpu: measured CUDA latency (run it on the GPU machine); "
                        "sparse: an accelerator that skips zeros (effective MACs) (default: cpu)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="largest accuracy drop allowed, in percentage points (default 1.0)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes to time; the first ranks (default 1)")
    add_threads(p)   # for the whole run: dense training, fine-tuning and the timings (recorded in advice.json)
    p.add_argument("--candidates", help=f"comma-separated KIND[:AMOUNT] with KIND one of "
                                        f"{listed(names('advise_kind'))}, e.g. dense,structured:0.5,"
                                        f"unstructured:0.9,nm:2:4 (default: {listed(names('advise_default'))})")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="recovery fine-tune of every pruned candidate, masks fixed (default 0)")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="learning rate of that fine-tune (default 0.01)")
    p.add_argument("--repeat", type=int, default=11, help="timed samples per candidate and batch (median; default 11)")
    p.add_argument("--allow-proxy", action="store_true",
                   help="--target gpu without a GPU: rank by the MACs a GPU executes, marked not measured")
    p.add_argument("--out", default="runs/advise", help="output folder (default: runs/advise)")
    p.add_argument("--quick", action="store_true", help="tiny setting for tests: 1000 train / 300 test images, "
                                                        "1 dense epoch (flags still override)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # the prune flags not offered here still exist for resolve_config, always unset
    p.set_defaults(no_compress=False, include_classifier=None,
                   **{f.replace("-", "_"): None for f in FLAGS if f not in SHARED + ("out",)})


def _parse_batches(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrunekitError(f"--batch {text!r} must be comma-separated positive ints, e.g. 1,256") from None
    if not values or any(v < 1 for v in values):
        raise PrunekitError(f"--batch {text!r}: every batch size must be >= 1")
    return values


def _settings(args) -> Dict[str, Any]:
    """Resolve and check everything before any data is loaded or model trained."""
    from prunekit.advise import check_candidates, check_target

    config = resolve_config(args, quick=QUICK)
    candidates = None if args.candidates is None else [c.strip() for c in args.candidates.split(",") if c.strip()]
    check_candidates(candidates)
    check_target(args.target, args.allow_proxy, None)  # no GPU for --target gpu: say so before training anything
    if args.budget < 0:
        raise PrunekitError(f"--budget {args.budget} must be >= 0 (percentage points)")
    for flag, value, low in (("--finetune-epochs", args.finetune_epochs, 0), ("--repeat", args.repeat, 1)):
        if value is not None and value < low:
            raise PrunekitError(f"{flag} {value} must be >= {low}")
    return {"config": config, "candidates": candidates, "batches": _parse_batches(args.batch)}


def table(advice) -> str:
    """``advice.table()`` with the accuracy as every command prints it (98.04%)."""
    from prunekit.analysis.metrics import format_table

    rows = advice.rows()
    shown = percent_columns(rows, {f"{advice.metric}_%": advice.metric})
    return advice.table().replace(format_table(rows), format_table(shown), 1)


def run(args) -> int:
    from prunekit.advise import advise
    from prunekit.cli.sensitivity import dense_for
    from prunekit.experiment import loaders

    s = _settings(args)
    config = s["config"]
    progress = False if args.no_progress else None
    train, test, info = loaders(config)
    model = dense_for(config, train, test, info, progress)
    example = next(iter(test))[0][: s["batches"][0]]  # real images (larger batches repeat them)
    advice = advise(model, example, target=args.target, budget_pp=args.budget,
                    eval_loader=test, candidates=s["candidates"], batch=s["batches"],
                    train_loader=train if args.finetune_epochs > 0 else None, finetune_epochs=args.finetune_epochs,
                    finetune_kwargs={"lr": args.finetune_lr}, threads=args.threads, repeat=args.repeat,
                    seed=config["seed"], allow_proxy=args.allow_proxy, progress=progress)
    paths = advice.save(Path(args.out))
    print(table(advice))
    print(f"\nwritten: {paths[0]}  {paths[1]}")
    return 0
