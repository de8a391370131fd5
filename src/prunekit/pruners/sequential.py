"""Sequential one-shot pruning of a stack of blocks: the decoder layers of an LLM, the layers of an encoder.

Running the whole model once per pruned layer (what :func:`prunekit.pruners.sparsegpt.sparsegpt_prune`
does for any module) costs a model forward per layer. A transformer is a stack of identical blocks, so
here the inputs of block 0 are recorded once (hidden states and whatever else the model passes its
blocks: attention mask, rotary position embeddings), and then for each block k:

1. its linear layers are grouped in forward order (q/k/v read the same tensor, then o; gate/up, then
   down); group by group (``true_sequential``) the layer statistics a solver needs are collected
   with the groups before it already pruned, and each layer is pruned by its solver
   (:mod:`prunekit.pruners.solvers`);
2. the pruned block is run on its inputs, and its outputs become block k+1's inputs.

So block k sees the errors of the blocks before it and later layers correct for earlier ones, as in the
papers' reference code. Memory: the calibration activations of one block boundary (tokens x hidden) plus
one block's statistics. Per-block sparsities can be allocated from outlier statistics (OWL: a dense pass
first) or from a global magnitude ranking. On any error every weight changed so far is put back.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import check_choice, progress_enabled
from prunekit.apply import masking
from prunekit.criteria.stats import preserved_state
from prunekit.errors import PrunekitError
from prunekit.plan import Plan
from prunekit.pruners.base import Pruner, register_pruner
from prunekit.pruners.reconstruct import refit_rows
from prunekit.pruners.solvers import SOLVERS, Target, get_solver
from prunekit.pruners.sparsegpt import (
    StopForward,
    as_matrix,
    from_matrix,
    is_linear,
    keep_plan,
    layer_features,
    record_calls,
)
from prunekit.select.allocation import (
    OWL_LAMBDA,
    OWL_M,
    least_cost_allocation,
    magnitude_allocation,
    owl_allocation,
)
from prunekit.select.nm import parse_nm
from prunekit.select.ranking import PruningShortfall
from prunekit.spec import Calibration, PruneSpec
from prunekit.targets import owner_of, select_targets

SEQUENTIAL_ALLOCATIONS = ("uniform", "owl", "magnitude", "sensitivity")
SENSITIVITY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)   # sparsities each block is probed at
SENSITIVITY_BATCHES = 2   # calibration batches the probes run on (a block forward per probe and batch)


# ----------------------------------------------------------------------------- finding the blocks

def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's stack of blocks: the ModuleList of same-typed modules holding the most parameters
    (``model.layers`` of Llama/Qwen2/Mistral, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT)."""
    best, best_size = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if size > best_size:
                best, best_size = (name, m), size
    if best is None:
        raise PrunekitError(f"{type(model).__name__} has no stack of blocks (an nn.ModuleList of same-typed "
                            "layers, such as model.layers of a decoder): sequential pruning needs one; use "
                            "prunekit.prune(model, amount, criterion=...) for other models")
    return best


def block_targets(model: nn.Module, prefix: str, blocks: nn.ModuleList, spec: PruneSpec) -> List[Dict[str, nn.Module]]:
    """Per block, {weight name: linear module} of the selected layers (include/exclude globs apply)."""
    kinds = {type(m) for m in blocks.modules() if is_linear(m)}
    allowed = set(select_targets(model, types=list(kinds) if spec.types is None else spec.types,
                                 include=spec.include, exclude=spec.exclude, include_classifier=True)) if kinds else set()
    out = []
    for i, block in enumerate(blocks):
        found = {}
        for sub, m in block.named_modules():
            name = f"{prefix}.{i}.{sub}.weight" if prefix else f"{i}.{sub}.weight"
            if sub and is_linear(m) and name in allowed:
                found[name] = m
        out.append(found)
    if not any(out):
        raise PrunekitError(f"no linear layer of {prefix or 'the blocks'} is selected (include={spec.include!r}, "
                            f"exclude={spec.exclude!r})")
    return out


# ----------------------------------------------------------------------------- block inputs

