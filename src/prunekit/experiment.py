"""Run pruning methods on a model and data, measure every point, and collect report results.

Shared by ``prunekit demo``, ``prunekit prune`` and the benchmarks, so that
they measure the same things the same way. A *method* is a dict::

    {"name": "global_l1", "label": "global magnitude (unstructured)",
     "kind": "oneshot" | "gradual" | "iterative",
     "sparsities": [0.5, 0.9],                      # oneshot: one point per value, each from the dense model
     "prune": {"criterion": "l1", "scope": "global", "pattern": "unstructured", ...},  # prunekit.prune kwargs
     "finetune": {"epochs": 1, "lr": 0.01, ...},    # after pruning (oneshot) / during (gradual, iterative)
     "gradual": {"epochs": 6, "prune_epochs": 4}}   # gradual only
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import itertools
import json
import logging
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import (
    call_model,
    check_choice,
    default_cache_dir,
    eval_mode,
    median,
    progress_enabled,
    seed_everything,
    time_calls,
)
from prunekit._version import __version__
from prunekit.advise import LATENCY_TIE, recommend
from prunekit.analysis.metrics import evaluate, summarize
from prunekit.api import needs_data, prune
from prunekit.apply import masking
from prunekit.apply.masking import global_sparsity
from prunekit.criteria import calibrate, get_criterion
from prunekit.deploy import io
from prunekit.errors import PrunekitError
from prunekit.pruners import PRUNERS
from prunekit.select.amount import resolve_amount
from prunekit.select.ranking import PATTERNS, SCOPES
from prunekit.spec import SPEC_FIELDS, PruneSpec
from prunekit.surgery import compact, plan_groups
from prunekit.targets import select_targets
from prunekit.train import distributed
from prunekit.train.callbacks import gradual_prune, iterative_prune
from prunekit.train.loop import finetune
from prunekit.zoo.data import DataOptions, data_record, example_batch, get_loaders
from prunekit.zoo.models import build_model
from prunekit.zoo.sources import cacheable, data_kwargs

log = logging.getLogger("prunekit")
KINDS = ("oneshot", "gradual", "iterative", "surgery")
PRUNE_KEYS = ("criterion", "scope", "pattern", "dim", "norm", "nm", "include", "exclude",
              "include_classifier", "min_keep", "types", "normalize", "aggregate", "round_to", "protect",
              "bias_correction", "allocation")
SURGERY_KEYS = ("criterion", "scope", "norm", "aggregate", "min_keep", "round_to", "protect", "normalize")
CALIB_BATCHES = 8   # training batches that data-aware criteria (taylor, wanda, sparsegpt) calibrate on
FINETUNE_KEYS = ("epochs", "lr", "optimizer", "momentum", "weight_decay", "lr_schedule", "max_steps",
                 "checkpoint_every")


def env_info() -> Dict[str, Any]:
    """Versions and threading, for bug reports and for reading benchmark numbers."""
    import numpy
    import safetensors

    return {"prunekit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cuda_available": torch.cuda.is_available(), "cache_dir": str(default_cache_dir())}




# ----------------------------------------------------------------------------- dense model

def _dense_key(model: str, model_kwargs: Dict[str, Any], dataset: str, train_cfg: Dict[str, Any], seed: int,
               n_train: int, fingerprint: Optional[str] = None) -> str:
    """The cache folder's name; ``fingerprint``: your own data's content (a file can change under its name)."""
    parts = [model, model_kwargs, dataset, train_cfg, seed, n_train, __version__] + ([fingerprint] if fingerprint else [])
    blob = json.dumps(parts, sort_keys=True)

    def short(text: str) -> str:   # a path or a source (timm:resnet18) as one file-name-safe piece
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[-40:]

    return f"dense-{short(model)}-{short(dataset)}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def dense_model(model: str, model_kwargs: Dict[str, Any], train, test, info: Dict[str, Any], *,
                train_cfg: Dict[str, Any], seed: int, cache: bool = True, progress: Optional[bool] = None,
                checkpoint_dir: Optional[Path] = None) -> Tuple[nn.Module, bool]:
    """Train the dense model, or reuse the cached one trained with the same settings.

    Returns (model, came_from_cache). The cache is prunekit's own save format.
    """
    kwargs = {**data_kwargs(model, info), **model_kwargs}   # classes (and channels) from the data, unless given
    folder = default_cache_dir() / _dense_key(model, kwargs, info["name"], train_cfg, seed, info["n_train"],
                                              info.get("fingerprint"))
    cache = cache and cacheable(model)
    if cache and (folder / io.SPEC).is_file():
        try:
            return io.load(folder), True
        except (ValueError, OSError) as e:  # a broken cache is rebuilt, never trusted
            log.warning("ignoring the cached dense model in %s: %s", folder, e)
    seed_everything(seed)
    net = build_model(model, **kwargs)
    finetune(net, train, desc="dense training", progress=progress, checkpoint=_ckpt(checkpoint_dir, "dense"),
             **train_cfg)
    if cache and distributed.is_main():   # under torchrun every rank trained the same model
        io.save(net, folder, metadata={"accuracy": evaluate(net, test)["accuracy"], "data": data_record(info)})
    distributed.barrier()
    return net, False


# ----------------------------------------------------------------------------- measuring

def paired_speedup(model: nn.Module, reference: nn.Module, x: Any, *, repeats: int = 30,
                   warmup: int = 5) -> Dict[str, Any]:
    """Latency of ``reference`` / latency of ``model``, the two timed in alternation, single calls: rounds
    go (ref, model), (model, ref), ... and each ratio is taken over two consecutive rounds, a moment apart and
    with each first once. That cancels the drift of a busy machine, which separate medians keep (timed one
    after the other, a masked LeNet read 0.90x of its dense twin), and the cost of going first (~25% for a
    40 us call). Returns the median ratio, its quartiles and the number of ratios."""
    n = 2 * max(1, int(repeats))
    with eval_mode(model), eval_mode(reference), torch.no_grad():
        t = time_calls({"dense": lambda: call_model(reference, x), "model": lambda: call_model(model, x)},
                       repeat=n, warmup=warmup, sample_ms=None)
    d, m = t["dense"], t["model"]
    ratios = [(d[i] + d[i + 1]) / (m[i] + m[i + 1]) for i in range(0, n - 1, 2) if m[i] + m[i + 1] > 0]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"speedup_measured": median(ratios), "speedup_q1": q[0], "speedup_q3": q[-1],
            "speedup_repeats": len(ratios)}


def measure(model: nn.Module, test, info: Dict[str, Any], *, latency_repeats: int = 30,
            reference: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Every number of one point: accuracy, sizes, MACs, latency (batch 1, with its spread), per-layer rows;
    with ``reference`` (the dense model) also the speedup over it, timed in alternation (:func:`paired_speedup`)."""
    res = summarize(model, example_batch(info, 1), test, latency=True, repeats=latency_repeats, warmup=5)
    if reference is not None:
        res.update(paired_speedup(model, reference, example_batch(info, 1), repeats=latency_repeats))
    return res


