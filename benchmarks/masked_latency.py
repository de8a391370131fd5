"""Does a masked (pruned but not compacted) model run at dense speed?

torch.nn.utils.prune recomputes ``weight = weight_orig * weight_mask`` in a
forward pre-hook on every call; prunekit stores the zeros in the weight and
keeps the mask aside, so the forward path is the plain module's. This script
measures, alternating run by run, the latency of the plain model, the
prunekit-masked model and the torch-pruned model (same sparsity, same batch).

JSON lines (../shared/BENCHMARKS.md): ``latency_ms`` of prunekit with peer
``torch.nn.utils.prune`` and with peer ``dense`` (ratio = dense / prunekit: 1.0
means no overhead; the goal is within 5%, i.e. ratio >= 0.95).
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import _common as C
import prunekit
from prunekit.analysis.metrics import measure_latency
from prunekit.zoo.models import build_model

BENCH = "masked_latency"


def _models(quick: bool):
    yield "lenet300", build_model("lenet300"), (1, 1, 28, 28)
    yield "lenet5", build_model("lenet5"), (1, 1, 28, 28)
    if not quick:
        torch.manual_seed(0)
        mlp = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())], nn.Linear(1024, 10))
        yield "mlp4x1024", mlp, (1, 1024)


def _torch_pruned(model: nn.Module, amount: float) -> nn.Module:
    m = copy.deepcopy(model)
    layers = [(mod, "weight") for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))][:-1]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=amount)
    return m


def _measure(name, model, shape, batch, amount, n, repeats):
    plain = model.eval()
    ours = copy.deepcopy(model)
    prunekit.prune(ours, amount, scope="global")
    theirs = _torch_pruned(model, amount)
    x = torch.randn(batch, *shape[1:])
    runs = {"dense": [], "prunekit": [], "torch": []}
    for _ in range(n):  # alternate, so that machine noise hits all three alike
        for key, m in (("dense", plain), ("prunekit", ours), ("torch", theirs)):
            runs[key].append(measure_latency(m, x, warmup=3, repeats=repeats)["median_ms"])
    med = {k: C.median(v) for k, v in runs.items()}
    case = f"{name}/sparsity={amount}/batch={batch}"
    common = dict(n=n, threads=torch.get_num_threads(), batch=batch)
    C.emit(BENCH, case, "latency_ms", med["prunekit"], "ms", peer="torch.nn.utils.prune",
           peer_value=med["torch"], **common)
    C.emit(BENCH, case, "latency_ms", med["prunekit"], "ms", peer="dense", peer_value=med["dense"], **common)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny setting for the tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n, repeats = (3, 10) if args.quick else (11, 50)
    batches = (1,) if args.quick else (1, 64)
    for name, model, shape in _models(args.quick):
        for batch in batches:
            C.log(f"{name} batch={batch}")
            _measure(name, model, shape, batch, 0.9, n, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
