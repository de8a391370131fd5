"""Structured pruning of a real decoder LLM that stays exact: attention heads (GQA), SwiGLU neurons, whole layers.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads of 64, SwiGLU
1536, tied embeddings), converted to fp32 by the install step (:mod:`prunekit.zoo.assets`). Text: Jane Austen
(Debian's ``r-cran-janeaustenr``). Calibration: ``--calib-windows`` random windows of ``--calib-len`` tokens of
*Pride and Prejudice* (one pass, :func:`prunekit.surgery.decoder_stats`, shared by every case); evaluation: the
first ``--tokens`` tokens of *Sense and Sensibility* in non-overlapping windows of ``--context``.

Every case plans from the same dense model (:func:`prunekit.surgery.plan_decoder`), compacts it
(:func:`prunekit.surgery.compact_decoder`: a smaller ``LlamaForCausalLM`` that plain transformers reloads)
and is measured without any retraining (``recovered=0``), then, for the cases ``--recover-cases`` selects,
distilled from the dense model (KL of the next-token distributions, :func:`prunekit.train.causal_lm.recover`)
for ``--recover-steps`` steps of ``--recover-batch`` windows drawn from *Pride and Prejudice* (``recovered=1``):

- ``heads``: whole KV groups (one KV head with its 3 query heads and their o_proj columns), per layer;
- ``qheads``: query heads inside their KV groups, the same number from every group (``num_key_value_groups``
  3 -> 2);
- ``ffn``: SwiGLU neurons (gate/up rows with down columns), per layer;
- ``depth``: whole decoder layers, lowest ShortGPT block influence (1 - cos(input, output)) first.

Width units lose the same number in every layer (transformers keeps one head count / intermediate size per
model). JSON lines (../shared/BENCHMARKS.md); ``case`` = ``smollm2-135m/<heads|qheads|ffn|depth>/<fraction
removed>/recovered=0`` (the fraction of that unit kind removed, two decimals; ``recovered=1`` cases report ``perplexity``, ``ppl_ratio``, ``params`` and the training
``time_s``: their shapes, hence their speed, are those of ``recovered=0``):

- ``perplexity`` with peer ``dense`` (same tokens, same run), ``ppl_ratio`` = pruned / dense;
- ``params`` (unique parameters, tied embeddings once) with peer ``dense``;
- ``tokens_per_s``: greedy decoding of ``--new-tokens`` tokens after a ``--prompt``-token prompt at batch 1
  (KV cache on), the dense model measured in the same case, alternating with the pruned one (medians of
  ``--repeat`` rounds after a warm-up call each); ``speedup`` = pruned / dense tokens/s;
- ``max_diff`` / ``max_diff_fp64``: largest |logit| difference between the masked model (same plan, zeros) and
  the compacted one on 128 evaluation tokens, in float32 as run and with both models in float64 (the
  transformation itself is exact; float32 differences are summation-order rounding).
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import _common as C
from _austen import austen
from prunekit.analysis.decode import alternating_speeds
from prunekit.analysis.perplexity import generation_speed, perplexity
from prunekit.apply import masking
from prunekit.surgery import compact_decoder, decoder_stats, plan_decoder
from prunekit.train.causal_lm import RecoveryOptions, recover
from prunekit.zoo.llm import calibration_windows

BENCH = "llm_structured"
# (case label, decoder unit, amount: a count per layer for width units, a count of layers for depth)
FULL = [("heads", "kv_groups", 1), ("qheads", "q_heads", 3), ("ffn", "ffn", 0.25), ("ffn", "ffn", 0.5),
        ("depth", "layers", 7), ("depth", "layers", 8)]
QUICK = [("heads", "kv_groups", 1), ("ffn", "ffn", 0.25), ("depth", "layers", 8)]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())   # parameters() lists a tied tensor once


def _fraction(plan) -> float:
    before, after = plan.meta["before"], plan.meta["after"]
    key = {"kv_groups": "kv_heads", "q_heads": "heads", "ffn": "intermediate", "layers": "layers"}[plan.meta["unit"]]
    return 1.0 - after[key] / before[key]


@torch.no_grad()
def _max_diffs(dense, slim, plan, window) -> Tuple[float, float]:
    """Largest |logit| difference, masked vs compacted, in float32 (as run) and float64 (the transformation
    itself: float32 differences are summation-order rounding, amplified through the layers)."""
    masked = copy.deepcopy(dense)
    masking.apply(masked, plan)
    out = []
    for dtype in (torch.float32, torch.float64):
        a, b = copy.deepcopy(masked).to(dtype), copy.deepcopy(slim).to(dtype)
        out.append(float((a(input_ids=window, use_cache=False).logits - b(input_ids=window, use_cache=False).logits)
                         .abs().max()))
    return out[0], out[1]


def _speeds(dense, slim, prompt, new_tokens: int, rounds: int) -> Tuple[float, float]:
    """Median greedy tokens/s of the dense and the pruned model, measured alternately (dense, pruned, dense,
    ...) after one warm-up call each, so that machine load changes hit both alike."""
    rates = alternating_speeds({"dense": dense, "pruned": slim}, prompt, new_tokens, rounds, generation_speed)
    return rates["dense"], rates["pruned"]


def _recovered(slim, dense, train, windows, case: str, dense_ppl: float, params: int, dense_params: int, args,
               common) -> None:
    """Distil ``slim`` from the dense model (in place) and emit the ``recovered=1`` case."""
    start = time.perf_counter()
    recover(slim, train, teacher=dense, options=RecoveryOptions(loss="kl", batch_size=args.recover_batch,
                                                                seed=args.seed),
            max_steps=args.recover_steps, epochs=max(1, -(-args.recover_steps * args.recover_batch // len(train))),
            lr=args.recover_lr, progress=False)
    seconds = time.perf_counter() - start
    ppl = perplexity(slim, windows, progress=False).perplexity
    C.log(f"{case}: perplexity {ppl:.3f} ({ppl / dense_ppl:.3f}x dense) after {args.recover_steps} steps of "
          f"distillation in {seconds:.0f} s")
    C.emit(BENCH, case, "perplexity", ppl, "ppl", peer="dense", peer_value=dense_ppl, **common)
    C.emit(BENCH, case, "ppl_ratio", ppl / dense_ppl, "x", **common)
    C.emit(BENCH, case, "params", params, "count", peer="dense", peer_value=dense_params, **common)
    C.emit(BENCH, case, "time_s", seconds, "s", n=1, steps=args.recover_steps, **common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny setting for the tests (few tokens, three cases)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 with --quick). On a busy machine use 1: a second "
                         "thread that spin-waits makes batch-1 decoding many times slower")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ffn-criterion", default="output", help="score of SwiGLU neurons (l2, l1, wanda, activation, output)")
    ap.add_argument("--heads-criterion", default="output", help="score of KV groups / query heads")
    ap.add_argument("--only", help="comma-separated case filters (substrings), e.g. depth,ffn/0.25")
    ap.add_argument("--recover-cases", default="depth,ffn/0.25,heads",
                    help="comma-separated filters of the cases also recovered ('' for none) (default: %(default)s)")
    ap.add_argument("--recover-steps", type=int, default=32)
    ap.add_argument("--recover-batch", type=int, default=4)
    ap.add_argument("--recover-windows", type=int, default=128)
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    args = ap.parse_args()
    if args.quick and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, label = (QUICK, "smollm2-135m-quick") if args.quick else (FULL, "smollm2-135m")
    if args.quick:  # the whole model (width units go in every layer), few tokens
        args.calib_windows, args.calib_len, args.tokens, args.context = 4, 64, 128, 128
        args.prompt, args.new_tokens, args.repeat = 8, 8, 1
        args.recover_cases, args.recover_steps, args.recover_batch, args.recover_windows = "depth", 2, 2, 4

    data = austen(args.calib_windows, args.calib_len, args.tokens, args.context, args.seed)
    dense, calib, windows, eval_ids = data.dense, data.calib, data.windows, data.eval_ids
    train = calibration_windows(data.text_ids, args.recover_windows, args.calib_len, seed=args.seed + 1)
    prompt = eval_ids[-args.prompt:]          # away from the perplexity windows
    dense_ppl = perplexity(dense, windows, progress=False).perplexity
    dense_params = _params(dense)
    start = time.perf_counter()
    stats = decoder_stats(dense, calib)
    C.log(f"dense perplexity {dense_ppl:.3f} on {windows.numel()} tokens; calibration statistics on "
          f"{stats.tokens} tokens in {time.perf_counter() - start:.1f} s")
    C.log("block influence: " + " ".join(f"{v:.3f}" for v in stats.influence))
    common = dict(threads=torch.get_num_threads(), seed=args.seed)
    for name, unit, amount in runs:
        criterion = {"ffn": args.ffn_criterion, "layers": "influence"}.get(unit, args.heads_criterion)
        plan = plan_decoder(dense, amount, unit=unit, criterion=criterion, stats=stats)
        case = f"{label}/{name}/{_fraction(plan):.2f}/recovered=0"
        if args.only and not any(f in case for f in args.only.split(",")):
            continue
        slim = compact_decoder(dense, plan)
        diff32, diff64 = _max_diffs(dense, slim, plan, windows[:1, :128])
        ppl = perplexity(slim, windows, progress=False).perplexity
        peer, speed = _speeds(dense, slim, prompt, args.new_tokens, args.repeat)
        params = _params(slim)
        removed = plan.meta["pruned"] if unit == "layers" else plan.meta["after"]
        C.log(f"{case} ({criterion}): perplexity {ppl:.3f} ({ppl / dense_ppl:.3f}x dense), {params / 1e6:.1f}M "
              f"params, {speed:.1f} vs {peer:.1f} tokens/s, masked vs compacted {diff32:.1e} (fp64 {diff64:.1e}); "
              f"{removed}")
        C.emit(BENCH, case, "perplexity", ppl, "ppl", peer="dense", peer_value=dense_ppl, criterion=criterion,
               **common)
        C.emit(BENCH, case, "ppl_ratio", ppl / dense_ppl, "x", **common)
        C.emit(BENCH, case, "params", params, "count", peer="dense", peer_value=dense_params, **common)
        C.emit(BENCH, case, "tokens_per_s", speed, "tokens/s", peer="dense", peer_value=peer, lower_is_better=False,
               batch=1, n=args.repeat, **common)
        C.emit(BENCH, case, "speedup", speed / peer, "x", batch=1, n=args.repeat, **common)
        C.emit(BENCH, case, "max_diff", diff32, "abs", dtype="fp32", **common)
        C.emit(BENCH, case, "max_diff_fp64", diff64, "abs", dtype="fp64", **common)
        if any(f in case for f in args.recover_cases.split(",") if f):
            _recovered(slim, dense, train, windows, case.replace("recovered=0", "recovered=1"), dense_ppl, params,
                       dense_params, args, common)
        del slim


if __name__ == "__main__":
    main()