def _point(model, test, info, target: float, names: Sequence[str], extra: Dict[str, Any],
           reference: Optional[nn.Module] = None) -> Dict[str, Any]:
    res = measure(model, test, info, reference=reference)
    res.update(target_sparsity=target, pruned_sparsity=global_sparsity(model, names), **extra)
    return res


# ----------------------------------------------------------------------------- methods

def _check_method(method: Dict[str, Any]) -> None:
    if method.get("kind") not in KINDS:
        raise PrunekitError(f"method {method.get('name')!r}: kind must be one of {', '.join(KINDS)}")
    bad = set(method.get("prune", {})) - set(PRUNE_KEYS)
    if bad:
        raise PrunekitError(f"method {method.get('name')!r}: unknown prune option(s) {sorted(bad)}; "
                         f"allowed: {', '.join(PRUNE_KEYS)}")
    bad = set(method.get("finetune", {})) - set(FINETUNE_KEYS)
    if bad:
        raise PrunekitError(f"method {method.get('name')!r}: unknown finetune option(s) {sorted(bad)}; "
                         f"allowed: {', '.join(FINETUNE_KEYS)}")
    pk = method.get("prune", {})
    if not method.get("sparsities") and pk.get("pattern") != "nm":
        raise PrunekitError(f"method {method.get('name')!r}: give at least one target in 'sparsities'")
    # check values now, not after the dense model has trained for minutes
    for s in method.get("sparsities") or []:
        resolve_amount(s, 1_000_000, what="sparsity")
    crit = pk.get("criterion", "l1")
    pruner = PRUNERS.get(crit) if isinstance(crit, str) and crit in PRUNERS else None
    if pruner is not None:   # a whole-model pruner, not a score: one-shot, with the patterns it declares
        if method["kind"] != "oneshot" or pk.get("pattern", "unstructured") not in pruner.patterns:
            raise PrunekitError(f"method {method.get('name')!r}: criterion {crit} rewrites weights; it works "
                                f"with kind oneshot and pattern {' or '.join(pruner.patterns)}")
        if pk.get("scope", pruner.scopes[0]) not in pruner.scopes:
            raise PrunekitError(f"method {method.get('name')!r}: {crit} takes scope "
                                f"{' or '.join(map(repr, pruner.scopes))}, not {pk['scope']!r}")
    else:
        get_criterion(crit)
    if pk.get("bias_correction") and (pruner is not None or method["kind"] == "surgery"):
        raise PrunekitError(f"method {method.get('name')!r}: bias_correction is for masking criteria with kind "
                            "oneshot, gradual or iterative (a pruner rewrites weights itself; surgery removes units)")
    if method["kind"] == "surgery" and pk.get("pattern", "structured") not in ("structured", "unstructured"):
        # surgery removes whole channels / neurons / heads: it has no other pattern to honour
        raise PrunekitError(f"method {method.get('name')!r}: kind surgery removes whole channels, so pattern "
                            f"{pk['pattern']!r} cannot be honoured (use kind oneshot for N:M)")
    check_choice(pk.get("scope", "layer"), SCOPES + ("row",), "scope")   # row: per output row (Wanda)
    check_choice(pk.get("pattern", "unstructured"), PATTERNS, "pattern")
    PruneSpec(**{k: v for k, v in pk.items() if k in SPEC_FIELDS})        # nm, dim, norm, seed... checked now


