"""``prunekit llm``: prune a decoder LLM (one-shot block by block, or structurally), recover, measure.

``prunekit llm prune --model smollm2 --method wanda --sparsity 0.5 --out runs/llm`` writes a folder that
plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads (dense weights with exact zeros) plus
prunekit's masks, and prints perplexity before and after on held-out text; ``--structured layers --amount 7``
removes whole units instead (a smaller model), ``--recover kl`` trains it afterwards with masks fixed.
``prunekit llm sweep`` runs several methods and sparsities into one ``llm.json``; ``prunekit report`` draws
it (and the ``llm.json`` of a prune folder). ``prunekit llm eval DIR`` measures perplexity (and, with
``--speed``, greedy-decoding tokens/s) of a saved or built-in model. ``prunekit llm bench DIR`` runs a pruned
model on packed sparse kernels where they measure faster and prints tokens/s against its dense form, bytes
per token and perplexity in one table (:mod:`prunekit.cli.llm_bench`). The runs: :mod:`prunekit.cli.llm_runs`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from prunekit.cli._common import add_threads
from prunekit.errors import PrunekitError

HELP = "prune a decoder LLM (Llama/Qwen2/Mistral/GPT-2 family) one-shot and measure perplexity"

METHODS = ("magnitude", "wanda", "sparsegpt")      # checked against the live registries in a test
ALLOCATIONS = ("uniform", "owl", "magnitude", "sensitivity")
STRUCTURED_UNITS = ("ffn", "kv_groups", "q_heads", "layers")
RECOVERY_LOSSES = ("kl", "ce")
MODEL_HELP = ("'smollm2' (SmolLM2-135M-Instruct, fetched by the install step), a Hugging Face model folder "
              "(config.json + safetensors), or a .gguf file")
TEXT_HELP = "'austen:<book>' (prideprejudice, sensesensibility, emma, ...) or a .txt / .jsonl ('text' field) file"


def _add_text_options(p, *, calib: bool) -> None:
    p.add_argument("--text", default="austen:sensesensibility", help=f"evaluation text: {TEXT_HELP} "
                   "(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (default: %(default)s)")
    p.add_argument("--context", type=int, default=512, help="evaluation window, non-overlapping "
                   "(default: %(default)s)")
    if calib:
        p.add_argument("--calib", default="austen:prideprejudice", help=f"calibration text: {TEXT_HELP} "
                       "(default: %(default)s)")
        p.add_argument("--calib-windows", type=int, default=64, help="calibration windows (default: %(default)s)")
        p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window "
                       "(default: %(default)s)")


def _add_recovery(p) -> None:
    p.add_argument("--recover", choices=RECOVERY_LOSSES, help="train after pruning, masks fixed: kl (distil from "
                   "the dense model) or ce (next-token fine-tuning) on windows of the calibration text")
    p.add_argument("--recover-steps", type=int, default=32, help="recovery steps (default: %(default)s)")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="recovery learning rate, AdamW (default: %(default)s)")
    p.add_argument("--recover-windows", type=int, default=128, help="recovery windows of --calib-len tokens "
                   "(default: %(default)s)")
    p.add_argument("--recover-batch", type=int, default=4, help="windows per recovery step (default: %(default)s)")


def _add_prune(sub) -> None:
    pr = sub.add_parser("prune", help="prune one-shot or structurally, save a transformers folder, report perplexity")
    pr.add_argument("--model", default="smollm2", help=f"{MODEL_HELP} (default: %(default)s)")
    pr.add_argument("--method", default="wanda", choices=METHODS, help="layer solver (default: %(default)s)")
    pr.add_argument("--sparsity", type=float, help="fraction of each layer's weights to prune (e.g. 0.5)")
    pr.add_argument("--nm", help="N:M pattern instead of --sparsity, e.g. 2:4")
    pr.add_argument("--refit", action="store_true", help="once the mask is chosen, refit the kept weights exactly "
                    "(least squares on the calibration inputs, aiming at the dense model's outputs)")
    pr.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                    help="per-block sparsities: uniform, owl (outlier-weighted), magnitude (one global |w| ranking), "
                    "sensitivity (least measured block error) (default: %(default)s)")
    pr.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's spread: target +- lambda "
                    "(default: %(default)s)")
    pr.add_argument("--owl-m", type=float, default=5.0, help="OWL's outlier threshold: M x the mean score "
                    "(default: %(default)s)")
    pr.add_argument("--prune-head", action="store_true", help="also prune the output head (lm_head) after the "
                    "blocks, at the same sparsity; tied input embeddings lose the same entries (default: kept dense)")
    pr.add_argument("--no-dense-targets", action="store_true", help="sparsegpt / --refit: reproduce each layer's "
                    "outputs on the pruned model's inputs (the paper's rule) instead of the dense model's outputs")
    pr.add_argument("--structured", choices=STRUCTURED_UNITS, help="remove whole units instead (a smaller model): "
                    "ffn (SwiGLU neurons), kv_groups (a KV head with its query heads), q_heads (query heads within "
                    "their groups), layers (lowest block influence); with --amount")
    pr.add_argument("--amount", type=float, help="with --structured: a fraction of the units, or a count (per "
                    "layer for width units, of layers for 'layers')")
    pr.add_argument("--out", default="runs/llm", help="output folder (default: %(default)s)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: %(default)s)")
    pr.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    _add_recovery(pr)
    _add_text_options(pr, calib=True)
    add_threads(pr)
    pr.set_defaults(threads=0)  # an LLM wants every core (the small-model default is 1)


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="prune with several methods and sparsities, one llm.json for "
                        "'prunekit report' (perplexity-vs-sparsity curves, per-block sparsity, block influence)")
    sw.add_argument("--model", default="smollm2", help=f"{MODEL_HELP} (default: %(default)s)")
    sw.add_argument("--methods", default="magnitude,wanda", help=f"comma-separated, of {', '.join(METHODS)} "
                    "(default: %(default)s)")
    sw.add_argument("--sparsities", default="0.5,0.6,0.7", help="comma-separated fractions (default: %(default)s)")
    sw.add_argument("--nm", default="", help="comma-separated N:M patterns run too, e.g. 2:4 (default: none)")
    sw.add_argument("--allocations", default="uniform", help=f"comma-separated, of {', '.join(ALLOCATIONS)} "
                    "(default: %(default)s)")
    sw.add_argument("--refit", action="store_true", help="refit the kept weights exactly after each mask")
    sw.add_argument("--no-influence", action="store_true", help="skip the block-influence pass")
    sw.add_argument("--out", default="runs/llm-sweep", help="output folder for llm.json (default: %(default)s)")
    sw.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: %(default)s)")
    _add_text_options(sw, calib=True)
    add_threads(sw)
    sw.set_defaults(threads=0)


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="llm_command", metavar="ACTION")
    sub.required = True
    _add_prune(sub)
    _add_sweep(sub)
    ev = sub.add_parser("eval", help="perplexity (and decoding speed) of a model")
    ev.add_argument("model", help=MODEL_HELP + ", or a folder written by 'prunekit llm prune'")
    ev.add_argument("--speed", action="store_true", help="also time greedy decoding at batch 1 (tokens/s)")
    ev.add_argument("--new-tokens", type=int, default=128, help="tokens generated by --speed (default: %(default)s)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    _add_text_options(ev, calib=False)
    add_threads(ev)
    ev.set_defaults(threads=0)
    from prunekit.cli import llm_bench
    llm_bench.add_parser(sub, MODEL_HELP, _add_text_options)


def _split(value: str, allowed, flag: str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise PrunekitError(f"{flag}: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(allowed)}")
    return items


def _check_texts(args) -> None:
    for flag in ("calib_windows", "calib_len", "tokens", "context"):
        if getattr(args, flag, 1) < 1:
            raise PrunekitError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.tokens < args.context or args.context < 2:
        raise PrunekitError(f"--tokens {args.tokens} must be at least one --context window ({args.context}, >= 2)")


def _check_recovery(args) -> None:
    for flag in ("recover_steps", "recover_windows", "recover_batch"):
        if getattr(args, flag) < 1:
            raise PrunekitError(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.recover_lr > 0:
        raise PrunekitError(f"--recover-lr {args.recover_lr} must be > 0")
    if args.recover and args.no_eval:
        raise PrunekitError("--recover is judged by perplexity: drop --no-eval")


def _check_prune(args) -> None:
    from prunekit.select.nm import parse_nm

    if args.structured:
        given = [f for f in ("sparsity", "nm") if getattr(args, f) is not None]
        if given or args.refit or args.allocation != "uniform" or args.prune_head:
            raise PrunekitError("--structured removes whole units: it takes --amount, not --sparsity / --nm / "
                                "--refit / --allocation / --prune-head")
        if args.amount is None or not args.amount > 0:
            raise PrunekitError("--structured needs --amount > 0 (a fraction of the units, or a count)")
        return
    if args.amount is not None:
        raise PrunekitError("--amount is for --structured; unstructured pruning takes --sparsity or --nm")
    if args.no_dense_targets and args.method != "sparsegpt" and not args.refit:
        raise PrunekitError("--no-dense-targets is for --method sparsegpt or --refit (what rewrites weights)")
    if (args.sparsity is None) == (args.nm is None):
        raise PrunekitError("give exactly one of --sparsity (e.g. 0.5) or --nm (e.g. 2:4)")
    if args.nm is not None:
        parse_nm(args.nm)
        if args.allocation != "uniform":
            raise PrunekitError("--nm is the same pattern in every layer: --allocation must be uniform")
    elif not 0.0 <= args.sparsity < 1.0:
        raise PrunekitError(f"--sparsity {args.sparsity} must be a fraction in [0, 1)")


def _check_sweep(args) -> None:
    from prunekit.select.nm import parse_nm

    args.methods = _split(args.methods, METHODS, "--methods")
    args.allocations = _split(args.allocations, ALLOCATIONS, "--allocations")
    args.nm = _split(args.nm, None, "--nm")
    for nm in args.nm:
        parse_nm(nm)
    try:
        args.sparsities = [float(v) for v in _split(args.sparsities, None, "--sparsities")]
    except ValueError:
        raise PrunekitError(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}") from None
    bad = [s for s in args.sparsities if not 0.0 < s < 1.0]
    if bad or not (args.methods and (args.sparsities or args.nm)):
        raise PrunekitError("--sparsities must be fractions in (0, 1), with at least one method and one "
                            f"sparsity or --nm pattern (got {bad or args.sparsities})")


def _check(args) -> None:
    """Every flag is checked before the model is read."""
    _check_texts(args)
    if args.llm_command == "prune":
        _check_prune(args)
        _check_recovery(args)
    elif args.llm_command == "sweep":
        _check_sweep(args)
    elif args.llm_command == "bench":
        from prunekit.cli import llm_bench
        llm_bench.check(args)


def _prune(args) -> int:
    import copy

    from prunekit.cli import llm_runs as R
    from prunekit.deploy.hf import save_pretrained

    setup = R.load_setup(args)
    recovery = R.Recovery(args.recover, args.recover_steps, args.recover_lr, args.recover_windows,
                          args.recover_batch) if args.recover else None
    if args.structured:
        model, plan, run = R.prune_structured(setup, unit=args.structured, amount=_amount(args.amount))
        if setup.windows is not None:
            R.decode_speeds(setup, model, run)
    else:
        model = copy.deepcopy(setup.model) if recovery and recovery.loss == "kl" else setup.model
        plan, run = R.prune_unstructured(setup, model, method=args.method, target=args.nm or args.sparsity,
                                         allocation=args.allocation, refit=args.refit, owl_m=args.owl_m,
                                         owl_lambda=args.owl_lambda, include_classifier=args.prune_head,
                                         dense_targets=False if args.no_dense_targets else None)
    if recovery is not None:
        R.recover_run(setup, model, recovery, run)
    doc = R.llm_doc(args, setup, [run], _influence(plan))
    out = save_pretrained(model, args.out, setup.tokenizer, plan=plan, metadata={"llm_prune": run},
                          files={R.LLM_FILE: json.dumps(doc, indent=1)})
    print(json.dumps(_summary(run, setup), indent=1))
    print(f"saved to {out} (transformers.AutoModelForCausalLM.from_pretrained loads it; "
          "prunekit.deploy.hf.load_pretrained restores the masks too; 'prunekit report "
          f"{out}' draws it)", file=sys.stderr)
    return 0


def _amount(value: float):
    """``--amount`` as the count it names when it is a whole number >= 1, else a fraction."""
    return int(value) if value >= 1 and float(value).is_integer() else value


def _influence(plan):
    influence = plan.meta.get("influence")
    return list(influence) if influence else None


def _summary(run, setup) -> dict:
    keep = ("kind", "method", "unit", "allocation", "target", "amount", "sparsity", "removed", "params",
            "perplexity", "ppl_ratio", "time_s", "tokens_per_s", "dense_tokens_per_s", "recovered")
    return {"dense_perplexity": setup.dense_ppl, **{k: run[k] for k in keep if k in run}}


def _sweep(args) -> int:
    import copy

    from prunekit._util import atomic_write_text
    from prunekit.cli import llm_runs as R
    from prunekit.surgery import block_influence

    setup = R.load_setup(args)
    influence = None if args.no_influence else block_influence(setup.model, setup.calib)
    targets = [*args.sparsities, *args.nm]
    runs = []
    for method in args.methods:
        for target in targets:
            for allocation in (["uniform"] if isinstance(target, str) else args.allocations):
                model = copy.deepcopy(setup.model)
                _, run = R.prune_unstructured(setup, model, method=method, target=target, allocation=allocation,
                                              refit=args.refit)
                del model
                runs.append(run)
                print(f"{method} {allocation} {target}: perplexity {run['perplexity']:.3f} "
                      f"({run['ppl_ratio']:.3f}x dense)", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / R.LLM_FILE, json.dumps(R.llm_doc(args, setup, runs, influence), indent=1))
    print(json.dumps([_summary(r, setup) for r in runs], indent=1))
    print(f"wrote {out / R.LLM_FILE}; 'prunekit report {out}' draws it", file=sys.stderr)
    return 0


def _eval(args) -> int:
    from prunekit.analysis.perplexity import generation_speed, perplexity
    from prunekit.cli.llm_runs import eval_windows
    from prunekit.zoo.llm import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    res = perplexity(model, eval_windows(args, tokenizer)).to_dict()
    if args.speed:
        prompt = tokenizer("It is a truth universally acknowledged,", return_tensors="pt").input_ids
        res["generation"] = generation_speed(model, prompt, args.new_tokens)
    print(json.dumps(res, indent=1) if args.json else
          "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return 0


def run(args) -> int:
    _check(args)
    from prunekit.cli import llm_bench
    return {"prune": _prune, "sweep": _sweep, "eval": _eval, "bench": llm_bench.run}[args.llm_command](args)
