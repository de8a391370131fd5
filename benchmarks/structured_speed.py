"""Does removing whole channels (surgery) make CNNs faster in proportion to the MACs saved?

For each model (VGG-style CNN with BN, ResNet-18-shaped net, MobileNetV2-style net,
and a small transformer encoder if the surgery can prune it) and each ratio of
channels removed, ``prunekit.surgery.plan_groups(..., scope="layer")`` plans the
pruning and ``prunekit.surgery.compact`` builds the slim dense model. The compacted
model's eval output is checked against the masked model's (``masking.apply`` of the
same plan on a copy; stderr warning when they differ by more than 1e-4).

JSON lines (../shared/BENCHMARKS.md), ``case`` = ``<model>/dense`` or ``<model>/ratio=<r>``:

Transformers: ``transformer`` (nn.TransformerEncoder: fx cannot trace it, so the block rules prune the
attention heads and FFN neurons inside each layer) and ``transformer_mha`` (the same shape written out
around nn.MultiheadAttention, traced; compacted heads run in SlimMultiheadAttention). The residual width
is kept in both (LayerNorm over it), so MACs fall less than the ratio suggests.

Peer ``hand_written`` (VGG, ResNet-18; MobileNetV2 where its constructor can express the widths): the model class built directly at the compacted widths (fresh
weights), checked to have exactly the compacted model's tensor shapes, timed alternating with the others:
``latency_ms`` with peer hand_written (ratio = hand-written / prunekit; 1.0 = no overhead from surgery).

- ``macs``, ``params`` (unit "count"); pruned ones with peer ``dense`` (ratio = dense / pruned)
- ``latency_ms`` with ``batch``: the dense model's, and the pruned model's with peer ``dense``
  (ratio = dense / pruned); dense and all pruned models are timed alternating, run by run,
  in the same process, after a warm-up; the value is the median of ``n`` rounds, each round's
  value the median of ``repeats`` forwards
- ``speedup`` (dense latency / pruned latency, unit "x") with ``batch``
- ``latency_per_macs`` (speedup / (dense MACs / pruned MACs), unit "frac") with ``batch``:
  1.0 means the latency fell exactly as much as the MACs did

Peer ``torch-pruning`` (optional: only when ``import torch_pruning`` works; otherwise a stderr note and
no peer lines). For the CNNs, a fresh copy of the same dense model is pruned by Torch-Pruning at the same
ratio and criterion (``MagnitudeImportance(p=2)`` per layer, ``global_pruning=False``, the final classifier
ignored, the same ``round_to``), and lines for ``<model>/ratio=<r>`` with ``peer`` torch-pruning are added
(ratio = torch-pruning / prunekit, lower is better for all three):

- ``macs`` (prunekit's pruned MACs vs Torch-Pruning's)
- ``latency_ms`` with ``batch`` (the slim models timed alternating with the others above)
- ``time_s``: time to prune, median of ``n`` alternating runs after a warm-up; prunekit: ``plan_groups`` +
  ``compact``; Torch-Pruning: building the pruner (its DependencyGraph) + ``pruner.step()`` on a deep copy
  (the copy is not timed). Accuracy after fine-tuning is not measured here (random init, no data).
  The criteria agree up to the aggregation over coupled layers: prunekit sums per-layer L2 norms,
  Torch-Pruning averages per-layer sums of squares; per-layer rankings of a lone layer are the same.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import _common as C
from prunekit import surgery
from prunekit.analysis.metrics import count_macs, count_parameters, measure_latency
from prunekit.apply import masking
from prunekit.zoo.models import MobileNetV2CIFAR, ResNetCIFAR, VGGSmall

try:
    import torch_pruning as tp  # optional benchmark-only peer
    TP_ERROR = None
except Exception as _e:  # noqa: BLE001 -- any import failure just drops the peer
    tp, TP_ERROR = None, f"{type(_e).__name__}: {_e}"

BENCH = "structured_speed"
TOL = 1e-4
TP = "torch-pruning"
PRUNE_RUNS = 3  # timed runs per method for time_s (after one warm-up run each)


# ----------------------------------------------------------------------------- models

class TinyTransformer(nn.Module):
    """Token embedding + 2 post-norm encoder layers + mean-pool classifier (input: float tokens)."""

    def __init__(self, d_in: int = 64, d_model: int = 256, heads: int = 4, ff: int = 1024, layers: int = 2,
                 num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.fc(self.encoder(self.embed(x)).mean(1))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer written out (nn.MultiheadAttention + a GELU FFN), so that the
    surgery sees the FFN's Linear layers; nn.TransformerEncoderLayer is one opaque module to it."""

    def __init__(self, d_model: int = 256, heads: int = 4, ff: int = 1024):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, ff), nn.Linear(ff, d_model)

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class MHATransformer(nn.Module):
    """Like TinyTransformer, with EncoderLayer written out: traced, heads and FFN neurons prunable."""

    def __init__(self, d_in: int = 64, d_model: int = 256, heads: int = 4, ff: int = 1024, layers: int = 2,
                 num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.layers = nn.Sequential(*[EncoderLayer(d_model, heads, ff) for _ in range(layers)])
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.embed(x)).mean(1))


def randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Trained-looking BatchNorm statistics and affine parameters (fresh ones are 0/1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def _models(quick: bool, seed: int):
    """(name, model, input shape without batch, round_to)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if quick:
        yield "vgg_tiny", randomize_bn(VGGSmall(in_channels=3, input_size=16, widths=(8, 16, 32), hidden=32), gen), \
            (3, 16, 16), None
        return
    yield "vgg", randomize_bn(VGGSmall(in_channels=3, input_size=32, widths=(64, 128, 256)), gen), (3, 32, 32), 8
    torch.manual_seed(seed + 1)
    yield "resnet18", randomize_bn(ResNetCIFAR(), gen), (3, 32, 32), 8
    torch.manual_seed(seed + 2)
    yield "mobilenetv2", randomize_bn(MobileNetV2CIFAR(), gen), (3, 32, 32), 8
    torch.manual_seed(seed + 3)
    yield "transformer", TinyTransformer(), (32, 64), None      # block rules: heads + FFN neurons
    torch.manual_seed(seed + 4)
    yield "transformer_mha", MHATransformer(), (32, 64), None   # traced: heads + FFN neurons


# ----------------------------------------------------------------------------- measuring

def _prune(model: nn.Module, x: torch.Tensor, amount: float, round_to: Optional[int], seed: int):
    """(slim model, plan) or (None, reason) when the surgery cannot prune this model."""
    try:
        plan = surgery.plan_groups(model, x, amount, criterion="l1", scope="layer", round_to=round_to, seed=seed)
    except Exception as e:  # noqa: BLE001 -- an unsupported model is reported, not fatal
        return None, f"plan_groups failed: {type(e).__name__}: {e}"
    groups = plan.meta.get("groups", [])
    if not any(g.get("pruned") for g in groups):
        return None, "plan_groups pruned no channel (every group unprunable):\n  " + "\n  ".join(plan.notes[:10])
    try:
        slim = surgery.compact(model, plan, x).eval()
    except Exception as e:  # noqa: BLE001
        return None, f"compact failed: {type(e).__name__}: {e}"
    return slim, plan


def _conv_widths(slim: nn.Module):
    return [m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)]


def _hand_written(name: str, model: nn.Module, slim: nn.Module) -> Optional[nn.Module]:
    """The model class built at the slim widths, or None where its constructor cannot express them."""
    widths = _conv_widths(slim)
    try:
        if isinstance(model, VGGSmall):
            hidden = [m.out_features for m in slim.modules() if isinstance(m, nn.Linear)][0]
            per_stage = widths[1::2]
            fresh = VGGSmall(in_channels=model.features[0].in_channels, input_size=2 ** len(per_stage),
                             widths=per_stage, hidden=hidden, num_classes=_final_linear(model).out_features)
        elif isinstance(model, ResNetCIFAR):
            stages = [slim.conv1.out_channels] + [stage[0].conv2.out_channels for stage in slim.layers[1:]]
            fresh = ResNetCIFAR(num_classes=_final_linear(model).out_features, widths=stages)
        elif isinstance(model, MobileNetV2CIFAR):
            fresh = _hand_mobilenet(model, slim)
        else:
            return None
    except Exception as e:  # noqa: BLE001 -- the baseline is optional
        C.log(f"NOTE: {name}: no hand-written baseline ({type(e).__name__}: {e})")
        return None
    same = {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in slim.state_dict().items()}
    if not same:
        C.log(f"NOTE: {name}: the compacted widths are not uniform per stage; no hand-written baseline")
        return None
    return fresh.eval()


def _hand_mobilenet(model: nn.Module, slim: nn.Module) -> nn.Module:
    """MobileNetV2CIFAR with each stage's width read off the slim model (expansion ratios kept)."""
    cfg, i = [], 0
    for t, _, nb, stride in model.CFG:
        i += nb
        cfg.append((t, slim.blocks[i - 1].conv[-2].out_channels, nb, stride))
    return MobileNetV2CIFAR(num_classes=_final_linear(model).out_features, cfg=tuple(cfg),
                            stem=slim.stem[0].out_channels, last=slim.head[0].out_channels)


def _final_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _tp_prune(model: nn.Module, x: torch.Tensor, amount: float, round_to: Optional[int]) -> nn.Module:
    """Torch-Pruning, in place on ``model`` (pass a copy): L2 magnitude, per layer, same ratio and round_to."""
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=amount, global_pruning=False,
                                       ignored_layers=[_final_linear(model)], round_to=round_to)
    pruner.step()
    return model.eval()


