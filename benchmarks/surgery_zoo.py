"""Structured surgery on modern timm architectures, side by side with Torch-Pruning.

Each model (random init, eval mode; structure is what matters here) loses 50% of the channels of every
prunable group by L2 magnitude, per layer, the classifier's outputs kept, in three ways measured in one run:

- ``exact``: prunekit's default: only groups whose removal leaves the kept channels' values unchanged
  (masked == compacted);
- ``residual``: prunekit with ``exact=False``: residual streams normalised by LayerNorm go too (ViT, Swin,
  ConvNeXt embedding widths), a smaller model that fine-tuning or distillation then recovers;
- the peer, Torch-Pruning's ``MagnitudePruner`` (L2, same ratio, per layer, classifier ignored; for ViT-style
  attention its ``num_heads`` option and the heads' attributes updated after, as its timm example does).

JSON lines (../shared/BENCHMARKS.md); ``case`` = ``timm/<model>/sparsity=0.5/<exact|residual>``:
``macs_ratio`` and ``params_ratio`` (dense / pruned, higher is better), ``speedup`` (dense / pruned median
latency, ``batch`` 1 and 16, 1 thread), ``plan_time_s`` (plan + compact, seconds; the peer: pruner + step),
each with Torch-Pruning's value as ``peer`` (``peer_value`` null and ``peer_error`` where the peer fails or its
model does not run), and ``max_diff`` (largest |output| difference, masked vs compacted prunekit model).
For ``--timed`` models (ResNet-50, DenseNet-121) only ``plan_time_s`` is measured: medians of
``--timing-runs`` runs, prunekit and the peer alternating.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

import _common as C
from prunekit.analysis.metrics import count_macs, measure_latency
from prunekit.apply import masking
from prunekit.surgery import compact, plan_groups
from prunekit.zoo.timm_compat import import_timm

try:
    import torch_pruning as tp
except ImportError:  # the peer is optional: its numbers are then reported as missing
    tp = None

BENCH = "surgery_zoo"
TP = "torch-pruning"
MODELS = ("resnet18", "efficientnet_b0", "convnext_atto", "regnetx_002", "vit_tiny_patch16_224",
          "swin_tiny_patch4_window7_224", "mobilenetv3_small_100")
QUICK = ("resnet18", "convnext_atto")
TIMED = ("resnet50", "densenet121")   # plan + compact time only (issue 12: within 1.2x of the peer's)
AMOUNT = 0.5


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _prunekit(model: nn.Module, x: torch.Tensor, exact: bool) -> Tuple[nn.Module, float, float]:
    """(slim model, plan + compact seconds, max |masked - compacted|)."""
    start = time.perf_counter()
    plan = plan_groups(model, x, AMOUNT, criterion="l1", norm=2.0, scope="layer", exact=exact)   # L2 norms
    slim = compact(model, plan, example_inputs=x)
    seconds = time.perf_counter() - start
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    with torch.no_grad():
        diff = float((masked(x) - slim(x)).abs().max())
    return slim.eval(), seconds, diff


def _tp_heads(model: nn.Module) -> Dict[nn.Module, int]:
    """timm attention blocks: their qkv projection and head count, for Torch-Pruning's num_heads option."""
    return {m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}