@dataclass
class BlockInputs:
    """What the model passes its first block, per calibration batch: hidden states (replaced by each
    block's outputs as the walk goes on) and the other arguments (masks, position embeddings)."""

    hidden: List[torch.Tensor] = field(default_factory=list)
    args: List[Tuple[Any, ...]] = field(default_factory=list)
    kwargs: List[Dict[str, Any]] = field(default_factory=list)

    def run(self, block: nn.Module, i: int) -> torch.Tensor:
        out = block(self.hidden[i], *self.args[i], **self.kwargs[i])
        return out[0] if isinstance(out, (tuple, list)) else out

    def advance(self, block: nn.Module) -> None:
        """Replace the hidden states by the block's outputs (the next block's inputs)."""
        for i in range(len(self.hidden)):
            self.hidden[i] = self.run(block, i)


def calibration_batches(data: Any, batch_size: int) -> List[Any]:
    """Token ids ``(n, seq)`` split into batches, or a list of batches (tensors or dicts of model kwargs)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunekitError(f"batch_size={batch_size!r} must be a positive int")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32) or data.shape[0] == 0:
            raise PrunekitError(f"calibration tokens must be a non-empty (windows, seq) integer tensor, got "
                                f"{tuple(data.shape)} {data.dtype}")
        return list(data.long().split(batch_size))
    batches = list(data) if isinstance(data, Iterable) else []
    if not batches:
        raise PrunekitError("calibration data must be token ids (windows, seq) or a non-empty list of batches")
    return batches


def run_until_stopped(model: nn.Module, batch: Any) -> None:
    """The model's forward on one calibration batch, until a hook raises StopForward (or to the end)."""
    try:
        if isinstance(batch, Mapping):
            model(**batch, use_cache=False)
        else:
            model(input_ids=batch, use_cache=False)
    except StopForward:
        pass


def capture_inputs(model: nn.Module, first_block: nn.Module, batches: List[Any]) -> BlockInputs:
    """Run the model up to its first block on every batch, recording that block's inputs."""
    rec = BlockInputs()

    def hook(mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rec.hidden.append(hidden.detach())
        rec.args.append(tuple(args[1:]))
        rec.kwargs.append(kwargs)
        raise StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            run_until_stopped(model, b)
    finally:
        handle.remove()
    if len(rec.hidden) != len(batches):
        raise PrunekitError("the model's forward never reached its first block")
    return rec


# ----------------------------------------------------------------------------- statistics of one block

def _layer_inputs(block: nn.Module, inputs: BlockInputs, i: int, modules: Mapping[str, nn.Module],
                  stop_early: bool) -> Dict[str, torch.Tensor]:
    """{name: the module's input rows (rows, in features)} for batch ``i``; with ``stop_early`` the block's
    forward stops once the last module has been reached."""
    seen: Dict[str, torch.Tensor] = {}
    last = list(modules)[-1]

    def make_hook(name):
        def hook(mod, args):
            seen[name] = layer_features(mod, args[0].detach())[0].float()
            if stop_early and name == last:
                raise StopForward
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        inputs.run(block, i)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _moment(x: torch.Tensor, kind: str) -> torch.Tensor:
    """One batch's share of a statistic, rows ``x`` (rows, in): ``norms`` sums x², ``hessian`` sums x^T x."""
    return x.pow(2).sum(0).double() if kind == "norms" else (x.t() @ x).double()


def _collect(block: nn.Module, inputs: BlockInputs, modules: Dict[str, nn.Module], kind: str,
             stop_early: bool, dense: Optional[Tuple[nn.Module, BlockInputs]] = None) -> Dict[str, Any]:
    """{name: statistic} of each module's input over all batches: ``norms`` (mean square per input
    feature) or ``hessian`` (``X^T X / rows``, float64). With ``dense`` (the block before pruning and the
    dense model's hidden states) a hessian comes with ``X^T X_dense / rows``: see :func:`_dense_target`."""
    acc: Dict[str, List[Any]] = {n: [0, 0, 0] for n in modules}   # sum, cross sum, rows
    dense_modules = None if dense is None else {n: dense[0].get_submodule(_relative(block, m))
                                                for n, m in modules.items()}
    for i in range(len(inputs.hidden)):
        xs = _layer_inputs(block, inputs, i, modules, stop_early)
        xd = None if dense is None else _layer_inputs(dense[0], dense[1], i, dense_modules, stop_early)
        for n, x in xs.items():
            a = acc[n]
            a[0] = a[0] + _moment(x, kind)
            if xd is not None:
                a[1] = a[1] + (x.t() @ xd[n]).double()
            a[2] += x.shape[0]
    return {n: s / max(r, 1) if dense is None else (s / max(r, 1), c / max(r, 1)) for n, (s, c, r) in acc.items()}


def _relative(block: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in block.named_modules() if m is module)


def _dense_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float) -> torch.Tensor:
    """The weights whose outputs on the *pruned* model's inputs best match the dense layer's outputs on the
    dense model's inputs: ``argmin ||X W'^T - X_d W^T||`` = ``W C^T H^-1``, written as ``W`` plus a correction
    (exactly ``W`` while both streams agree; the damping acts on the correction only)."""
    H64, W64 = H.double(), W.double()
    Hd = H64 + torch.eye(H64.shape[0], dtype=H64.dtype) * damp * float(torch.diagonal(H64).mean())
    return (W64 + torch.linalg.solve(Hd, (C.double() - H64) @ W64.t()).t()).to(W.dtype)