def _tp_slims(name: str, model: nn.Module, x: torch.Tensor, ratios, round_to: Optional[int]):
    """{ratio: Torch-Pruning slim model}; empty when the peer is absent, not a CNN, or fails."""
    if tp is None or name.startswith("transformer"):
        return {}
    out = {}
    for r in ratios:
        try:
            out[r] = _tp_prune(copy.deepcopy(model), x, r, round_to)
        except Exception as e:  # noqa: BLE001 -- a peer failure is reported, not fatal
            C.log(f"NOTE: {TP} failed on {name}/ratio={r}: {type(e).__name__}: {e}")
    return out


def _emit_prune_times(name, model, x, ratios, round_to, seed, n):
    """time_s to prune: prunekit (plan_groups + compact) vs Torch-Pruning (pruner + step), alternating."""
    for r in ratios:
        methods = {"prunekit": (None, lambda _, r=r: _prune(model, x, r, round_to, seed)),
                   TP: (lambda: copy.deepcopy(model), lambda m, r=r: _tp_prune(m, x, r, round_to))}
        t = C.alternating_medians(methods, n=n, warmup=1, progress=False)
        pk, peer = C.median(t["prunekit"]), C.median(t[TP])
        C.emit(BENCH, f"{name}/ratio={r}", "time_s", pk, "s", peer=TP, peer_value=peer, n=n, seed=seed)
        C.log(f"  {name}/ratio={r}: time to prune {pk:.3f} s (prunekit) vs {peer:.3f} s ({TP})")


@torch.no_grad()
def _macs(model: nn.Module, x: torch.Tensor) -> int:
    return count_macs(model, x)["dense"]


@torch.no_grad()
def _check_equal(model: nn.Module, slim: nn.Module, plan, x: torch.Tensor, case: str) -> None:
    masked = masking.apply(copy.deepcopy(model), plan).eval()
    a, b = masked(x), slim(x)
    if a.shape != b.shape:
        C.warn(f"{case}: compacted output shape {tuple(b.shape)} != masked {tuple(a.shape)}")
        return
    diff = (a - b).abs().max().item()
    scale = max(1.0, a.abs().max().item())
    if not diff <= TOL * scale:
        C.warn(f"{case}: compacted output differs from the masked model's by {diff:.3g} (> {TOL} x {scale:.3g})")
    else:
        C.log(f"  {case}: compacted == masked (max abs diff {diff:.2e})")


def _alternating_latency(models, x: torch.Tensor, rounds: int, repeats: int, warmup: int):
    """Median latency (ms) per model: ``rounds`` rounds, each model in turn per round (A B C A B C ...),
    each round's value the median of ``repeats`` forwards after ``warmup`` untimed ones.

    Not _common.alternating_medians: its gc.collect() around every run costs ~0.1 s once torch is
    imported, which dwarfs millisecond forwards; garbage is collected once before the rounds instead.
    """
    gc.collect()
    per_round = {k: [] for k in models}
    for _ in range(rounds):
        for key, m in models.items():
            per_round[key].append(measure_latency(m, x, warmup=warmup, repeats=repeats)["median_ms"])
    return {k: C.median(v) for k, v in per_round.items()}