def data_options(config: Dict[str, Any]) -> Optional[DataOptions]:
    """How a config's own data (a folder or file) is read: its ``data_options`` section, checked (None: none)."""
    given = {k: v for k, v in (config.get("data_options") or {}).items() if v is not None}
    return DataOptions(**given) if given else None


def loaders(config: Dict[str, Any]):
    """(train, test, info) of a config's data (its batch size, seed, limits and data options)."""
    return get_loaders(config.get("data", "mnist"), batch_size=config.get("batch_size", 128),
                       seed=int(config.get("seed", 0)), limit_train=config.get("limit_train"),
                       limit_test=config.get("limit_test"), options=data_options(config))


def starting_model(config: Dict[str, Any], info: Dict[str, Any]) -> nn.Module:
    """The model a config's ``checkpoint`` holds: a folder saved by prunekit (its spec rebuilds it), or a
    weights file (.safetensors, or .pt/.pth read with weights_only=True: no pickled code runs) loaded into
    ``config["model"]`` built for the data."""
    path = Path(config["checkpoint"])
    if path.is_dir():
        return io.load(path)
    kwargs = {**data_kwargs(config["model"], info), **config.get("model_kwargs", {})}
    return io.load(path, build_model(config["model"], **kwargs))


def _check_against_model(config: Dict[str, Any], info: Dict[str, Any]) -> None:
    """What only the architecture can settle (a structured ``dim`` each selected tensor has, the layers a
    pattern matches), checked on a shape-only (meta device) copy before the dense model trains for minutes."""
    if config.get("checkpoint") and Path(config["checkpoint"]).is_dir():
        return   # a saved folder: its own spec says what it is (checked when it loads)
    kwargs = {**data_kwargs(config["model"], info), **config.get("model_kwargs", {})}
    with torch.device("meta"):
        probe = build_model(config["model"], **kwargs)
    _check_inputs(probe, config["model"], info)
    params = dict(probe.named_parameters())
    for method in config["methods"]:
        pk = method.get("prune", {})
        if method["kind"] == "surgery":
            continue
        names = select_targets(probe, types=pk.get("types"), include=pk.get("include"), exclude=pk.get("exclude"),
                               include_classifier=pk.get("include_classifier", False))
        dim = pk.get("dim", 0)
        for name in names if pk.get("pattern") == "structured" else ():
            nd = params[name].dim()
            if not -nd <= dim < nd:
                raise PrunekitError(f"method {method.get('name')!r}: dim={dim} is out of range for {name} with {nd} "
                                    f"dims (allowed {-nd}..{nd - 1})")


