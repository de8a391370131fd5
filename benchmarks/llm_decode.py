"""Batch-1 decoding of a pruned real LLM on CPU: packed sparse weights (prunekit.deploy.packed) against the
best dense form, with the roofline that explains the speedup.

Model: SmolLM2-135M-Instruct (fp32, and a bfloat16 copy), pruned one-shot with ``--method`` (Wanda by
default; calibration 32 x 256 tokens of *Pride and Prejudice*) to each ``--sparsities`` target and 2:4.
Each pruned model is converted by :func:`prunekit.deploy.sparse.to_sparse` at batch 1 (every Linear timed
against its best dense form on a cold cache, converted only where faster; the packed formats, CSR and
prunekit's CSR kernel all compete) at 1 thread, and the same converted model is then timed at each
``--threads``. Per case (format chosen / target / dtype):

- ``tokens_per_s``: greedy decoding of ``--new-tokens`` tokens after a ``--prompt``-token prompt (from *Sense
  and Sensibility*), median of ``--repeat`` calls, the dense forms and the sparse model alternating; peer: the
  fastest dense form in the same dtype, in the same run, per metric (every Linear as ``F.linear``, or the
  decoder's as a pre-transposed ``addmm`` and the head as ``F.linear``: ``dense_form`` names it).
- ``speedup`` (sparse / dense tokens/s), with ``roofline`` (dense bytes / sparse bytes per token: the speedup
  a purely bandwidth-bound decode would get) and ``decoder_only`` cases: the decoder layers alone (the tied
  ``lm_head`` reads the dense 49152 x 576 embedding every token and bounds the whole model's gain).
- ``bytes_per_token``: weight bytes read per token; ``gbps``: bytes_per_token x tokens/s.
- ``perplexity`` of the pruned model (on ``--tokens`` tokens of *Sense and Sensibility*) against dense, and
  ``max_diff``: the largest |logit| difference between the masked dense model and the sparse one, both
  decoding a 16-token window token by token (the packed kernels' path), with ``logit_scale`` (the largest
  |logit|) and, as ``peer_value``, the float32 noise floor: the same masked weights in the two dense forms.
- ``memory_bandwidth`` (GB/s, case ``machine``) per thread count, and ``break_even`` (case
  ``layer/OUTxIN``): the lowest sparsity at which the best sparse kernel beats dense for SmolLM2's four
  Linear shapes at batch 1, fp32, timed as a decoder streams them (a chain of distinct layers of the shape,
  twice the last-level cache, back to back: ``measure_break_even(stream=True)``).

Run: ``python benchmarks/llm_decode.py`` (about 30 min on 2 cores) or ``--quick`` (two blocks, seconds).
"""
from __future__ import annotations

import argparse
import copy
from typing import Dict

import torch

import _common as C
import prunekit
from _austen import austen
from prunekit.analysis.decode import alternating_speeds, decoder_speed, memory_bandwidth, weight_bytes_per_token
from prunekit.analysis.perplexity import generation_speed, perplexity
from prunekit.apply import masking
from prunekit.deploy.packed import PackedLinear
from prunekit.deploy.sparse import measure_break_even, to_dense_form, to_sparse

BENCH = "llm_decode"
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _prune(dense, calib, target, args):
    model = copy.deepcopy(dense)
    nm = isinstance(target, str)
    opts = dict(pattern="nm", nm=target) if nm else {}
    if args.method == "magnitude":
        prunekit.prune(model, 0.5 if nm else target, include=args.include, seed=args.seed, **opts)
    else:
        prunekit.prune(model, None if nm else target, criterion="sequential", method=args.method, data=calib,
                       include=args.include, seed=args.seed, progress=False, **opts)
    return masking.make_permanent(model).eval()


def _format_label(model) -> str:
    fmts = sorted({m.fmt for m in model.modules() if isinstance(m, PackedLinear)})
    return "+".join(fmts) or "dense"


