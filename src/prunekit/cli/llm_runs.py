"""The runs behind ``prunekit llm prune`` and ``prunekit llm sweep``, and their record ``llm.json``.

A run prunes a copy of the dense model (one-shot unstructured or N:M through the sequential pruner, or
structured through :mod:`prunekit.surgery.decoder`), optionally recovers it (:mod:`prunekit.train.causal_lm`),
and measures perplexity on the same evaluation windows as the dense model. Each run becomes one entry of
``runs`` in ``llm.json`` (format ``prunekit.llm/1``), which ``prunekit report`` draws.
Importing this module does not import torch (``prunekit --help`` imports the CLI).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

LLM_FORMAT = "prunekit.llm/1"
LLM_FILE = "llm.json"


@dataclass(frozen=True)
class Recovery:
    """Recovery after pruning: the loss (kl / ce), steps, learning rate, windows and windows per step."""

    loss: str
    steps: int = 32
    lr: float = 1e-4
    windows: int = 128
    batch: int = 4


@dataclass
class Setup:
    """What every run of one command shares: the dense model, its tokenizer, the token windows and the
    dense baseline measured on them."""

    model: Any
    tokenizer: Any
    calib: Any                 # (windows, len) calibration token ids
    train_text: Any            # 1-D token ids recovery windows are drawn from
    windows: Any               # (n, context) evaluation windows, or None (no evaluation)
    dense_ppl: Optional[float]
    seed: int


def load_setup(args) -> Setup:
    """Load the model and tokenize the texts (everything was validated before)."""
    from prunekit.analysis.perplexity import perplexity
    from prunekit.zoo.llm import calibration_windows, load_causal_lm, read_text

    model, tokenizer = load_causal_lm(args.model)
    text = tokenizer(read_text(args.calib), return_tensors="pt").input_ids[0]
    calib = calibration_windows(text, args.calib_windows, args.calib_len, seed=args.seed)
    windows = None if getattr(args, "no_eval", False) else eval_windows(args, tokenizer)
    dense_ppl = None if windows is None else perplexity(model, windows).perplexity
    return Setup(model, tokenizer, calib, text, windows, dense_ppl, args.seed)


def eval_windows(args, tokenizer):
    """The evaluation text (``--text``) as ``--tokens`` tokens in non-overlapping windows of ``--context``."""
    from prunekit.analysis.perplexity import token_windows
    from prunekit.zoo.llm import read_text

    ids = tokenizer(read_text(args.text), return_tensors="pt").input_ids[0]
    return token_windows(ids, args.context, args.tokens)


def measure(setup: Setup, model) -> Dict[str, Optional[float]]:
    from prunekit.analysis.perplexity import perplexity

    if setup.windows is None:
        return {"perplexity": None, "ppl_ratio": None}
    ppl = perplexity(model, setup.windows).perplexity
    return {"perplexity": ppl, "ppl_ratio": ppl / setup.dense_ppl}


def unique_params(model) -> int:
    return sum(p.numel() for p in model.parameters())   # parameters() lists a tied tensor once


def prune_unstructured(setup: Setup, model, *, method: str, target, allocation: str = "uniform",
                       refit: bool = False, **options: Any):
    """Prune ``model`` in place (``target``: a sparsity, or an ``"N:M"`` string); (plan, run record)."""
    import prunekit
    from prunekit.apply import masking

    nm = isinstance(target, str)
    pattern = dict(pattern="nm", nm=target) if nm else dict(allocation=allocation)
    start = time.perf_counter()
    plan = prunekit.prune(model, None if nm else target, criterion="sequential", method=method, data=setup.calib,
                          seed=setup.seed, refit=refit, **pattern, **options)
    seconds = time.perf_counter() - start
    layer_sparsity = plan.meta.get("layer_sparsity")
    run = {"kind": "unstructured", "method": method, "refit": refit, "allocation": allocation, "target": target,
           "sparsity": masking.global_sparsity(model, list(plan.tensors)), "time_s": seconds,
           "layer_sparsity": dict(layer_sparsity) if layer_sparsity else None, "recovered": None}
    run.update(measure(setup, model))
    return plan, run


def prune_structured(setup: Setup, *, unit: str, amount, criterion: Optional[str] = None, stats=None):
    """A compacted copy of the dense model without ``amount`` of ``unit``; (slim model, plan, run record)."""
    from prunekit.surgery import compact_decoder, plan_decoder

    start = time.perf_counter()
    plan = plan_decoder(setup.model, amount, unit=unit, criterion=criterion, data=setup.calib, stats=stats)
    slim = compact_decoder(setup.model, plan)
    run = {"kind": "structured", "unit": unit, "amount": amount, "criterion": plan.meta.get("criterion"),
           "removed": describe_removed(plan), "params": unique_params(slim),
           "dense_params": unique_params(setup.model), "time_s": time.perf_counter() - start,
           "tokens_per_s": None, "dense_tokens_per_s": None, "recovered": None}
    if unit == "layers":
        run["removed_layers"] = list(plan.meta["pruned"])
    run.update(measure(setup, slim))
    return slim, plan, run


def describe_removed(plan) -> str:
    meta = plan.meta
    if meta.get("unit") == "layers":
        return "layers " + ", ".join(map(str, meta["pruned"]))
    before, after = meta.get("before") or {}, meta.get("after") or {}
    return ", ".join(f"{k} {before[k]} -> {after[k]}" for k in after if before.get(k) != after[k])


def recover_run(setup: Setup, model, recovery: Recovery, run: Dict[str, Any]) -> None:
    """Train ``model`` in place (masks fixed) and record the result in ``run["recovered"]``."""
    from prunekit.train.causal_lm import RecoveryOptions, recover
    from prunekit.zoo.llm import calibration_windows

    train = calibration_windows(setup.train_text, recovery.windows, setup.calib.shape[1], seed=setup.seed + 1)
    start = time.perf_counter()
    state = recover(model, train, teacher=setup.model if recovery.loss == "kl" else None,
                    options=RecoveryOptions(loss=recovery.loss, batch_size=recovery.batch, seed=setup.seed),
                    max_steps=recovery.steps, epochs=max(1, -(-recovery.steps * recovery.batch // recovery.windows)),
                    lr=recovery.lr)
    run["recovered"] = {"loss": recovery.loss, "steps": state.step, "lr": recovery.lr,
                        "time_s": time.perf_counter() - start, **measure(setup, model)}


def decode_speeds(setup: Setup, slim, run: Dict[str, Any], new_tokens: int = 64, rounds: int = 3) -> None:
    """Greedy tokens/s of the dense and the slim model at batch 1, alternating, medians (into ``run``)."""
    from prunekit.analysis.decode import alternating_speeds
    from prunekit.analysis.perplexity import generation_speed

    prompt = setup.tokenizer("It is a truth universally acknowledged,", return_tensors="pt").input_ids
    rates = alternating_speeds({"dense": setup.model, "slim": slim}, prompt, new_tokens, rounds, generation_speed)
    run["dense_tokens_per_s"], run["tokens_per_s"] = rates["dense"], rates["slim"]


def llm_doc(args, setup: Setup, runs: List[Dict[str, Any]], influence: Optional[List[float]] = None) -> Dict[str, Any]:
    """The ``llm.json`` record of a command's runs."""
    import torch

    dense = {"perplexity": setup.dense_ppl, "params": unique_params(setup.model)}
    speeds = [r["dense_tokens_per_s"] for r in runs if r.get("dense_tokens_per_s")]
    if speeds:
        dense["tokens_per_s"] = speeds[0]
    return {"format": LLM_FORMAT, "model": str(args.model), "dense": dense,
            "evaluation": None if setup.windows is None else {"text": args.text, "tokens": int(setup.windows.numel()),
                                                               "context": args.context},
            "calibration": {"text": args.calib, "windows": args.calib_windows, "len": args.calib_len,
                            "seed": args.seed},
            "threads": torch.get_num_threads(), "block_influence": influence, "runs": runs}
