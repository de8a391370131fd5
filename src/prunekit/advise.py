"""Measured, hardware-aware advice: which pruning strategy to use for this model, on this machine.

    from prunekit.advise import advise
    advice = advise(model, x, target="cpu", budget_pp=1.0, eval_loader=test)
    print(advice.table())
    print(advice.recommended, "-", advice.reason)

Each candidate (dense; whole channels/neurons removed by surgery; unstructured
masks, with CSR kernels where :func:`prunekit.deploy.sparse.to_sparse` measures that a
layer pays, both forms then timed in the whole model and the faster kept; N:M)
is built from a copy of the model, measured here, and ranked by what the target
rewards:

- ``cpu``: latency measured on this CPU, all candidates timed in turn (A B C,
  B C A, ...) after a warm-up, so that machine noise hits them alike;
- ``gpu``: latency measured on CUDA, so advise must run on the GPU machine; with
  no GPU, ``allow_proxy=True`` ranks by the MACs a GPU executes, marked not measured;
- ``sparse`` (an accelerator that skips zeros): effective (non-zero) MACs, then
  non-zero weights; the CPU latency shown is this machine's, not the target's.

Among the candidates whose accuracy drop (dense minus candidate, in percentage
points) is within the budget, the best by that measure is recommended; latencies
within ``latency_tie`` of the fastest count as a tie, and ties go to the smaller file.
Dense is the reference and is never fine-tuned; with ``train_loader`` and
``finetune_epochs`` every pruned candidate gets the same recovery fine-tune.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import (
    atomic_write_text,
    batch_of,
    call_model,
    eval_mode,
    median,
    progress_enabled,
    seed_everything,
    spread,
    time_calls,
    to_jsonable,
    with_batch,
)
from prunekit.analysis.metrics import count_macs, count_parameters, evaluate, format_table, size_on_disk
from prunekit.analysis.nm_check import validate_nm
from prunekit.api import prune
from prunekit.apply import masking
from prunekit.deploy.sparse import to_sparse
from prunekit.errors import InvalidTypeError, PrunekitError, UnknownNameError
from prunekit.select.nm import parse_nm
from prunekit.surgery import compact, plan_groups
from prunekit.train.loop import finetune

__all__ = ["Advice", "advise", "recommend", "build_candidate", "parse_candidate", "TargetUnavailable", "TARGETS",
           "KINDS", "DEFAULT_CANDIDATES"]

TARGETS = ("cpu", "gpu", "sparse")
KINDS = ("dense", "structured", "unstructured", "nm")
DEFAULT_CANDIDATES = ("dense", "structured:0.25", "structured:0.5", "structured:0.75", "unstructured:0.5",
                      "unstructured:0.8", "unstructured:0.9", "unstructured:0.95", "nm:2:4")
#: per-kind options a candidate dict may carry (besides kind, name, amount, nm)
OPTIONS = {"dense": (), "structured": ("criterion", "scope", "round_to", "norm", "min_keep"),
           "unstructured": ("criterion", "scope", "min_keep", "sparse_kernels", "min_speedup"),
           "nm": ("criterion",)}
#: latencies within 5% of the fastest are a tie: on a shared machine medians move about that much
LATENCY_TIE = 0.05
FORMAT = "prunekit.advice/1"
#: a latency whose interquartile range exceeds this fraction of its median is flagged in the reason
NOISY = 0.25
PLAIN_SUFFIX = " (plain)"  # timing key of a candidate's form without sparse kernels
_DROP_EPS = 1e-9                   # float noise in 100 * (a - b): a drop equal to the budget is within it


class TargetUnavailable(PrunekitError):
    """The target's hardware is not on this machine (a PrunekitError: the CLI prints it as one line)."""


# ----------------------------------------------------------------------------- candidates
def _fraction(value: Any, spec: Any) -> float:
    try:
        amount = float(value)
    except (TypeError, ValueError):
        raise PrunekitError(f"candidate {spec!r}: amount {value!r} must be a fraction in (0, 1), e.g. 0.5") from None
    if not 0.0 < amount < 1.0:
        raise PrunekitError(f"candidate {spec!r}: amount {amount} must be a fraction in (0, 1)")
    return amount


def _nm_pair(value: Any, spec: Any) -> List[int]:
    try:
        return list(parse_nm(value))
    except PrunekitError as e:
        raise PrunekitError(f"candidate {spec!r}: {e}") from None


def _default_name(kind: str, amount: Optional[float], nm: Optional[List[int]]) -> str:
    if kind == "dense":
        return "dense"
    if kind == "nm":
        return f"{nm[0]}:{nm[1]}"
    return f"{kind} {amount * 100:g}%"


