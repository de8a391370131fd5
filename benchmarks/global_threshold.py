"""Global magnitude pruning: prunekit vs ``torch.nn.utils.prune.global_unstructured``.

Model: ``layers`` x ``nn.Linear(width, width)`` (full: 24 x 2048 -> 100.7M parameters,
403 MB fp32), every weight pruned together by |w| (L1) at each ``amount``, on CPU.

- prunekit: ``prunekit.api.prune(model, amount, scope="global", criterion="l1",
  include_classifier=True)`` (exact global threshold found in chunks, weights zeroed
  in place, packed bit masks as buffers); ``plan_pruning`` (selection only) is timed
  as its own case ``.../plan_only``, which has no torch peer.
- torch: ``prune.global_unstructured([(m, "weight") ...], prune.L1Unstructured, amount)``.

Metrics (JSON lines on stdout, see ../shared/BENCHMARKS.md):
- ``time_s``: median of ``n`` runs after a warm-up, each on a freshly built model
  (built outside the timed region), prunekit and torch alternating run by run;
- ``peak_rss_mb`` and ``extra_rss_frac``: each method runs once in its own child
  process (this script with the hidden ``--child METHOD``); the child builds the
  model, resets its peak RSS, notes the RSS, prunes, and reports its peak RSS
  (``VmHWM``, i.e. what ``ru_maxrss`` reports, but reset after the model was built;
  the raw ``ru_maxrss`` goes to the log too).
  ``extra_rss_frac = (peak after pruning - RSS with the model built) / model bytes``.
  ``--mem-reps K`` runs K children per method and reports the medians (with ``n``):
  prunekit's peak varies from process to process with heap fragmentation.
  A ``baseline`` child that builds the model and prunes nothing checks the method.
- ``size_bytes`` of the model (case without amount), for reference.

Correctness is checked on the way (warnings on stderr): both methods prune exactly
``round(amount * N)`` weights, and their masks differ at most at entries tied at
the threshold.

Usage: ``python benchmarks/global_threshold.py [--quick] [--seed S]``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import prune as tprune

import _common as C
from prunekit.api import plan_pruning, prune as pk_prune

BENCH = "global_threshold"
PEER = "torch.nn.utils.prune"
METHODS = ("prunekit", "torch", "baseline")

FULL = dict(layers=24, width=2048, n=5, warmup=1, amounts=(0.5, 0.9))
QUICK = dict(layers=4, width=256, n=2, warmup=1, amounts=(0.5,))


# ----------------------------------------------------------------------------- model and methods

def build_model(layers: int, width: int, seed: int) -> nn.Sequential:
    """``layers`` x Linear(width, width), default (kaiming-uniform) init, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def linears(model: nn.Module) -> List[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def n_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in linears(model))


def run_prunekit(model: nn.Module, amount: float):
    return pk_prune(model, amount, scope="global", criterion="l1", include_classifier=True)


def run_plan_only(model: nn.Module, amount: float):
    return plan_pruning(model, amount, scope="global", criterion="l1", include_classifier=True)


def run_torch(model: nn.Module, amount: float):
    tprune.global_unstructured([(m, "weight") for m in linears(model)],
                               pruning_method=tprune.L1Unstructured, amount=amount)
    return None


def run_method(method: str, model: nn.Module, amount: float):
    if method == "prunekit":
        return run_prunekit(model, amount)
    if method == "torch":
        return run_torch(model, amount)
    if method == "baseline":
        return None
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------- correctness

def prunekit_keep(model: nn.Module) -> List[torch.Tensor]:
    return [m.weight.detach() != 0 for m in linears(model)]


def torch_keep(model: nn.Module) -> List[torch.Tensor]:
    return [m.weight_mask != 0 for m in linears(model)]


def check_prunekit(model: nn.Module, plan, amount: float, label: str) -> None:
    want = round(amount * n_weights(model))
    planned = sum(tp.pruned_units for tp in plan)
    if planned != want:
        C.warn(f"{label}: prunekit planned {planned} pruned weights, expected round({amount} * N) = {want}")
    missing = [m for m in linears(model) if "weight_mask" not in m._buffers]
    if missing:
        C.warn(f"{label}: prunekit registered no weight_mask buffer on {len(missing)} layers")
    zeros = sum(int((m.weight == 0).sum()) for m in linears(model))
    if zeros != want:
        C.warn(f"{label}: {zeros} weights are zero after prunekit, expected {want}")


