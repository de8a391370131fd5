"""Batch-1 decoding and its physical limit: the bytes a model reads per generated token, the memory
bandwidth this machine delivers, and the decoder stack's own tokens/s.

Why: at batch 1 every weight is read once per token, so decoding is bound by memory bandwidth; a sparse
format is faster in proportion to the bytes it saves (the *roofline*: dense bytes / sparse bytes), and
achieved GB/s (bytes per token x tokens/s) next to the measured bandwidth shows how close a kernel is
to that limit. A tied-embedding model's output head reads the whole embedding matrix every token and
stays dense, which bounds the whole model's gain: :func:`decoder_speed` times the decoder layers alone.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping

import torch
from torch import nn

from prunekit._util import eval_mode, median, spread, time_calls
from prunekit.errors import InvalidTypeError, PrunekitError

__all__ = ["weight_bytes_per_token", "memory_bandwidth", "decoder_speed", "alternating_speeds"]


def _own_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def weight_bytes_per_token(model: nn.Module, *, decoder_only: bool = False) -> int:
    """Bytes of weights one decoding step reads: every module's own parameters and buffers (a packed or
    CSR layer's buffers are its format), except that an embedding table gives one row per token. A tied
    output head reads the whole table. ``decoder_only``: without the output head."""
    head = _head(model)
    total = 0
    for module in model.modules():
        if decoder_only and module is head:
            continue
        if isinstance(module, nn.Embedding):
            total += module.embedding_dim * module.weight.element_size()
        else:
            total += _own_bytes(module)
    return total


def memory_bandwidth(threads: int = 1, nbytes: int = 512 * 2**20, repeat: int = 7) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): the median time of summing a ``nbytes`` float32 buffer, far
    larger than any CPU cache, on ``threads`` torch threads."""
    if threads < 1 or nbytes < 2**20 or repeat < 1:
        raise PrunekitError(f"need threads >= 1, nbytes >= 1 MiB, repeat >= 1; got {threads}, {nbytes}, {repeat}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        buf = torch.ones(nbytes // 4)
        ms = time_calls({"sum": lambda: buf.sum()}, repeat=repeat, warmup=1, sample_ms=None)["sum"]
    finally:
        torch.set_num_threads(old)
    return buf.numel() * 4 / (median(ms) / 1000.0) / 1e9


def decoder_speed(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 128, *, repeat: int = 3,
                  warmup: int = 1) -> Dict[str, Any]:
    """Tokens/s of the decoder layers alone at batch 1, the way decoding runs them: the prompt in one
    pass, then ``new_tokens`` single-token steps on the key/value cache (the tokens fed are the prompt's,
    cycled: their values do not change the work). No output head, no sampling. Returns
    ``{"tokens_per_s", "spread", "new_tokens", "repeat"}`` (medians, as :func:`generation_speed`)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if not isinstance(decoder, nn.Module):
        raise InvalidTypeError(f"{type(model).__name__} has no get_decoder(): pass a Hugging Face causal LM")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise PrunekitError(f"new_tokens must be a positive int, got {new_tokens!r}")
    ids = prompt_ids.reshape(1, -1)
    steps = ids[0, torch.arange(new_tokens) % ids.shape[1]].view(-1, 1, 1)

    def run() -> None:
        past = decoder(input_ids=ids, use_cache=True).past_key_values
        for tok in steps:
            past = decoder(input_ids=tok, past_key_values=past, use_cache=True).past_key_values

    with eval_mode(model), torch.no_grad():
        ms = time_calls({"decode": run}, repeat=repeat, warmup=warmup, sample_ms=None)["decode"]
    rates = [new_tokens / (t / 1000.0) for t in ms]
    return {"tokens_per_s": median(rates), "spread": spread(rates), "new_tokens": new_tokens, "repeat": repeat}


def alternating_speeds(models: Mapping[str, nn.Module], prompt_ids: torch.Tensor, new_tokens: int, rounds: int,
                       speed: Callable[..., Dict[str, Any]]) -> Dict[str, float]:
    """Median tokens/s of each model by ``speed`` (:func:`generation_speed` or :func:`decoder_speed`), one call
    per model per round, the models in turn (after one warm-up call each in the first round), so that machine
    load hits them all alike and cancels in their ratios."""
    rates: Dict[str, List[float]] = {k: [] for k in models}
    for r in range(rounds):
        for name, model in models.items():
            rates[name].append(speed(model, prompt_ids, new_tokens, repeat=1, warmup=int(r == 0))["tokens_per_s"])
    return {k: median(v) for k, v in rates.items()}
