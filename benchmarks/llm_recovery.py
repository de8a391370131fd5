"""Recovery of a one-shot pruned decoder LLM: perplexity before and after training, beside a dense control.

Model and text as in ``llm_oneshot.py``: SmolLM2-135M-Instruct (fp32), calibration ``--calib-windows`` x
``--calib-len`` tokens of *Pride and Prejudice*, evaluation the first ``--tokens`` tokens of *Sense and
Sensibility* (context ``--context``, non-overlapping). The model is pruned once (``--method``, ``--sparsity``
or ``--nm``), then recovered with masks held fixed (:func:`prunekit.train.causal_lm.recover`) on
``--train-windows`` other windows of *Pride and Prejudice* for ``--steps`` steps of ``--batch`` windows:

- ``kl``: distillation from the dense model (no labels);
- ``ce``: next-token fine-tuning on the text.

Training on Austen also lowers a *dense* model's perplexity on Austen, so the fair control is the dense
model given the same ``ce`` training (``dense/recovered=ce``); every ratio is quoted against the untouched
dense model and against that control.

JSON lines (../shared/BENCHMARKS.md); ``case`` = ``smollm2-135m/<method>/<sparsity=0.5|2:4>/recovered=<0|kl|ce>``
and ``smollm2-135m/dense/recovered=ce``:

- ``perplexity`` with peer ``dense`` (same tokens, same run);
- ``ppl_ratio`` = perplexity / dense perplexity (lower is better), with peer ``dense+ce`` (the control's
  ratio) on recovered cases;
- ``time_s`` to train (``recovered=kl|ce``) or to prune (``recovered=0``); ``sparsity`` achieved.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import _common as C
import prunekit
from _austen import austen
from prunekit.analysis.perplexity import perplexity
from prunekit.apply import masking
from prunekit.train.causal_lm import RecoveryOptions, recover
from prunekit.zoo.llm import calibration_windows

BENCH = "llm_recovery"


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny setting for the tests (two blocks, few steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--method", default="sparsegpt", help="layer solver: magnitude, wanda, sparsegpt")
    ap.add_argument("--refit", action="store_true", help="refit the kept weights exactly after the mask")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nm", help="N:M instead of --sparsity, e.g. 2:4")
    ap.add_argument("--losses", default="kl,ce", help="recoveries to run (kl, ce), comma-separated")
    ap.add_argument("--no-control", action="store_true", help="skip the dense model given the same ce training")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--train-windows", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    if args.quick:
        args.calib_windows, args.calib_len, args.tokens, args.context = 4, 64, 128, 128
        args.train_windows, args.steps, args.batch = 4, 2, 2
    return args


def _train(model, train, teacher, loss: str, args) -> float:
    start = time.perf_counter()
    recover(model, train, teacher=teacher if loss == "kl" else None,
            options=RecoveryOptions(loss=loss, batch_size=args.batch, seed=args.seed),
            max_steps=args.steps, epochs=max(1, -(-args.steps * args.batch // len(train))), lr=args.lr,
            progress=False)
    return time.perf_counter() - start


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    label = "smollm2-135m-quick" if args.quick else "smollm2-135m"
    data = austen(args.calib_windows, args.calib_len, args.tokens, args.context, args.seed)
    dense, calib, windows = data.dense, data.calib, data.windows
    train = calibration_windows(data.text_ids, args.train_windows, args.calib_len, seed=args.seed + 1)
    dense_ppl = perplexity(dense, windows, progress=False).perplexity
    C.log(f"dense perplexity {dense_ppl:.3f} on {windows.numel()} tokens")
    common = dict(threads=torch.get_num_threads(), seed=args.seed)

    def report(case: str, model, seconds: float, control=None) -> float:
        ppl = perplexity(model, windows, progress=False).perplexity
        C.log(f"{case}: perplexity {ppl:.3f} ({ppl / dense_ppl:.3f}x dense) after {seconds:.0f} s")
        C.emit(BENCH, case, "perplexity", ppl, "ppl", peer="dense", peer_value=dense_ppl, **common)
        peer = {} if control is None else {"peer": "dense+ce", "peer_value": control}
        C.emit(BENCH, case, "ppl_ratio", ppl / dense_ppl, "x", **peer, **common)
        C.emit(BENCH, case, "time_s", seconds, "s", n=1, **common)
        return ppl / dense_ppl

    control = None
    if not args.no_control:
        ctrl = copy.deepcopy(dense)
        control = report(f"{label}/dense/recovered=ce", ctrl, _train(ctrl, train, None, "ce", args))
        del ctrl
    pruned = copy.deepcopy(dense)
    target = dict(pattern="nm", nm=args.nm) if args.nm else {}
    include = "model.layers.[01].*" if args.quick else None
    start = time.perf_counter()
    plan = prunekit.prune(pruned, None if args.nm else args.sparsity, criterion="sequential", method=args.method,
                          refit=args.refit, data=calib, include=include, seed=args.seed, progress=False, **target)
    name = f"{label}/{args.method}{'+refit' if args.refit else ''}/" + (args.nm or f"sparsity={args.sparsity}")
    report(f"{name}/recovered=0", pruned, time.perf_counter() - start)
    C.emit(BENCH, f"{name}/recovered=0", "sparsity", masking.global_sparsity(pruned, list(plan.tensors)), "frac",
           **common)
    for loss in [s for s in args.losses.split(",") if s]:
        student = copy.deepcopy(pruned)
        seconds = _train(student, train, dense, loss, args)
        report(f"{name}/recovered={loss}", student, seconds, control)
        C.emit(BENCH, f"{name}/recovered={loss}", "sparsity", masking.global_sparsity(student, list(plan.tensors)),
               "frac", **common)
        del student


if __name__ == "__main__":
    main()
