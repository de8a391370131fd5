"""Measure what pruning bought: parameters, MACs, size on disk, latency, accuracy.

Every function here leaves the model as it found it: train/eval flags of all
submodules, torch's thread count and autograd state are restored afterwards.
All returned numbers are plain Python ints/floats so results can go to JSON.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from prunekit._util import batch_of, call_model, eval_mode, median, tensors_in, time_calls, with_batch
from prunekit.deploy import compress
from prunekit.errors import InvalidTypeError, PrunekitError

# Bookkeeping buffers of prunekit's pruned layers: never part of the model's size.
_AUX_SUFFIXES = ("_mask", "_orig_values")
# Layers whose MACs shrink with weight sparsity (a sparse kernel skips the zeros).
_SPARSE_MAC_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_LATENCY_KW = {"warmup", "repeats"}
_EVAL_KW = {"device", "loss_fn", "max_batches"}












def _weight_of(module: nn.Module) -> Optional[nn.Parameter]:
    w = getattr(module, "weight", None)
    return w if isinstance(w, nn.Parameter) else None


def _density(t: torch.Tensor) -> float:
    return int(torch.count_nonzero(t)) / t.numel() if t.numel() else 1.0


def _module_flops(model: nn.Module, example_inputs: Any) -> Dict[str, int]:
    """Dense FLOPs per module name ('' = the whole model), from one no-grad eval forward."""
    counter = FlopCounterMode(display=False)
    # nn.MultiheadAttention's eval fast path is one fused op the flop counter has no formula for
    # (it counted 0 MACs); the regular path is the same math in countable mm/bmm ops
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with eval_mode(model), torch.no_grad(), counter:
            call_model(model, example_inputs)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)
    # FlopCounterMode names modules "<RootClass>.<dotted.path>"; strip the root prefix.
    root = type(model).__name__
    out: Dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1 :] if key.startswith(root + ".") else None
        if name is not None:
            out[name] = int(sum(per_op.values()))
    out[""] = int(counter.get_total_flops())
    return out


def _macs_from(model: nn.Module, flops: Dict[str, int]) -> Dict[str, int]:
    """Total dense MACs, and effective MACs with Linear/Conv scaled by weight density."""
    dense = flops.get("", 0) / 2
    saved = 0.0
    for name, module in model.named_modules():
        w = _weight_of(module)
        if isinstance(module, _SPARSE_MAC_TYPES) and w is not None:
            saved += flops.get(name, 0) / 2 * (1.0 - _density(w))
    return {"dense": int(round(dense)), "effective": int(round(dense - saved))}


# ----------------------------------------------------------------------- counts
def count_parameters(model: nn.Module) -> Dict[str, int]:
    """``{"total", "nonzero"}`` over the model's parameters (tied ones counted once)."""
    total = nonzero = 0
    for name, p in model.named_parameters():
        if name.endswith(_AUX_SUFFIXES):
            continue
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"total": total, "nonzero": nonzero}


def _layer_rows(model: nn.Module, flops: Optional[Dict[str, int]]) -> List[Dict[str, Any]]:
    rows = []
    for name, module in model.named_modules():
        w = _weight_of(module)
        if w is None:
            continue
        params = [p for p in (w, getattr(module, "bias", None)) if isinstance(p, nn.Parameter)]
        n = sum(p.numel() for p in params)
        nz = sum(int(torch.count_nonzero(p.detach())) for p in params)
        row = {"name": name, "type": type(module).__name__, "params": n, "nonzeros": nz,
               "sparsity": 1.0 - nz / n if n else 0.0}
        if flops is not None:
            dense = flops.get(name, 0) / 2
            scale = _density(w) if isinstance(module, _SPARSE_MAC_TYPES) else 1.0
            row["macs_dense"] = int(round(dense))
            row["macs_effective"] = int(round(dense * scale))
        rows.append(row)
    return rows


def layer_table(model: nn.Module, example_inputs: Any = None) -> List[Dict[str, Any]]:
    """One row per module with a ``weight`` parameter: name, type, params, nonzeros,
    sparsity and, given ``example_inputs``, macs_dense / macs_effective."""
    flops = None if example_inputs is None else _module_flops(model, example_inputs)
    return _layer_rows(model, flops)


def count_macs(model: nn.Module, example_inputs: Any) -> Dict[str, int]:
    """``{"dense", "effective"}`` MACs of one forward on ``example_inputs``."""
    return _macs_from(model, _module_flops(model, example_inputs))


# ----------------------------------------------------------------------- timing
def _sync(inputs: Any) -> None:
    # CUDA kernels run asynchronously: wait for them or the timing measures only the launch
    if any(t.is_cuda for t in tensors_in(inputs)):
        torch.cuda.synchronize()


def measure_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 20,
                    threads: Optional[int] = None) -> Dict[str, Any]:
    """Median, p10/p90, quartiles (q1/q3) and min/max wall time (ms) of one no-grad eval forward."""
    if repeats < 1 or warmup < 0:
        raise PrunekitError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    old_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        used_threads = torch.get_num_threads()
        with eval_mode(model), torch.no_grad():
            times = time_calls({"model": lambda: call_model(model, example_inputs)}, repeat=repeats, warmup=warmup,
                               sample_ms=None, sync=lambda: _sync(example_inputs))["model"]
    finally:
        torch.set_num_threads(old_threads)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    quart = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median_ms": median(times), "p10_ms": q[0], "p90_ms": q[-1], "q1_ms": quart[0], "q3_ms": quart[-1],
            "min_ms": min(times), "max_ms": max(times),
            "batch": batch_of(example_inputs), "threads": used_threads, "repeats": repeats}


