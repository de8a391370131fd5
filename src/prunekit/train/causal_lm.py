"""Recovery training of a pruned decoder LLM on plain text, with its masks held fixed.

Two losses, one loop (:func:`prunekit.train.loop.finetune`, so masks stay exact zeros, and checkpoints,
resume and progress bars work as everywhere else):

- ``kl``: distillation. The pruned model learns the *dense* model's next-token distribution (KL of the
  softmaxes, :func:`prunekit.train.distill.distill`). Needs no labels and cannot drift from the original
  model's behaviour; the structured (compacted) student works too: only the logits are compared.
- ``ce``: next-token cross-entropy on the text. What a fair control gets: a dense model given the
  same training also improves on in-domain text, so recovery is quoted beside it.

The input embeddings (tied to the lm_head in most small LLMs: a third of SmolLM2's weights) are frozen by
default: pruning leaves them dense, and Adam's state for them would cost memory without recovering
anything the blocks lost.

    from prunekit.train.causal_lm import RecoveryOptions, recover
    recover(pruned, calib_windows, teacher=dense, options=RecoveryOptions(loss="kl"), max_steps=64, lr=1e-4)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from prunekit._util import check_choice
from prunekit.errors import PrunekitError
from prunekit.train.config import TrainConfig, train_config
from prunekit.train.distill import LossLog, distill
from prunekit.train.loop import finetune
from prunekit.train.state import TrainState
from prunekit.zoo.data import TensorLoader

RECOVERY_LOSSES = ("kl", "ce")
RECOVERY_DEFAULTS = {"lr": 1e-4, "optimizer": "adamw", "lr_schedule": "cosine"}


@dataclass(frozen=True)
class RecoveryOptions:
    """What recovery optimises: ``loss`` (kl: distil from the dense teacher; ce: next-token fine-tuning),
    the KL ``temperature``, windows per step, whether the input embeddings train, and the shuffle seed."""

    loss: str = "kl"
    temperature: float = 1.0
    batch_size: int = 4
    train_embeddings: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.loss, RECOVERY_LOSSES, "loss")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PrunekitError(f"batch_size={self.batch_size!r} must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise PrunekitError(f"temperature={self.temperature!r} must be > 0")
        if self.temperature != 1.0 and self.loss != "kl":
            raise PrunekitError(f"temperature={self.temperature} only applies to loss='kl'")


def lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of a causal LM on ``input_ids``, without building a KV cache (training never reuses it)."""
    return model(input_ids=input_ids, use_cache=False).logits


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens <= t (what perplexity exponentiates)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


class _LogitsOf(nn.Module):
    """``model`` seen by :func:`finetune` as ``input_ids -> logits`` (the loop calls ``net(x)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.model, input_ids)


def check_windows(windows: Any) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise PrunekitError("recovery text must be token ids, a LongTensor (windows, tokens), e.g. "
                            "prunekit.zoo.llm.calibration_windows(...)")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise PrunekitError(f"recovery needs at least one window of >= 2 tokens, got {tuple(windows.shape)}")
    return windows


@contextlib.contextmanager
def frozen_embeddings(model: nn.Module, freeze: bool) -> Iterator[None]:
    """Input embeddings (and an lm_head tied to them) out of training for the block; flags restored after."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if freeze and callable(get) else None
    params = [] if emb is None else [p for p in emb.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def recover(model: nn.Module, windows: torch.Tensor, *, teacher: Optional[nn.Module] = None,
            options: Optional[RecoveryOptions] = None, config: Optional[TrainConfig] = None,
            log_every: int = 10, **train_kwargs: Any) -> TrainState:
    """Train ``model`` (in place, masks fixed) on token ``windows`` ``(n, tokens)``; returns the final state.

    ``options.loss="kl"`` needs the dense ``teacher`` (a separate module, never updated); ``"ce"`` refuses
    one (it would be ignored). Training options (``max_steps``, ``epochs``, ``lr``, ``checkpoint``...) are
    :func:`prunekit.finetune`'s, defaulting to AdamW at lr 1e-4 with a cosine schedule.
    ``state.history`` holds the loss every ``log_every`` steps and at the last.
    """
    options = options or RecoveryOptions()
    windows = check_windows(windows)
    cfg = train_config(config, train_kwargs, **({} if config is not None else RECOVERY_DEFAULTS))
    if options.loss == "kl" and teacher is None:
        raise PrunekitError("loss='kl' distils from the dense model: pass teacher=<the model before pruning>")
    if options.loss == "ce" and teacher is not None:
        raise PrunekitError("loss='ce' trains on the text alone: drop teacher= (or use loss='kl')")
    loader = TensorLoader(windows, windows, options.batch_size, shuffle=True, seed=options.seed)
    with frozen_embeddings(model, not options.train_embeddings):
        if options.loss == "kl":
            return distill(model, teacher, loader, loss="kl", temperature=float(options.temperature),
                           forward_fn=lm_logits, pairs=True, seed=options.seed, config=cfg, log_every=log_every,
                           desc="recover (distill)")
        wrapper = _LogitsOf(model)
        with torch.random.fork_rng():
            torch.manual_seed(options.seed)
            return finetune(wrapper, loader, cfg, loss_fn=next_token_loss, callbacks=[LossLog(log_every)],
                            desc="recover (fine-tune)")
