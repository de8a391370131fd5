"""Distributed fine-tuning helpers (DistributedDataParallel under ``torchrun``).

    torchrun --nproc_per_node=2 train.py        # train.py calls prunekit.finetune(...)

:func:`prunekit.train.loop.finetune` turns DDP on by itself when ``WORLD_SIZE > 1``
(or with ``distributed=True``): it joins the process group (:func:`init_from_env`:
gloo on CPU, nccl with CUDA), shards the loader (:func:`shard_loader`), checks
that every rank holds the same masks (:func:`check_masks_equal`) and wraps the
model in DDP. Masks are enforced after every step on every rank; gradients of
pruned entries are zeroed after the all-reduce, so all ranks stay identical.

Masks must be the same on every rank: compute them deterministically (same
weights, same seed) or on rank 0 and :func:`broadcast_masks`. Every helper is a
no-op (or the trivial answer) in a single process.
"""
from __future__ import annotations

import datetime
import hashlib
import math
import os
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from prunekit.apply import masking
from prunekit.errors import PrunekitError

BACKENDS = ("gloo", "nccl")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    if is_active():
        dist.barrier()


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise PrunekitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(backend: Optional[str] = None) -> bool:
    """Join the process group described by torchrun's environment; True when distributed.

    ``backend`` defaults to nccl when CUDA is available, else gloo. With nccl the
    current CUDA device becomes ``LOCAL_RANK``. Already initialised: nothing to do.
    A single process (no WORLD_SIZE, or 1) starts no group and returns False.
    """
    if backend is not None and backend not in BACKENDS:
        raise PrunekitError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return is_active()
    if env_world_size() <= 1:
        return False
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise PrunekitError(f"WORLD_SIZE>1 but {', '.join(missing)} not set: launch with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", rank=int(os.environ["RANK"]),
                            world_size=env_world_size())
    return True


def want_distributed(flag: Optional[bool]) -> bool:
    """Resolve finetune's ``distributed`` argument: None means "when WORLD_SIZE > 1"."""
    if flag is False:
        return False
    if is_active():
        return True
    if flag is None and env_world_size() <= 1:
        return False
    if not init_from_env() and flag:
        raise PrunekitError("distributed=True but this is a single process: launch with "
                         "torchrun --nproc_per_node=N, or leave distributed=None")
    return is_active()


def cleanup(timeout_s: float = 60.0) -> None:
    """Leave the process group (call once at the end of a torchrun script).

    The ranks first meet at a barrier: a rank that tears its group down while another still talks to it
    makes gloo's connection threads die with "terminate called without an active exception" (exit -6), which
    a loaded machine, where ranks finish far apart, turns from rare to common. A rank that failed does not
    wait (its peers' barrier then times out after ``timeout_s`` instead of hanging).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if sys.exc_info()[0] is None and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.barrier()
    except RuntimeError:
        pass  # a peer failed: leave anyway, its error is the one to report
    finally:
        dist.destroy_process_group()


def all_gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not is_active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    """nccl only moves CUDA tensors; gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- masks
def mask_digests(model: nn.Module) -> Dict[str, str]:
    """A short hash of every mask, by parameter name: equal digests, equal masks."""
    out = {}
    for name, module, pname in masking.masked_parameters(model):
        bits = module._buffers[pname + masking.MASK_SUFFIX]
        shape = tuple(module._parameters[pname].shape)
        out[name] = f"{shape}:{hashlib.sha256(bits.cpu().numpy().tobytes()).hexdigest()[:16]}"
    return out


def check_masks_equal(model: nn.Module) -> None:
    """Raise ValueError on every rank unless all ranks hold exactly the same masks."""
    everyone = all_gather_objects(mask_digests(model))
    ref = everyone[0]
    bad = sorted({n for d in everyone for n in set(d) | set(ref) if d.get(n) != ref.get(n)})
    if bad:
        ranks = [r for r, d in enumerate(everyone) if d != ref]
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise PrunekitError(f"prunekit masks differ between rank 0 and rank(s) {ranks} on {shown}: compute them "
                         "deterministically (same weights and seed on every rank) or call "
                         "prunekit.train.distributed.broadcast_masks(model) before fine-tuning")


