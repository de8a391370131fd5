"""``prunekit demo``: the main job on the bundled default (LeNet-300-100 on MNIST).

Trains the dense model (or reuses the cached one), then runs and compares
one-shot L1 per layer, global magnitude, structured L1 (whole neurons, masked),
structured L1 groups with surgery (the neurons physically removed: a smaller,
faster dense model), the activation-aware Wanda and SparseGPT (calibrated on a
few training batches), random (the baseline every criterion must beat) and
gradual cubic pruning with fine-tuning, and writes a report.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Dict

from prunekit.cli._common import (
    add_threads,
    check_data,
    check_model,
    dataset_names,
    listed,
    model_names,
    print_summary,
    write_run,
)

HELP = "train (or reuse) a dense LeNet on MNIST, compare pruning methods, write a report"

# settings measured by benchmarks/lenet_mnist.py (see README): lr 0.1 fine-tuning recovers most
FT = {"epochs": 2, "lr": 0.1, "lr_schedule": "cosine", "momentum": 0.9, "weight_decay": 1e-4}
UNSTRUCTURED = [0.5, 0.8, 0.9, 0.95]
METHODS = [
    {"name": "oneshot_l1", "label": "one-shot L1 per layer (unstructured)", "kind": "oneshot",
     "sparsities": UNSTRUCTURED, "prune": {"criterion": "l1", "scope": "layer"}, "finetune": FT},
    {"name": "global_l1", "label": "one-shot global magnitude (unstructured)", "kind": "oneshot",
     "sparsities": UNSTRUCTURED, "prune": {"criterion": "l1", "scope": "global"}, "finetune": FT},
    {"name": "structured_l1", "label": "structured L1 per layer (whole neurons/channels)", "kind": "oneshot",
     "sparsities": [0.25, 0.5, 0.75], "prune": {"criterion": "l1", "scope": "layer", "pattern": "structured",
                                                "dim": 0, "norm": 1}, "finetune": FT},
    {"name": "surgery_l1", "label": "structured L1 groups + surgery (physically smaller)", "kind": "surgery",
     "sparsities": [0.5, 0.75], "prune": {"criterion": "l1", "scope": "global"}, "finetune": FT},
    {"name": "wanda", "label": "one-shot Wanda |W|·‖X‖ per row (activation-aware)", "kind": "oneshot",
     "sparsities": UNSTRUCTURED, "prune": {"criterion": "wanda", "scope": "row"}, "finetune": FT},
    {"name": "wanda_bc", "label": "one-shot Wanda + bias correction", "kind": "oneshot",
     "sparsities": UNSTRUCTURED, "prune": {"criterion": "wanda", "scope": "row", "bias_correction": True},
     "finetune": FT},
    {"name": "taylor", "label": "one-shot first-order Taylor |w·∂L/∂w| per layer (loss-aware)", "kind": "oneshot",
     "sparsities": UNSTRUCTURED, "prune": {"criterion": "taylor", "scope": "layer"}, "finetune": FT},
    {"name": "sparsegpt", "label": "one-shot SparseGPT (weights reconstructed)", "kind": "oneshot",
     "sparsities": UNSTRUCTURED, "prune": {"criterion": "sparsegpt"}, "finetune": FT},
    {"name": "random", "label": "random per layer (baseline)", "kind": "oneshot",
     "sparsities": UNSTRUCTURED, "prune": {"criterion": "random", "scope": "layer"}, "finetune": FT},
    {"name": "gradual_cubic", "label": "gradual cubic (Zhu & Gupta), global magnitude", "kind": "gradual",
     "sparsities": [0.95], "prune": {"criterion": "l1", "scope": "global"},
     "finetune": {"lr": 0.1, "weight_decay": 1e-4, "lr_schedule": "cosine"},
     "gradual": {"epochs": 30, "prune_epochs": 12}},
]
DENSE = {"epochs": 40, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine"}


def add_arguments(p) -> None:
    p.add_argument("--model", default="lenet300", help=f"built-in model: {listed(model_names(), 'lenet300')}")
    p.add_argument("--data", default="mnist", help=f"dataset: {listed(dataset_names(), 'mnist')} "
                                                   "(idx: a folder of IDX files)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed: the same seed gives the same masks")
    p.add_argument("--quick", action="store_true", help="a tiny setting (subset of data, few epochs) for tests")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads(p)


def demo_config(args) -> Dict[str, Any]:
    config: Dict[str, Any] = {"title": f"prunekit demo: {args.model} on {args.data}", "model": args.model,
                              "model_kwargs": {}, "data": args.data, "seed": args.seed, "batch_size": 128,
                              "dense": dict(DENSE), "methods": copy.deepcopy(METHODS),
                              "threads": getattr(args, "threads", None)}  # in effect (set by the CLI's main)
    if args.quick:
        config.update(limit_train=2000, limit_test=500, dense={**DENSE, "epochs": 2})
        for m in config["methods"]:
            m["sparsities"] = m["sparsities"][-2:]
            if m["kind"] == "oneshot":
                m["finetune"] = {**m["finetune"], "epochs": 1}
            else:
                m["gradual"] = {"epochs": 2, "prune_epochs": 1}
    return config


def run(args) -> int:
    from prunekit.experiment import run_experiment

    check_model(args.model)
    check_data(args.data)
    t0 = time.perf_counter()
    config = demo_config(args)
    results, heatmaps, _ = run_experiment(config, progress=False if args.no_progress else None)
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    written = write_run(Path(args.out), results, heatmaps, config)
    print_summary(results)
    print(f"\ndense model {'reused from cache' if results['dense'].get('from_cache') else 'trained'}; "
          f"total time {results['wall_time_s']} s")
    print(f"report: {written['html']}")
    return 0
