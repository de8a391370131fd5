"""Language-model evaluation: perplexity over fixed token windows, and greedy decoding speed.

Perplexity is measured the way pruning papers report it, so numbers are comparable and every run states
what it counted: the evaluation text is cut into **fixed, non-overlapping windows** of ``context`` tokens
(:func:`token_windows`), each window is scored on its own (no carried-over context), and the perplexity is
``exp`` of the mean negative log-likelihood over all predicted tokens (``context - 1`` per window: the first
token of a window has nothing to be predicted from). Sums run in float64, so the order of windows and the
batch size do not change the result beyond float32 rounding of the logits.

Any Hugging Face causal LM works (``model(input_ids=...).logits``), and so does any module whose output is
logits shaped ``(batch, tokens, vocab)`` or has a ``.logits`` attribute.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from prunekit._util import eval_mode, median, progress_enabled, spread, time_calls
from prunekit.errors import InvalidTypeError, PrunekitError


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` measured: ``perplexity = exp(nll)``, ``nll`` the mean per predicted token,
    ``tokens`` the number of predicted tokens (``windows * (context - 1)``)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    context: int

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _as_ids(ids: Any, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise InvalidTypeError(f"{what} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InvalidTypeError(f"{what} must hold integer token ids, got {ids.dtype}")
    return ids.long()


def token_windows(ids: torch.Tensor, context: int, n_tokens: Optional[int] = None) -> torch.Tensor:
    """Fixed, non-overlapping windows ``(windows, context)`` over the first ``n_tokens`` tokens of ``ids`` (1-D).

    ``n_tokens=None`` uses every token; a count that is not a multiple of ``context`` is cut down to one (the
    tail that does not fill a window is dropped). Asking for more tokens than ``ids`` holds, or for fewer than
    one window, is an error naming the counts.
    """
    ids = _as_ids(ids, "ids")
    if ids.dim() != 1:
        raise PrunekitError(f"token_windows needs a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise PrunekitError(f"context must be an int >= 2 (a window predicts context - 1 tokens), got {context!r}")
    available = ids.numel()
    if n_tokens is None:
        n_tokens = available
    elif isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise PrunekitError(f"n_tokens must be a positive int or None, got {n_tokens!r}")
    elif n_tokens > available:
        raise PrunekitError(f"asked for {n_tokens} tokens but the text has only {available}: use more text or "
                            f"a smaller n_tokens")
    windows = n_tokens // context
    if windows < 1:
        raise PrunekitError(f"{n_tokens} tokens do not fill one window of context {context}: need at least "
                            f"{context} tokens (the text has {available})")
    return ids[: windows * context].reshape(windows, context)


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise PrunekitError("the model must return logits shaped (batch, tokens, vocab) (or an output with "
                            f".logits); got {type(logits).__name__}"
                            + (f" of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else ""))
    return logits


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _forward_kwargs(model: nn.Module) -> Dict[str, Any]:
    # a Hugging Face model would build a key/value cache no one reads; a plain module may not take the flag
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def perplexity(model: nn.Module, ids_or_windows: torch.Tensor, *, context: int = 512, n_tokens: Optional[int] = None,
               batch_size: int = 1, progress: Optional[bool] = None) -> PerplexityResult:
    """Perplexity of a causal LM: ``exp`` of the mean next-token NLL over fixed, non-overlapping windows.

    ``ids_or_windows``: a 1-D tensor of token ids, cut by :func:`token_windows` (``context``, ``n_tokens``), or
    a 2-D ``(windows, context)`` tensor of windows used as given (``context`` is then their width). Runs in
    eval mode (each submodule's flag restored after) under ``torch.no_grad``, ``batch_size`` windows per
    forward, with a progress bar (``progress=False`` or ``PRUNEKIT_PROGRESS=0`` turn it off).
    """
    ids = _as_ids(ids_or_windows, "ids_or_windows")
    if ids.dim() == 1:
        windows = token_windows(ids, context, n_tokens)
    elif ids.dim() == 2:
        if n_tokens is not None:
            raise PrunekitError("n_tokens applies to a 1-D token stream; with 2-D windows, pass the windows to use")
        if ids.shape[0] < 1 or ids.shape[1] < 2:
            raise PrunekitError(f"windows must be (windows >= 1, context >= 2), got shape {tuple(ids.shape)}")
        windows = ids
    else:
        raise PrunekitError(f"ids_or_windows must be 1-D token ids or 2-D windows, got shape {tuple(ids.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunekitError(f"batch_size must be a positive int, got {batch_size!r}")
    from tqdm.auto import tqdm

    n_windows, width = int(windows.shape[0]), int(windows.shape[1])
    device, kwargs = _device(model), _forward_kwargs(model)
    total = torch.zeros((), dtype=torch.float64)
    with eval_mode(model), torch.no_grad(), tqdm(total=n_windows, desc="perplexity", unit="window", leave=False,
                                                 disable=not progress_enabled(progress)) as bar:
        for start in range(0, n_windows, batch_size):
            batch = windows[start: start + batch_size].to(device)
            logits = _logits(model(input_ids=batch, **kwargs))
            if tuple(logits.shape[:2]) != tuple(batch.shape):
                raise PrunekitError(f"the model returned logits of shape {tuple(logits.shape)} for input ids of "
                                    f"shape {tuple(batch.shape)}: expected (batch, tokens, vocab)")
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                  reduction="none")
            total += nll.double().sum().cpu()
            bar.update(batch.shape[0])
    tokens = n_windows * (width - 1)
    mean = float(total) / tokens
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = math.inf
    return PerplexityResult(perplexity=ppl, nll=mean, tokens=tokens, windows=n_windows, context=width)


def generation_speed(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 128, *, repeat: int = 3,
                     warmup: int = 1) -> Dict[str, Any]:
    """Greedy decoding speed at batch 1: ``{"tokens_per_s", "spread", "new_tokens", "repeat"}``.

    Each sample is one ``model.generate`` call that decodes exactly ``new_tokens`` tokens after ``prompt_ids``
    (greedy, key/value cache on, end-of-sequence suppressed until then); ``tokens_per_s`` is the median of
    ``new_tokens / seconds`` over ``repeat`` samples after ``warmup`` untimed calls (prefill included),
    ``spread`` their interquartile range over the median (:func:`prunekit._util.spread`).
    """
    from transformers import GenerationConfig

    ids = _as_ids(prompt_ids, "prompt_ids")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() < 1:
        raise PrunekitError(f"prompt_ids must be one prompt (1-D, or shaped (1, tokens)), got shape {tuple(ids.shape)}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise PrunekitError(f"new_tokens must be a positive int, got {new_tokens!r}")
    if not callable(getattr(model, "generate", None)):
        raise InvalidTypeError(f"{type(model).__name__} has no generate(): pass a Hugging Face causal LM")
    device = _device(model)
    ids = ids.unsqueeze(0).to(device)
    own = getattr(model, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    pad = getattr(own, "pad_token_id", None)
    if pad is None:
        pad = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos is not None else 0
    # plain greedy decoding: transformers fills unset fields from the model's own generation config, which may
    # ask for sampling (temperature, top_p) or penalties, so those are set to their neutral values here
    config = GenerationConfig(do_sample=False, num_beams=1, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                              use_cache=True, pad_token_id=pad, eos_token_id=eos, temperature=1.0, top_p=1.0,
                              top_k=50, typical_p=1.0, repetition_penalty=1.0)
    mask = torch.ones_like(ids)
    produced = []

    def run() -> None:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        produced.append(int(out.shape[-1]) - int(ids.shape[-1]))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with eval_mode(model), torch.no_grad():
        ms = time_calls({"generate": run}, repeat=repeat, warmup=warmup, sample_ms=None, sync=sync)["generate"]
    if any(n != new_tokens for n in produced):
        raise PrunekitError(f"generate produced {sorted(set(produced))} new tokens instead of {new_tokens}: "
                            "the model stopped early, so tokens/s would be wrong")
    rates = [new_tokens / (t / 1000.0) for t in ms]
    return {"tokens_per_s": median(rates), "spread": spread(rates), "new_tokens": new_tokens, "repeat": repeat}
