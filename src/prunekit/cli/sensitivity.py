"""``prunekit sensitivity``: prune each layer alone at several sparsities, plot, and allocate.

    prunekit sensitivity --model lenet300 --sparsities 0.5,0.8,0.9,0.95,0.98 --target 0.9 --out runs/sens

Takes the model and data of ``prunekit prune`` (the same flags, or ``--recipe``:
a built-in model trained or reused from the cache, or ``--checkpoint``), and
writes into ``--out``: ``sensitivity.json`` (every curve), ``sensitivity.png``
(one curve per layer), ``allocation.json`` (per-layer sparsities meeting
``--target`` with the least predicted loss, and the metric measured with them,
with uniform per-layer pruning and with global magnitude at the same target)
and ``plan.json`` (the allocation as a Plan for ``prunekit.apply``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List

from prunekit.cli._common import add_threads, atomic_write_text, listed, pct
from prunekit.cli._names import live, names
from prunekit.cli.prune import FLAGS, flag_help, resolve_config, to_method
from prunekit.errors import PrunekitError

HELP = "per-layer sensitivity curves and per-layer sparsities that meet a global target with the least loss"

# the flags of `prunekit prune` that say which model, data and criterion: the rest concern training methods
SHARED = ("model", "checkpoint", "data", "seed", "batch-size", "limit-train", "limit-test", "dense-epochs",
          "criterion", "pattern", "dim", "norm", "include", "exclude", "min-keep")
QUICK = {"limit-train": 1000, "limit-test": 300, "dense-epochs": 1}  # --quick: at most these (flags win)


def add_arguments(p) -> None:
    p.add_argument("--recipe", help="a `prunekit prune` YAML recipe (model, data, dense training, method); "
                                    "flags override its fields")
    own = {  # what these two take here differs from `prunekit prune` (no whole-model pruners, no N:M)
        "criterion": f"a registered criterion: {listed(names('criterion'), 'l1')} (whole-model pruners such as "
                     "sparsegpt do not prune one layer alone)",
        "pattern": f"what is pruned: {listed(names('sensitivity_pattern'), 'unstructured')} (N:M fixes the "
                   "sparsity: nothing to sweep)",
    }
    for flag in SHARED:
        _, typ, _ = FLAGS[flag]
        help_ = own.get(flag) or flag_help(flag)
        if flag in ("include", "exclude"):
            p.add_argument(f"--{flag}", action="append", help=help_)
        else:
            p.add_argument(f"--{flag}", type=typ, help=help_)
    p.add_argument("--include-classifier", action="store_true", default=None, help="also analyse the last layer")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any recipe field, as for `prunekit prune` (value parsed as YAML; repeatable)")
    p.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9,0.95,0.98",
                   help="comma-separated sparsities each layer is pruned to alone (default: %(default)s)")
    p.add_argument("--target", type=float, default=0.9,
                   help="global sparsity (fraction of the analysed layers' weights) to allocate (default 0.9)")
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "loss"), help="what the curves measure")
    p.add_argument("--weights", default="params", choices=names("sensitivity_weights"),
                   help="params: the target counts weights (default); uniform: the mean of the layer sparsities")
    p.add_argument("--eval-on", default="test", choices=("test", "train"),
                   help="which split the curves are measured on (default test; train keeps the test set unseen)")
    p.add_argument("--eval-batches", type=int,
                   help="evaluate on at most this many batches (test batches hold 1000 images)")
    p.add_argument("--out", default="runs/sensitivity", help="output folder (default: runs/sensitivity)")
    p.add_argument("--quick", action="store_true", help="tiny setting for tests: 1000 train / 300 test images, "
                                                        "1 dense epoch (flags still override)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads(p)
    p.add_argument("--bias-correction", action="store_true",
                   help="correct each trial's (and the allocation's) biases by the removed weights' mean "
                        "contribution, as `prunekit prune --bias-correction` does")
    # the prune flags not offered here still exist for resolve_config, always unset
    p.set_defaults(no_compress=False, **{f.replace("-", "_"): None for f in FLAGS if f not in SHARED + ("out",)})


def _parse_sparsities(text: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrunekitError(f"--sparsities {text!r} must be comma-separated fractions, e.g. 0.5,0.9") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise PrunekitError(f"--sparsities {text!r}: every value must be a fraction in (0, 1)")
    return sorted(set(values))


def _settings(args) -> Dict[str, Any]:
    """Resolve and check everything before any data is loaded or model trained."""
    from prunekit._util import check_choice

    config = resolve_config(args, criteria=live("criterion"), quick=QUICK)   # scoring criteria only: no pruners
    prune_kw = to_method(config)["prune"]
    check_choice(prune_kw["pattern"], live("sensitivity_pattern"), "pattern")
    if not 0.0 <= args.target < 1.0:
        raise PrunekitError(f"--target {args.target} must be a fraction in [0, 1)")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise PrunekitError(f"--eval-batches {args.eval_batches} must be >= 1")
    return {"config": config, "prune": prune_kw, "sparsities": _parse_sparsities(args.sparsities)}


def dense_for(config: Dict[str, Any], train, test, info, progress):
    """The dense model of a config: its checkpoint (a saved folder, or weights for its model), else trained or
    taken from the cache. A factory named as the model is built: the user asked for it."""
    from prunekit.experiment import dense_model, starting_model
    from prunekit.zoo.sources import trusting

    with trusting([config["model"]]):
        if config.get("checkpoint"):
            return starting_model(config, info)
        model, _ = dense_model(config["model"], config.get("model_kwargs") or {}, train, test, info,
                               train_cfg=config["dense"], seed=config["seed"], progress=progress)
    return model


def _trial_options(model, names, prune_kw, train, bias_correction: bool) -> Dict[str, Any]:
    """Statistics for data-aware criteria (and bias correction), from the first training batches, and the
    ranking a trial uses: per output row for Wanda (its rule), per layer otherwise."""
    import itertools

    from prunekit.api import needs_data
    from prunekit.criteria import calibrate
    from prunekit.experiment import CALIB_BATCHES

    crit = prune_kw["criterion"]
    scope = "row" if crit == "wanda" and prune_kw["pattern"] == "unstructured" else "layer"
    if not (needs_data(crit) or bias_correction):
        return {"stats": None, "scope": scope, "bias_correction": False}
    batches = list(itertools.islice(iter(train), CALIB_BATCHES))
    stats = calibrate(crit if needs_data(crit) else "input_mean", model, batches, names)
    if bias_correction and crit == "taylor":  # taylor's statistics hold no input means: add them
        for name, entry in calibrate("input_mean", model, batches, names).items():
            stats[name].update(entry)
    return {"stats": stats, "scope": scope, "bias_correction": bool(bias_correction)}


def _measured(model, alloc, prune_kw, target, score, trial) -> Dict[str, float]:
    """The metric with the allocation, and with the two usual one-number alternatives at the same target."""
    from prunekit.analysis.sensitivity import apply_allocation
    from prunekit.api import prune

    shape = {k: prune_kw[k] for k in ("pattern", "dim", "norm") if k in prune_kw}
    layers = {k: prune_kw[k] for k in ("include", "exclude", "include_classifier") if k in prune_kw}
    seed = prune_kw.get("seed", 0)
    out = {}
    m = copy.deepcopy(model)
    apply_allocation(m, alloc, criterion=prune_kw["criterion"], seed=seed, **shape, **trial)
    out["allocated"] = score(m)
    data_kw = {"stats": trial["stats"], "bias_correction": trial["bias_correction"]}
    for scope in (trial["scope"], "global"):
        m = copy.deepcopy(model)
        prune(m, target, criterion=prune_kw["criterion"], scope=scope, min_keep=prune_kw["min_keep"], seed=seed,
              **shape, **layers, **data_kw)
        out["global_magnitude" if scope == "global" else "uniform_layer"] = score(m)
    return out


def run(args) -> int:
    from prunekit.analysis.sensitivity import allocation_plan, analyze, evaluator
    from prunekit.experiment import loaders
    from prunekit.report.figures import sensitivity_curves
    from prunekit.targets import select_targets

    s = _settings(args)
    config, prune_kw = s["config"], s["prune"]
    progress = False if args.no_progress else None
    train, test, info = loaders(config)
    model = dense_for(config, train, test, info, progress)
    names = select_targets(model, **{k: prune_kw[k] for k in ("include", "exclude", "include_classifier")
                                     if k in prune_kw})
    shape = {k: prune_kw[k] for k in ("dim", "norm") if k in prune_kw}
    loader = test if args.eval_on == "test" else train
    trial = _trial_options(model, names, prune_kw, train, args.bias_correction)
    result = analyze(model, loader, sparsities=s["sparsities"], criterion=prune_kw["criterion"], names=names,
                     pattern=prune_kw["pattern"], metric=args.metric, seed=config["seed"],
                     max_batches=args.eval_batches, progress=progress, **shape, **trial)
    alloc = result.allocate(args.target, min_keep=prune_kw["min_keep"], weights=args.weights)
    score = evaluator(loader, args.metric, args.eval_batches)
    measured = _measured(model, alloc, {**prune_kw, "seed": config["seed"]}, args.target, score, trial)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "sensitivity.json")
    sensitivity_curves(result.to_dict(), out / "sensitivity.png", alloc)
    allocation_plan(model, alloc, criterion=prune_kw["criterion"], pattern=prune_kw["pattern"],
                    seed=config["seed"], stats=trial["stats"], scope=trial["scope"], **shape).save(out / "plan.json")
    doc = {"format": "prunekit.allocation/1", "target": args.target, "weights": args.weights,
           "min_keep": prune_kw["min_keep"], "metric": args.metric, "eval_on": args.eval_on,
           "achieved": result.achieved(alloc, args.weights), "sparsities": alloc, "baseline": result.baseline,
           "predicted_drop": result.predicted_drop(alloc), "measured": measured,
           "criterion": prune_kw["criterion"], "pattern": prune_kw["pattern"], "seed": config["seed"],
           "scope": trial["scope"], "bias_correction": trial["bias_correction"], "threads": args.threads}
    atomic_write_text(out / "allocation.json", json.dumps(doc, indent=1, allow_nan=False))
    _print(result, alloc, doc, out)
    return 0


def _print(result, alloc, doc, out: Path) -> None:
    from prunekit.analysis.metrics import format_table

    acc = result.metric == "accuracy"   # a fraction: printed as every command prints accuracy (98.04%, pp)

    def value(v):
        return pct(v) if acc else v

    def measured(method, v):
        if acc:
            return {"method": method, "accuracy": pct(v), "drop_pp": round(100 * result.drop(v), 2)}
        return {"method": method, result.metric: v, "drop": result.drop(v)}

    sparsities = {f"s={s:g}" for s in result.sparsities}
    print(f"{result.metric} with each layer pruned alone (baseline "
          f"{pct(result.baseline) if acc else f'{result.baseline:.4f}'}, {result.meta['criterion']}, "
          f"{result.meta['pattern']}):")
    print(format_table([{k: value(v) if k in sparsities else v for k, v in row.items()} for row in result.rows(alloc)]))
    drop = doc["predicted_drop"]
    print(f"\nallocation for target {doc['target']:g} ({doc['weights']}-weighted; achieved {doc['achieved']:.4f}): "
          f"predicted drop {f'{100 * drop:.2f} pp' if acc else f'{drop:.4f}'}")
    print(format_table([measured(k, v) for k, v in doc["measured"].items()]))
    print(f"\nwritten: {out / 'sensitivity.json'}  {out / 'sensitivity.png'}  {out / 'allocation.json'}  "
          f"{out / 'plan.json'}")