def _check_inputs(probe: nn.Module, model: str, info: Dict[str, Any]) -> None:
    """A forward of one shape-only example: a model built for other inputs (3-channel CIFAR models on 1-channel
    MNIST) is said in one line, before any training, instead of a traceback minutes later."""
    try:
        with torch.no_grad():
            probe.eval()(torch.empty(1, *info["input_shape"], device="meta"))
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrunekitError(f"model {model!r} cannot take {info['name']} inputs of shape {list(info['input_shape'])} "
                            f"({reason}); choose a model built for this data") from None


def _ckpt(folder: Optional[Path], name: str) -> Optional[Path]:
    return None if folder is None else Path(folder) / f"{name}.pt"


def _finetune_point(model, method, train, seed, progress, checkpoint) -> None:
    """The method's fine-tuning after a one-shot prune (masks held fixed), if it has any."""
    ft = dict(method.get("finetune") or {})
    if checkpoint is None or ft.get("checkpoint_every") is None:
        ft.pop("checkpoint_every", None)   # mid-epoch checkpoints need a checkpoint file
    if ft.get("epochs", 0) > 0:
        seed_everything(seed)
        finetune(model, train, progress=progress, desc=f"{method['name']} fine-tune", checkpoint=checkpoint, **ft)


def _with_calibration(pk: Dict[str, Any], train) -> Dict[str, Any]:
    """prune() keywords, plus a few training batches for a data-aware criterion (fixed: the first ones)."""
    if not (needs_data(pk.get("criterion", "l1")) or pk.get("bias_correction")):
        return pk
    return {**pk, "data": list(itertools.islice(iter(train), CALIB_BATCHES))}


def _oneshot(dense, method, train, test, info, seed, progress, ckpt_dir) -> Tuple[List[Dict], nn.Module, List[str]]:
    points, model, notes = [], None, []
    pk = _with_calibration(dict(method.get("prune", {})), train)
    targets = method.get("sparsities") or [None]
    if pk.get("pattern") == "nm":  # the pattern fixes the sparsity
        n, m = pk.get("nm", (2, 4))
        targets = [None]
    for target in tqdm(targets, desc=method["name"], disable=not progress_enabled(progress), leave=False):
        model = copy.deepcopy(dense)
        plan = prune(model, target, seed=seed, **pk)
        notes = plan.notes
        names = plan.meta["targets"]
        before = evaluate(model, test)["accuracy"]
        _finetune_point(model, method, train, seed, progress, _ckpt(ckpt_dir, f"{method['name']}-{target}"))
        achieved = global_sparsity(model, names)
        if pk.get("pattern") == "nm":
            target = 1 - n / m
        points.append(_point(model, test, info, target if target is not None else achieved, names,
                             {"accuracy_before_finetune": before}, reference=dense))
    return points, model, notes