def _bench_model(name: str, model: nn.Module, shape: Tuple[int, ...], round_to: Optional[int], ratios, batches,
                 runs, seed: int, threads: int) -> None:
    model.eval()
    x1 = torch.randn(1, *shape)
    slims = {}
    for r in ratios:
        slim, plan = _prune(model, x1, r, round_to, seed)
        if slim is None:
            C.log(f"NOTE: skipping {name}/ratio={r}: {plan}")
            continue
        _check_equal(model, slim, plan, torch.randn(4, *shape), f"{name}/ratio={r}")
        slims[r] = slim
    if not slims:
        C.log(f"NOTE: {name}: the surgery cannot prune this model; no numbers for it")
        return
    macs = {"dense": _macs(model, x1)}
    params = {"dense": count_parameters(model)["total"]}
    for r, slim in slims.items():
        macs[r] = _macs(slim, x1)
        params[r] = count_parameters(slim)["total"]
    C.emit(BENCH, f"{name}/dense", "macs", macs["dense"], "count", seed=seed)
    C.emit(BENCH, f"{name}/dense", "params", params["dense"], "count", seed=seed)
    for r in slims:
        case = f"{name}/ratio={r}"
        C.emit(BENCH, case, "macs", macs[r], "count", peer="dense", peer_value=macs["dense"], seed=seed)
        C.emit(BENCH, case, "params", params[r], "count", peer="dense", peer_value=params["dense"], seed=seed)
    tps = _tp_slims(name, model, x1, slims, round_to)
    for r, m in tps.items():
        C.emit(BENCH, f"{name}/ratio={r}", "macs", macs[r], "count", peer=TP, peer_value=_macs(m, x1), seed=seed)
    if tps:
        _emit_prune_times(name, model, x1, list(tps), round_to, seed, n=PRUNE_RUNS)
    hands = {r: h for r, slim in slims.items() if (h := _hand_written(name, model, slim)) is not None}

    for batch in batches:
        n, repeats = runs(batch)
        x = torch.randn(batch, *shape)
        models = {"dense": model, **{f"ratio={r}": slim for r, slim in slims.items()},
                  **{f"{TP} ratio={r}": m for r, m in tps.items()},
                  **{f"hand ratio={r}": m for r, m in hands.items()}}
        C.log(f"{name} batch={batch}: timing {len(models)} models alternating, {n} rounds x {repeats} forwards")
        for key, m in models.items():  # warm-up: allocator, oneDNN primitives
            measure_latency(m, x, warmup=2, repeats=1)
        med = _alternating_latency(models, x, n, repeats, warmup=1)
        common = dict(n=n, repeats=repeats, threads=threads, batch=batch, seed=seed)
        C.emit(BENCH, f"{name}/dense", "latency_ms", med["dense"], "ms", **common)
        for r in slims:
            case, lat = f"{name}/ratio={r}", med[f"ratio={r}"]
            C.emit(BENCH, case, "latency_ms", lat, "ms", peer="dense", peer_value=med["dense"], **common)
            speedup = med["dense"] / lat
            C.emit(BENCH, case, "speedup", speedup, "x", **common)
            C.emit(BENCH, case, "latency_per_macs", speedup / (macs["dense"] / macs[r]), "frac", **common)
            C.log(f"  {case} batch={batch}: {med['dense']:.3f} -> {lat:.3f} ms, speedup {speedup:.2f}x, "
                  f"MACs / {macs['dense'] / macs[r]:.2f}")
        for r in tps:
            C.emit(BENCH, f"{name}/ratio={r}", "latency_ms", med[f"ratio={r}"], "ms", peer=TP,
                   peer_value=med[f"{TP} ratio={r}"], **common)
        for r in hands:
            C.emit(BENCH, f"{name}/ratio={r}", "latency_ms", med[f"ratio={r}"], "ms", peer="hand_written",
                   peer_value=med[f"hand ratio={r}"], **common)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny setting for the tests (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--models", default=None, help="comma-separated subset of model names")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.quick:
        ratios, batches = (0.5,), (1, 4)
        def runs(batch): return 5, 3  # noqa: E704  (rounds, forwards per round)
    else:
        ratios, batches = (0.25, 0.5, 0.75), (1, 64)
        def runs(batch): return (15, 5) if batch == 1 else (11, 1)  # noqa: E704  (rounds, forwards per round)
    wanted = set(args.models.split(",")) if args.models else None
    if tp is None:
        C.log(f"NOTE: torch_pruning not importable ({TP_ERROR}); skipping the {TP} peer")
    for name, model, shape, round_to in _models(args.quick, args.seed):
        if wanted is not None and name not in wanted:
            continue
        C.log(f"== {name}")
        _bench_model(name, model, shape, round_to, ratios, batches, runs, args.seed, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
