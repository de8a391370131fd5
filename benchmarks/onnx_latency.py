"""Does structured pruning + surgery make models faster in onnxruntime too, not only in torch?

For VGG-style (with BN), ResNet-18 (CIFAR) and MobileNetV2 (CIFAR) from ``prunekit.zoo.models`` (random
init, trained-looking BN statistics), the dense model and the models with 25/50/75% of channels
removed (``prunekit.surgery.plan_groups(..., scope="layer", round_to=8)`` + ``compact``, as in
``structured_speed.py``) are exported with ``prunekit.deploy.export.export_onnx`` (verified there: onnxruntime
within 1e-4 of torch at batch 1 and 2) and timed on onnxruntime's CPU provider with a fixed number of
threads (``--threads``, default 1, for torch too). All models of one network are timed in rounds, one
after the other (dense, pruned..., each in onnxruntime then in torch eager), after a warm-up; a value
is the median of ``n`` rounds, each round's value the median of ``repeats`` runs. ``--quick`` (a tiny VGG, one
ratio, batches 1 and 4) uses the TorchScript exporter unless ``--exporter`` says otherwise.

JSON lines (../shared/BENCHMARKS.md), ``case`` = ``<model>/dense`` or ``<model>/ratio=<r>``:

- ``latency_ms`` with ``batch``: onnxruntime latency. Dense: peer ``torch`` (torch eager, same model,
  same threads; ratio = torch / onnxruntime). Pruned: one line with peer ``dense`` (the dense model in
  onnxruntime; ratio = dense / pruned) and one with peer ``torch`` (the same compacted model in torch eager)
- ``speedup`` with ``batch`` (unit "x"): dense / pruned latency, both in onnxruntime; one line without a
  peer, and one with peer ``torch`` whose ``peer_value`` is the same speedup measured in torch eager
  (ratio = onnxruntime speedup / torch speedup: does the structural speedup carry over?)
- ``cpu_ms`` with ``batch``: like ``latency_ms`` (same peers and ratios), but the process CPU time per run
  (``time.process_time``). With one thread it is the latency an idle machine shows; on a busy machine long
  runs are preempted more often than short ones, which inflates wall-clock speedups (we saw 53x wall vs
  13x CPU for ResNet-18 at 75% under a load average of 9 on 2 cores), so trust ``cpu_ms`` ratios there
- ``max_abs_diff`` with ``batch`` (unit "abs"): onnxruntime vs torch outputs on the timed input
- ``size_bytes``: the ONNX file; pruned with peer ``dense`` (ratio = dense / pruned)
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

import _common as C
import structured_speed as S  # the same models and pruning as the torch speed benchmark
from prunekit.deploy.export import export_onnx, onnx_session
from structured_speed import _prune

BENCH = "onnx_latency"


def _models(quick: bool, seed: int):
    """The CNNs of structured_speed.py (same seeds and widths): (name, model, input shape, round_to)."""
    for item in S._models(quick, seed):
        if not item[0].startswith("transformer"):
            yield item


def _variants(name: str, model: nn.Module, x1: torch.Tensor, ratios, round_to: Optional[int], seed: int):
    """{"dense": model, "ratio=r": compacted model}."""
    out = {"dense": model.eval()}
    for r in ratios:
        slim, plan = _prune(model, x1, r, round_to, seed)
        if slim is None:
            C.log(f"NOTE: skipping {name}/ratio={r}: {plan}")
            continue
        out[f"ratio={r}"] = slim
    return out


def _export_all(name: str, models: Dict[str, nn.Module], x1: torch.Tensor, folder: Path, exporter: str):
    results = {}
    for key, m in models.items():
        res = export_onnx(m, x1, folder / f"{name}_{key.replace('=', '')}.onnx", exporter=exporter)
        C.log(f"  {name}/{key}: exported with {res.exporter} (opset {res.opset}), {res.size_bytes} bytes, "
              f"max abs diff {res.max_abs_diff:.2e}")
        results[key] = res
    return results


def _diff(sess, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - ref).max())


def _median_times(fn, warmup: int, repeat: int) -> Tuple[float, float]:
    """(wall, process CPU) median ms of ``fn()``. With one thread, CPU time is the latency an idle machine would
    show: on a busy one, long runs are preempted more often than short ones and their wall time inflates."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - w0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    return C.median(wall), C.median(cpu)


def _runners(sessions, models, x: torch.Tensor):
    """{(key, "ort" | "torch"): fn}: one forward each, same input."""
    out = {}
    for key, m in models.items():
        sess = sessions[key]
        feeds = {sess.get_inputs()[0].name: x.numpy()}
        out[(key, "ort")] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
        out[(key, "torch")] = lambda m=m: m(x)
    return out