def check_plan(model: nn.Module, plan, amount: float, label: str) -> None:
    want = round(amount * n_weights(model))
    planned = sum(tp.pruned_units for tp in plan)
    if planned != want:
        C.warn(f"{label}: plan_pruning planned {planned} pruned weights, expected {want}")


def check_torch(model: nn.Module, amount: float, label: str) -> None:
    want = round(amount * n_weights(model))
    pruned = sum(int((m.weight_mask == 0).sum()) for m in linears(model))
    if pruned != want:
        C.warn(f"{label}: torch pruned {pruned} weights, expected round({amount} * N) = {want}")


def compare_masks(pk: List[torch.Tensor], tm: List[torch.Tensor], model: nn.Module, label: str) -> None:
    """Same weights pruned by both, except among entries tied at the threshold (any order is right)."""
    scores = [m.weight_orig.detach().abs() for m in linears(model)]
    thr = max(float(s[~k].max()) for s, k in zip(scores, tm) if (~k).any()) if any((~k).any() for k in tm) else None
    n_diff, bad = 0, 0
    for a, b, s in zip(pk, tm, scores):
        diff = a != b
        nd = int(diff.sum())
        n_diff += nd
        if nd:
            bad += int((s[diff] != thr).sum())
    if bad:
        C.warn(f"{label}: prunekit and torch masks differ at {bad} entries that are not ties at the "
               f"threshold {thr} ({n_diff} differences in all)")
    else:
        C.log(f"  {label}: masks agree ({n_diff} entries differ, all tied at the threshold {thr})")


# ----------------------------------------------------------------------------- child process

def child_main(args) -> None:
    """Build the model, prune it once with ``args.child``, print the RSS numbers as JSON."""
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    amount = args.amount
    # warm up on a mid-size model (same code paths as the big one: chunked passes, sampling,
    # parallel kernels): one-time lazy set-up (kernel code pages, thread pools, allocator
    # arenas, measured at ~0.15x the big model) is not the method's cost
    tiny = build_model(2, 64, args.seed) if args.quick else build_model(4, 1024, args.seed)
    run_method(args.child, tiny, amount)
    del tiny
    model = build_model(cfg["layers"], cfg["width"], args.seed)
    with torch.no_grad():  # init has written every weight; read them all as well
        touched = float(sum(p.sum() for p in model.parameters()))
    gc.collect()
    reset = C.reset_peak_rss()
    rss_before = C.rss_now_kb()
    peak_before = C.peak_rss_kb()
    run_method(args.child, model, amount)
    peak = C.peak_rss_kb()
    rss_after = C.rss_now_kb()
    maxrss = C.ru_maxrss_kb()
    print(json.dumps({"method": args.child, "amount": amount, "rss_before_kb": rss_before,
                      "peak_before_kb": peak_before, "peak_kb": peak, "rss_after_kb": rss_after,
                      "ru_maxrss_kb": maxrss,
                      "model_bytes": model_bytes(model), "peak_reset": reset, "touched": touched}),
          flush=True)


