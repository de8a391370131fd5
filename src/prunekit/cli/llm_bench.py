"""``prunekit llm bench``: a pruned decoder on packed sparse kernels against its dense form, in one table.

The model's Linear layers are converted by :func:`prunekit.deploy.sparse.to_sparse` at batch 1 (each timed
against its best dense form, converted only where faster), then greedy decoding (whole model, and the
decoder layers alone) is timed at batch 1, dense and sparse alternating, next to the weight bytes each
reads per token, the achieved GB/s and the perplexity of both (equal within rounding: the same weights).
Importing this module does not import torch (``prunekit --help`` imports the CLI).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

from prunekit.cli._common import add_threads
from prunekit.errors import PrunekitError

DTYPES = ("fp32", "bf16")
FORMATS = ("bitmask", "nm24", "csr8")  # prunekit.deploy.packed.FORMATS (a test keeps them equal)


def add_parser(sub, model_help: str, add_text_options) -> None:
    b = sub.add_parser("bench", help="decoding tokens/s of a pruned model on sparse kernels vs dense, bytes per "
                       "token and perplexity in one table")
    b.add_argument("model", help=model_help + ", or a folder written by 'prunekit llm prune'")
    b.add_argument("--dtype", default="fp32", choices=DTYPES, help="run in this dtype (default: %(default)s)")
    b.add_argument("--formats", default=",".join(FORMATS), help="packed formats that may be chosen "
                   "(default: %(default)s; '' for CSR kernels only)")
    b.add_argument("--layers", help="only these Linear layers (glob of module names, e.g. 'model.layers.*.mlp.*')")
    b.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default: %(default)s)")
    b.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per timing (default: %(default)s)")
    b.add_argument("--repeat", type=int, default=3, help="timings per model, medians (default: %(default)s)")
    b.add_argument("--convert-repeat", type=int, default=5, help="timings per kernel when choosing "
                   "(default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="accepted for symmetry: nothing here is random")
    b.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_text_options(b, calib=False)
    add_threads(b)
    b.set_defaults(threads=0)


def check(args) -> None:
    for flag in ("prompt_tokens", "new_tokens", "repeat", "convert_repeat"):
        if getattr(args, flag) < 1:
            raise PrunekitError(f"--{flag.replace('_', '-')} must be >= 1")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise PrunekitError(f"--formats: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(FORMATS)}")
    args.format_list = formats


def _speeds(models: Dict[str, Any], prompt, args) -> Dict[str, Dict[str, float]]:
    """``{model: {"model": tokens/s of generate, "decoder": tokens/s of the decoder layers}}``, alternating."""
    from prunekit.analysis.decode import alternating_speeds, decoder_speed
    from prunekit.analysis.perplexity import generation_speed

    whole = alternating_speeds(models, prompt, args.new_tokens, args.repeat, generation_speed)
    decoder = alternating_speeds(models, prompt, args.new_tokens, args.repeat, decoder_speed)
    return {k: {"model": whole[k], "decoder": decoder[k]} for k in models}


def _row(name: str, model, speeds: Dict[str, float], ppl: float) -> Dict[str, Any]:
    from prunekit.analysis.decode import weight_bytes_per_token

    nbytes, dec_bytes = weight_bytes_per_token(model), weight_bytes_per_token(model, decoder_only=True)
    return {"kernels": name, "tokens_per_s": speeds["model"], "decoder_tokens_per_s": speeds["decoder"],
            "bytes_per_token": nbytes, "decoder_bytes_per_token": dec_bytes,
            "gbps": nbytes * speeds["model"] / 1e9, "perplexity": ppl}


def _table(rows: List[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    head = f"{'kernels':<26}{'tokens/s':>10}{'decoder tok/s':>15}{'MB/token':>10}{'GB/s':>8}{'perplexity':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kernels']:<26}{r['tokens_per_s']:>10.2f}{r['decoder_tokens_per_s']:>15.2f}"
                     f"{r['bytes_per_token'] / 1e6:>10.1f}{r['gbps']:>8.2f}{r['perplexity']:>12.3f}")
    lines.append(f"speedup {summary['speedup']:.2f}x (decoder layers {summary['decoder_speedup']:.2f}x); roofline "
                 f"{summary['roofline']:.2f}x (decoder {summary['decoder_roofline']:.2f}x); "
                 f"{summary['converted']} of {summary['layers']} Linear layers converted")
    return "\n".join(lines)


def run(args) -> int:
    import copy

    import torch

    from prunekit.analysis.perplexity import perplexity
    from prunekit.cli.llm_runs import eval_windows
    from prunekit.deploy.packed import PackedLinear
    from prunekit.deploy.sparse import to_sparse
    from prunekit.zoo.llm import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    model = model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).eval()
    windows = eval_windows(args, tokenizer)
    prompt = windows.reshape(-1)[-args.prompt_tokens:].view(1, -1)
    sparse, report = to_sparse(model, prompt[:, :1], layers=args.layers, repeat=args.convert_repeat,
                               min_speedup=1.0, formats=args.format_list)
    fmts = sorted({m.fmt for m in sparse.modules() if isinstance(m, PackedLinear)})
    kernels = sorted({e["kernel"] for e in report if e["converted"]})
    speeds = _speeds({"dense": model, "sparse": sparse}, prompt, args)
    rows = [_row("dense", model, speeds["dense"], perplexity(model, windows).perplexity),
            _row("sparse (" + ("+".join(kernels) or "none") + ")", sparse, speeds["sparse"],
                 perplexity(copy.deepcopy(sparse), windows).perplexity)]
    summary = {"speedup": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
               "decoder_speedup": rows[1]["decoder_tokens_per_s"] / rows[0]["decoder_tokens_per_s"],
               "roofline": rows[0]["bytes_per_token"] / rows[1]["bytes_per_token"],
               "decoder_roofline": rows[0]["decoder_bytes_per_token"] / rows[1]["decoder_bytes_per_token"],
               "converted": sum(e["converted"] for e in report), "layers": len(report), "formats": fmts,
               "dtype": args.dtype, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    print(json.dumps({"rows": rows, **summary}, indent=1) if args.json else _table(rows, summary))
    return 0
