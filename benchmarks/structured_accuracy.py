"""Structured pruning side by side with Torch-Pruning: accuracy after the same fine-tune, MACs, time to prune.

A VGG-style CNN with BatchNorm (``prunekit.zoo.models.VGGSmall``) is trained on MNIST
(``prunekit.experiment.dense_model``, cached). For each ratio of channels removed, two copies of
the same dense model are pruned in the same run, with the same criterion (L2 magnitude of each
channel, per layer, the final classifier kept, the same ``round_to``):

- prunekit: ``surgery.plan_groups`` + ``surgery.compact``;
- Torch-Pruning (``torch-pruning`` on PyPI, benchmark-only): ``MagnitudePruner`` + ``step()``.

Both slim models are then fine-tuned by the same ``prunekit.train.loop`` call (same epochs, learning
rate, schedule, seed, and therefore the same batches) and scored on the same test set.

JSON lines (../shared/BENCHMARKS.md), ``case`` = ``vgg_mnist/ratio=<r>/seed=<s>``:

- ``accuracy`` (frac) with peer ``torch-pruning`` (ratio = prunekit / peer, higher is better);
- ``accuracy_drop_pp`` (dense minus pruned, pp) with peer torch-pruning (ratio = peer / prunekit;
  undefined when prunekit's drop is <= 0, then omitted);
- ``macs`` and ``params`` (count) with peer torch-pruning (lower is better);
- ``time_s`` to prune (plan + surgery, without fine-tuning) with peer torch-pruning;
``vgg_mnist/dense/seed=<s>``: ``accuracy``, ``macs``, ``params``.

Criterion comparison in the same run: ``vgg_mnist/taylor/ratio=<r>/seed=<s>`` is prunekit with first-order
Taylor scores (|w * dL/dw| summed over each channel group's members, calibrated on the first 8 training
batches) instead of L1, same fine-tune: ``accuracy`` and ``accuracy_drop_pp`` with peer ``l1`` (prunekit's
L1 result above).
Without torch_pruning the prunekit lines are printed alone (a stderr note says so).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time

import torch
from torch import nn

import _common as C
from prunekit import surgery
from prunekit._util import seed_everything
from prunekit.analysis.metrics import count_macs, count_parameters, evaluate
from prunekit.criteria import calibrate
from prunekit.experiment import dense_model
from prunekit.train.loop import finetune
from prunekit.zoo.data import get_loaders

try:
    import torch_pruning as tp  # optional benchmark-only peer
except Exception as _e:  # noqa: BLE001 -- any import failure just drops the peer
    tp, TP_ERROR = None, f"{type(_e).__name__}: {_e}"

BENCH = "structured_accuracy"
TP = "torch-pruning"
FULL = dict(dataset="mnist", limit_train=20000, limit_test=None, widths=(16, 32, 64), hidden=64,
            dense=dict(epochs=6, lr=0.05, weight_decay=5e-4, lr_schedule="cosine"),
            finetune=dict(epochs=2, lr=0.02, lr_schedule="cosine"), ratios=(0.25, 0.5, 0.75), round_to=4)
QUICK = dict(dataset="digits", limit_train=None, limit_test=None, widths=(8, 16), hidden=16,
             dense=dict(epochs=3, lr=0.05, lr_schedule="cosine"),
             finetune=dict(epochs=1, lr=0.02, lr_schedule="cosine"), ratios=(0.5,), round_to=None)


def _prunekit(model: nn.Module, x: torch.Tensor, ratio: float, round_to, seed: int, criterion="l1",
              stats=None) -> nn.Module:
    plan = surgery.plan_groups(model, x, ratio, criterion=criterion, norm=2, scope="layer", round_to=round_to,
                               seed=seed, stats=stats)
    return surgery.compact(model, plan, x)


def _torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float, round_to) -> nn.Module:
    final = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, global_pruning=False, ignored_layers=[final],
                                       round_to=round_to)
    pruner.step()
    return model


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _tune_and_score(model: nn.Module, train, test, cfg, seed: int) -> float:
    seed_everything(seed)   # same batches and dropout for both methods
    finetune(model, train, progress=False, **cfg["finetune"])
    return evaluate(model.eval(), test)["accuracy"]


def _emit_pair(case: str, metric: str, ours: float, peer, unit: str, seed: int, higher_better=False) -> None:
    if peer is None:
        C.emit(BENCH, case, metric, ours, unit, seed=seed)
    else:
        C.emit(BENCH, case, metric, ours, unit, peer=TP, peer_value=peer, lower_is_better=not higher_better,
               seed=seed)


def run_ratio(dense: nn.Module, x, train, test, cfg, ratio: float, dense_acc: float, seed: int) -> None:
    case = f"vgg_mnist/ratio={ratio}/seed={seed}"
    ours, t_ours = _timed(lambda: _prunekit(dense, x, ratio, cfg["round_to"], seed))
    peer, t_peer = (None, None)
    if tp is not None:
        peer, t_peer = _timed(lambda: _torch_pruning(copy.deepcopy(dense), x, ratio, cfg["round_to"]))
    macs = (count_macs(ours, x)["dense"], count_macs(peer, x)["dense"] if peer is not None else None)
    params = (count_parameters(ours)["total"], count_parameters(peer)["total"] if peer is not None else None)
    acc = _tune_and_score(ours, train, test, cfg, seed)
    acc_peer = _tune_and_score(peer, train, test, cfg, seed) if peer is not None else None
    _emit_pair(case, "accuracy", acc, acc_peer, "frac", seed, higher_better=True)
    drop = 100 * (dense_acc - acc)
    drop_peer = 100 * (dense_acc - acc_peer) if acc_peer is not None else None
    if drop > 0 or drop_peer is None:
        _emit_pair(case, "accuracy_drop_pp", drop, drop_peer, "pp", seed)
    _emit_pair(case, "macs", macs[0], macs[1], "count", seed)
    _emit_pair(case, "params", params[0], params[1], "count", seed)
    _emit_pair(case, "time_s", t_ours, t_peer, "s", seed)
    C.log(f"  ratio={ratio}: prunekit {acc:.4f} ({drop:+.2f} pp), MACs {macs[0]:,}"
          + (f" | {TP} {acc_peer:.4f} ({drop_peer:+.2f} pp), MACs {macs[1]:,}" if peer is not None else ""))
    return acc


def run_taylor(dense, x, train, test, cfg, ratio, dense_acc, l1_acc, seed, stats) -> None:
    """The same surgery and fine-tune with Taylor scores; compared with prunekit's L1."""
    case = f"vgg_mnist/taylor/ratio={ratio}/seed={seed}"
    slim = _prunekit(dense, x, ratio, cfg["round_to"], seed, criterion="taylor", stats=stats)
    acc = _tune_and_score(slim, train, test, cfg, seed)
    C.emit(BENCH, case, "accuracy", acc, "frac", peer="l1", peer_value=l1_acc, lower_is_better=False, seed=seed)
    drop, drop_l1 = 100 * (dense_acc - acc), 100 * (dense_acc - l1_acc)
    if drop > 0:
        C.emit(BENCH, case, "accuracy_drop_pp", drop, "pp", peer="l1", peer_value=drop_l1, seed=seed)
    C.log(f"  ratio={ratio}: taylor {acc:.4f} ({drop:+.2f} pp) vs l1 {l1_acc:.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny setting for the tests (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    if tp is None:
        C.log(f"NOTE: torch_pruning not importable ({TP_ERROR}); prunekit lines only")
    train, test, info = get_loaders(cfg["dataset"], batch_size=128, seed=args.seed,
                                    limit_train=cfg["limit_train"], limit_test=cfg["limit_test"])
    kwargs = dict(in_channels=info["input_shape"][0], input_size=info["input_shape"][1], widths=cfg["widths"],
                  hidden=cfg["hidden"])
    dense, cached = dense_model("vgg_small", kwargs, train, test, info, train_cfg=cfg["dense"], seed=args.seed)
    dense.eval()
    x = torch.randn(2, *info["input_shape"])
    dense_acc = evaluate(dense, test)["accuracy"]
    case = f"vgg_mnist/dense/seed={args.seed}"
    C.emit(BENCH, case, "accuracy", dense_acc, "frac", seed=args.seed)
    C.emit(BENCH, case, "macs", count_macs(dense, x)["dense"], "count", seed=args.seed)
    C.emit(BENCH, case, "params", count_parameters(dense)["total"], "count", seed=args.seed)
    C.log(f"dense VGG ({'cached' if cached else 'trained'}): {dense_acc:.4f}")
    calib = list(itertools.islice(iter(train), 8))
    taylor_stats = calibrate("taylor", dense, calib)   # on the dense model, once: every ratio uses it
    for ratio in cfg["ratios"]:
        l1_acc = run_ratio(dense, x, train, test, cfg, ratio, dense_acc, args.seed)
        run_taylor(dense, x, train, test, cfg, ratio, dense_acc, l1_acc, args.seed, taylor_stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