@torch.no_grad()
def _time_rounds(sessions, models, x: torch.Tensor, rounds: int, repeats: int):
    """{(key, runtime): (wall ms, CPU ms)}: rounds of every model in turn (dense, pruned..., onnxruntime then
    torch each), each round's value the median of ``repeats`` runs after one warm-up run; medians over rounds."""
    runners = _runners(sessions, models, x)
    for fn in runners.values():  # warm-up: onnxruntime's first runs and torch's allocator / oneDNN primitives
        _median_times(fn, warmup=2, repeat=1)
    gc.collect()  # once here, not around every run: it would cost more than a small forward
    per_round = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            per_round[k].append(_median_times(fn, warmup=1, repeat=repeats))
    return {k: (C.median([w for w, _ in v]), C.median([c for _, c in v])) for k, v in per_round.items()}


def _emit_batch(name, models, sessions, batch, shape, rounds, repeats, threads, seed) -> None:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + batch))
    C.log(f"{name} batch={batch}: timing {len(models)} models x 2 runtimes, {rounds} rounds x {repeats} runs")
    med = _time_rounds(sessions, models, x, rounds, repeats)
    common = dict(n=rounds, repeats=repeats, threads=threads, batch=batch, seed=seed)
    for metric, i in (("latency_ms", 0), ("cpu_ms", 1)):
        dense_ort, dense_torch = med[("dense", "ort")][i], med[("dense", "torch")][i]
        for key in models:
            case, ort_ms, torch_ms = f"{name}/{key}", med[(key, "ort")][i], med[(key, "torch")][i]
            C.emit(BENCH, case, metric, ort_ms, "ms", peer="torch", peer_value=torch_ms, **common)
            if key == "dense":
                C.log(f"  {case} ({metric}): onnxruntime {ort_ms:.3f} ms, torch {torch_ms:.3f} ms")
                continue
            C.emit(BENCH, case, metric, ort_ms, "ms", peer="dense", peer_value=dense_ort, **common)
            speedup, torch_speedup = dense_ort / ort_ms, dense_torch / torch_ms
            C.log(f"  {case} ({metric}): onnxruntime {dense_ort:.3f} -> {ort_ms:.3f} ms ({speedup:.2f}x); "
                  f"torch {dense_torch:.3f} -> {torch_ms:.3f} ms ({torch_speedup:.2f}x)")
            if metric == "latency_ms":
                C.emit(BENCH, case, "speedup", speedup, "x", **common)
                C.emit(BENCH, case, "speedup", speedup, "x", peer="torch", peer_value=torch_speedup,
                       lower_is_better=False, **common)
    for key, m in models.items():
        C.emit(BENCH, f"{name}/{key}", "max_abs_diff", _diff(sessions[key], m, x), "abs", batch=batch, seed=seed)


def _bench_model(name, model, shape, round_to, ratios, batches, runs, seed, threads, exporter, folder) -> None:
    x1 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    models = _variants(name, model, x1, ratios, round_to, seed)
    results = _export_all(name, models, x1, folder, exporter)
    dense_size = results["dense"].size_bytes
    C.emit(BENCH, f"{name}/dense", "size_bytes", dense_size, "bytes", seed=seed)
    for key, res in results.items():
        if key != "dense":
            C.emit(BENCH, f"{name}/{key}", "size_bytes", res.size_bytes, "bytes", peer="dense",
                   peer_value=dense_size, seed=seed)
    sessions = {key: onnx_session(res.path, threads=threads) for key, res in results.items()}
    for batch in batches:
        rounds, repeats = runs(batch)
        _emit_batch(name, models, sessions, batch, shape, rounds, repeats, threads, seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny setting for the tests (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op and torch threads (default 1)")
    p.add_argument("--models", default=None, help="comma-separated subset of model names")
    p.add_argument("--exporter", default=None, help="auto (default), dynamo or torchscript; --quick: torchscript")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.quick:
        # torchscript: the dynamo exporter's fixed ~2 s per export would dominate a seconds-long run
        exporter = args.exporter or "torchscript"
        ratios, batches = (0.5,), (1, 4)
        def runs(batch): return 3, 3  # noqa: E704  (rounds, runs per round)
    else:
        exporter = args.exporter or "auto"
        ratios, batches = (0.25, 0.5, 0.75), (1, 64)
        def runs(batch): return (10, 5) if batch == 1 else (10, 1)  # noqa: E704  (rounds, runs per round)
    wanted = set(args.models.split(",")) if args.models else None
    with tempfile.TemporaryDirectory(prefix="prunekit-onnx-") as tmp:
        for name, model, shape, round_to in _models(args.quick, args.seed):
            if wanted is not None and name not in wanted:
                continue
            C.log(f"== {name}")
            _bench_model(name, model, shape, round_to, ratios, batches, runs, args.seed, threads, exporter, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
