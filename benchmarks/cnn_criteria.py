"""Do data-aware criteria hold up on a CNN? Every criterion at 90% on a trained LeNet-5, before and after fine-tuning.

On a CNN, uniform per-layer sparsity kills the tiny first conv (at 90% each 5x5 filter of one input channel keeps
2 or 3 weights), so Wanda, Taylor and SparseGPT, which rank within a layer or a row, trail one global magnitude
ranking badly. ``allocation="magnitude"`` gives them the per-layer sparsities of that global ranking and lets each
criterion choose *which* weights go within a layer; ``allocation="owl"`` gives the outlier-weighted ones;
``allocation="sensitivity"`` (``+sens``) probes each layer's calibration loss pruned alone by the criterion itself
and takes the least-cost sparsities (:mod:`prunekit.select.probe`).

Two repairs of the masking criteria, measured here: ``+refit`` solves the kept weights of each pruned layer by
least squares towards the dense layer's outputs on the calibration batches, layer by layer in forward order
(``prune(..., refit=True)``, :mod:`prunekit.pruners.refit`); each ``X+refit`` is case ``X`` plus the refit, and
``magnitude+refit`` is the honest control (the repair alone, on global magnitude's masks). ``+steps=8`` prunes in
8 equal steps, Taylor's gradients collected again on the partly pruned model before each (``prune(..., steps=8)``).

Setting (full): LeNet-5 (``prunekit.zoo``, Caffe's: conv 20, conv 50, fc 500, fc 10) trained on all of MNIST
(4 epochs, seed 0, cached), 8 training batches of calibration data, target sparsity 0.9 over the two convs and the
hidden Linear layer (the classifier stays dense), then ``finetune=0`` (no training) and ``finetune=1`` (one epoch,
lr 0.01, masks held fixed, the same batches for every method). Peer, in the same run:
``torch.nn.utils.prune.global_unstructured`` with L1 on the same tensors (the same masks as prunekit's global
magnitude up to ties), fine-tuned with its pruning reparametrisation in place so that its zeros stay zero.

JSON lines (../shared/BENCHMARKS.md): ``accuracy`` (top-1, %) with ``case`` =
``lenet5/<criterion>/sparsity=0.9/finetune=<0|1>``, where the criterion is ``magnitude/global``,
``magnitude/layer``, ``wanda``, ``wanda+alloc``, ``wanda+owl``, ``wanda+sens``, ``taylor``, ``taylor+alloc``,
``taylor+sens``, ``sparsegpt``, ``sparsegpt+alloc``, ``sparsegpt+sens``, ``magnitude+refit``,
``wanda+alloc+refit``, ``wanda+sens+refit``, ``taylor+alloc+refit``, ``taylor+sens+refit``, ``taylor+alloc+steps=8``,
``taylor+alloc+steps=8+refit`` or ``torch.nn.utils.prune``; the ``magnitude/global`` rows carry torch's accuracy
as ``peer``.
Also ``sparsity`` (achieved, over the pruned tensors) per method, and the dense accuracy.

Usage: ``python benchmarks/cnn_criteria.py [--quick] [--seed S] [--threads T]``.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch.nn.utils import prune as tprune

import _common as C
import prunekit
from prunekit.analysis.metrics import evaluate
from prunekit.experiment import dense_model
from prunekit.targets import select_targets
from prunekit.zoo.data import get_loaders

BENCH = "cnn_criteria"
MODEL = "lenet5"
PEER = "torch.nn.utils.prune"
FULL = {"limit_train": None, "limit_test": None, "dense": {"epochs": 4, "lr": 0.05}, "calib": 8}
QUICK = {"limit_train": 1024, "limit_test": 256, "dense": {"epochs": 1, "lr": 0.05}, "calib": 2}
# name -> prune() options; data-aware ones get the calibration batches
METHODS: Dict[str, Dict[str, Any]] = {
    "magnitude/global": {"criterion": "l1", "scope": "global"},
    "magnitude/layer": {"criterion": "l1", "scope": "layer"},
    "wanda": {"criterion": "wanda", "scope": "row"},
    "wanda+alloc": {"criterion": "wanda", "scope": "row", "allocation": "magnitude"},
    "wanda+owl": {"criterion": "wanda", "scope": "layer", "allocation": "owl"},
    "wanda+sens": {"criterion": "wanda", "scope": "layer", "allocation": "sensitivity"},
    "taylor": {"criterion": "taylor", "scope": "layer"},
    "taylor+alloc": {"criterion": "taylor", "scope": "layer", "allocation": "magnitude"},
    "taylor+sens": {"criterion": "taylor", "scope": "layer", "allocation": "sensitivity"},
    "sparsegpt": {"criterion": "sparsegpt"},
    "sparsegpt+alloc": {"criterion": "sparsegpt", "allocation": "magnitude"},
    "sparsegpt+sens": {"criterion": "sparsegpt", "allocation": "sensitivity"},
    "magnitude+refit": {"criterion": "l1", "scope": "global", "refit": True},
    "wanda+alloc+refit": {"criterion": "wanda", "scope": "row", "allocation": "magnitude", "refit": True},
    "wanda+sens+refit": {"criterion": "wanda", "scope": "layer", "allocation": "sensitivity", "refit": True},
    "taylor+alloc+refit": {"criterion": "taylor", "scope": "layer", "allocation": "magnitude", "refit": True},
    "taylor+sens+refit": {"criterion": "taylor", "scope": "layer", "allocation": "sensitivity", "refit": True},
    "taylor+alloc+steps=8": {"criterion": "taylor", "scope": "layer", "allocation": "magnitude", "steps": 8},
    "taylor+alloc+steps=8+refit": {"criterion": "taylor", "scope": "layer", "allocation": "magnitude", "steps": 8,
                                   "refit": True},
}


def _torch_prune(model: torch.nn.Module, names: List[str], amount: float) -> list:
    """Prune with torch; the reparametrisation (weight = weight_orig * mask) stays, so fine-tuning keeps the zeros."""
    params = [(model.get_submodule(n.rpartition(".")[0]), "weight") for n in names]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
    return params


def _sparsity(model: torch.nn.Module, names: List[str]) -> float:
    total = sum(model.get_parameter(n).numel() for n in names)
    return sum(int((model.get_parameter(n) == 0).sum()) for n in names) / total


def _finetuned(model: torch.nn.Module, train, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same batches and dropout for every method
    prunekit.finetune(model, train, epochs=1, lr=0.01, optimizer="sgd", momentum=0.9, progress=False)
    return model


def run(args) -> None:
    setting = QUICK if args.quick else FULL
    seed, amount = args.seed, 0.9
    train, test, info = get_loaders("mnist", batch_size=128, seed=seed, limit_train=setting["limit_train"],
                                    limit_test=setting["limit_test"])
    dense, cached = dense_model(MODEL, {}, train, test, info, train_cfg=setting["dense"], seed=seed, progress=False)
    names = select_targets(dense)
    calib = list(itertools.islice(iter(train), setting["calib"]))
    acc = 100 * evaluate(dense, test)["accuracy"]
    C.log(f"{BENCH}: dense {MODEL} {acc:.2f}% ({'cached' if cached else 'trained'}; {info['n_train']} train / "
          f"{info['n_test']} test images); pruning {names} to {amount}")
    C.emit(BENCH, f"{MODEL}/dense", "accuracy", acc, "%", seed=seed)
    results: Dict[str, Dict[int, float]] = {}
    for name, options in METHODS.items():
        model = copy.deepcopy(dense)
        # the sensitivity probe and the refit read the batches too
        reads = options.get("allocation") == "sensitivity" or options.get("refit", False)
        data = {"data": calib} if reads or prunekit.api.needs_data(options["criterion"]) else {}
        with warnings.catch_warnings():  # floors and skipped layers are said in plan.notes, logged below
            warnings.simplefilter("ignore")
            plan = prunekit.prune(model, amount, seed=seed, **options, **data)
        for note in plan.notes:
            C.log(f"  {name}: {note}")
        results[name] = {0: 100 * evaluate(model, test)["accuracy"]}
        results[name][1] = 100 * evaluate(_finetuned(model, train, seed), test)["accuracy"]
        C.emit(BENCH, f"{MODEL}/{name}/sparsity={amount}", "sparsity", _sparsity(model, names), "frac", seed=seed)
        C.log(f"  {name}: {results[name][0]:.2f}% -> {results[name][1]:.2f}% after one epoch")
    peer_model = copy.deepcopy(dense)
    params = _torch_prune(peer_model, names, amount)
    peer = {0: 100 * evaluate(peer_model, test)["accuracy"]}
    peer[1] = 100 * evaluate(_finetuned(peer_model, train, seed), test)["accuracy"]
    for module, pname in params:  # only now: removed before fine-tuning, the pruned weights would train back
        tprune.remove(module, pname)
    C.emit(BENCH, f"{MODEL}/{PEER}/sparsity={amount}", "sparsity", _sparsity(peer_model, names), "frac", seed=seed)
    for ft in (0, 1):
        for name, res in results.items():
            extra = {"peer": PEER, "peer_value": peer[ft], "lower_is_better": False} if name == "magnitude/global" else {}
            C.emit(BENCH, f"{MODEL}/{name}/sparsity={amount}/finetune={ft}", "accuracy", res[ft], "%", seed=seed,
                   **extra)
        C.emit(BENCH, f"{MODEL}/{PEER}/sparsity={amount}/finetune={ft}", "accuracy", peer[ft], "%", seed=seed)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny setting for the tests (seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