def measure_memory(script: str, args, method: str, amount: float) -> Dict:
    """Run ``args.mem_reps`` children for ``method``; medians of their peak RSS and extra fraction."""
    child_args = ["--child", method, "--amount", repr(amount), "--seed", str(args.seed),
                  "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    runs = []
    for _ in range(args.mem_reps):
        res = C.run_child(script, child_args, timeout=args.child_timeout)
        res["extra_frac"] = (res["peak_kb"] - res["rss_before_kb"]) * 1024 / res["model_bytes"]
        res["peak_mb"] = res["peak_kb"] * 1024 / C.MB
        if not res.get("peak_reset"):
            C.warn(f"{method}: could not reset the peak RSS after building the model; the peak "
                   "includes the model's construction")
        C.log(f"  memory {method} amount={amount}: RSS before {res['rss_before_kb'] / 1024:.1f} MiB, "
              f"peak {res['peak_kb'] / 1024:.1f} MiB (ru_maxrss {res['ru_maxrss_kb'] / 1024:.1f} MiB), "
              f"extra {res['extra_frac']:.3f} x model")
        runs.append(res)
    fr = [r["extra_frac"] for r in runs]
    if len(runs) > 1:
        C.log(f"  memory {method} amount={amount}: extra {min(fr):.3f}..{max(fr):.3f} x model over "
              f"{len(runs)} processes, median {C.median(fr):.3f}")
    return {"extra_frac": C.median(fr), "peak_mb": C.median([r["peak_mb"] for r in runs]),
            "n": len(runs)}


# ----------------------------------------------------------------------------- parent

def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny setting for tests (seconds)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model init (default 0)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--n", type=int, default=None, help="timed runs per method (default: 5, quick 2)")
    ap.add_argument("--amounts", type=float, nargs="+", default=None,
                    help="fractions to prune (default: 0.5 0.9, quick 0.5)")
    ap.add_argument("--mem-reps", type=int, default=1,
                    help="child processes per method for the RSS metrics; their median is reported "
                         "(default 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the child processes (RSS metrics)")
    ap.add_argument("--child-timeout", type=float, default=1800, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--amount", type=float, default=0.5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args)
        return

    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    n = args.n if args.n is not None else cfg["n"]
    amounts = tuple(args.amounts) if args.amounts else cfg["amounts"]
    layers, width, seed, threads = cfg["layers"], cfg["width"], args.seed, torch.get_num_threads()
    tag = f"mlp{layers}x{width}"
    script = os.path.abspath(__file__)

    def fresh() -> nn.Sequential:
        return build_model(layers, width, seed)

    probe = fresh()
    size, n_w = model_bytes(probe), n_weights(probe)
    C.log(f"{tag}: {sum(p.numel() for p in probe.parameters()):,} parameters ({n_w:,} weights), "
          f"{size / C.MB:.1f} MB; threads={threads}, n={n}, seed={seed}")
    C.emit(BENCH, tag, "size_bytes", size, "bytes", seed=seed)
    plan_model = probe  # plan_pruning does not touch the model: one copy serves every run

    for amount in amounts:
        case = f"{tag}/amount={amount}"
        C.log(f"timing {case}")
        stash: Dict[str, List[torch.Tensor]] = {}

        def check(name, r, model, out, amount=amount, case=case, stash=stash):
            label = f"{case} {name} {'warm-up' if r < 0 else f'run {r + 1}'}"
            if name == "prunekit":
                check_prunekit(model, out, amount, label)
                if r < 0:
                    stash["prunekit"] = prunekit_keep(model)
            elif name == "torch":
                check_torch(model, amount, label)
                if r < 0 and "prunekit" in stash:
                    compare_masks(stash.pop("prunekit"), torch_keep(model), model, case)
            else:
                check_plan(model, out, amount, label)

        times = C.alternating_medians({
            "prunekit": (fresh, lambda m, a=amount: run_prunekit(m, a)),
            "torch": (fresh, lambda m, a=amount: run_torch(m, a)),
            "plan_only": (lambda: plan_model, lambda m, a=amount: run_plan_only(m, a)),
        }, n=n, warmup=cfg["warmup"], check=check)
        pk, tt, po = (C.median(times[k]) for k in ("prunekit", "torch", "plan_only"))
        C.emit(BENCH, case, "time_s", pk, "s", peer=PEER, peer_value=tt, n=n, threads=threads, seed=seed)
        C.emit(BENCH, f"{case}/plan_only", "time_s", po, "s", n=n, threads=threads, seed=seed)
        gc.collect()

    if args.no_memory:
        return
    plan_model = probe = None  # free the model before the memory runs
    gc.collect()
    base = measure_memory(script, args, "baseline", amounts[0])
    mem_n = args.mem_reps if args.mem_reps > 1 else None
    C.emit(BENCH, f"{tag}/baseline", "peak_rss_mb", base["peak_mb"], "MB", n=mem_n, threads=threads,
           seed=seed)
    C.emit(BENCH, f"{tag}/baseline", "extra_rss_frac", base["extra_frac"], "frac", n=mem_n,
           threads=threads, seed=seed)
    if abs(base["extra_frac"]) > 0.02:
        C.log(f"note: baseline child: extra RSS {base['extra_frac']:.3f} x model without pruning; "
               "the memory numbers carry that much noise")
    for amount in amounts:
        case = f"{tag}/amount={amount}"
        pk = measure_memory(script, args, "prunekit", amount)
        tm = measure_memory(script, args, "torch", amount)
        C.emit(BENCH, case, "peak_rss_mb", pk["peak_mb"], "MB", peer=PEER, peer_value=tm["peak_mb"],
               n=mem_n, threads=threads, seed=seed)
        C.emit(BENCH, case, "extra_rss_frac", pk["extra_frac"], "frac", peer=PEER,
               peer_value=tm["extra_frac"], n=mem_n, threads=threads, seed=seed)


if __name__ == "__main__":
    main()