# ----------------------------------------------------------------------- accuracy
def evaluate(model: nn.Module, loader: Iterable, *, device: Any = "cpu", loss_fn=None,
             max_batches: Optional[int] = None) -> Dict[str, Any]:
    """Accuracy (and top5 when there are more than 5 classes), mean loss and sample count.

    ``loader`` yields ``(x, y)``; x and y are moved to ``device`` (the model must
    already be there). ``loss_fn(logits, y)`` must return a batch mean; default
    cross-entropy.
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    n = correct = correct5 = 0
    loss_sum, classes = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            logits = call_model(model, x)
            classes = logits.shape[-1]
            loss_sum += float(loss_fn(logits, y)) * y.shape[0]
            top = logits.topk(min(5, classes), dim=-1).indices
            hits = top == y.unsqueeze(-1)
            correct += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=-1).sum())
            n += int(y.shape[0])
    if n == 0:
        raise PrunekitError("evaluate: the loader yielded no samples")
    out: Dict[str, Any] = {"accuracy": correct / n, "loss": loss_sum / n, "n": n}
    if classes > 5:
        out["top5"] = correct5 / n
    return out


# ----------------------------------------------------------------------- size
def _stored_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith(_AUX_SUFFIXES)}


def size_on_disk(model: nn.Module) -> Dict[str, Any]:
    """Safetensors bytes of the model's parameters and buffers, dense and compressed
    (prunekit's mask / original-value buffers are left out of both)."""
    sd = _stored_state(model)
    dense = compress.dense_size_bytes(sd)
    packed = compress.compressed_size_bytes(sd)
    return {"dense_bytes": dense, "compressed_bytes": packed, "ratio": dense / packed if packed else 1.0}


# ----------------------------------------------------------------------- summary
def _split_kw(kw: Dict[str, Any]) -> tuple:
    unknown = set(kw) - _LATENCY_KW - _EVAL_KW
    if unknown:
        raise InvalidTypeError(f"summarize() got unexpected keyword(s) {sorted(unknown)}; "
                        f"allowed: {sorted(_LATENCY_KW | _EVAL_KW)}")
    return ({k: v for k, v in kw.items() if k in _LATENCY_KW}, {k: v for k, v in kw.items() if k in _EVAL_KW})


def summarize(model: nn.Module, example_inputs: Any, loader: Optional[Iterable] = None, *, latency: bool = True,
              batch: Optional[int] = None, threads: Optional[int] = None, **kw: Any) -> Dict[str, Any]:
    """All metrics in one JSON-safe dict. ``batch`` resizes ``example_inputs`` for the
    latency run; ``kw`` goes to :func:`measure_latency` (warmup, repeats) and
    :func:`evaluate` (device, loss_fn, max_batches)."""
    lat_kw, eval_kw = _split_kw(kw)
    counts = count_parameters(model)
    flops = _module_flops(model, example_inputs)
    macs = _macs_from(model, flops)
    size = size_on_disk(model)
    total, nz = counts["total"], counts["nonzero"]
    out: Dict[str, Any] = {
        "params": total, "nonzeros": nz, "sparsity": 1.0 - nz / total if total else 0.0,
        "compression_ratio": total / nz if nz else None,  # None: all-zero model (inf is not JSON)
        "macs": macs["dense"], "macs_effective": macs["effective"],
        "theoretical_speedup": macs["dense"] / macs["effective"] if macs["effective"] else None,
        "size_bytes": size["dense_bytes"], "size_compressed_bytes": size["compressed_bytes"],
    }
    if latency:
        lat = measure_latency(model, with_batch(example_inputs, batch), threads=threads, **lat_kw)
        out.update(latency_ms=lat["median_ms"], batch=lat["batch"], threads=lat["threads"],
                   # the spread, so that a report can tell a speedup from noise
                   latency_q1_ms=lat["q1_ms"], latency_q3_ms=lat["q3_ms"], latency_min_ms=lat["min_ms"],
                   latency_max_ms=lat["max_ms"], latency_repeats=lat["repeats"])
    if loader is not None:
        out.update({k: v for k, v in evaluate(model, loader, **eval_kw).items() if k != "n"})
    out["layers"] = _layer_rows(model, flops)
    return out


# ----------------------------------------------------------------------- tables
def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def format_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None,
                 floatfmt: str = ".4g", *, markdown: bool = False) -> str:
    """Aligned plain-text (or Markdown) table; numbers right-aligned, text left-aligned.

    ``columns`` defaults to every key of ``rows`` in first-seen order; missing cells are blank.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if not columns:
        return ""
    cells = [[_cell(r.get(c), floatfmt) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) and bool(rows)
               for c in columns]
    widths = [max([len(str(c))] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    if markdown:
        sep = "|" + "|".join(("-" * (w + 1) + ":") if num else "-" * (w + 2) for w, num in zip(widths, numeric)) + "|"
    else:
        sep = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(c) for c in columns]), sep] + [line(r) for r in cells])
