"""Knowledge distillation: train a pruned student to reproduce a frozen dense teacher.

Pruning without training loses quality; the cheapest recovery needs no labels:
make the student's outputs match the teacher's on unlabeled inputs. The
student may be masked (its masks stay fixed: the loop is :func:`prunekit.train.loop`'s,
so pruned weights stay exactly zero, and checkpoints, resume, callbacks and
progress bars work the same) or compacted by :mod:`prunekit.surgery`.

    from prunekit.train.distill import distill
    from prunekit.zoo.textdata import st_forward
    distill(slim_st, dense_st, batches, loss="cosine", output="sentence_embedding",
            forward_fn=st_forward, max_steps=500, lr=1e-4)          # sentence embeddings
    distill(student, teacher, loader, loss="kl", temperature=2.0)   # classifier logits

The teacher runs in eval mode under ``torch.no_grad`` and is never updated; the
student's train/eval flags are restored afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from prunekit._util import eval_mode  # every submodule to eval, each one's own flag restored after
from prunekit.errors import PrunekitError, UnknownNameError
from prunekit.registry import Registry
from prunekit.train.config import TrainConfig, train_config
from prunekit.train.loop import finetune
from prunekit.train.state import Callback, TrainState

LOSSES = Registry("distillation loss")

LossSpec = Union[str, Mapping[str, float], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
OutputSpec = Union[None, str, int, Callable[[Any], torch.Tensor]]


@LOSSES.register("mse")
def mse_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error, element by element (hidden states, regression outputs)."""
    return F.mse_loss(student, teacher)


@LOSSES.register("cosine")
def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """1 - cosine similarity along the last dim, averaged (embeddings: direction matters, not norm)."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8).mean()


@LOSSES.register("kl")
def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes at ``temperature`` over the last dim (logits), times T².

    The T² keeps the gradient's size independent of T (Hinton et al., 2015).
    """
    t = temperature
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / t, dim=-1)
    q = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / t, dim=-1)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * (t * t)


