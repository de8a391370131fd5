"""Lottery tickets on MNIST: a ticket rewound to an early step vs the same masks randomly re-initialised.

For every seed, ``prunekit.train.lottery.lottery_ticket`` runs iterative global magnitude pruning on
LeNet-300-100 (``--model lenet300``, the default) or a small VGG-style CNN (``--model vgg``: models.py's
``vgg_small`` with widths 16/32/64, BatchNorm, a 64-wide hidden layer; 75,664 prunable conv/fc weights)
(Frankle & Carbin 2019): round 0 trains the dense network from its random init and records the
weights after ``rewind`` optimizer steps (the rewind point; Frankle et al. 2020); every later round
prunes the surviving weights to the next target of ``SCHEDULE``, rewinds the survivors to the rewind
point and trains again, ``epochs`` per round (fresh cosine schedule, SGD with momentum; ``MODELS``
holds each model's values). In every pruning round the *random re-init control* trains a copy with
the same masks from a fresh random initialisation (another seed), the same way. The dense baseline
is round 0: the same architecture trained for the same number of epochs as each round.

Sparsity is over the pruned layers (LeNet: fc1 and fc2; VGG: the six convolutions and the hidden fc;
the classifier stays dense, prunekit's default); accuracy is on all 10,000 MNIST test images unless
``--limit-test`` says otherwise. The case names start with the ``--model`` value.

Metrics (JSON lines on stdout, ../shared/BENCHMARKS.md; logs on stderr):

- ``<model>/dense/seed=<n>``: ``accuracy``;
- ``<model>/<method>/sparsity=<s>/seed=<n>`` for ``lottery_rewind`` and ``random_reinit``:
  ``accuracy`` (frac), ``accuracy_drop_pp`` (dense minus pruned, percentage points; negative: the
  pruned model is better), ``sparsity`` (achieved, frac); the ticket's ``accuracy`` line also has
  ``peer`` random_reinit, ``peer_value`` and ``ratio`` (ticket / control accuracy);
- medians over seeds, ``.../sparsity=<s>/median`` with ``n`` (no best-seed picking), and for the
  ticket ``advantage_pp``: the median over seeds of ticket minus control accuracy, in pp;
- ``<model>/total`` ``time_s``. With ``--with-init``, a second IMP run per seed rewinds to
  initialisation (``lottery_init``), to compare the two rewind points.

Usage: ``python benchmarks/lottery_mnist.py [--quick] [--model lenet300|vgg] [--seed S] [--seeds N]
[--epochs E] [--rewind K] [--limit-train N] [--limit-test N] [--threads T] [--with-init] [--progress]``.
LeNet's full setting (3 seeds) trains 11 x 6 epochs per seed; at 2.6 s per epoch on one thread that is
about 3 minutes per seed (seed 0 took 8.5 minutes on a machine shared with other jobs); ``--with-init``
adds 6 x 6 epochs per seed. VGG's full setting (full MNIST, 2 epochs per round, rewind to step 100)
costs ~9 s per epoch of 10,000 images on one thread, ~20 minutes per seed; ``--limit-train 10000
--seeds 1 --rewind 40`` (rewind ~0.5 epoch of the subset) took 443 s on a machine shared with other jobs.

LeNet-300-100, seed 0, full setting (a machine shared with other jobs; accuracies do not depend on the load):
dense 98.27%; ticket / re-init control at 50% 98.31 / 98.41, 80% 98.31 / 98.26, 90% 98.20 / 98.15,
95% 98.20 / 97.86, 98% 98.05 / 97.10: the ticket keeps the dense accuracy to 95% and its advantage
over the control grows with sparsity (+0.05 pp at 90%, +0.34 at 95%, +0.95 at 98%).

VGG (``--model vgg --limit-train 10000 --seeds 1 --rewind 40``: 10,000 training images, 2 epochs per round,
all 10,000 test images), seed 0: dense 97.94%; ticket / re-init control at 50% 98.34 / 97.73, 80% 98.52 /
97.38, 90% 98.55 / 97.24, 95% 98.26 / 95.80, 98% 96.99 / 92.25: the ticket beats the dense round up to 95%,
and its advantage grows with sparsity (+0.61, +1.14, +1.31, +2.46, +4.74 pp).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

import _common as C

BENCH = "lottery_mnist"
# The targets of the pruning rounds: IMP keeps ~half, then ~0.4, 0.5, 0.5, 0.4 of the survivors.
SCHEDULE = [0.5, 0.8, 0.9, 0.95, 0.98]
TRAIN = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine"}
# Per model: how to build it, and the full and quick settings. Each round (dense included) trains "epochs".
MODELS: Dict[str, Dict[str, Any]] = {
    # The dense LeNet reaches ~98.2% in 6 epochs. Rewind: ~0.4 epoch at batch 128 (Frankle et al. 2020
    # rewind deeper nets to such early steps). On LeNet-300-100 rewinding to init is as good or better
    # (seed 0, 6 epochs/round: 98.38/98.38/98.37/98.26% at 50/90/95/98% vs 98.31/98.20/98.20/98.05% for
    # step 200; --with-init measures it), as Frankle & Carbin found for LeNet.
    "lenet300": {"build": ("lenet300", {}), "epochs": 6, "rewind": 200,
                 "quick": {"limit_train": 2000, "limit_test": 500, "epochs": 1, "rewind": 5}},
    # Narrower than vgg_small's default (32/64/128): a third of the time per epoch on a CPU, and still
    # ~97% after one epoch on 10,000 images. BatchNorm statistics are rewound with the weights.
    "vgg": {"build": ("vgg_small", {"widths": [16, 32, 64], "hidden": 64}), "epochs": 2, "rewind": 100,
            "quick": {"limit_train": 1000, "limit_test": 300, "epochs": 1, "rewind": 2}},
}
QUICK_SCHEDULE = [0.5, 0.9, 0.95]


def fmt(s: float) -> str:
    return f"{s:g}"


def run_seed(seed: int, setting: Dict[str, Any], args, rewind, reinit: bool):
    """One IMP run; returns the LotteryResult."""
    from prunekit.train.lottery import lottery_ticket
    from prunekit.zoo.data import get_loaders
    from prunekit.zoo.models import build_model

    train, test, info = get_loaders("mnist", batch_size=128, seed=seed, limit_train=setting["limit_train"],
                                    limit_test=setting["limit_test"])
    name, kwargs = MODELS[args.model]["build"]
    return lottery_ticket(lambda: build_model(name, **kwargs), train, sparsities=setting["schedule"], rewind=rewind,
                          epochs_per_round=setting["epochs"], criterion="l1", scope="global", seed=seed,
                          reinit=reinit, eval_loader=test, progress=args.progress, **TRAIN)


def emit_seed(model: str, seed: int, res, dense: float, per: Dict, methods: Dict[str, str]) -> None:
    """JSON lines of one seed; per[(method, target)][seed] collects accuracies for the medians."""
    for row in res.rounds[1:]:
        for method, key in methods.items():
            acc = getattr(row, key)
            case = f"{model}/{method}/sparsity={fmt(row.target)}/seed={seed}"
            peer = {}
            if method != "random_reinit" and row.reinit_accuracy is not None:
                peer = {"peer": "random_reinit", "peer_value": row.reinit_accuracy, "lower_is_better": False}
            C.emit(BENCH, case, "accuracy", acc, "frac", seed=seed, **peer)
            C.emit(BENCH, case, "accuracy_drop_pp", round(100.0 * (dense - acc), 4), "pp", seed=seed)
            C.emit(BENCH, case, "sparsity", round(row.sparsity, 6), "frac", seed=seed)
            per.setdefault((method, row.target), {})[seed] = (acc, dense, row.reinit_accuracy)
            C.log(f"  seed {seed} {method:<15} sparsity {fmt(row.target):<5} accuracy {acc:.4f} "
                  f"drop {100 * (dense - acc):+.2f} pp")


def emit_medians(model: str, per: Dict) -> None:
    for (method, target), by_seed in per.items():
        case = f"{model}/{method}/sparsity={fmt(target)}/median"
        n = len(by_seed)
        acc = statistics.median(a for a, _, _ in by_seed.values())
        drop = statistics.median(100.0 * (d - a) for a, d, _ in by_seed.values())
        C.emit(BENCH, case, "accuracy", acc, "frac", n=n)
        C.emit(BENCH, case, "accuracy_drop_pp", round(drop, 4), "pp", n=n)
        gaps = [100.0 * (a - r) for a, _, r in by_seed.values() if r is not None]
        if method != "random_reinit" and gaps:
            C.emit(BENCH, case, "advantage_pp", round(statistics.median(gaps), 4), "pp", n=len(gaps))
        C.log(f"median {method:<15} sparsity {fmt(target):<5} accuracy {acc:.4f} drop {drop:+.2f} pp"
              + (f" advantage over re-init {statistics.median(gaps):+.2f} pp" if gaps and method != "random_reinit"
                 else ""))


def setting_of(args) -> Dict[str, Any]:
    """The model's full or quick setting, with the flags given applied."""
    spec = MODELS[args.model]
    setting = {"limit_train": None, "limit_test": None, "epochs": spec["epochs"], "schedule": SCHEDULE,
               "rewind": spec["rewind"]}
    if args.quick:
        setting.update(spec["quick"], schedule=QUICK_SCHEDULE)
    for key in ("epochs", "rewind", "limit_train", "limit_test"):
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    return setting