def _tp_fix_heads(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            m.head_dim = m.qkv.out_features // 3 // m.num_heads
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.qkv.out_features // 3


def _peer(model: nn.Module, x: torch.Tensor) -> Tuple[Optional[nn.Module], float, Optional[str]]:
    """(Torch-Pruning's slim model or None, its seconds, why it failed or None)."""
    if tp is None:
        return None, 0.0, "torch-pruning is not installed"
    peer = copy.deepcopy(model)
    start = time.perf_counter()
    try:
        heads = _tp_heads(peer)
        pruner = tp.pruner.MagnitudePruner(peer, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=AMOUNT, global_pruning=False,
                                           ignored_layers=[_classifier(peer)], num_heads=heads)
        pruner.step()
        _tp_fix_heads(peer)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = peer.eval()(x)
        if out.shape != model(x).shape:
            return None, seconds, f"output shape {tuple(out.shape)} instead of {tuple(model(x).shape)}"
        return peer, seconds, None
    except Exception as e:  # noqa: BLE001 -- a peer failure is a result, not a crash
        return None, time.perf_counter() - start, f"{type(e).__name__}: {str(e)[:200]}"


def _emit(case: str, metric: str, value: float, unit: str, peer_value: Optional[float], error: Optional[str],
          lower_is_better: bool, **extra: Any) -> None:
    if error is None and peer_value is not None:
        C.emit(BENCH, case, metric, value, unit, peer=TP, peer_value=peer_value, lower_is_better=lower_is_better,
               **extra)
        return
    rec = {"bench": BENCH, "case": case, "metric": metric, "value": value, "unit": unit, "peer": TP,
           "peer_value": None, "peer_error": error or "no value", **extra}
    print(json.dumps(rec), flush=True)


def _latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    return measure_latency(model, x, warmup=2, repeats=repeats, threads=1)["median_ms"]


def _plan_times(name: str, args) -> None:
    """Median plan + compact seconds of prunekit and the peer, run alternately (machine noise hits both)."""
    timm = import_timm()
    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, args.size, args.size)

    def ours(_):
        plan = plan_groups(model, x, AMOUNT, criterion="l1", norm=2.0, scope="layer")
        return compact(model, plan, example_inputs=x)

    def peer(m):
        tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=AMOUNT,
                                  global_pruning=False, ignored_layers=[_classifier(m)]).step()
        return m

    methods = {"prunekit": (None, ours)}
    if tp is not None:
        methods[TP] = (lambda: copy.deepcopy(model), peer)
    times = C.alternating_medians(methods, n=args.timing_runs, progress=False)
    case = f"timm/{name}/sparsity={AMOUNT}/exact"
    mine = C.median(times["prunekit"])
    theirs = C.median(times[TP]) if tp is not None else None
    _emit(case, "plan_time_s", mine, "s", theirs, None if tp is not None else "torch-pruning is not installed", True,
          n=args.timing_runs, threads=1, seed=args.seed)
    C.log(f"{case}: plan + compact {mine:.2f} s, peer {theirs if theirs is None else round(theirs, 2)} s")


def _measure(name: str, args) -> None:
    timm = import_timm()
    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    side = args.size
    x = torch.randn(2, 3, side, side)
    macs = count_macs(model, x)["dense"]
    params = sum(p.numel() for p in model.parameters())
    peer, peer_s, error = _peer(model, x)
    peer_lat = {}
    dense_lat = {b: _latency(model, torch.randn(b, 3, side, side), args.repeats) for b in args.batches}
    if peer is not None:
        peer_lat = {b: _latency(peer, torch.randn(b, 3, side, side), args.repeats) for b in args.batches}
    common = dict(threads=1, seed=args.seed)
    for mode, exact in (("exact", True), ("residual", False)):
        case = f"timm/{name}/sparsity={AMOUNT}/{mode}"
        slim, seconds, diff = _prunekit(model, x, exact)
        ratio = macs / count_macs(slim, x)["dense"]
        peer_ratio = None if peer is None else macs / count_macs(peer, x)["dense"]
        _emit(case, "macs_ratio", ratio, "x", peer_ratio, error, False, **common)
        p_ratio = params / sum(p.numel() for p in slim.parameters())
        peer_p = None if peer is None else params / sum(p.numel() for p in peer.parameters())
        _emit(case, "params_ratio", p_ratio, "x", peer_p, error, False, **common)
        for b in args.batches:
            lat = _latency(slim, torch.randn(b, 3, side, side), args.repeats)
            _emit(case, "speedup", dense_lat[b] / lat, "x", None if peer is None else dense_lat[b] / peer_lat[b],
                  error, False, batch=b, n=args.repeats, **common)
        _emit(case, "plan_time_s", seconds, "s", None if error else peer_s, error, True, n=1, **common)
        C.emit(BENCH, case, "max_diff", diff, "abs", exact=exact, **common)
        C.log(f"{case}: MACs /{ratio:.2f} (peer {'fails: ' + error if error else f'/{peer_ratio:.2f}'}), "
              f"masked vs compacted {diff:.1e}, {seconds:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two models at 64 px, few repeats (for the tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--timed", default=",".join(TIMED), help="models whose plan time alone is compared")
    ap.add_argument("--timing-runs", type=int, default=5)
    args = ap.parse_args()
    args.batches = (1, 16)
    models = [m for m in args.models.split(",") if m]
    if args.quick:
        models, args.size, args.repeats, args.batches, args.timed = list(QUICK), 64, 2, (1, 4), ""
    torch.set_num_threads(1)
    if import_timm() is None:
        sys.exit("timm is not installed (pip install timm --no-deps)")
    for name in models:
        _measure(name, args)
    for name in [m for m in args.timed.split(",") if m]:
        _plan_times(name, args)


if __name__ == "__main__":
    main()