def _dense_forms(dense) -> Dict[str, torch.nn.Module]:
    """The dense peers: every Linear as ``F.linear``; or the decoder's as a pre-transposed ``addmm`` with the
    output head kept as ``F.linear`` (on this CPU each form wins for some shapes: the best one is the peer)."""
    mixed = to_dense_form(dense, "addmm_t")
    head, emb = dense.get_output_embeddings(), dense.get_input_embeddings()
    new_head = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=head.weight.dtype)
    if head.weight is emb.weight:   # tied: the head reads the embedding table, as in the dense model
        new_head.weight = mixed.get_input_embeddings().weight
    else:
        new_head.weight = torch.nn.Parameter(head.weight.detach().clone())
    mixed.set_output_embeddings(new_head)
    return {"linear": dense, "addmm_t": mixed}


def _stepwise_logits(model, window) -> torch.Tensor:
    """Logits of ``window`` fed a token at a time with the key/value cache: batch-1 decoding's path."""
    out = model(input_ids=window[:, :1], use_cache=True)
    got = [out.logits.float()]
    for i in range(1, window.shape[1]):
        out = model(input_ids=window[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
        got.append(out.logits.float())
    return torch.cat(got, dim=1)


def _timed_case(label, dense_forms, sparse, masked, prompt, window, args, common, extra) -> None:
    for threads in args.thread_list:
        torch.set_num_threads(threads)
        for speed, suffix, only in ((generation_speed, "", False), (decoder_speed, "/decoder_only", True)):
            case = label + suffix
            t = alternating_speeds({**dense_forms, "sparse": sparse}, prompt, args.new_tokens, args.repeat, speed)
            form = max(dense_forms, key=t.get)   # the fastest dense form is the peer
            dense_b = weight_bytes_per_token(dense_forms[form], decoder_only=only)
            sparse_b = weight_bytes_per_token(sparse, decoder_only=only)
            kw = dict(batch=1, n=args.repeat, threads=threads, seed=args.seed, dense_form=form)
            C.log(f"{case} @{threads}t: {t['sparse']:.1f} vs {t[form]:.1f} tokens/s dense {form} "
                  f"({t['sparse'] / t[form]:.2f}x; roofline {dense_b / sparse_b:.2f}x; {sparse_b / 1e6:.1f} vs "
                  f"{dense_b / 1e6:.1f} MB/token); dense forms {', '.join(f'{k} {t[k]:.1f}' for k in dense_forms)}")
            C.emit(BENCH, case, "tokens_per_s", t["sparse"], "tokens/s", peer="dense", peer_value=t[form],
                   lower_is_better=False, **kw)
            C.emit(BENCH, case, "speedup", t["sparse"] / t[form], "x", roofline=dense_b / sparse_b, **kw)
            C.emit(BENCH, case, "bytes_per_token", sparse_b, "bytes", peer="dense", peer_value=dense_b, **kw)
            C.emit(BENCH, case, "gbps", sparse_b * t["sparse"] / 1e9, "GB/s", peer="dense",
                   peer_value=dense_b * t[form] / 1e9, lower_is_better=False, **kw)
    torch.set_num_threads(args.thread_list[0])
    with torch.no_grad():
        want = _stepwise_logits(masked, window)
        diff = float((want - _stepwise_logits(sparse, window)).abs().max())
        # the float32 noise floor: the same masked weights in the other dense form (another summation order)
        floor = float((want - _stepwise_logits(to_dense_form(masked, "addmm_t"), window)).abs().max())
    scale = float(want.abs().max())
    C.log(f"{label}: max |logit| difference to the masked model {diff:.2e} (logits up to {scale:.1f}; two dense "
          f"forms of the same weights differ by {floor:.2e})")
    C.emit(BENCH, label, "max_diff", diff, "abs", peer="dense forms", peer_value=floor, logit_scale=scale,
           **common, **extra)


def _run_target(data, target, dense_ppl, prompt, args, common) -> None:
    pruned = _prune(data.dense, data.calib, target, args)
    name = f"sparsity={target}" if not isinstance(target, str) else target
    ppl = perplexity(pruned, data.windows, progress=False).perplexity
    C.log(f"{args.method} {name}: perplexity {ppl:.3f} ({ppl / dense_ppl:.3f}x dense)")
    for dname in args.dtype_list:
        masked = copy.deepcopy(pruned).to(DTYPES[dname])
        dense = copy.deepcopy(data.dense).to(DTYPES[dname])
        torch.set_num_threads(args.thread_list[0])
        sparse, report = to_sparse(masked, prompt[:, :1], layers=args.layers, threads=args.thread_list[0],
                                   repeat=args.convert_repeat, min_speedup=1.0)
        n_conv = sum(e["converted"] for e in report)
        label = f"{args.model_label}/{_format_label(sparse)}/{name}/{dname}"
        C.log(f"{label}: {n_conv} of {len(report)} Linear layers converted")
        C.emit(BENCH, label, "perplexity", ppl, "ppl", peer="dense", peer_value=dense_ppl, **common)
        _timed_case(label, _dense_forms(dense), sparse, masked, prompt, data.windows[:1, :16], args,
                    common, {"dtype": dname, "converted": n_conv})
        del sparse, dense, masked


def _break_even(args) -> None:
    torch.set_num_threads(1)
    for out_f, in_f in SHAPES:
        res = measure_break_even(out_f, in_f, 1, sparsities=args.be_sparsities, threads=1, repeat=args.repeat_layer,
                                 seed=args.seed, stream=True)
        best = {r["sparsity"]: (r["kernel"], round(r["speedup"], 3)) for r in res["rows"]}
        C.log(f"break-even {out_f}x{in_f}: {res['break_even']:.3f} ({res['bound']}); {best}")
        C.emit(BENCH, f"layer/{out_f}x{in_f}/fp32", "break_even", res["break_even"], "frac", bound=res["bound"],
               batch=1, threads=1, n=args.repeat_layer, seed=args.seed, copies=res["stream"],
               kernels={str(k): v[0] for k, v in best.items()}, speedups={str(k): v[1] for k, v in best.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny setting for the tests (two blocks, few tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--sparsities", default="0.5,0.7,2:4", help="targets: fractions and/or N:M (default: %(default)s)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: %(default)s)")
    ap.add_argument("--threads", default="1,2", help="thread counts timed (the first also converts)")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024, help="evaluation tokens for perplexity")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="generate calls per model (medians)")
    ap.add_argument("--convert-repeat", type=int, default=5, help="timings per kernel when converting")
    ap.add_argument("--repeat-layer", type=int, default=9, help="timings per kernel for break-even")
    ap.add_argument("--no-break-even", action="store_true")
    args = ap.parse_args()
    args.thread_list = [int(t) for t in args.threads.split(",")]
    args.dtype_list = [d for d in args.dtypes.split(",")]
    bad = [d for d in args.dtype_list if d not in DTYPES]
    if bad or any(t < 1 for t in args.thread_list):
        ap.error(f"--dtypes takes {', '.join(DTYPES)}; --threads positive ints")
    targets = [s if ":" in s else float(s) for s in args.sparsities.split(",")]
    args.model_label, args.include, args.layers, args.be_sparsities = "smollm2-135m", None, None, \
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    if args.quick:  # two blocks pruned and converted, magnitude, few tokens, one thread
        args.model_label, args.method, args.include = "smollm2-135m-quick", "magnitude", "model.layers.[01].*"
        args.layers = "model.layers.[01].*"
        args.calib_windows, args.calib_len, args.tokens, args.context = 2, 32, 64, 64
        args.prompt, args.new_tokens, args.repeat, args.convert_repeat = 8, 4, 1, 1
        args.repeat_layer, args.be_sparsities, args.thread_list = 1, (0.5, 0.9), [1]
        targets = ["2:4"]
    data = austen(args.calib_windows, args.calib_len, args.tokens, args.context, args.seed)
    prompt = data.eval_ids[-args.prompt:].view(1, -1)  # away from the perplexity windows
    torch.set_num_threads(args.thread_list[0])
    dense_ppl = perplexity(data.dense, data.windows, progress=False).perplexity
    common = dict(seed=args.seed, method=args.method, threads=args.thread_list[0])
    for threads in args.thread_list:
        bw = memory_bandwidth(threads, nbytes=64 * 2**20 if args.quick else 1 << 30)
        C.log(f"memory bandwidth, {threads} thread(s): {bw:.1f} GB/s")
        C.emit(BENCH, "machine", "memory_bandwidth", bw, "GB/s", threads=threads, seed=args.seed)
    if not args.no_break_even:
        _break_even(args)
    for target in targets:
        _run_target(data, target, dense_ppl, prompt, args, common)


if __name__ == "__main__":
    main()
