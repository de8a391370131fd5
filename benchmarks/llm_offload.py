"""Prune a decoder LLM bigger than the machine's RAM: peak RSS of the streamed pruner as a fraction of the model.

Model: a random-weight Llama (default hidden 4096, MLP 11008, 32 query / 8 KV heads, vocab 32000: the shapes of a
Llama-2-7B with grouped-query attention) with as many decoder layers as make ``--size-gb`` GB of fp32 shards
(default 30: more than this 24 GB machine's RAM). It is written by
:func:`prunekit.pruners.offload.write_random_checkpoint` (one tensor at a time, never whole in memory) in a child
process, then pruned by :func:`prunekit.pruners.offload.prune_checkpoint` (one decoder layer in memory at a time,
one output shard per layer) in another child process, once per method. Calibration: ``--calib-windows`` random
windows of ``--calib-len`` random token ids (seeded). The model and the output go to ``--workdir`` (default a
temporary folder under /tmp, removed afterwards); the layers are cut down, with a warning, when the disk cannot
hold both copies.

JSON lines (../shared/BENCHMARKS.md), ``case`` = ``llama-<size>gb/<method>/sparsity=<amount>``:

- ``peak_rss_frac``: the pruning process's peak RSS (``VmHWM`` reset when the child starts, before torch is
  imported: the whole process, imports included) / the model's bytes on disk;
- ``peak_rss_mb``, ``time_s`` (prune_checkpoint's wall time: reading, pruning, writing), ``size_bytes`` (the
  model's shards on disk);
- ``--quick`` (a tiny Llama in 3 shards, seconds) also prunes the same checkpoint in memory with
  ``sequential_prune`` and reports ``identical`` (the fraction of the output's tensors equal, bit for bit, to the
  in-memory run's: 1.0).

Usage: ``python benchmarks/llm_offload.py [--quick] [--size-gb 30] [--methods wanda,sparsegpt]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import _common as C

BENCH = "llm_offload"
GB = 1_000_000_000
FULL = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=8, vocab=32000, methods="wanda")
QUICK = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, layers=4, methods="wanda,sparsegpt",
             calib_windows=4, calib_len=32, shard_bytes=300_000)


def _config(args, layers: int) -> dict:
    return dict(model_type="llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                num_hidden_layers=layers, max_position_embeddings=max(2048, args.calib_len),
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def _bytes(args, layers: int) -> int:
    """fp32 bytes of the checkpoint: per layer q, k, v, o, gate, up, down and two norms; embeddings, lm_head,
    final norm."""
    h, f, kv = args.hidden, args.intermediate, args.hidden // args.heads * args.kv_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return 4 * (layers * per_layer + 2 * args.vocab * h + h)


def _layers_for(args, free: int) -> int:
    if args.layers:
        layers = args.layers
    else:
        per = _bytes(args, 1) - _bytes(args, 0)
        layers = max(1, round((args.size_gb * GB - _bytes(args, 0)) / per))
    # the source, the output (same size) and its masks (1 bit per weight), with 2 GB to spare
    while layers > 1 and 2.05 * _bytes(args, layers) + 2 * GB > free:
        layers -= 1
    return layers


# ----------------------------------------------------------------------------- the child processes

def child_generate(args) -> None:
    from prunekit.pruners.offload import write_random_checkpoint

    start = time.perf_counter()
    write_random_checkpoint(args.src, json.loads(args.config), seed=args.seed, shard_bytes=args.shard_bytes)
    size = sum(os.path.getsize(os.path.join(args.src, f)) for f in os.listdir(args.src) if f.endswith(".safetensors"))
    print(json.dumps({"size_bytes": size, "time_s": time.perf_counter() - start}), flush=True)


def child_prune(args) -> None:
    C.reset_peak_rss()  # before torch is imported: the peak covers the whole process
    import torch

    from prunekit.pruners.offload import prune_checkpoint
    from prunekit.pruners.sequential import SequentialOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.calib_windows, args.calib_len), generator=g)
    options = SequentialOptions(method=args.method, progress=not args.quick)
    start = time.perf_counter()
    prune_checkpoint(args.src, args.out, ids, args.amount, options=options)
    elapsed = time.perf_counter() - start
    res = {"time_s": elapsed, "peak_rss_kb": C.peak_rss_kb(), "ru_maxrss_kb": C.ru_maxrss_kb(),
           "threads": torch.get_num_threads()}
    if args.quick:  # the same checkpoint pruned in memory: the output must equal it, bit for bit
        from transformers import AutoModelForCausalLM

        from prunekit.apply import masking
        from prunekit.pruners.sequential import sequential_prune

        ref = AutoModelForCausalLM.from_pretrained(args.src)
        sequential_prune(ref, ids, args.amount, options=options)
        want = masking.plain_state_dict(ref)
        got = AutoModelForCausalLM.from_pretrained(args.out).state_dict()
        same = sum(1 for k, v in want.items() if k in got and torch.equal(v, got[k]))
        res["identical"] = same / max(len(set(want) | set(got)), 1)
    print(json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- the parent

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny Llama (seconds), checked against an in-memory run")
    ap.add_argument("--size-gb", type=float, default=30.0, help="target size of the fp32 shards (GB, 10^9 bytes)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: as many as make --size-gb)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--methods", help="comma-separated: magnitude, wanda, sparsegpt (default wanda; quick: "
                                      "wanda,sparsegpt)")
    ap.add_argument("--amount", type=float, default=0.5)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--shard-bytes", type=int, default=2 * GB)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the pruning child (0: torch's default)")
    ap.add_argument("--workdir", help="where the model and its pruned copy go (default: a temporary folder)")
    # internal: the child processes
    ap.add_argument("--child", choices=("generate", "prune"), help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) in (None, 0) or (args.quick and key in ("calib_windows", "calib_len", "shard_bytes")):
            setattr(args, key, value)
    if args.child == "generate":
        return child_generate(args)
    if args.child == "prune":
        return child_prune(args)

    work = args.workdir or tempfile.mkdtemp(prefix="prunekit-offload-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.makedirs(work, exist_ok=True)
    try:
        free = shutil.disk_usage(work).free
        layers = _layers_for(args, free)
        expected = _bytes(args, layers)
        if not args.quick and not args.layers and expected < 0.95 * args.size_gb * GB:
            C.warn(f"{free / GB:.1f} GB free in {work}: the model is cut down to {layers} layers "
                   f"({expected / GB:.1f} GB) so that it and its pruned copy fit")
        src, label = os.path.join(work, "src"), None
        C.log(f"writing a random Llama: {layers} layers, hidden {args.hidden}, {expected / GB:.2f} GB fp32 in {work}")
        common = ["--seed", str(args.seed), "--vocab", str(args.vocab)] + (["--quick"] if args.quick else [])
        gen = C.run_child(__file__, ["--child", "generate", "--src", src, "--config",
                                     json.dumps(_config(args, layers)), "--shard-bytes", str(args.shard_bytes),
                                     *common])
        size = gen["size_bytes"]
        C.log(f"written {size / GB:.2f} GB in {gen['time_s']:.0f} s")
        label = "llama-quick" if args.quick else f"llama-{size / GB:.0f}gb"
        for method in args.methods.split(","):
            out = os.path.join(work, f"out-{method}")
            res = C.run_child(__file__, ["--child", "prune", "--src", src, "--out", out, "--method", method,
                                         "--amount", str(args.amount), "--calib-windows", str(args.calib_windows),
                                         "--calib-len", str(args.calib_len), "--threads", str(args.threads), *common])
            shutil.rmtree(out, ignore_errors=True)
            case = f"{label}/{method}/sparsity={args.amount}"
            peak = res["peak_rss_kb"] * 1024
            C.log(f"{case}: peak RSS {peak / 1e6:.0f} MB = {peak / size:.3f} of the model, {res['time_s']:.0f} s "
                  f"(ru_maxrss {res['ru_maxrss_kb'] / 1e3:.0f} MB)")
            extra = dict(threads=res["threads"], seed=args.seed, layers=layers,
                         calib_tokens=args.calib_windows * args.calib_len)
            C.emit(BENCH, case, "peak_rss_frac", peak / size, "frac", **extra)
            C.emit(BENCH, case, "peak_rss_mb", peak / C.MB, "MB", **extra)
            C.emit(BENCH, case, "time_s", res["time_s"], "s", n=1, **extra)
            C.emit(BENCH, case, "size_bytes", size, "bytes", **extra)
            if "identical" in res:
                C.emit(BENCH, case, "identical", res["identical"], "frac", peer="sequential_prune (in memory)",
                       peer_value=1.0, lower_is_better=False, **extra)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