def make_loss(loss: LossSpec, temperature: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss`` as a function of (student output, teacher output).

    A registered name (``LOSSES.names()``), a mapping name -> weight for a weighted
    sum (e.g. ``{"cosine": 1.0, "mse": 0.1}``), or a callable used as is.
    """
    if not temperature > 0:
        raise PrunekitError(f"temperature={temperature!r} must be > 0")
    if callable(loss) and not isinstance(loss, str):
        return loss
    weights = {loss: 1.0} if isinstance(loss, str) else dict(loss) if isinstance(loss, Mapping) else None
    if not weights:
        raise PrunekitError(f"loss must be a name ({', '.join(LOSSES.names())}), a non-empty mapping "
                         f"name -> weight, or a callable; got {loss!r}")
    fns = {name: LOSSES.get(name) for name in weights}  # KeyError listing the known names
    if temperature != 1.0 and "kl" not in fns:
        raise PrunekitError(f"temperature={temperature} only applies to the 'kl' loss, not {sorted(fns)}")

    def combined(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return sum(w * fns[n](student, teacher, temperature=temperature) for n, w in weights.items())

    return combined


def pick_output(out: Any, output: OutputSpec, who: str = "model") -> torch.Tensor:
    """The tensor to match inside a model's output: the output itself, a key/attribute, an index or fn(out)."""
    if callable(output):
        value = output(out)
    elif output is None:
        value = out
    elif isinstance(output, int) and not isinstance(output, bool):
        value = out[output]
    elif isinstance(output, str):
        if isinstance(out, Mapping) and output in out:  # HF ModelOutput is a Mapping too
            value = out[output]
        elif not isinstance(out, Mapping) and hasattr(out, output):
            value = getattr(out, output)
        else:
            keys = list(out.keys()) if isinstance(out, Mapping) else []
            raise UnknownNameError(f"the {who}'s output ({type(out).__name__}) has no {output!r}"
                           + (f"; its keys: {', '.join(map(str, keys))}" if keys else ""))
    else:
        raise PrunekitError(f"output must be None, a key, an index or a callable, got {output!r}")
    if not isinstance(value, torch.Tensor):
        keys = f" (keys: {', '.join(map(str, out.keys()))})" if isinstance(out, Mapping) else ""
        raise PrunekitError(f"the {who}'s output {type(value).__name__} is not a tensor: pass output=<key, index "
                         f"or callable> to pick the tensor to match{keys}")
    return value


def _call(model: nn.Module, x: Any) -> Any:
    """The default ``forward_fn``: ``model(x)``, as :func:`prunekit.train.finetune` calls it."""
    return model(x)


def _to(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or a dict / tuple / list of them) on ``device``; anything else as is."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        moved = {k: _to(v, device) for k, v in x.items()}
        if all(moved[k] is v for k, v in x.items()):
            return x  # already there: keep the user's type (a tokenizer's BatchEncoding...)
        return type(x)(moved) if isinstance(x, dict) else moved
    if isinstance(x, (tuple, list)):
        items = [_to(v, device) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # namedtuples take fields
    return x


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _capture(modules: Sequence[nn.Module], names: Sequence[str], into: Dict[str, torch.Tensor]):
    """Record the output (its first tensor, for blocks returning tuples) of each named module."""
    def hook(name):
        def fn(_module, _inputs, out):
            into[name] = out[0] if isinstance(out, (tuple, list)) else out
        return fn

    handles = [m.register_forward_hook(hook(n)) for m, n in zip(modules, names)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hidden_pairs(hidden) -> list:
    if hidden is None:
        return []
    if isinstance(hidden, str):
        return [(hidden, hidden)]
    if isinstance(hidden, Mapping):
        return list(hidden.items())
    return [(h, h) for h in hidden]


def _modules(model: nn.Module, names: Sequence[str], who: str) -> list:
    found = dict(model.named_modules())
    missing = [n for n in names if n not in found]
    if missing:
        raise UnknownNameError(f"no module named {', '.join(map(repr, missing))} in the {who} "
                       "(hidden= takes names from model.named_modules())")
    return [found[n] for n in names]


class Distiller(nn.Module):
    """The student with a frozen teacher beside it; ``forward(x)`` returns the distillation loss.

    Only the student is a submodule: the teacher's weights are not trained,
    not checkpointed, and not switched to train mode by ``Distiller.train()``.
    ``hidden``: module names (the same in both) or a mapping student name ->
    teacher name whose outputs are matched too, with ``hidden_loss`` times
    ``hidden_weight``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, loss: LossSpec = "mse",
                 output: OutputSpec = None, forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
                 temperature: float = 1.0, hidden=None, hidden_loss: LossSpec = "mse",
                 hidden_weight: float = 1.0):
        super().__init__()
        _check_separate(student, teacher)
        self.loss_fn = make_loss(loss, temperature)
        self.hidden_fn = make_loss(hidden_loss)
        self.output, self.forward_fn = output, forward_fn or _call
        pairs = _hidden_pairs(hidden)
        self.hidden_weight = float(hidden_weight)
        self._s_names, self._t_names = [s for s, _ in pairs], [t for _, t in pairs]
        self._s_mods = tuple(_modules(student, self._s_names, "student"))
        self._t_mods = tuple(_modules(teacher, self._t_names, "teacher"))
        self.student = student
        self._teacher = (teacher,)  # in a tuple: not a submodule (see the class docstring)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, x: Any) -> torch.Tensor:
        s_hid: Dict[str, torch.Tensor] = {}
        t_hid: Dict[str, torch.Tensor] = {}
        with torch.no_grad(), eval_mode(self.teacher), _capture(self._t_mods, self._t_names, t_hid):
            t_out = self.forward_fn(self.teacher, _to(x, _device(self.teacher)))
            target = pick_output(t_out, self.output, "teacher")
        with _capture(self._s_mods, self._s_names, s_hid):
            s_out = self.forward_fn(self.student, _to(x, _device(self.student)))
        loss = _match(self.loss_fn, pick_output(s_out, self.output, "student"), target, "output")
        for sn, tn in zip(self._s_names, self._t_names):
            if sn not in s_hid or tn not in t_hid:
                name = sn if sn not in s_hid else tn
                raise RuntimeError(f"hidden module {name!r} did not run in the forward pass")
            loss = loss + self.hidden_weight * _match(self.hidden_fn, s_hid[sn], t_hid[tn], f"hidden {sn!r}")
        return loss


def _match(fn, student: torch.Tensor, teacher: torch.Tensor, what: str) -> torch.Tensor:
    if student.shape != teacher.shape:
        raise PrunekitError(f"{what}: the student gives shape {tuple(student.shape)}, the teacher "
                         f"{tuple(teacher.shape)}; distillation compares them element by element "
                         "(pick comparable tensors with output= / hidden=)")
    return fn(student, teacher.detach().to(student.device, student.dtype))


def _check_separate(student: nn.Module, teacher: nn.Module) -> None:
    """Training must not move the teacher: refuse a student that shares any parameter with it."""
    if student is teacher:
        raise PrunekitError("student and teacher are the same module: distil into a (pruned) copy")
    theirs = {id(p) for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if id(p) in theirs]
    if shared:
        raise PrunekitError(f"student and teacher share parameter(s) {', '.join(shared[:5])}: training would "
                         "change the teacher; distil into a copy (copy.deepcopy) of the model")


class LossLog(Callback):
    """Appends ``{"step", "loss"}`` to ``state.history`` every ``every`` steps and at the last one."""

    def __init__(self, every: int = 50):
        if every < 1:
            raise PrunekitError(f"every={every} must be >= 1")
        self.every = every

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.every == 0 or state.step == state.total_steps:
            state.history.append({"step": state.step, "loss": state.loss})


class _Inputs:
    """Bare input batches as the (x, None) pairs that finetune's loop unpacks."""

    def __init__(self, batches: Iterable):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return ((x, None) for x in self.batches)

    def __getattr__(self, name: str):  # set_epoch, sampler, generator: what finetune's resume looks for
        if name == "batches":
            raise AttributeError(name)
        return getattr(self.batches, name)


def _as_pairs(batches: Iterable, pairs: Optional[bool]) -> Iterable:
    """``batches`` as finetune's (x, y) items; with ``pairs=None`` the first item decides."""
    try:
        len(batches)
    except TypeError:
        raise PrunekitError(f"batches must have a length (a list, a DataLoader, a TensorLoader...), "
                         f"got a {type(batches).__name__}") from None
    if pairs is None:
        first = next(iter(batches), None)
        if first is None:
            raise PrunekitError("batches is empty")
        pairs = isinstance(first, (tuple, list)) and len(first) == 2
    return batches if pairs else _Inputs(batches)


DISTILL_DEFAULTS = {"lr": 1e-4, "optimizer": "adamw"}  # a student near its teacher needs small, adaptive steps


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable, *, loss: LossSpec = "mse",
            output: OutputSpec = None, forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
            temperature: float = 1.0, hidden=None, hidden_loss: LossSpec = "mse", hidden_weight: float = 1.0,
            pairs: Optional[bool] = None, seed: Optional[int] = 0, log_every: int = 50,
            callbacks: Sequence[Callback] = (), desc: str = "distill", config: Optional[TrainConfig] = None,
            **train_kwargs: Any) -> TrainState:
    """Train ``student`` (in place) to match ``teacher`` on ``batches``; returns finetune's final state.

    ``loss``: a name in :data:`LOSSES` ("mse", "cosine", "kl" with ``temperature``),
    a mapping name -> weight, or a callable (student tensor, teacher tensor) -> loss.
    ``output`` picks the tensor to match in each model's output (a key such as
    "sentence_embedding" or "logits", an index, or a callable); ``forward_fn(model, x)``
    calls a model (default ``model(x)``; :func:`prunekit.zoo.textdata.st_forward` for a
    SentenceTransformer, ``lambda m, x: m(**x)`` for a Hugging Face model on tokenizer output).
    ``batches``: items are inputs ``x``, or ``(x, y)`` pairs whose ``y`` is ignored
    (``pairs=None``: a 2-tuple is taken as a pair; say ``pairs=False`` if your inputs are 2-tuples).

    Masks of a masked student stay fixed. Training (``config`` and/or keywords: ``epochs``, ``max_steps``,
    ``lr``, ``optimizer``, ``lr_schedule``, ``checkpoint``, ...) is :func:`prunekit.finetune`'s, with
    distillation's defaults ``lr=1e-4, optimizer="adamw"`` when no config is given. With ``seed`` the torch RNG (dropout, shuffling) is
    seeded inside the call and the caller's RNG is left as it was. ``state.history``
    holds the loss every ``log_every`` steps; ``state.model`` is the :class:`Distiller`.
    """
    cfg = train_config(config, train_kwargs, **({} if config is not None else DISTILL_DEFAULTS))
    wrapper = Distiller(student, teacher, loss=loss, output=output, forward_fn=forward_fn,
                        temperature=temperature, hidden=hidden, hidden_loss=hidden_loss,
                        hidden_weight=hidden_weight)
    callbacks = [LossLog(log_every), *callbacks]
    device = _device(student)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loader = _as_pairs(batches, pairs)  # may draw a shuffled batch: before seeding
        if seed is not None:
            torch.manual_seed(seed)
        return finetune(wrapper, loader, cfg, loss_fn=_returned_loss, callbacks=callbacks, desc=desc)


def _returned_loss(loss: torch.Tensor, _target: Any) -> torch.Tensor:
    """finetune's ``loss_fn``: the Distiller's forward already computed the loss."""
    return loss


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, batches: Iterable, *, output: OutputSpec = None,
              forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
              pairs: Optional[bool] = None) -> Dict[str, float]:
    """Mean cosine of the student's to the teacher's outputs (last dim) and their MSE, both in eval mode."""
    forward_fn = forward_fn or _call
    cos, mse, n = 0.0, 0.0, 0
    with eval_mode(student), eval_mode(teacher):
        for x, _ in _as_pairs(batches, pairs):
            s = pick_output(forward_fn(student, _to(x, _device(student))), output, "student")
            t = pick_output(forward_fn(teacher, _to(x, _device(teacher))), output, "teacher").to(s.device, s.dtype)
            if s.shape != t.shape:
                raise PrunekitError(f"the student gives shape {tuple(s.shape)}, the teacher {tuple(t.shape)}")
            rows = s.reshape(-1, s.shape[-1]).shape[0]
            cos += float(F.cosine_similarity(s, t, dim=-1).sum())
            mse += float(F.mse_loss(s, t, reduction="sum")) / s.shape[-1]
            n += rows
    return {"cosine": cos / n, "mse": mse / n}
