"""``prunekit prune``: prune a model as a recipe (YAML) says; every field is also a flag.

    prunekit prune --recipe recipe.yaml --sparsity 0.9 --out runs/lenet-90

writes the pruned model (safetensors + JSON spec), its masks as a plan, the
resolved config (config.yaml), results.json and a report into ``--out``.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from prunekit.cli._common import (
    add_threads,
    add_trust,
    check_checkpoint,
    check_data,
    check_model,
    criterion_names,
    dataset_names,
    listed,
    model_names,
    print_summary,
    quick_value,
    trusted,
    write_run,
)
from prunekit.cli._names import DATA_FORMS, MODEL_FORMS, WEIGHT_SUFFIXES, live, names
from prunekit.errors import PrunekitError

HELP = "prune a model from a YAML recipe and/or flags; save it, its plan, config and report"

DEFAULTS: Dict[str, Any] = {
    "model": "lenet300", "model_kwargs": {}, "checkpoint": None, "data": "mnist",
    # how your own data (a folder or file given as data) is read: prunekit.zoo.userdata.DataOptions
    "data_options": {"input_size": None, "mean": None, "std": None, "label_column": None, "test_fraction": None},
    "seed": 0,
    "batch_size": 128, "limit_train": None, "limit_test": None, "out": "runs/prune",
    "dense": {"epochs": 40, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine"},
    "method": {"name": "pruned", "kind": "oneshot", "sparsity": 0.9, "criterion": "l1", "scope": None,
               "pattern": "unstructured", "dim": 0, "norm": 1.0, "nm": [2, 4], "include": None,
               "exclude": None, "include_classifier": False, "min_keep": 0.01, "bias_correction": False,
               "allocation": "uniform"},
    "finetune": {"epochs": 2, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4,
                 "lr_schedule": "cosine", "checkpoint_every": None},
    "gradual": {"epochs": 30, "prune_epochs": None, "every": None},  # None: first 40% of epochs; ~10 updates/epoch
    "save": {"compressed": True},
}

DEFAULT_SCOPE = "global"  # one ranking across layers: the strongest default for magnitude (see the README)
# --quick: at most these (flag -> value; as `prunekit demo --quick`), for the fields no flag gives: seconds
QUICK = {"limit-train": 2000, "limit-test": 500, "dense-epochs": 2, "epochs": 1, "gradual-epochs": 2,
         "prune-epochs": 1}

# flag -> (path in the recipe, type, help); "{names}" in a help is filled in by flag_help() with the values the
# flag takes (CHOICES, as _names has them when the parser is built), and the recipe default is added
FLAGS = {
    "model": ("model", str, "a built-in model: {names}; or " + ", ".join(MODEL_FORMS) + " (a factory function "
              "returning an nn.Module); the number of classes (and timm's in_chans) come from the data"),
    "checkpoint": ("checkpoint", str, "start from these weights instead of training: a model folder saved by "
                   "prunekit, or a weights file for --model (" + ", ".join(WEIGHT_SUFFIXES) + "; torch files are read "
                   "with weights_only=True)"),
    "data": ("data", str, "dataset: {names}; or your own: " + ", ".join(DATA_FORMS)),
    "input-size": ("data_options.input_size", str, "your images: resize to H[,W] pixels (default: their own size, "
                   "which must then be the same for all)"),
    "mean": ("data_options.mean", str, "your data: per-channel mean to subtract, e.g. 0.5,0.5,0.5, or imagenet, or "
             "auto (computed on the training split) (default: imagenet for RGB image folders, else auto)"),
    "std": ("data_options.std", str, "your data: per-channel std to divide by (as --mean)"),
    "label-column": ("data_options.label_column", str, "your CSV: the label column (default: 'label', else the "
                     "last column)"),
    "test-fraction": ("data_options.test_fraction", float, "your data without a test split: the fraction held out "
                      "per class, seeded (default: 0.2)"),
    "seed": ("seed", int, "seed: the same seed gives the same masks"),
    "batch-size": ("batch_size", int, "training batch size"),
    "limit-train": ("limit_train", int, "use only this many training examples"),
    "limit-test": ("limit_test", int, "use only this many test examples"),
    "dense-epochs": ("dense.epochs", int, "epochs to train the dense model (when no checkpoint)"),
    "schedule": ("method.kind", str, "how to prune: {names} (surgery: whole channels/neurons physically "
                 "removed, a smaller, faster dense model)"),
    "sparsity": ("method.sparsity", float, "target sparsity in [0, 1) (a list in the recipe for iterative)"),
    "criterion": ("method.criterion", str, "a registered criterion or whole-model pruner: {names}"),
    "scope": ("method.scope", str, "where the sparsity is met: {names} (row: the same fraction of every "
              f"output row; default {DEFAULT_SCOPE}, or what a whole-model pruner takes)"),
    "pattern": ("method.pattern", str, "what is pruned: {names}"),
    "dim": ("method.dim", int, "structured: 0 = rows/output channels, 1 = columns/input channels"),
    "norm": ("method.norm", float, "structured: the Ln norm of each slice (1, 2, inf)"),
    "nm": ("method.nm", str, "N:M pattern, e.g. 2:4"),
    "include": ("method.include", str, "glob of layers to prune (repeatable)"),
    "exclude": ("method.exclude", str, "glob of layers to leave alone (repeatable)"),
    "min-keep": ("method.min_keep", float, "per-layer floor in global ranking (fraction, or count if >= 1)"),
    "allocation": ("method.allocation", str, "per-layer sparsities for layer/row scope: {names} (magnitude: as one "
                   "global |w| ranking; owl: more outliers, less pruning)"),
    "epochs": ("finetune.epochs", int, "fine-tuning epochs after pruning"),
    "lr": ("finetune.lr", float, "fine-tuning learning rate"),
    "optimizer": ("finetune.optimizer", str, "fine-tuning optimizer: {names}"),
    "momentum": ("finetune.momentum", float, "SGD momentum"),
    "weight-decay": ("finetune.weight_decay", float, "weight decay"),
    "lr-schedule": ("finetune.lr_schedule", str, "fine-tuning learning-rate schedule: {names}"),
    "checkpoint-every": ("finetune.checkpoint_every", int, "also checkpoint every N steps (mid-epoch); "
                         "continue a killed run with --resume"),
    "gradual-epochs": ("gradual.epochs", int, "gradual: total epochs of training"),
    "prune-epochs": ("gradual.prune_epochs", int, "gradual: epochs over which sparsity rises (default: the first 40%% of the "
                     "gradual epochs)"),
    "out": ("out", str, "output folder"),
}
REPEATABLE = {"include", "exclude"}
# flag -> the values it takes: help lists them as _names has them (no torch), a run checks them against the
# registry or tuple that defines them (live)
CHOICES = {"model": "model", "data": "dataset", "schedule": "kind", "criterion": "criterion", "scope": "scope",
           "pattern": "pattern", "optimizer": "optimizer", "lr-schedule": "lr_schedule", "allocation": "allocation"}
CHOICE_NAMES = {"model": model_names, "data": dataset_names, "criterion": criterion_names}  # as a user spells them


def choice_names(flag: str) -> Sequence[str]:
    """The values ``--flag`` takes, for its help (no torch)."""
    return CHOICE_NAMES[flag]() if flag in CHOICE_NAMES else names(CHOICES[flag])


def recipe_default(flag: str) -> Any:
    """The value ``--flag`` has when neither it nor the recipe gives one (DEFAULTS)."""
    value: Any = DEFAULTS
    for part in FLAGS[flag][0].split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def flag_help(flag: str, names_: Sequence[str] = ()) -> str:
    """The help of ``--flag``: the values it takes (``names_``, or its CHOICES now), the default marked, or
    ``(default: X)`` from the recipe defaults."""
    _, _, text = FLAGS[flag]
    default = recipe_default(flag)
    if flag in CHOICES or names_:
        text = text.format(names=listed(names_ or choice_names(flag), default if isinstance(default, str) else None))
    if default not in (None, {}) and "default" not in text:
        shown = ":".join(map(str, default)) if flag == "nm" else default
        text += f" (default: {shown})".replace("%", "%%")
    return text


def add_arguments(p) -> None:
    p.add_argument("--recipe", help="YAML recipe; flags override its fields")
    for flag, (_, typ, _) in FLAGS.items():
        if flag in REPEATABLE:
            p.add_argument(f"--{flag}", action="append", help=flag_help(flag))
        else:
            p.add_argument(f"--{flag}", type=typ, help=flag_help(flag))
    p.add_argument("--include-classifier", action="store_true", default=None, help="also prune the last layer")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any recipe field, e.g. --set dense.lr=0.1 --set model_kwargs={hidden: [64]} "
                        "(value parsed as YAML; repeatable)")
    add_trust(p)
    p.add_argument("--no-compress", action="store_true", help="save the model dense instead of compressed")
    p.add_argument("--bias-correction", action="store_true",
                   help="move each pruned layer's bias by the mean contribution of its removed weights "
                        "(input means from a few training batches; not with sparsegpt or surgery)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny setting, as `prunekit demo --quick` (seconds): at most {QUICK['limit-train']} train / "
                        f"{QUICK['limit-test']} test images, {QUICK['dense-epochs']} dense epochs, "
                        f"{QUICK['epochs']} fine-tuning epoch, {QUICK['gradual-epochs']} gradual epochs "
                        f"({QUICK['prune-epochs']} pruning); smaller recipe values and flags still stand")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoints in <out>/checkpoints "
                        "(without it, old checkpoints there are discarded)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep <out>/checkpoints after the run succeeds (they exist to resume an interrupted "
                        "run, and are removed when it finishes)")


FREE_FORM = {"model_kwargs"}  # passed through to the model's constructor, checked there


def _merge(base: Dict[str, Any], over: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if where + k in FREE_FORM:
            if not isinstance(v, dict):
                raise PrunekitError(f"recipe field {where + k!r} must be a mapping of keyword arguments")
            out[k] = v
            continue
        if k not in base:
            raise PrunekitError(f"unknown recipe field {where + k!r}; allowed: {', '.join(where + b for b in base)}")
        if isinstance(base[k], dict) != isinstance(v, dict):
            raise PrunekitError(f"recipe field {where + k!r} must be "
                                + (f"a mapping of {', '.join(base[k])}" if isinstance(base[k], dict)
                                   else "a value, not a mapping"))
        out[k] = _merge(base[k], v, f"{where}{k}.") if isinstance(v, dict) else v
    return out


def _nested(path: str, value: Any) -> Dict[str, Any]:
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def _get(config: Dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        config = config[part]
    return config


def _set(config: Dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def resolve_config(args, *, criteria: Optional[Sequence[str]] = None,
                   quick: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults ← recipe ← ``--quick`` ← flags; validated shape and names, ready for run_experiment.

    ``criteria``: the criterion names the command takes (default: every criterion and whole-model pruner).
    ``quick``: the command's tiny setting (flag -> value, at most that value, see :func:`quick_value`), applied
    when ``args.quick`` is set (default: prune's :data:`QUICK`).
    """
    recipe: Dict[str, Any] = {}
    if args.recipe:
        path = Path(args.recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found")
        recipe = yaml.safe_load(path.read_text()) or {}
        if not isinstance(recipe, dict):
            raise PrunekitError(f"recipe {path} must be a YAML mapping of fields")
    config = _merge(DEFAULTS, recipe)
    if getattr(args, "quick", False):
        for flag, tiny in (QUICK if quick is None else quick).items():
            _set(config, FLAGS[flag][0], quick_value(_get(config, FLAGS[flag][0]), tiny))
    for flag, (path, _, _) in FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            _set(config, path, value)
    for item in args.set:
        path, sep, raw = item.partition("=")
        if not sep:
            raise PrunekitError(f"--set {item!r} must look like FIELD=VALUE, e.g. dense.lr=0.1")
        _merge(config, _nested(path.strip(), yaml.safe_load(raw)))  # validates the field name
        _set(config, path.strip(), yaml.safe_load(raw))
    if args.include_classifier:
        config["method"]["include_classifier"] = True
    if getattr(args, "bias_correction", False):  # only `prune` has the flag; advise and others share this
        config["method"]["bias_correction"] = True
    if args.no_compress:
        config["save"]["compressed"] = False
    if config["method"]["scope"] is None:  # not given: global ranking, or what a whole-model pruner takes
        crit = config["method"]["criterion"]
        from prunekit.pruners import PRUNERS

        config["method"]["scope"] = PRUNERS.get(crit).scopes[0] if isinstance(crit, str) and crit in PRUNERS \
            else DEFAULT_SCOPE
    check_config(config, criteria)
    return config


def check_config(config: Dict[str, Any], criteria: Optional[Sequence[str]] = None) -> None:
    """The named choices of a resolved config are ones prunekit has (registered now), before anything runs."""
    from prunekit._util import check_choice

    if config.get("checkpoint"):
        check_checkpoint(config["checkpoint"])
    if not config.get("checkpoint") or not Path(config["checkpoint"]).is_dir():   # a folder's spec names its model
        check_model(config["model"])
    check_data(config["data"], config.get("data_options"))
    m = config["method"]
    check_choice(m["kind"], live("kind"), "schedule (method.kind)")
    every = sorted(set(live("criterion")) | set(live("pruner")))
    check_choice(m["criterion"], every if criteria is None else criteria, "criterion")
    check_choice(m["scope"], live("scope"), "scope")
    check_choice(m["pattern"], live("pattern"), "pattern")
    for section in ("dense", "finetune"):
        for key, kind in (("optimizer", "optimizer"), ("lr_schedule", "lr_schedule")):
            if key in config[section]:
                check_choice(config[section][key], live(kind), f"{section}.{key}")


def _parse_nm(nm) -> list:
    if isinstance(nm, str):
        try:
            n, m = (int(x) for x in nm.split(":"))
        except ValueError:
            raise PrunekitError(f"nm={nm!r} must look like N:M, e.g. 2:4") from None
        return [n, m]
    return list(nm)


def to_method(config: Dict[str, Any]) -> Dict[str, Any]:
    m = config["method"]
    sparsity = m["sparsity"]
    sparsities = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity]
    min_keep = m["min_keep"]
    if isinstance(min_keep, float) and min_keep >= 1 and min_keep.is_integer():
        min_keep = int(min_keep)  # a flag gives floats; >= 1 means a count of units
    prune = {"criterion": m["criterion"], "scope": m["scope"], "pattern": m["pattern"], "min_keep": min_keep,
             "include_classifier": m["include_classifier"]}
    if m.get("bias_correction"):
        prune["bias_correction"] = True
    if m.get("allocation", "uniform") != "uniform":
        prune["allocation"] = m["allocation"]
    if m["pattern"] == "structured":
        prune.update(dim=m["dim"], norm=m["norm"])
    if m["pattern"] == "nm":
        prune["nm"] = _parse_nm(m["nm"])
    for key in ("include", "exclude"):
        if m.get(key):
            prune[key] = m[key]
    if m["pattern"] == "nm":  # N:M fixes the sparsity: 1 - N/M
        n_, m_ = prune["nm"]
        sparsities = [1 - n_ / m_]
    method = {"name": m["name"], "label": f"{m['kind']} {m['criterion']} {m['scope']} {m['pattern']}",
              "kind": m["kind"], "sparsities": sparsities, "prune": prune, "finetune": dict(config["finetune"]),
              "gradual": dict(config["gradual"])}
    if m["kind"] == "iterative":
        method["iterative"] = {"epochs_per_round": config["finetune"]["epochs"]}
    return method