def _check_same_layout(model: nn.Module) -> None:
    layouts = all_gather_objects([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    diff = [r for r, lay in enumerate(layouts) if lay != layouts[0]]
    if diff:
        extra = sorted(set(layouts[diff[0]]) ^ set(layouts[0]))[:5]
        raise PrunekitError(f"rank(s) {diff} hold a model whose parameters differ from rank 0's "
                         f"(e.g. {extra}): every rank must build the same architecture")


@torch.no_grad()
def broadcast_masks(model: nn.Module, src: int = 0) -> None:
    """Give every rank the masks of rank ``src`` (pruned entries zeroed, extra masks dropped).

    Only the masks are sent; DDP sends rank 0's weights when it wraps the model.
    A mask that changes drops that parameter's ``keep_original`` values (they no
    longer match it).
    """
    if not is_active():
        return
    _check_same_layout(model)  # nothing changes on any rank unless all can take the masks
    names = [[n for n, _, _ in masking.masked_parameters(model)] if get_rank() == src else None]
    dist.broadcast_object_list(names, src=src)
    wanted, dev = names[0], _comm_device()
    for name in wanted:
        module, pname = masking.owner_of(model, name)
        param = module._parameters[pname]
        own = module._buffers.get(pname + masking.MASK_SUFFIX)
        buf = own.to(dev, copy=True) if own is not None and get_rank() == src else \
            torch.empty(math.ceil(param.numel() / 8), dtype=torch.uint8, device=dev)
        dist.broadcast(buf, src=src)
        if get_rank() == src or (own is not None and torch.equal(own.to(dev), buf)):
            continue
        module._buffers.pop(pname + masking.ORIG_SUFFIX, None)
        module.register_buffer(pname + masking.MASK_SUFFIX, buf.to(param.device))
        param.masked_fill_(~masking.get_mask(module, pname), 0.0)
    for name, module, pname in list(masking.masked_parameters(model)):
        if name not in wanted:  # rank src has no mask there
            module._buffers.pop(pname + masking.MASK_SUFFIX, None)
            module._buffers.pop(pname + masking.ORIG_SUFFIX, None)


# ----------------------------------------------------------------------------- data and model
def shard_loader(loader, *, rank: Optional[int] = None, world_size: Optional[int] = None, seed: int = 0):
    """This rank's share of ``loader``: every rank gets as many batches as the others.

    A prunekit ``TensorLoader`` is sharded by :meth:`~prunekit.zoo.data.TensorLoader.shard`
    (a strided share of its deterministic order). A torch ``DataLoader`` is rebuilt
    with a ``DistributedSampler`` (shuffled with ``seed`` if the loader shuffled);
    one that already has one is returned as is. Other iterables: a ValueError.
    """
    r = get_rank() if rank is None else rank
    w = get_world_size() if world_size is None else world_size
    if hasattr(loader, "shard") and hasattr(loader, "world_size"):
        if loader.world_size == 1:
            return loader.shard(r, w) if w > 1 else loader
        if (loader.rank, loader.world_size) != (r, w):
            raise PrunekitError(f"loader is sharded for rank {loader.rank} of {loader.world_size}, "
                             f"but this is rank {r} of {w}")
        return loader
    if isinstance(loader, torch.utils.data.DataLoader):
        return _shard_dataloader(loader, r, w, seed)
    raise PrunekitError(f"cannot shard a {type(loader).__name__} for distributed training: pass a prunekit "
                     "TensorLoader or a torch DataLoader (ideally with a DistributedSampler)")


def _shard_dataloader(loader, r: int, w: int, seed: int):
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

    if isinstance(loader.sampler, DistributedSampler) or w == 1:
        return loader
    if isinstance(loader.dataset, torch.utils.data.IterableDataset) or type(loader.batch_sampler) is not BatchSampler:
        raise PrunekitError("cannot shard a DataLoader over an IterableDataset or with a custom batch_sampler: "
                         "give it a DistributedSampler yourself")
    sampler = DistributedSampler(loader.dataset, num_replicas=w, rank=r, seed=seed,
                                 shuffle=isinstance(loader.sampler, RandomSampler))
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, timeout=loader.timeout,
                      persistent_workers=loader.persistent_workers)


def wrap(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` on the model's device (a no-op in a single process)."""
    if not is_active():
        return model
    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