def run(args) -> None:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, setting = args.model, setting_of(args)
    seeds = list(range(args.seed, args.seed + (args.seeds if args.seeds is not None else 1 if args.quick else 3)))
    C.log(f"{BENCH}: {model} {MODELS[model]['build']}, {'quick' if args.quick else 'full'} setting {setting}, "
          f"seeds {seeds}, torch threads {torch.get_num_threads()}")
    per: Dict = {}
    dense_acc: Dict[int, float] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        res = run_seed(seed, setting, args, setting["rewind"], reinit=True)
        dense_acc[seed] = res.rounds[0].accuracy
        C.emit(BENCH, f"{model}/dense/seed={seed}", "accuracy", dense_acc[seed], "frac", seed=seed)
        C.log(f"seed {seed}: dense accuracy {dense_acc[seed]:.4f}; IMP + control {time.perf_counter() - t0:.0f} s")
        emit_seed(model, seed, res, dense_acc[seed], per,
                  {"lottery_rewind": "accuracy", "random_reinit": "reinit_accuracy"})
        if args.with_init:
            res = run_seed(seed, setting, args, "init", reinit=False)
            emit_seed(model, seed, res, dense_acc[seed], per, {"lottery_init": "accuracy"})
    C.emit(BENCH, f"{model}/dense/median", "accuracy", statistics.median(dense_acc.values()), "frac", n=len(seeds))
    emit_medians(model, per)
    total = time.perf_counter() - t_start
    C.emit(BENCH, f"{model}/total", "time_s", round(total, 1), "s", threads=torch.get_num_threads())
    C.log(f"total {total:.0f} s")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny setting for tests (seconds)")
    ap.add_argument("--model", default="lenet300", choices=tuple(MODELS),
                    help="lenet300 (default) or vgg (a small VGG-style CNN with BatchNorm)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick: 1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per round (default lenet300: 6, vgg: 2; "
                                                             "quick: 1)")
    ap.add_argument("--rewind", type=int, default=None,
                    help="rewind point in optimizer steps (default lenet300: 200, vgg: 100; quick: 5, 2)")
    ap.add_argument("--limit-train", type=int, default=None,
                    help="train on this many MNIST images (a seeded subset; default all 60,000; quick: 2000, 1000)")
    ap.add_argument("--limit-test", type=int, default=None,
                    help="evaluate on this many test images (default all 10,000; quick: 500, 300)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small batches gain little)")
    ap.add_argument("--with-init", action="store_true", help="also run IMP rewinding to init (lottery_init)")
    ap.add_argument("--progress", action="store_true", help="show progress bars (stderr)")
    args = ap.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        ap.error("--seeds must be >= 1")
    for flag in ("epochs", "limit_train", "limit_test"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.rewind is not None and args.rewind < 0:
        ap.error("--rewind must be >= 0")
    run(args)


if __name__ == "__main__":
    main()
