"""Do unstructured-pruned models get smaller on disk and faster on CPU with sparse (CSR) kernels?

For each width ``w`` an MLP of 4 x Linear(w, w) (ReLU between; ``mlp4x<w>``, random init, seeded) is
pruned per layer with ``prunekit.prune`` (magnitude, all 4 layers, masks kept) at each sparsity, then:

- saved with ``prunekit.save(compressed=True)`` and loaded back (checked bit-exact);
- converted by ``prunekit.deploy.sparse.to_sparse`` at each batch size, which *measures* every layer on this
  machine and converts only those whose CSR form is >= 1.1x faster than their best dense form (the CSR
  kernel, torch's ``linear``/``mm`` or prunekit's ``native`` C kernel, is chosen per layer by measurement;
  ``kernels`` in the JSON line lists what the 4 layers run);
- timed end to end, alternating run by run with the same masked model in every dense form
  (``F.linear`` as nn.Linear runs it, ``addmm`` / ``matmul`` with a pre-transposed weight): the
  fastest dense form is the peer.

Separately, ``measure_break_even`` times a single random w x w layer per batch size over a sparsity sweep.

JSON lines (../shared/BENCHMARKS.md), torch threads fixed (``--threads``, recorded as ``threads``):

- ``size_ratio`` (unit "x"), case ``mlp4x<w>/sparsity=<s>``: dense state_dict file size (plain
  safetensors, no masks) / compressed prunekit folder size (weights + JSON spec, masks included);
  extra keys ``dense_bytes``, ``compressed_bytes``
- ``latency_ms`` (unit "ms"), case ``mlp4x<w>/sparsity=<s>/batch=<b>``: the converted model's median
  forward time, peer ``dense`` = the fastest dense form's (ratio = dense / sparse); extra ``dense_form``,
  ``layers_sparse`` (how many of the 4 layers to_sparse converted), ``n``, ``batch``, ``threads``
- ``speedup`` (unit "x"), same case: dense / sparse end-to-end latency, peer ``dense`` (peer_value 1.0)
- ``speedup`` (unit "x"), case ``linear<w>x<w>/sparsity=<s>/batch=<b>``: one layer, best dense form /
  best CSR kernel; extra ``dense_form``, ``kernel``
- ``break_even_sparsity`` (unit "frac"), case ``linear<w>x<w>/batch=<b>``: the lowest sparsity from which
  the CSR layer stays faster than the best dense form (linear interpolation); extra ``bound``:
  ``exact``, ``below`` (already faster at the lowest sparsity measured: the value is an upper bound) or
  ``above`` (never faster in the sweep: the break-even is above the value)

Single-layer timings (to_sparse's and the sweep's) evict the CPU cache before every call where a model of
such layers would not fit in it (extra key ``cold_cache``): timed alone, a 90%-sparse 4096^2 CSR layer
(13 MB) stays in a 32 MB cache and looks ~25% faster than it runs inside the model.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import _common as C
import prunekit
from prunekit.apply import masking
from prunekit.deploy import compress, io
from prunekit.deploy.sparse import DENSE_FORMS, measure_break_even, to_dense_form, to_sparse

BENCH = "sparse_speed"
FULL = dict(widths=(1024, 2048, 4096), batches=(1, 8, 64), sparsities=(0.5, 0.7, 0.8, 0.9, 0.95), n=11,
            repeat=7, sweep=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95))
QUICK = dict(widths=(256,), batches=(1, 8), sparsities=(0.5, 0.9), n=3, repeat=3, sweep=(0.5, 0.9))
SAMPLE_S = 0.02  # each timed sample runs enough forwards to last about this long (timer noise, small models)


def _mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i in range(4):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < 3 else [])
    return nn.Sequential(*layers).eval()


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _size_ratio(model: nn.Module, case: str, threads: int) -> None:
    """Compressed prunekit folder vs the plain dense state_dict; the load must give the exact weights."""
    plain = {k: v for k, v in model.state_dict().items() if not k.endswith(masking.MASK_SUFFIX)}
    dense_bytes = compress.dense_size_bytes(plain)
    with tempfile.TemporaryDirectory() as tmp:
        folder = prunekit.save(model, Path(tmp) / "m", compressed=True)
        packed = _folder_bytes(folder)
        back = io.read_state_dict(folder)
    want = model.state_dict()
    if back.keys() != want.keys() or not all(torch.equal(back[k], want[k]) for k in want):
        raise RuntimeError(f"{case}: the compressed checkpoint did not load back exactly")
    C.emit(BENCH, case, "size_ratio", dense_bytes / packed, "x", dense_bytes=dense_bytes,
           compressed_bytes=packed, threads=threads)


def _inner(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        model(x)
        dt = time.perf_counter() - t0
    return max(1, min(200, int(SAMPLE_S / max(dt, 1e-6))))


def _timed(model: nn.Module, x: torch.Tensor, inner: int):
    def run(_):
        with torch.no_grad():
            for _ in range(inner):
                model(x)
    return None, run


def _end_to_end(model: nn.Module, width: int, s: float, batch: int, cfg: dict, threads: int) -> None:
    x = torch.randn(batch, width)
    fast, report = to_sparse(model, x, threads=threads, repeat=cfg["repeat"])
    converted = sum(r["converted"] for r in report)
    C.log(f"  batch={batch}: to_sparse converted {converted}/4: "
          + "; ".join(f"{r['name']} {r['speedup']:.2f}x {r['kernel']}" for r in report))
    with torch.no_grad():
        want = model(x)
        err = float((fast(x) - want).abs().max())
    if err > 1e-5 * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"sparse model differs from the dense one by {err:.2e}")
    forms = {"linear": model, **{f: to_dense_form(model, f) for f in DENSE_FORMS if f != "linear"}}
    inner = _inner(model, x)
    methods = {f"dense_{f}": _timed(m, x, inner) for f, m in forms.items()}
    methods["sparse"] = _timed(fast, x, inner)
    times = C.alternating_medians(methods, n=cfg["n"], warmup=1, progress=False)
    med = {k: C.median(v) * 1000.0 / inner for k, v in times.items()}
    best = min(forms, key=lambda f: med[f"dense_{f}"])
    dense_ms, sparse_ms = med[f"dense_{best}"], med["sparse"]
    case = f"mlp4x{width}/sparsity={s}/batch={batch}"
    common = dict(n=cfg["n"], threads=threads, batch=batch, dense_form=best, layers_sparse=converted,
                  kernels=",".join(sorted({r["kernel"] for r in report if r["converted"]})))
    C.emit(BENCH, case, "latency_ms", sparse_ms, "ms", peer="dense", peer_value=dense_ms, **common)
    C.emit(BENCH, case, "speedup", dense_ms / sparse_ms, "x", peer="dense", peer_value=1.0,
           lower_is_better=False, **common)
    del forms, fast
    gc.collect()


def _break_even(width: int, batch: int, cfg: dict, threads: int, seed: int) -> None:
    res = measure_break_even(width, width, batch, sparsities=cfg["sweep"], threads=threads,
                             repeat=cfg["repeat"], seed=seed)
    shape = f"linear{width}x{width}"
    for r in res["rows"]:
        C.emit(BENCH, f"{shape}/sparsity={r['sparsity']}/batch={batch}", "speedup", r["speedup"], "x",
               n=cfg["repeat"], threads=threads, batch=batch, dense_form=r["dense_form"], kernel=r["kernel"],
               dense_ms=r["dense_ms"], sparse_ms=r["sparse_ms"], cold_cache=res["cold_cache"])
    C.emit(BENCH, f"{shape}/batch={batch}", "break_even_sparsity", res["break_even"], "frac",
           bound=res["bound"], n=cfg["repeat"], threads=threads, batch=batch, cold_cache=res["cold_cache"])


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny setting for the tests (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, a second OpenMP thread waiting for a "
                        "busy core makes sparse kernels erratic)")
    p.add_argument("--widths", type=_csv(int), default=None, help="comma-separated, overrides the setting")
    p.add_argument("--batches", type=_csv(int), default=None, help="comma-separated, overrides the setting")
    p.add_argument("--sparsities", type=_csv(float), default=None, help="comma-separated, overrides the setting")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("widths", "batches", "sparsities"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    gc.freeze()  # the import-time heap is permanent: keeps the timers' gc.collect() calls short
    for width in cfg["widths"]:
        base = _mlp(width, args.seed)
        for s in cfg["sparsities"]:
            C.log(f"mlp4x{width} sparsity={s}")
            model = copy.deepcopy(base)
            prunekit.prune(model, s, scope="layer", include_classifier=True)
            _size_ratio(model, f"mlp4x{width}/sparsity={s}", threads)
            for batch in cfg["batches"]:
                _end_to_end(model, width, s, batch, cfg, threads)
            del model
            gc.collect()
        for batch in cfg["batches"]:
            C.log(f"break-even linear{width}x{width} batch={batch}")
            _break_even(width, batch, cfg, threads, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