def run(args) -> int:
    from prunekit.experiment import run_experiment
    from prunekit.train import distributed as pkdist

    config = resolve_config(args)
    method = to_method(config)
    exp = {**{k: config[k] for k in ("model", "model_kwargs", "checkpoint", "data", "data_options", "seed",
                                      "batch_size", "limit_train", "limit_test", "dense")},
           "title": f"prunekit prune: {config['model']} on {config['data']}", "methods": [method],
           "threads": args.threads}   # recorded in results.json's config (env.torch_threads too), not a recipe field
    out = Path(config["out"])
    ckpt = out / "checkpoints"   # under the run's folder, never the working directory
    pkdist.init_from_env()   # under torchrun: DDP fine-tuning, rank 0 writes
    if ckpt.is_dir() and not args.resume and pkdist.is_main():
        shutil.rmtree(ckpt)  # checkpoints of another run must never be resumed silently
    pkdist.barrier()
    try:
        with trusted(args, config["model"]):   # the factory named by --model: the user asked to run it
            results, heatmaps, models = run_experiment(exp, progress=False if args.no_progress else None,
                                                       checkpoint_dir=ckpt)
        if not pkdist.is_main():
            return 0
        _write_outputs(out, config, method, results, heatmaps, models)
        if not args.keep_checkpoints:  # they exist to resume an interrupted run: this one finished
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        pkdist.cleanup()
    return 0


def _write_outputs(out: Path, config, method, results, heatmaps, models) -> None:
    from prunekit.apply.masking import current_plan
    from prunekit.deploy import io

    write_run(out, results, heatmaps, config)
    model = models[method["name"]]
    io.save(model, out / "model", compressed=config["save"]["compressed"],
            metadata={"final": results["methods"][0]["final"], "data": results.get("data")})
    plan = getattr(model, "_prunekit_plan", None)   # surgery: the structured plan the slim model came from
    (plan if plan is not None else current_plan(model)).save(out / "plan.json")
    print_summary(results)
    print(f"\npruned model: {out / 'model'}   plan: {out / 'plan.json'}   report: {out / 'report' / 'report.html'}")