def _scheduled(dense, method, train, test, info, seed, progress, ckpt_dir) -> Tuple[List[Dict], nn.Module, List[Dict]]:
    model = copy.deepcopy(dense)
    pk = _with_calibration(dict(method.get("prune", {}), seed=seed), train)   # re-calibrated at every step
    ft = dict(method.get("finetune") or {})
    ft.pop("epochs", None)
    ft["checkpoint"] = _ckpt(ckpt_dir, method["name"])
    if ft["checkpoint"] is None or ft.get("checkpoint_every") is None:
        ft.pop("checkpoint_every", None)
    seed_everything(seed)
    if method["kind"] == "gradual":
        g = method.get("gradual", {})
        state = gradual_prune(model, train, final=max(method["sparsities"]), epochs=g.get("epochs", 6),
                              prune_epochs=g.get("prune_epochs"), every=g.get("every"), eval_loader=test,
                              prune_kwargs=pk, progress=progress, **ft)
    else:
        state = iterative_prune(model, train, sparsities=method["sparsities"],
                                epochs_per_round=method.get("iterative", {}).get("epochs_per_round", 1),
                                eval_loader=test, prune_kwargs=pk, progress=progress, **ft)
    names = select_targets(model, **{k: pk[k] for k in ("types", "include", "exclude", "include_classifier")
                                     if k in pk})
    final = _point(model, test, info, max(method["sparsities"]), names, {}, reference=dense)
    return [final], model, state.history


def _surgery(dense, method, train, test, info, seed, progress, ckpt_dir):
    """Coupled channel groups pruned (masks), fine-tuned, then physically removed.

    Each point measures the *compacted* model: fewer parameters and MACs, lower
    latency. Returns the masked model of the last target (same outputs, same shapes as
    the dense one: for heatmaps) and the compacted one, which carries its plan as
    ``_prunekit_plan``.
    """

    pk = {k: v for k, v in method.get("prune", {}).items() if k in SURGERY_KEYS}
    x = example_batch(info, 2)
    dense_params = sum(p.numel() for p in dense.parameters())
    if needs_data(pk.get("criterion", "l1")):   # every target starts from the same dense model: calibrate once
        data = _with_calibration(pk, train)["data"]
        pk["stats"] = calibrate(get_criterion(pk["criterion"]).collector, dense, data)
    points, masked, slim, notes = [], None, None, []
    for target in tqdm(method["sparsities"], desc=method["name"], disable=not progress_enabled(progress),
                       leave=False):
        masked = copy.deepcopy(dense)
        plan = plan_groups(masked, x, target, seed=seed, **pk)
        notes = plan.notes
        masking.apply(masked, plan)
        before = evaluate(masked, test)["accuracy"]
        _finetune_point(masked, method, train, seed, progress, _ckpt(ckpt_dir, f"{method['name']}-{target}"))
        slim = compact(masked, plan, x)
        res = measure(slim, test, info, reference=dense)
        slim_params = sum(p.numel() for p in slim.parameters())
        # "sparsity" of a compacted model: the share of the dense model's parameters that are gone,
        # so that its points sit where they belong on the report's curves
        res.update(target_sparsity=target, pruned_sparsity=1 - slim_params / dense_params,
                   sparsity=1 - slim_params / dense_params,
                   compression_ratio=dense_params / slim_params, accuracy_before_finetune=before,
                   accuracy_masked=evaluate(masked, test)["accuracy"], compacted=True)
        points.append(res)
        slim._prunekit_plan = plan
    return points, masked, notes, slim