def _groups(block: nn.Module, inputs: BlockInputs, targets: Dict[str, nn.Module]) -> List[List[str]]:
    """The block's target layers in forward order, grouped where they read the same tensor."""
    groups, count = record_calls(block, targets, 0, lambda blk, i: inputs.run(blk, i))
    twice = [n for n, c in count.items() if c > 1]
    if twice:
        raise PrunekitError(f"{', '.join(twice)} run more than once per block forward: sequential pruning "
                            "needs each linear called once (exclude them)")
    return groups


# ----------------------------------------------------------------------------- the walk

@dataclass(frozen=True)
class SequentialOptions:
    """How the sequential pruner walks: the solver, batching, and OWL's outlier threshold and spread."""

    method: str = "wanda"
    batch_size: int = 8
    true_sequential: bool = True
    blocksize: int = 128
    damp: float = 0.01
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    dense_targets: Optional[bool] = None   # None: on when the kept weights are rewritten (sparsegpt, refit)
    refit: bool = False                    # exact least-squares kept weights once the mask is chosen
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        check_choice(self.method, SOLVERS.names(), "method")
        if not isinstance(self.refit, bool):
            raise PrunekitError(f"refit={self.refit!r} must be True or False")
        if self.dense_targets is None:  # frozen: set through object.__setattr__, as dataclasses do
            object.__setattr__(self, "dense_targets", self.stat_kind == "hessian")
        if self.dense_targets and self.stat_kind != "hessian":
            raise PrunekitError(f"dense_targets rewrites the kept weights: it needs refit=True or a solver that "
                                f"reconstructs ({', '.join(n for n in SOLVERS.names() if get_solver(n).stats == 'hessian')}"
                                f"), not {self.method!r}")
        for what, v in (("owl_m", self.owl_m), ("owl_lambda", self.owl_lambda)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise PrunekitError(f"{what}={v!r} must be a number > 0")

    @property
    def stat_kind(self) -> str:
        """The layer statistic the walk collects: the solver's, or the Hessian a refit needs."""
        return "hessian" if self.refit else get_solver(self.method).stats


@dataclass
class Walk:
    """One sequential pruning run: the model, its blocks and their target layers, the options, the Plan
    being filled, the original weights of every layer changed so far (put back on error) and, with
    ``dense_targets``, the dense model's hidden states at the current block."""

    model: nn.Module
    blocks: nn.ModuleList
    targets: List[Dict[str, nn.Module]]
    options: SequentialOptions
    plan: Plan
    backup: Optional[Dict[str, torch.Tensor]] = field(default_factory=dict)
    dense: Optional[BlockInputs] = None    # the dense model's hidden states (dense_targets)


def _solver_stat(solver_kind: str, stat: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The statistic a solver asked for, from the one collected (a refit collects the Hessian, whose
    diagonal is Wanda's mean square per input)."""
    if solver_kind == "none" or stat is None:
        return None
    return torch.diagonal(stat) if solver_kind == "norms" and stat.dim() == 2 else stat


def _prune_module(walk: Walk, name: str, module: nn.Module, stat, target: Target) -> None:
    solver = get_solver(walk.options.method)
    w = module.weight
    current = masking.get_mask(*owner_of(walk.model, name))
    W = as_matrix(module, w.detach())[0]
    if isinstance(stat, tuple):  # (H, X^T X_dense): aim at the dense model's outputs
        stat, cross = stat
        W = _dense_target(W, stat, cross, target.damp)
    keep = None if current is None else as_matrix(module, current)[0]
    new, mask = solver.solve(name, W, _solver_stat(solver.stats, stat), target, keep)
    if walk.options.refit:
        new = refit_rows(W, stat, mask, target.damp)
    if walk.backup is not None:  # None: the caller keeps the originals (offload: the source shards)
        walk.backup[name] = w.detach().clone()
    with torch.no_grad():
        if new is not None:
            w.copy_(from_matrix(module, new.unsqueeze(0), tuple(w.shape)))
        w.masked_fill_(~from_matrix(module, mask.unsqueeze(0), tuple(w.shape)), 0.0)
    walk.plan.tensors[name] = keep_plan(name, from_matrix(module, mask.unsqueeze(0), tuple(w.shape)), target.nm)


def prune_block(walk: Walk, k: int, inputs: Optional[BlockInputs], targets_of: Mapping[str, Target]) -> None:
    """Prune the target layers of block ``k`` given its (pruned model's) inputs; fills ``walk.plan`` and
    ``walk.backup``, advances ``walk.dense`` past the block. The caller advances ``inputs``."""
    block, targets = walk.blocks[k], walk.targets[k]
    kind = walk.options.stat_kind
    if kind == "none":
        for name, m in targets.items():
            _prune_module(walk, name, m, None, targets_of[name])
        return
    groups = _groups(block, inputs, targets)
    passes = [[g] for g in groups] if walk.options.true_sequential else [groups]
    dense = None if walk.dense is None else (copy.deepcopy(block), walk.dense)  # the block before pruning
    for i, pass_groups in enumerate(passes):
        leaders = {g[0]: targets[g[0]] for g in pass_groups}   # a group shares one input: one statistic
        stats = _collect(block, inputs, leaders, kind, stop_early=i < len(passes) - 1, dense=dense)
        for g in pass_groups:
            for name in g:
                _prune_module(walk, name, targets[name], stats[g[0]], targets_of[name])
        del stats
    if dense is not None:
        walk.dense.advance(dense[0])


def owl_block_scores(walk: Walk, k: int, inputs: BlockInputs) -> torch.Tensor:
    """Block k's Wanda scores ``|W| * ||X||`` on its (dense) inputs, its target layers flattened into one vector."""
    targets = walk.targets[k]
    norms = _collect(walk.blocks[k], inputs, targets, "norms", stop_early=False)
    return torch.cat([(as_matrix(m, m.weight.detach())[0].abs().float() * norms[n].sqrt().float()).reshape(-1)
                      for n, m in targets.items()])


def _owl_sparsities(walk: Walk, batches: List[Any], amount: float) -> Dict[str, float]:
    """OWL: a dense pass collecting Wanda scores per block; blocks with more outliers keep more."""
    inputs = capture_inputs(walk.model, walk.blocks[0], batches)
    scores, sizes = {}, {}
    bar = tqdm(range(len(walk.blocks)), desc="owl statistics", leave=False,
               disable=not progress_enabled(walk.options.progress))
    for k in bar:
        if walk.targets[k]:
            scores[str(k)] = owl_block_scores(walk, k, inputs)
            sizes[str(k)] = int(scores[str(k)].numel())
        inputs.advance(walk.blocks[k])
    per_block = owl_allocation(scores, amount, sizes, m=walk.options.owl_m, lam=walk.options.owl_lambda)
    return {n: per_block[str(k)] for k, t in enumerate(walk.targets) for n in t}


def _block_error(walk: Walk, k: int, inputs: BlockInputs, reference: List[torch.Tensor], norms,
                 sparsity: float) -> float:
    """Relative output error of block k (dense inputs) with its layers masked at ``sparsity`` by the cheap rule
    of the run's method (Wanda's scores for data-aware methods, |W| for magnitude); weights put back after."""
    probe = get_solver("magnitude" if norms is None else "wanda")
    saved = {}
    try:
        for n, m in walk.targets[k].items():
            W = as_matrix(m, m.weight.detach())[0]
            _, keep = probe.solve(n, W, None if norms is None else norms[n], Target(sparsity=sparsity), None)
            saved[n] = m.weight.detach().clone()
            m.weight.mul_(from_matrix(m, keep.unsqueeze(0), tuple(m.weight.shape)))
        err = sum(float((inputs.run(walk.blocks[k], i) - ref).pow(2).sum()) for i, ref in enumerate(reference))
    finally:
        for n, w in saved.items():
            walk.targets[k][n].weight.copy_(w)
    return err / max(sum(float(r.pow(2).sum()) for r in reference), 1e-30)


def _sensitivity_sparsities(walk: Walk, batches: List[Any], amount: float) -> Dict[str, float]:
    """Per-block sparsities with the least summed relative output error: a dense pass probes each block at
    :data:`SENSITIVITY_GRID` (on the first calibration batches), then
    :func:`prunekit.select.allocation.least_cost_allocation` spreads ``amount`` (weighted by block size)."""
    inputs = capture_inputs(walk.model, walk.blocks[0], batches[:SENSITIVITY_BATCHES])
    data_aware = get_solver(walk.options.method).stats != "none"
    curves, sizes = {}, {}
    bar = tqdm(range(len(walk.blocks)), desc="block sensitivity", leave=False,
               disable=not progress_enabled(walk.options.progress))
    for k in bar:
        targets = walk.targets[k]
        if targets:
            reference = [inputs.run(walk.blocks[k], i) for i in range(len(inputs.hidden))]
            norms = _collect(walk.blocks[k], inputs, targets, "norms", stop_early=False) if data_aware else None
            curves[str(k)] = [(0.0, 0.0)] + [(s, _block_error(walk, k, inputs, reference, norms, s))
                                             for s in SENSITIVITY_GRID]
            sizes[str(k)] = float(sum(m.weight.numel() for m in targets.values()))
        inputs.advance(walk.blocks[k])
    per_block = least_cost_allocation(curves, sizes, amount, {b: SENSITIVITY_GRID[-1] for b in curves})
    walk.plan.meta["block_sensitivity"] = {b: [c for _, c in pts[1:]] for b, pts in curves.items()}
    return {n: per_block[str(k)] for k, t in enumerate(walk.targets) for n in t}


def layer_targets(walk: Walk, batches, spec: PruneSpec, amount: Optional[float],
                   nm: Optional[Tuple[int, int]]) -> Dict[str, Target]:
    o = walk.options
    names = [n for t in walk.targets for n in t]
    if nm is not None:
        return {n: Target(nm=nm, blocksize=o.blocksize, damp=o.damp) for n in names}
    if spec.allocation == "owl":
        sparsity = _owl_sparsities(walk, batches, amount)
    elif spec.allocation == "sensitivity":
        sparsity = _sensitivity_sparsities(walk, batches, amount)
    elif spec.allocation == "magnitude":
        sparsity = magnitude_allocation({n: walk.model.get_parameter(n) for n in names}, amount, 0)
    else:
        sparsity = {n: amount for n in names}
    return {n: Target(sparsity=sparsity[n], blocksize=o.blocksize, damp=o.damp) for n in names}


# ----------------------------------------------------------------------------- the output head

def output_head(model: nn.Module) -> Tuple[str, nn.Module]:
    """(weight name, module) of the model's output head (``lm_head``), refused where there is none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not is_linear(head):
        raise PrunekitError("include_classifier=True prunes the output head (lm_head) after the blocks: "
                            f"{type(model).__name__} has no linear get_output_embeddings()")
    return next(f"{n}.weight" for n, m in model.named_modules() if m is head), head


def _head_stat(model: nn.Module, head: nn.Module, batches: List[Any], kind: str) -> Optional[torch.Tensor]:
    """The head's input statistic on the pruned model (its forward stops at the head: the vocabulary-wide
    matmul is never computed)."""
    if kind == "none":
        return None
    acc: List[Any] = [0, 0]

    def hook(mod, args):
        x = layer_features(mod, args[0].detach())[0].float()
        acc[0] = acc[0] + _moment(x, kind)
        acc[1] += x.shape[0]
        raise StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        for b in batches:
            run_until_stopped(model, b)
    finally:
        handle.remove()
    return acc[0] / max(acc[1], 1)


def prune_head(walk: Walk, batches: List[Any], target: Target) -> None:
    """Prune the output head last, on the inputs the pruned blocks give it. With tied embeddings the input
    embedding is the same tensor and loses the same entries (the plan says so)."""
    name, head = output_head(walk.model)
    _prune_module(walk, name, head, _head_stat(walk.model, head, batches, walk.options.stat_kind), target)
    walk.plan.meta["targets"].append(name)
    emb = walk.model.get_input_embeddings() if callable(getattr(walk.model, "get_input_embeddings", None)) else None
    if emb is not None and getattr(emb, "weight", None) is head.weight:
        walk.plan.notes.append(f"{name} is tied to the input embeddings: pruning it prunes them too")
    if walk.options.dense_targets:
        walk.plan.notes.append(f"{name} reproduces its own outputs on the pruned model (no dense target for "
                               "the head)")


def sequential_prune(model: nn.Module, data: Any, amount: Optional[float] = None, *,
                     spec: Optional[PruneSpec] = None, options: Optional[SequentialOptions] = None) -> Plan:
    """Prune the linear layers of ``model``'s blocks one block at a time (see the module docstring).

    ``data``: calibration token ids ``(windows, seq)`` (or a list of batches of model kwargs);
    ``amount``: the fraction of each layer (the average when ``spec.allocation`` is ``owl`` or
    ``magnitude``), or ``spec.pattern="nm"`` with ``spec.nm``. Returns the Plan (masks; the weights
    SparseGPT rewrote are in the model) and applies it with :func:`prunekit.apply.masking.apply`.
    """
    spec = spec or PruneSpec(criterion="sequential")
    options = options or SequentialOptions()
    nm = check_request(amount, spec)
    batches = calibration_batches(data, options.batch_size)
    walk = new_walk(model, spec, options, amount, nm)
    if spec.include_classifier:
        output_head(model)   # refused now, not after the walk
    start = time.perf_counter()
    try:
        with preserved_state(model), torch.no_grad():
            targets_of = layer_targets(walk, batches, spec, amount, nm)
            _walk_blocks(walk, batches, targets_of)
            if spec.include_classifier:   # the head's share is the average target
                prune_head(walk, batches, Target(sparsity=None if nm else amount, nm=nm,
                                                 blocksize=options.blocksize, damp=options.damp))
        masking.apply(model, walk.plan)
    except BaseException:
        with torch.no_grad():
            for name, w in walk.backup.items():  # leave the model as it was
                model.get_parameter(name).copy_(w)
        raise
    layer_sparsity = None
    if nm is None:   # the targets, and what the head (not allocated) reached
        layer_sparsity = {n: t.sparsity for n, t in targets_of.items()}
        layer_sparsity.update({n: e.sparsity for n, e in walk.plan.tensors.items() if n not in layer_sparsity})
    walk.plan.meta["layer_sparsity"] = layer_sparsity
    walk.plan.meta["time_s"] = time.perf_counter() - start
    for note in walk.plan.notes:
        warnings.warn(note, PruningShortfall, stacklevel=2)
    return walk.plan


def new_walk(model: nn.Module, spec: PruneSpec, options: SequentialOptions, amount: Optional[float],
             nm: Optional[Tuple[int, int]]) -> Walk:
    """The Walk of one run: the model's blocks, their target layers and an empty Plan with the run's metadata."""
    prefix, blocks = find_blocks(model)
    walk = Walk(model, blocks, block_targets(model, prefix, blocks, spec), options,
                Plan(meta={"criterion": "sequential", "method": options.method, "pattern": spec.pattern,
                           "amount": amount, "nm": list(nm) if nm else None, "allocation": spec.allocation,
                           "blocks": prefix, "true_sequential": options.true_sequential,
                           "dense_targets": options.dense_targets,
                           "refit": options.refit, "seed": spec.seed}))
    walk.plan.meta["targets"] = [n for t in walk.targets for n in t]
    return walk


def last_block(walk: Walk) -> int:
    """The last block with a target layer: nothing is computed past it."""
    return max(k for k, t in enumerate(walk.targets) if t)


def walk_block(walk: Walk, k: int, inputs: Optional[BlockInputs], targets_of: Mapping[str, Target]) -> None:
    """One step of the walk: prune block ``k`` (when it has targets; the dense stream goes through a block left
    dense) and advance the hidden states past it (up to the last block with targets)."""
    if walk.targets[k]:
        prune_block(walk, k, inputs, targets_of)
    elif walk.dense is not None:   # a block left dense: both streams go through it
        walk.dense.advance(walk.blocks[k])
    if inputs is not None and k < last_block(walk):
        inputs.advance(walk.blocks[k])


def _walk_blocks(walk: Walk, batches: List[Any], targets_of: Mapping[str, Target]) -> None:
    needs_data = walk.options.stat_kind != "none"
    inputs = capture_inputs(walk.model, walk.blocks[0], batches) if needs_data else None
    if walk.options.dense_targets:
        walk.dense = BlockInputs(list(inputs.hidden), inputs.args, inputs.kwargs)
    bar = tqdm(range(last_block(walk) + 1), desc=f"{walk.options.method} (blocks)", leave=False,
               disable=not progress_enabled(walk.options.progress))
    for k in bar:
        walk_block(walk, k, inputs, targets_of)


def check_request(amount, spec: PruneSpec) -> Optional[Tuple[int, int]]:
    check_choice(spec.allocation, SEQUENTIAL_ALLOCATIONS, "allocation")
    if spec.pattern == "nm":
        if amount is not None:
            raise PrunekitError(f"pattern='nm' fixes the sparsity at 1 - N/M; drop amount={amount!r}")
        if spec.allocation != "uniform":
            raise PrunekitError("N:M is the same pattern in every layer: allocation must be 'uniform'")
        return parse_nm(spec.nm)
    check_choice(spec.pattern, ("unstructured", "nm"), "pattern")
    if isinstance(amount, bool) or not isinstance(amount, float) or not 0.0 <= amount < 1.0:
        raise PrunekitError(f"amount={amount!r} must be a fraction in [0, 1) (the share of each layer pruned)")
    return None


@register_pruner("sequential")
class SequentialPruner(Pruner):
    """``prunekit.prune(llm, 0.5, criterion="sequential", method="wanda", data=token_ids)``: block-by-block
    one-shot pruning of a decoder (or encoder) stack with a layer solver (magnitude, wanda, sparsegpt)."""

    patterns = ("unstructured", "nm")
    scopes = ("layer",)  # each layer to its target (wanda compares within rows, as in the paper)
    options = ("method", "batch_size", "true_sequential", "blocksize", "damp", "owl_m", "owl_lambda",
               "dense_targets", "refit", "progress")

    def prune(self, model: nn.Module, amount, spec: PruneSpec, calib: Calibration, **options: Any) -> Plan:
        if calib.data is None:
            raise PrunekitError("sequential pruning needs calibration tokens: data=token_ids (windows, seq)")
        if calib.stats is not None or calib.loss_fn is not None or calib.forward_fn is not None:
            raise PrunekitError("sequential pruning runs the blocks itself: it takes no stats, loss_fn or forward_fn")
        return sequential_prune(model, calib.data, amount, spec=spec, options=SequentialOptions(**options))