def parse_candidate(spec: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """``"dense"``, ``"structured:0.5"``, ``"unstructured:0.9"``, ``"nm:2:4"`` or a dict ``{"kind", "amount" |
    "nm", "name", **options}`` -> ``{"name", "kind", "amount", "nm", "options"}`` (checked)."""
    if isinstance(spec, str):
        kind, _, rest = spec.strip().partition(":")
        d: Dict[str, Any] = {"kind": kind}
        if rest:
            d["nm" if kind == "nm" else "amount"] = rest
    elif isinstance(spec, Mapping):
        d = dict(spec)
    else:
        raise InvalidTypeError(f"a candidate is a string like 'structured:0.5' or a dict, got {type(spec).__name__}")
    kind = d.pop("kind", None)
    if kind not in KINDS:
        raise PrunekitError(f"unknown candidate kind {kind!r} in {spec!r}; allowed: dense, structured:<fraction>, "
                         "unstructured:<fraction>, nm:<N>:<M>")
    name, amount, nm = d.pop("name", None), d.pop("amount", None), d.pop("nm", None)
    if kind in ("structured", "unstructured"):
        amount = _fraction(amount, spec)
    elif kind == "nm":
        nm, amount = _nm_pair(nm if nm is not None else (2, 4), spec), None
    elif amount is not None or nm is not None:
        raise PrunekitError(f"candidate {spec!r}: dense takes no amount")
    bad = sorted(set(d) - set(OPTIONS[kind]))
    if bad:
        raise PrunekitError(f"candidate {spec!r}: unknown option(s) {bad} for {kind}; "
                         f"allowed: {', '.join(OPTIONS[kind]) or 'none'}")
    return {"name": str(name or _default_name(kind, amount, nm)), "kind": kind, "amount": amount, "nm": nm,
            "options": d}


def check_candidates(candidates: Optional[Sequence[Any]]) -> List[Dict[str, Any]]:
    specs = [parse_candidate(c) for c in (DEFAULT_CANDIDATES if candidates is None else candidates)]
    if not any(s["kind"] == "dense" for s in specs):
        specs.insert(0, parse_candidate("dense"))  # the reference every speedup and drop is measured against
    names = [s["name"] for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrunekitError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
    if sum(s["kind"] == "dense" for s in specs) > 1:
        raise PrunekitError("give at most one dense candidate (it is the reference)")
    return specs


def _recover(model: nn.Module, name: str, train_loader, epochs: int, kwargs: Optional[Mapping[str, Any]],
             seed: int) -> None:
    """The same recovery fine-tune for every pruned candidate (masks held fixed), seeded alike."""
    if train_loader is None or epochs <= 0:
        return
    seed_everything(seed)
    finetune(model, train_loader, epochs=epochs, desc=f"{name} fine-tune", **{"lr": 0.01, **(kwargs or {})})


def build_candidate(model: nn.Module, example_inputs: Any, spec: Union[str, Mapping[str, Any]], *,
                    train_loader: Optional[Iterable] = None, finetune_epochs: int = 0,
                    finetune_kwargs: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Tuple[nn.Module, List[str]]:
    """``(candidate model, notes)`` built from a deepcopy of ``model`` (never modified), deterministic given
    ``seed``: structured -> the compacted smaller dense model; unstructured / N:M -> the masked model."""
    s = spec if isinstance(spec, Mapping) and "options" in spec else parse_candidate(spec)
    opts, notes, new = dict(s["options"]), [], copy.deepcopy(model)
    if s["kind"] == "dense":
        return new, notes
    if s["kind"] == "structured":

        kw = {"criterion": "l1", "scope": "global", **opts}
        plan = plan_groups(new, example_inputs, s["amount"], seed=seed, **kw)
        masking.apply(new, plan)
        _recover(new, s["name"], train_loader, finetune_epochs, finetune_kwargs, seed)
        notes += plan.notes
        return compact(new, plan, example_inputs), notes
    kw = {"criterion": opts.get("criterion", "l1"), "seed": seed}
    if s["kind"] == "unstructured":
        kw.update({k: opts[k] for k in ("scope", "min_keep") if k in opts})
        prune(new, s["amount"], **{"scope": "global", **kw})
    else:
        prune(new, pattern="nm", nm=tuple(s["nm"]), **kw)
    _recover(new, s["name"], train_loader, finetune_epochs, finetune_kwargs, seed)
    if s["kind"] == "nm":
        bad = validate_nm(new, *s["nm"])
        notes += [f"{k} is not {s['nm'][0]}:{s['nm'][1]}: {v}" for k, v in bad.items()]
    return new, notes


# ----------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def _threads(n: Optional[int]):
    old = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(int(n))
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _digest(model: nn.Module) -> str:
    """Short hash of the state_dict (names, shapes, values): equal digests = the same candidate."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _prunekit_classes(model: nn.Module) -> set:
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("prunekit.")}


def _static(model: nn.Module, x1: Any, score: Callable[[nn.Module], float]) -> Dict[str, Any]:
    """Counts, MACs per sample, size on disk and the metric of a built candidate."""
    counts, macs, size = count_parameters(model), count_macs(model, x1), size_on_disk(model)
    return {"params": counts["total"], "nonzeros": counts["nonzero"], "macs": macs["dense"],
            "macs_effective": macs["effective"], "size_bytes": min(size["dense_bytes"], size["compressed_bytes"]),
            "size_dense_bytes": size["dense_bytes"], "metric_value": float(score(model)), "digest": _digest(model)}


def _to_device(inputs: Any, device: torch.device, dtype: Optional[torch.dtype]) -> Any:
    def fix(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    if isinstance(inputs, dict):
        return {k: fix(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fix(v) for v in inputs)
    return fix(inputs)


def _semi_structured(model: nn.Module, nm: Sequence[int], notes: List[str]) -> List[str]:
    """Put 2:4 Linear weights on CUDA sparse tensor cores (Ampere+), in place; returns the layers converted."""
    if list(nm) != [2, 4]:
        notes.append(f"{nm[0]}:{nm[1]}: sparse tensor cores run only 2:4; measured as masked (dense kernels)")
        return []
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and not validate_nm(m, 2, 4, names=["weight"]):
            try:
                m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
                done.append(name)
            except (RuntimeError, ValueError, TypeError) as e:  # dtype, shape or GPU not supported
                notes.append(f"{name}: no 2:4 kernel ({str(e).splitlines()[0][:120]})")
    return done


def _deploy(spec: Dict[str, Any], model: nn.Module, xb: Any, device: torch.device, threads: Optional[int],
            repeat: int, dtype: Optional[torch.dtype], notes: List[str]) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """The form a candidate runs in at this batch: CSR layers where they measurably pay (CPU), 2:4 sparse
    tensor cores (CUDA); returns (model, [{name, speedup}] of the layers on sparse kernels)."""
    if device.type == "cpu":
        opts = spec["options"]
        if spec["kind"] != "unstructured" or not opts.get("sparse_kernels", True):
            return model, []

        sparse_model, report = to_sparse(model, xb, min_speedup=opts.get("min_speedup", 1.1), threads=threads,
                                         repeat=min(repeat, 7))
        return sparse_model, [{"name": r["name"], "speedup": r["speedup"], "kernel": r["kernel"]}
                              for r in report if r["converted"]]
    run = copy.deepcopy(model).to(device=device, dtype=dtype)
    if spec["kind"] != "nm":
        return run, []
    layers = _semi_structured(run, spec["nm"], notes)
    try:  # 2:4 kernels have shape and dtype rules of their own: a form that cannot run is not a candidate form
        with torch.no_grad(), eval_mode(run):
            call_model(run, _to_device(xb, device, dtype))
    except (RuntimeError, ValueError, TypeError) as e:
        notes.append(f"2:4 kernels failed at batch {batch_of(xb)} ({str(e).splitlines()[0][:120]}); "
                     "measured masked")
        return copy.deepcopy(model).to(device=device, dtype=dtype), []
    return run, [{"name": n, "speedup": None, "kernel": "semi_structured"} for n in layers]


def _forms(rows, built, xb, device, threads, repeat, dtype) -> Dict[str, Tuple[str, nn.Module, list]]:
    """Timing key -> (candidate, model, sparse layers): each candidate's deploy form, and where sparse kernels
    replaced layers also its plain form, since layers timed alone can win and still lose in the whole model."""
    forms = {}
    for name, (spec, model) in built.items():
        run, layers = _deploy(spec, model, xb, device, threads, repeat, dtype, rows[name]["notes"])
        forms[name] = (name, run, layers)
        if layers:
            plain = model if device.type == "cpu" else copy.deepcopy(model).to(device=device, dtype=dtype)
            forms[name + PLAIN_SUFFIX] = (name, plain, [])
    return forms


def _time_batch(rows, built, example_inputs, batch, device, threads, repeat, warmup, dtype) -> Dict[str, Any]:
    """Deploy forms at ``batch``, timed alternately; the faster form of each candidate fills its ``batches``."""
    xb = with_batch(example_inputs, batch)
    xdev = _to_device(xb, device, dtype) if device.type != "cpu" else xb
    forms = _forms(rows, built, xb, device, threads, repeat, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with contextlib.ExitStack() as stack:
        for _, run, _ in forms.values():
            stack.enter_context(eval_mode(run))
        stack.enter_context(torch.no_grad())
        # in turn (A B C, B C A, ...) so that noise hits all alike; a sample of a fast model repeats its call
        samples = time_calls({k: (lambda r=run: call_model(r, xdev)) for k, (_, run, _) in forms.items()},
                             repeat=repeat, warmup=warmup, sync=sync)
    ms = {k: (median(v), spread(v)) for k, v in samples.items()}
    chosen: Dict[str, str] = {}
    for key, (name, _, _) in forms.items():
        if name not in chosen or ms[key][0] < ms[chosen[name]][0]:
            chosen[name] = key
    dense_ms = ms[next(n for n, (s, _) in built.items() if s["kind"] == "dense")][0]
    for name, key in chosen.items():
        (t, noise), layers = ms[key], forms[key][2]
        entry = {"batch": batch, "latency_ms": t, "speedup": dense_ms / t, "spread": noise,
                 "sparse_layers": layers, "device": device.type}
        if name + PLAIN_SUFFIX in forms:
            entry["forms_ms"] = {"sparse_kernels": ms[name][0], "plain": ms[name + PLAIN_SUFFIX][0]}
        rows[name]["batches"].append(entry)
    return {name: forms[key][1] for name, key in chosen.items()}


# ----------------------------------------------------------------------------- checking the arguments
_BUILD_ERRORS = (ValueError, RuntimeError, TypeError, KeyError, NotImplementedError)


def _batches(batch: Union[None, int, Sequence[int]], example_inputs: Any) -> List[int]:
    if batch is None:
        return [batch_of(example_inputs)]
    values = [batch] if isinstance(batch, int) else list(batch)
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise PrunekitError(f"batch={batch!r} must be a positive int or a non-empty list of them (e.g. [1, 256])")
    return list(dict.fromkeys(values))


def check_target(target: str, allow_proxy: bool, dtype: Optional[torch.dtype]) -> Tuple[torch.device, bool, str]:
    """(device to time on, whether the ranking measure is measured on the target, the ranking key)."""
    if target not in TARGETS:
        raise PrunekitError(f"unknown target {target!r}; allowed: {', '.join(TARGETS)}")
    if target == "gpu" and torch.cuda.is_available():
        return torch.device("cuda"), True, "latency_ms"
    if dtype is not None:
        raise PrunekitError("dtype applies only to target='gpu' measured on a CUDA device")
    if target == "gpu":
        if not allow_proxy:
            raise TargetUnavailable(
                "target='gpu' is measured on a CUDA device, and torch.cuda.is_available() is False here: run "
                "advise on the GPU machine you will deploy on, or pass allow_proxy=True (CLI: --allow-proxy) to "
                "rank by the MACs a GPU executes, marked 'not measured'")
        return torch.device("cpu"), False, "gpu_macs"
    return torch.device("cpu"), target == "cpu", "latency_ms" if target == "cpu" else "macs_effective"


def _check_numbers(budget_pp, repeat, warmup, finetune_epochs, train_loader, threads, latency_tie) -> None:
    if isinstance(budget_pp, bool) or not isinstance(budget_pp, (int, float)) or not 0 <= budget_pp < math.inf:
        raise PrunekitError(f"budget_pp={budget_pp!r} must be a number >= 0 (percentage points of accuracy)")
    for name, value, low in (("repeat", repeat, 1), ("warmup", warmup, 0), ("finetune_epochs", finetune_epochs, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PrunekitError(f"{name}={value!r} must be an int >= {low}")
    if finetune_epochs > 0 and train_loader is None:
        raise PrunekitError(f"finetune_epochs={finetune_epochs} needs train_loader")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrunekitError(f"threads={threads!r} must be an int >= 1 or None")
    if not isinstance(latency_tie, (int, float)) or not 0 <= latency_tie < 1:
        raise PrunekitError(f"latency_tie={latency_tie!r} must be a fraction in [0, 1)")


FINETUNE_OPTIONS = ("lr", "optimizer", "momentum", "weight_decay", "lr_schedule", "max_steps", "loss_fn")


def _check_finetune(kwargs: Optional[Mapping[str, Any]]) -> None:
    bad = sorted(set(kwargs or {}) - set(FINETUNE_OPTIONS))
    if bad:  # caught here: inside a candidate's build it would only mark every candidate failed
        raise PrunekitError(f"finetune_kwargs: unknown option(s) {bad}; allowed: {', '.join(FINETUNE_OPTIONS)} "
                         "(the epochs are finetune_epochs)")


def _scorer(model: nn.Module, eval_fn, eval_loader) -> Callable[[nn.Module], float]:
    if (eval_fn is None) == (eval_loader is None):
        raise PrunekitError("advise needs exactly one of eval_fn (model -> metric, higher is better, a fraction "
                         "like accuracy) or eval_loader (yields (x, y); accuracy): the budget is checked on it")
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        raise PrunekitError("pass the model on the CPU: advise builds and evaluates candidates there, and moves "
                         "copies to the GPU itself for target='gpu'")
    if eval_fn is not None:
        return lambda m: float(eval_fn(m))
    return lambda m: evaluate(m, eval_loader)["accuracy"]


# ----------------------------------------------------------------------------- building and judging
def _build_row(model, example_inputs, x1, spec, score, ft: Dict[str, Any], seed: int):
    """(row of static measurements, built model or None when it could not be built)."""
    row = {"name": spec["name"], "kind": spec["kind"], "amount": spec["amount"], "nm": spec["nm"],
           "options": dict(spec["options"]), "status": "ok", "error": None, "notes": [], "batches": []}
    try:
        built, notes = build_candidate(model, example_inputs, spec, seed=seed, **ft)
        row["notes"] += notes
        row.update(_static(built, x1, score))
    except _BUILD_ERRORS as e:
        if spec["kind"] == "dense":  # the reference: nothing can be advised without it
            raise
        row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return row, None
    return row, built


def _judge(rows: Dict[str, Dict[str, Any]], budget_pp: float) -> None:
    dense = next(r for r in rows.values() if r["kind"] == "dense")
    for r in rows.values():
        if r["status"] != "ok":
            r.update(drop_pp=None, within_budget=False, sparsity=None)
            continue
        r["drop_pp"] = 100.0 * (dense["metric_value"] - r["metric_value"])
        r["within_budget"] = r["drop_pp"] <= budget_pp + _DROP_EPS
        r["sparsity"] = 1.0 - r["nonzeros"] / dense["params"] if dense["params"] else 0.0


def _finish(rows, runs: Mapping[str, nn.Module], original: nn.Module, rank_by: str) -> None:
    """Primary-batch numbers, deployability and the ranking value of each measured row."""
    base = _prunekit_classes(original)
    for name, r in rows.items():
        if r["status"] != "ok":
            r.update(latency_ms=None, speedup=None, sparse_layers=[], needs_prunekit=[], plain_pytorch=None,
                     gpu_macs=None, score=None)
            continue
        first = r["batches"][0]
        needs = sorted(_prunekit_classes(runs[name]) - base)
        # a GPU skips only 2:4 zeros (sparse tensor cores); unstructured zeros are multiplied like any weight
        gpu = r["macs_effective"] if r["kind"] == "nm" and r["nm"] == [2, 4] else r["macs"]
        r.update(latency_ms=first["latency_ms"], speedup=first["speedup"],
                 sparse_layers=[x["name"] for x in first["sparse_layers"]], needs_prunekit=needs,
                 plain_pytorch=not needs, gpu_macs=gpu)
        r["score"] = r[rank_by]


def _pick(rows: Sequence[Dict[str, Any]], key: str, tie: float) -> Dict[str, Any]:
    """Best in-budget row by ``key`` (lower is better); values within ``tie`` of the best are a tie, and
    ties go to the smaller file, then the smaller drop."""
    ok = [r for r in rows if r["status"] == "ok" and r["within_budget"] and r.get(key) is not None]
    best = min(r[key] for r in ok)
    pool = [r for r in ok if r[key] <= best * (1.0 + tie)]
    return min(pool, key=lambda r: (r["size_bytes"], r["drop_pp"], r[key]))


def _at_batch(rows: Sequence[Dict[str, Any]], i: int) -> List[Dict[str, Any]]:
    """Rows as they were at the i-th measured batch (latency and speedup of that batch)."""
    return [{**r, "latency_ms": r["batches"][i]["latency_ms"], "speedup": r["batches"][i]["speedup"]}
            if r["status"] == "ok" else r for r in rows]


# ----------------------------------------------------------------------------- the main entry
def advise(model: nn.Module, example_inputs: Any, *, target: str = "cpu", budget_pp: float = 1.0,
           eval_fn: Optional[Callable[[nn.Module], float]] = None, eval_loader: Optional[Iterable] = None,
           metric: str = "accuracy", candidates: Optional[Sequence[Union[str, Mapping[str, Any]]]] = None,
           batch: Union[None, int, Sequence[int]] = None, train_loader: Optional[Iterable] = None,
           finetune_epochs: int = 0, finetune_kwargs: Optional[Mapping[str, Any]] = None,
           threads: Optional[int] = None, repeat: int = 11, warmup: int = 3, seed: int = 0,
           allow_proxy: bool = False, dtype: Optional[torch.dtype] = None, latency_tie: float = LATENCY_TIE,
           keep_models: bool = False, progress: Optional[bool] = None) -> "Advice":
    """Build every candidate from a copy of ``model``, measure it here, and recommend one for ``target``.

    ``budget_pp``: the largest metric drop (dense minus candidate, percentage points) allowed. The metric is
    ``eval_fn(model)`` (higher is better, a fraction) or the accuracy on ``eval_loader``. ``candidates``:
    strings like ``"structured:0.5"``, ``"unstructured:0.9"``, ``"nm:2:4"`` or dicts (see
    :func:`parse_candidate`); default :data:`DEFAULT_CANDIDATES`. ``batch``: the batch size(s) latency is
    measured at (default: that of ``example_inputs``); the first one ranks. ``dtype``: cast copies for
    CUDA timing (2:4 kernels need float16/bfloat16). ``keep_models``: keep the built candidates in
    ``Advice.models``. ``model`` is never modified.
    """
    device, measured, rank_by = check_target(target, allow_proxy, dtype)
    _check_numbers(budget_pp, repeat, warmup, finetune_epochs, train_loader, threads, latency_tie)
    _check_finetune(finetune_kwargs)
    score = _scorer(model, eval_fn, eval_loader)
    specs, batches = check_candidates(candidates), _batches(batch, example_inputs)
    ft = {"train_loader": train_loader, "finetune_epochs": finetune_epochs, "finetune_kwargs": finetune_kwargs}
    x1 = with_batch(example_inputs, 1)
    rows, built = {}, {}
    for spec in tqdm(specs, desc="advise: build", disable=not progress_enabled(progress), leave=False):
        rows[spec["name"]], m = _build_row(model, example_inputs, x1, spec, score, ft, seed)
        if m is not None:
            built[spec["name"]] = (spec, m)
    _judge(rows, budget_pp)
    with _threads(threads) as used:  # the threads you deploy with: for timing only, not for fine-tuning
        primary = None
        for b in tqdm(batches, desc="advise: time", disable=not progress_enabled(progress), leave=False):
            runs = _time_batch(rows, built, example_inputs, b, device, threads, repeat, warmup, dtype)
            primary = runs if primary is None else primary
        _finish(rows, primary, model, rank_by)
    listed = list(rows.values())
    rec = _pick(listed, rank_by, latency_tie if rank_by == "latency_ms" else 0.0)
    settings = {"threads": used, "repeat": repeat, "warmup": warmup, "seed": seed, "latency_tie": latency_tie,
                "finetune_epochs": finetune_epochs, "torch": torch.__version__, "allow_proxy": allow_proxy,
                "dtype": None if dtype is None else str(dtype).replace("torch.", "")}
    advice = Advice(target=target, rank_by=rank_by, measured=measured, device=_device_label(device, used),
                    metric=metric, budget_pp=float(budget_pp), batches=batches, candidates=listed,
                    recommended=rec["name"], reason="", settings=settings,
                    models={n: m for n, (_, m) in built.items()} if keep_models else {})
    advice.reason = _reason(advice, rec) + _weak_reference(rows, metric)
    return advice


WEAK_DENSE = 0.8   # a dense accuracy below this: the model is barely trained, its advice may not carry over


def _weak_reference(rows: Mapping[str, Dict[str, Any]], metric: str) -> str:
    """A warning (stderr, the dense row's notes and the reason) when the reference model is barely trained:
    how much pruning costs depends on it, so advice from a 48%-accurate model says little about a trained one."""
    dense = next(r for r in rows.values() if r["kind"] == "dense")
    if metric != "accuracy" or dense["metric_value"] >= WEAK_DENSE:
        return ""
    msg = (f"the dense model scores only {100 * dense['metric_value']:.2f}%: advice from a barely trained model may "
           "not hold for a trained one (--quick trains briefly: drop it, or give your trained checkpoint)")
    dense["notes"].append(msg)
    warnings.warn(msg, stacklevel=3)
    return f" Warning: {msg}."


_MEASURED_KEYS = ("metric_value", "params", "nonzeros", "macs", "macs_effective", "size_bytes", "latency_ms")


def recommend(candidates: Sequence[Mapping[str, Any]], *, budget_pp: float = 1.0, metric: str = "accuracy",
              latency_tie: float = LATENCY_TIE, batch: int = 1, device: str = "cpu") -> "Advice":
    """advise's judgement over candidates measured elsewhere (the points of ``prunekit demo`` / ``prune``):
    the same budget check, ranking by CPU latency with ties (within ``latency_tie``) going to the smaller
    file, and the same reason; nothing is built or timed here.

    Each candidate is a dict: ``name``, ``kind`` (one ``"dense"``, the reference; ``"structured"`` for a
    compacted model, ``"unstructured"`` / ``"nm"`` for masked ones), the numbers of :data:`_MEASURED_KEYS`
    (``metric_value`` a fraction, higher is better; ``size_bytes`` the file to ship) and optionally
    ``spread`` (interquartile range / median of its latency) and ``notes``. Latencies timed one model after
    another are noisier than advise's interleaved ones: give a ``latency_tie`` at least their spread.
    """
    _check_numbers(budget_pp, 1, 0, 0, None, None, latency_tie)
    rows: Dict[str, Dict[str, Any]] = {}
    for c in candidates:
        missing = [k for k in _MEASURED_KEYS if c.get(k) is None]
        if c.get("kind") not in KINDS or missing or not c["latency_ms"] > 0:
            raise PrunekitError(f"candidate {c.get('name')!r}: needs a kind in {KINDS}, a latency_ms > 0 and "
                                f"every one of {', '.join(_MEASURED_KEYS)}")
        rows[str(c["name"])] = {"name": str(c["name"]), "kind": c["kind"], "amount": c.get("amount"),
                                "nm": c.get("nm"), "options": {"sparse_kernels": False}, "status": "ok",
                                "error": None, "notes": list(c.get("notes") or []), "digest": None,
                                **{k: c[k] for k in _MEASURED_KEYS}}
    if len(rows) != len(candidates) or [r["kind"] for r in rows.values()].count("dense") != 1:
        raise PrunekitError("recommend needs uniquely named candidates and exactly one of kind 'dense'")
    _judge(rows, budget_pp)
    dense_ms = next(r for r in rows.values() if r["kind"] == "dense")["latency_ms"]
    for c, r in zip(candidates, rows.values()):
        speedup = dense_ms / r["latency_ms"]
        r["batches"] = [{"batch": batch, "latency_ms": r["latency_ms"], "speedup": speedup,
                         "spread": float(c.get("spread") or 0.0), "sparse_layers": [], "device": "cpu"}]
        r.update(speedup=speedup, sparse_layers=[], needs_prunekit=[], plain_pytorch=None, gpu_macs=r["macs"],
                 score=r["latency_ms"])
    listed = list(rows.values())
    rec = _pick(listed, "latency_ms", latency_tie)
    advice = Advice(target="cpu", rank_by="latency_ms", measured=True, device=device, metric=metric,
                    budget_pp=float(budget_pp), batches=[batch], candidates=listed, recommended=rec["name"],
                    reason="", settings={"latency_tie": latency_tie, "measured_by": "recommend"})
    advice.reason = _reason(advice, rec) + _weak_reference(rows, metric)
    return advice


def _device_label(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"cpu: {name or platform.processor() or platform.machine()}, {threads} torch thread(s)"


# ----------------------------------------------------------------------------- the reason, from the numbers
def _pp(drop: float) -> str:
    return f"{-drop:+.2f} pp"


def _hw(advice: "Advice") -> str:
    return "this GPU" if advice.device.startswith("cuda") else "this CPU"


def _headline(a: "Advice", rec: Dict[str, Any], dense: Dict[str, Any]) -> str:
    budget, b = f"(budget {a.budget_pp:g} pp)", a.batches[0]
    if a.rank_by == "latency_ms":
        if rec["speedup"] >= 1.0 + a.settings["latency_tie"]:
            return (f"{rec['name']}: {rec['speedup']:.2f}x faster than dense at batch {b} on {_hw(a)} "
                    f"({rec['latency_ms']:.3g} vs {dense['latency_ms']:.3g} ms), {_pp(rec['drop_pp'])} {budget}")
        return (f"{rec['name']}: as fast as dense at batch {b} on {_hw(a)} ({rec['speedup']:.2f}x, a tie within "
                f"{a.settings['latency_tie']:.0%}) and {dense['size_bytes'] / rec['size_bytes']:.2f}x smaller on "
                f"disk, {_pp(rec['drop_pp'])} {budget}")
    if a.rank_by == "macs_effective":
        return (f"{rec['name']}: {dense['macs_effective'] / max(1, rec['macs_effective']):.2f}x fewer effective "
                f"(non-zero) MACs than dense ({rec['macs_effective']:,} vs {dense['macs_effective']:,} per sample), "
                f"{rec['nonzeros']:,} non-zero weights, {_pp(rec['drop_pp'])} {budget}")
    return (f"{rec['name']}: NOT MEASURED on a GPU (no CUDA device here; allow_proxy ranks by the MACs a GPU "
            f"executes): {dense['gpu_macs'] / max(1, rec['gpu_macs']):.2f}x fewer than dense ({rec['gpu_macs']:,} "
            f"vs {dense['gpu_macs']:,} per sample), {_pp(rec['drop_pp'])} {budget}")


def _dense_headline(a: "Advice", rows: List[Dict[str, Any]]) -> str:
    pruned = [r for r in rows if r["kind"] != "dense" and r["status"] == "ok"]
    inside = [r for r in pruned if r["within_budget"]]
    if not inside:
        close = min(pruned, key=lambda r: r["drop_pp"], default=None)
        return (f"dense: no pruned candidate stays within the {a.budget_pp:g} pp budget"
                + (f" (closest: {close['name']} at {_pp(close['drop_pp'])})" if close else ""))
    best = min(inside, key=lambda r: r[a.rank_by])
    if a.rank_by == "latency_ms":
        return (f"dense: no candidate within the {a.budget_pp:g} pp budget is faster at batch {a.batches[0]} on "
                f"{_hw(a)} (best: {best['name']} at {best['speedup']:.2f}x, {best['latency_ms']:.3g} vs "
                f"{next(r for r in rows if r['kind'] == 'dense')['latency_ms']:.3g} ms)")
    return f"dense: no candidate within the {a.budget_pp:g} pp budget does better by {a.rank_by}"


def _family_clauses(a: "Advice", rows: List[Dict[str, Any]], rec: Dict[str, Any]) -> List[str]:
    """What the other kinds of pruning did here (the evidence against them)."""
    out = []
    ok = [r for r in rows if r["status"] == "ok" and r is not rec]
    unstructured = [r for r in ok if r["kind"] == "unstructured"]
    if unstructured and rec["kind"] != "unstructured":
        u = max([r for r in unstructured if r["within_budget"]] or unstructured, key=lambda r: r["speedup"])
        if u["sparse_layers"]:
            csr = f" + CSR ({len(u['sparse_layers'])} layer(s))"
        elif not u["options"].get("sparse_kernels", True):
            csr = " (masked, dense kernels: CSR not tried)"
        elif "forms_ms" in u["batches"][0]:
            csr = " (its CSR layers were slower end to end, so it runs dense)"
        else:
            csr = " (no layer faster as CSR)"
        over = "" if u["within_budget"] else f" but {_pp(u['drop_pp'])} is over the budget"
        out.append(f"{u['name']}{csr} ran at {u['speedup']:.2f}x{over}")
    for r in (r for r in ok if r["kind"] == "nm"):
        if a.device.startswith("cuda"):
            on = f"{len(r['sparse_layers'])} layer(s) on sparse tensor cores" if r["sparse_layers"] else \
                "no layer on sparse tensor cores: masked runs at dense speed"
            out.append(f"{r['name']} at {r['speedup']:.2f}x ({on})")
        else:
            out.append(f"{r['name']} at {r['speedup']:.2f}x: CPUs have no N:M kernels")
    faster = [r for r in ok if not r["within_budget"] and r["latency_ms"] < rec["latency_ms"]]
    if faster:
        f = min(faster, key=lambda r: r["latency_ms"])
        out.append(f"{f['name']} would be {f['speedup']:.2f}x but {_pp(f['drop_pp'])} is over the budget")
    return out


def _batch_clauses(a: "Advice", rows: List[Dict[str, Any]], rec: Dict[str, Any]) -> List[str]:
    out = []
    for i, b in enumerate(a.batches[1:], start=1):
        there = _at_batch(rows, i)
        best = _pick(there, "latency_ms", a.settings["latency_tie"])
        mine = rec["batches"][i]["speedup"]
        if best["name"] == rec["name"]:
            out.append(f"at batch {b} it is also the pick ({mine:.2f}x)")
        else:
            out.append(f"at batch {b} {best['name']} would be the pick ({best['speedup']:.2f}x; "
                       f"{rec['name']} {mine:.2f}x)")
    return out


def _reason(a: "Advice", rec: Dict[str, Any]) -> str:
    rows = a.candidates
    dense = next(r for r in rows if r["kind"] == "dense")
    clauses = [_dense_headline(a, rows) if rec is dense else _headline(a, rec, dense)]
    if a.rank_by == "latency_ms":
        clauses += _family_clauses(a, rows, rec) + _batch_clauses(a, rows, rec)
    else:
        what = "non-zeros and effective MACs" if a.rank_by == "macs_effective" else "MACs it executes"
        hw = "a sparse accelerator that skips zeros" if a.target == "sparse" else \
            "a GPU (unstructured zeros cost as much as weights; 2:4 runs on sparse tensor cores, Ampere+)"
        shown = "" if rec is dense else f" ({rec['speedup']:.2f}x at batch {a.batches[0]})"
        clauses.append(f"{hw} is rewarded by {what}; the latency shown{shown} is {_hw(a)}'s, not the target's")
    noisy = max(r["batches"][0]["spread"] for r in (rec, dense))
    if a.rank_by == "latency_ms" and noisy > NOISY:
        clauses.append(f"timings were noisy (interquartile range {noisy:.0%} of the median): re-run with more "
                       "repeats, 1 thread or on an idle machine before trusting small speedups")
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        clauses.append(f"could not build {', '.join(failed)} (see their error)")
    return "; ".join(clauses)


# ----------------------------------------------------------------------------- the result
_FIELDS = ("target", "rank_by", "measured", "device", "metric", "budget_pp", "batches", "candidates",
           "recommended", "reason", "settings")


@dataclass
class Advice:
    """The measurements of every candidate, the recommendation and its reason (JSON-safe but ``models``)."""

    target: str
    rank_by: str          # latency_ms | macs_effective | gpu_macs
    measured: bool        # whether rank_by was measured on the target's hardware
    device: str
    metric: str
    budget_pp: float
    batches: List[int]
    candidates: List[Dict[str, Any]]
    recommended: str
    reason: str
    settings: Dict[str, Any] = field(default_factory=dict)
    models: Dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    def candidate(self, name: str) -> Dict[str, Any]:
        for r in self.candidates:
            if r["name"] == name:
                return r
        raise UnknownNameError(f"no candidate {name!r}; known: {', '.join(r['name'] for r in self.candidates)}")

    def to_dict(self) -> Dict[str, Any]:

        return {"format": FORMAT, **to_jsonable({k: getattr(self, k) for k in _FIELDS})}

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "Advice":
        if doc.get("format") != FORMAT:
            raise PrunekitError(f"not a prunekit advice document (format {doc.get('format')!r}, expected {FORMAT!r})")
        missing = [k for k in _FIELDS if k not in doc]
        if missing:
            raise PrunekitError(f"advice document lacks {', '.join(missing)}")
        return cls(**{k: copy.deepcopy(doc[k]) for k in _FIELDS})

    @classmethod
    def from_json(cls, text: str) -> "Advice":
        return cls.from_dict(json.loads(text))

    def save(self, folder: Union[str, Path]) -> Tuple[Path, Path]:
        """Write ``advice.json`` and ``advice.md`` into ``folder``; returns their paths."""
        out = Path(folder)
        paths = (out / "advice.json", out / "advice.md")
        for path, text in zip(paths, (self.to_json(), self.to_markdown())):
            atomic_write_text(path, text)
        return paths

    def rows(self) -> List[Dict[str, Any]]:
        """One display row per candidate (``*`` marks the recommendation)."""
        out = []
        for r in self.candidates:
            ok = r["status"] == "ok"
            row = {"": "*" if r["name"] == self.recommended else "", "candidate": r["name"],
                   "budget": ("ok" if r["within_budget"] else "over") if ok else "failed",
                   f"{self.metric}_%": round(100 * r["metric_value"], 2) if ok else None,
                   "drop_pp": round(r["drop_pp"], 2) if ok else None}
            for i, b in enumerate(self.batches):
                row[f"ms@{b}"] = r["batches"][i]["latency_ms"] if ok else None
                row[f"x@{b}"] = round(r["batches"][i]["speedup"], 2) if ok else None
            for k in ("params", "nonzeros", "macs", "macs_effective"):
                row[k] = r.get(k)
            row["size_kb"] = round(r["size_bytes"] / 1000, 1) if ok else None
            for i, b in enumerate(self.batches):  # layers on sparse kernels (CSR, 2:4) at each batch
                row[f"sparse@{b}"] = len(r["batches"][i]["sparse_layers"]) if ok else None
            row["plain_torch"] = ("yes" if r["plain_pytorch"] else "no") if ok else ""
            out.append(row)
        return out

    def _header(self) -> str:
        how = "measured" if self.measured else "NOT measured on the target"
        return (f"target {self.target}: ranked by {self.rank_by} ({how}), on {self.device}; budget "
                f"{self.budget_pp:g} pp of {self.metric}; latency medians at batch "
                f"{', '.join(map(str, self.batches))}")

    def table(self) -> str:
        return "\n".join([self._header(), format_table(self.rows()), "",
                          f"recommended: {self.recommended}", f"why: {self.reason}"])

    def to_markdown(self) -> str:
        lines = [f"# prunekit advise: {self.target}", "", f"**Recommended: {self.recommended}.** {self.reason}", "",
                 self._header() + ".", "", format_table(self.rows(), markdown=True), ""]
        notes = [f"- {r['name']}: {n}" for r in self.candidates for n in ([r["error"]] if r["error"] else [])
                 + r["notes"]]
        if notes:
            lines += ["Notes:", ""] + notes + [""]
        s = self.settings
        lines.append(f"Settings: threads {s.get('threads')}, repeat {s.get('repeat')}, seed {s.get('seed')}, "
                     f"fine-tune epochs {s.get('finetune_epochs')}, torch {s.get('torch')}.")
        return "\n".join(lines) + "\n"