def run_method(dense: nn.Module, method: Dict[str, Any], train, test, info: Dict[str, Any], *, seed: int = 0,
               heat_layers: Sequence[str] = (), progress: Optional[bool] = None,
               checkpoint_dir: Optional[Path] = None):
    """Run one method; returns (report entry, heatmaps {method/layer: (before, after)}, final model)."""
    _check_method(method)
    result = model = None
    if method["kind"] == "oneshot":
        points, model, notes = _oneshot(dense, method, train, test, info, seed, progress, checkpoint_dir)
        history = []
    elif method["kind"] == "surgery":   # heatmaps from the masked model, the compacted one is the result
        points, model, notes, result = _surgery(dense, method, train, test, info, seed, progress, checkpoint_dir)
        history = []
    else:
        points, model, history = _scheduled(dense, method, train, test, info, seed, progress, checkpoint_dir)
        notes = []
    final = points[-1]
    entry = {"name": method["name"], "label": method.get("label", method["name"]), "kind": method["kind"],
             "prune": method.get("prune", {}), "points": [_strip(p) for p in points], "final": _strip(final),
             "layers": final["layers"], "notes": list(notes)}
    params = dict(model.named_parameters(remove_duplicate=False))
    dense_params = dict(dense.named_parameters())
    heat = {f"{method['name']}/{n}": (dense_params[n].detach().clone(), params[n].detach().clone())
            for n in heat_layers if n in params}
    return entry, heat, result if result is not None else model, history


def _strip(point: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in point.items() if k != "layers"}


def results_skeleton(title: str, config: Dict[str, Any], dense_metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {"title": title, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "config": config, "env": env_info(), "dense": _strip(dense_metrics),
            "dense_layers": dense_metrics.get("layers", []), "methods": [], "history": {}}


def masks_digest(model: nn.Module) -> str:
    """A short hash of all masks (or of a compacted model's plan): the same seed gives the same digest."""
    h = hashlib.sha256()
    plan = getattr(model, "_prunekit_plan", None)   # a compacted model: its channels are gone, not masked
    if plan is not None:
        h.update(plan.to_json().encode())
    return masking.digest(model, h)


# ----------------------------------------------------------------------------- whole experiments

def run_experiment(config: Dict[str, Any], *, progress: Optional[bool] = None,
                   checkpoint_dir: Optional[Path] = None):
    """Dense model + every method of ``config``; returns (results, heatmaps, {name: model}).

    ``config`` keys: model, model_kwargs, data, data_options (how your own data is
    read: :class:`prunekit.zoo.data.DataOptions`), seed, batch_size, limit_train,
    limit_test, dense (training settings), checkpoint (optional saved model folder, or a
    weights file for ``model``, to start from instead of training), methods (list of method dicts), heat_layers,
    budget_pp (the accuracy drop, in percentage points, that the report's
    recommendation may spend; default 1.0, as advise).
    With ``checkpoint_dir``, every training run checkpoints there at each epoch
    end and resumes from an existing checkpoint.
    """

    seed = int(config.get("seed", 0))
    budget = config.get("budget_pp", 1.0)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < float("inf"):
        raise PrunekitError(f"budget_pp={budget!r} must be a number >= 0 (percentage points of accuracy)")
    for m in config["methods"]:
        _check_method(m)
    train, test, info = loaders(config)
    _check_against_model(config, info)
    if config.get("checkpoint"):
        dense, cached = starting_model(config, info), True
    else:
        dense, cached = dense_model(config["model"], config.get("model_kwargs", {}), train, test, info,
                                    train_cfg=config.get("dense", {}), seed=seed, progress=progress,
                                    checkpoint_dir=checkpoint_dir)
    results = results_skeleton(config.get("title", f"prunekit: {config.get('model')} on {info['name']}"),
                               config, measure(dense, test, info))
    results["dense"]["from_cache"] = cached
    results["data"] = data_record(info)
    heat_layers = config.get("heat_layers") or select_targets(dense)[:2]
    heatmaps, models = {}, {}
    for method in config["methods"]:
        entry, heat, model, history = run_method(dense, method, train, test, info, seed=seed,
                                                 heat_layers=heat_layers, progress=progress,
                                                 checkpoint_dir=checkpoint_dir)
        entry["masks_digest"] = masks_digest(model)
        results["methods"].append(entry)
        if history:
            results["history"][method["name"]] = history
        heatmaps.update(heat)
        models[method["name"]] = model
    results["conclusion"] = conclusion(results, float(budget))
    return results, heatmaps, models


def _candidate(name: str, kind: str, point: Dict[str, Any], nm: Any = None,
               dense_ms: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """A measured point as a candidate of :func:`prunekit.advise.recommend` (None: a number is missing); with
    a speedup timed against dense, its latency is dense's over that speedup."""
    sizes = [v for v in (point.get("size_bytes"), point.get("size_compressed_bytes")) if v is not None]
    c = {"name": name, "kind": kind, "nm": nm, "metric_value": point.get("accuracy"), "params": point.get("params"),
         "nonzeros": point.get("nonzeros"), "macs": point.get("macs"), "macs_effective": point.get("macs_effective"),
         "size_bytes": min(sizes) if sizes else None, "latency_ms": point.get("latency_ms")}
    if any(c[k] is None for k in c if k != "nm") or not c["latency_ms"] > 0:
        return None
    q1, q3 = point.get("latency_q1_ms"), point.get("latency_q3_ms")
    c["spread"] = (q3 - q1) / c["latency_ms"] if q1 is not None and q3 is not None else 0.0
    speedup = point.get("speedup_measured")
    if speedup and dense_ms:   # timed against dense in alternation: put every point on dense's clock
        c["latency_ms"] = dense_ms / speedup
        c["spread"] = (point.get("speedup_q3", speedup) - point.get("speedup_q1", speedup)) / speedup
    return c


def conclusion(results: Dict[str, Any], budget_pp: float = 1.0) -> Optional[Dict[str, Any]]:
    """advise's recommendation (:func:`prunekit.advise.recommend`) among every measured point of ``results``,
    for an accuracy budget of ``budget_pp`` percentage points; None when the dense model lacks a number.

    A point's latency is the dense model's over the speedup timed against it in alternation (as advise
    times candidates), else its own median; latencies within the typical spread of these timings (the
    median relative IQR over all points, at least advise's 5%) tie."""
    dense = _candidate("dense", "dense", results.get("dense") or {})
    if dense is None:
        return None
    candidates = [dense]
    for m in results.get("methods") or []:
        pk, label = m.get("prune") or {}, m.get("label") or m.get("name")
        for p in m.get("points") or []:
            t = p.get("target_sparsity")
            name = label if t is None else f"{label} at {100 * t:.3g}%"
            while any(c["name"] == name for c in candidates):
                name += "'"
            kind = "structured" if p.get("compacted") else "nm" if pk.get("pattern") == "nm" else "unstructured"
            c = _candidate(name, kind, p, list(pk.get("nm", (2, 4))) if kind == "nm" else None,
                           dense["latency_ms"])
            if c is not None:
                c["method"] = m.get("name")
                candidates.append(c)
    spreads = sorted(c["spread"] for c in candidates)
    tie = min(0.5, max(LATENCY_TIE, spreads[len(spreads) // 2]))
    env = results.get("env") or {}
    device = f"cpu: {env.get('processor') or '?'}, {(results.get('dense') or {}).get('threads', '?')} torch thread(s)"
    advice = recommend(candidates, budget_pp=budget_pp, latency_tie=tie, device=device)
    out = advice.to_dict()
    out["methods"] = {c["name"]: c.get("method") for c in candidates}   # candidate -> method name
    return out


def summary_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per method (its final point) plus the dense baseline, for printing."""
    dense = results["dense"]

    def row(name, p):
        acc = p.get("accuracy")
        return {"method": name, "target": p.get("target_sparsity"),
                "sparsity_whole_model": round(p.get("sparsity", 0.0), 4),
                "sparsity_pruned_layers": round(p.get("pruned_sparsity", p.get("sparsity", 0.0)), 4),
                "accuracy_%": None if acc is None else round(100 * acc, 2),
                "drop_pp": None if acc is None else round(100 * (dense["accuracy"] - acc), 2),
                "compression_x": None if not p.get("compression_ratio") else round(p["compression_ratio"], 2),
                "macs_eff": p.get("macs_effective"),
                "size_kb": round(p.get("size_compressed_bytes", 0) / 1024, 1),
                "latency_ms": None if p.get("latency_ms") is None else round(p["latency_ms"], 4)}

    return [row("dense", dense)] + [row(m["name"], m["final"]) for m in results["methods"]]
