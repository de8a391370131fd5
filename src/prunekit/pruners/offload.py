"""Prune a Hugging Face decoder LLM bigger than RAM: stream it from its safetensors shards, one block at a time.

:func:`prune_checkpoint` is :func:`prunekit.pruners.sequential.sequential_prune` on a checkpoint folder rather
than a model in memory, and gives the same weights and masks, bit for bit, on the same calibration tokens (with
the same torch build and thread count):

1. the model is built from ``config.json`` on the meta device (no memory); only the small parts before the
   blocks (token and position embeddings, rotary tables: what runs before block 0) are loaded, to record the
   block inputs (:func:`~prunekit.pruners.sequential.capture_inputs`), then dropped again;
2. block k is loaded from the source shards (one tensor at a time, from the memory map of its shard), pruned by
   :func:`~prunekit.pruners.sequential.prune_block` (the same solvers, the same Walk), run on the calibration
   hidden states (they become block k+1's inputs), written to its own output shard and its masks to their own
   file (each written whole, fsynced and renamed), and put back on the meta device: one block in memory;
3. the other tensors (embeddings, final norm, lm_head) are copied to a last shard as they are, with
   ``model.safetensors.index.json``, ``config.json`` and the tokenizer's files: ``transformers`` loads the folder
   with ``AutoModelForCausalLM.from_pretrained``; the masks go to ``prunekit_masks.safetensors`` and
   ``prunekit.json`` (the format of :mod:`prunekit.deploy.hf`, so ``load_pretrained`` restores them).

A manifest (``prunekit_offload.json``) is rewritten after every block: the run's identity (source config and
shards, method, amount, options, a hash of the calibration tokens) and the finished blocks. A run that stops
(killed, out of disk) resumes after its last finished block: the hidden states are recomputed by running the
finished, pruned blocks from the output shards, so the result equals an uninterrupted run. A manifest of another
run is refused, naming what differs.

OWL allocation (``spec.allocation="owl"``) needs a dense pass over every block first: it is streamed too (block
by block from the source), and the per-layer sparsities are kept in the manifest (a resumed run does not redo
it). ``allocation="magnitude"`` ranks every weight of the model at once and is refused.

Memory: one block's weights (plus what its solver needs: SparseGPT's Hessians), the calibration hidden states
(windows x tokens x hidden), and briefly the input embeddings. :func:`write_random_checkpoint` writes a
random-weight checkpoint of any size the same way, one tensor at a time.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import atomic_write, atomic_write_text, progress_enabled, to_jsonable
from prunekit._version import __version__
from prunekit.bits import pack_bits, unpack_bits
from prunekit.criteria.score import LazyScores
from prunekit.errors import PrunekitError
from prunekit.plan import Plan, TensorPlan
from prunekit.pruners.sequential import (
    BlockInputs,
    SequentialOptions,
    Walk,
    calibration_batches,
    capture_inputs,
    check_request,
    last_block,
    layer_targets,
    new_walk,
    owl_block_scores,
    walk_block,
)
from prunekit.select.allocation import owl_allocation
from prunekit.select.ranking import PruningShortfall
from prunekit.spec import PruneSpec

__all__ = ["MANIFEST", "prune_checkpoint", "write_random_checkpoint"]

PathLike = Union[str, os.PathLike]
FORMAT = "prunekit.offload/1"
MANIFEST = "prunekit_offload.json"
WORK = "prunekit_offload"          # the per-block mask files while the run goes on
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# prunekit.deploy.hf's folder format (that module is a layer above this one: the names are repeated here,
# and tests/unit/test_offload.py checks that they agree)
HF_FORMAT, HF_MASKS, HF_META = "prunekit.hf/1", "prunekit_masks.safetensors", "prunekit.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors, streamed

@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file to write: its bytes come from ``chunks()`` (row-major pieces, called
    when the tensor is written), so a file is written without holding its tensors all at once (and a random
    tensor not even whole)."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _write_safetensors(path: Path, entries: Sequence[_Entry], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file entry by entry (atomically); returns the bytes of tensor data. Wider dtypes
    first, as safetensors itself orders them, so every tensor starts aligned."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian bytes
        raise PrunekitError("writing safetensors here needs a little-endian machine")
    entries = sorted(entries, key=lambda e: (-_itemsize(e.dtype), e.name))
    header: Dict[str, Any] = {}
    offset = 0
    for e in entries:
        if e.dtype not in _ST_DTYPES:
            raise PrunekitError(f"{e.name}: dtype {e.dtype} cannot be written to safetensors here")
        header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            done = 0
            for chunk in e.chunks():
                data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                done += data.nbytes
                del chunk, data  # a view of a memory-mapped shard: release it now
            if done != e.nbytes:
                raise RuntimeError(f"{e.name}: wrote {done} bytes, expected {e.nbytes}")

    atomic_write(path, write)
    return offset


def _read(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file: a view of the file's memory map (no copy; the map is released when the
    view is dropped, so only what is kept stays resident)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


class _Mapped:
    def __init__(self, handle):
        self.handle = handle

    def __call__(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)

    def keys(self) -> List[str]:
        return list(self.handle.keys())


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[_Mapped]:
    """Several tensors of one safetensors file as views of a single memory map."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        yield _Mapped(f)


def _header_digest(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return hashlib.sha256(head + f.read(min(n, 1 << 28))).hexdigest()[:16]


# ----------------------------------------------------------------------------- the source checkpoint

class _Checkpoint:
    """A Hugging Face folder: ``config.json`` and ``model.safetensors`` or shards listed in the index."""

    def __init__(self, folder: PathLike):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise PrunekitError(f"{self.folder} is not a Hugging Face model folder: config.json is missing")
        if (self.folder / INDEX).is_file():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PrunekitError(f"{self.folder / INDEX} is corrupt: {e}") from e
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise PrunekitError(f"{self.folder} has no {SINGLE} or {INDEX}: prune_checkpoint reads safetensors "
                                "(convert a .bin checkpoint with save_pretrained(..., safe_serialization=True))")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        self.info: Dict[str, Tuple[str, torch.dtype, Tuple[int, ...]]] = {}
        for file in files:
            path = self.folder / file
            if not path.is_file():
                raise PrunekitError(f"{path} is missing (listed in {INDEX})")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        if weight_map is not None and weight_map.get(key) != file:
                            continue
                        s = f.get_slice(key)
                        dtype = _TORCH_DTYPES.get(s.get_dtype())
                        if dtype is None:
                            raise PrunekitError(f"{path}: {key} has dtype {s.get_dtype()}, not supported here")
                        self.info[key] = (file, dtype, tuple(s.get_shape()))
            except (SafetensorError, OSError) as e:
                raise PrunekitError(f"{path} is not a readable safetensors file: {e}") from e
        missing = sorted(set(weight_map or {}) - set(self.info))
        if missing:
            raise PrunekitError(f"{INDEX} lists tensors its shards do not hold: {missing[:5]}")
        self.files = files

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.info:
            raise PrunekitError(f"{self.folder} has no tensor {key!r} (the checkpoint's names differ from the "
                                f"model's, e.g. {sorted(self.info)[:3]})")
        return _read(self.folder / self.info[key][0], key)

    def identity(self) -> Dict[str, Any]:
        """What tells this checkpoint from another without reading its weights: the config's hash and each
        shard's size, modification time and header hash."""
        shards = {}
        for file in self.files:
            st = (self.folder / file).stat()
            shards[file] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                            "header_sha256": _header_digest(self.folder / file)}
        config = hashlib.sha256((self.folder / "config.json").read_bytes()).hexdigest()[:16]
        return {"config_sha256": config, "shards": shards}

    def dtype(self, config) -> torch.dtype:
        """The dtype ``from_pretrained`` would load the model in: the config's, else the weights'."""
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        if isinstance(d, torch.dtype):
            return d
        floats = [dt for _, dt, _ in self.info.values() if dt.is_floating_point]
        return floats[0] if floats else torch.get_default_dtype()

    def skeleton(self) -> nn.Module:
        """The model on the meta device (eval mode): module structure and shapes, no memory."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(self.folder), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype(config), trust_remote_code=False)
        return model.eval()


# ----------------------------------------------------------------------------- loading and dropping modules

def _stored(module: nn.Module) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """A module's own parameters and persistent buffers (what a checkpoint holds)."""
    yield from module._parameters.items()
    for name, b in module._buffers.items():
        if name not in module._non_persistent_buffers_set:
            yield name, b


def _load_module(model: nn.Module, name: str, module: nn.Module, read: Callable[[str], torch.Tensor]) -> None:
    """Give ``module`` (not its children) real CPU tensors: its stored ones read from the checkpoint, the
    buffers a checkpoint does not hold (rotary ``inv_freq``) computed by transformers' own initialisation."""
    module.to_empty(device="cpu", recurse=False)
    if any(b in module._non_persistent_buffers_set for b, v in module._buffers.items() if v is not None):
        model._init_weights(module)
    for pname, t in _stored(module):
        if t is None:
            continue
        key = f"{name}.{pname}" if name else pname
        value = read(key)
        if tuple(value.shape) != tuple(t.shape):
            raise PrunekitError(f"{key} has shape {tuple(value.shape)} in the checkpoint, the model built from "
                                f"its config expects {tuple(t.shape)}")
        t.copy_(value)
        del value


@contextlib.contextmanager
def _loaded(model: nn.Module, modules: Sequence[Tuple[str, nn.Module]],
            read: Callable[[str], torch.Tensor]) -> Iterator[None]:
    """The modules hold real tensors inside the block, and are back on the meta device (freed) after it."""
    try:
        with torch.no_grad():
            for name, m in modules:
                _load_module(model, name, m, read)
        yield
    finally:
        for _, m in modules:
            m.to_empty(device="meta", recurse=False)


def _block_modules(prefix: str, k: int, block: nn.Module) -> List[Tuple[str, nn.Module]]:
    base = f"{prefix}.{k}" if prefix else str(k)
    return [(f"{base}.{sub}" if sub else base, m) for sub, m in block.named_modules()]


def _head_modules(model: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    """The modules outside the blocks that run before block 0 could (all but the blocks and the output
    embeddings: lm_head is never run while pruning and is copied as it is)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = (prefix + ".") if prefix else ""
    return [(n, m) for n, m in model.named_modules()
            if not (n == prefix or (inside and n.startswith(inside))) and m is not out]


def _materialised_blocks(blocks: nn.ModuleList) -> int:
    """How many blocks hold real (non-meta) tensors now (the tests' memory check)."""
    return sum(1 for b in blocks if any(not t.is_meta for t in [*b.parameters(), *b.buffers()]))


# ----------------------------------------------------------------------------- the run's identity and manifest

def _calibration_digest(batches: Sequence[Any]) -> str:
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, Mapping):
            for key in sorted(v):
                h.update(str(key).encode())
                feed(v[key])
        else:
            h.update(repr(v).encode())

    for b in batches:
        feed(b)
    return h.hexdigest()[:16]


def _identity(ckpt: _Checkpoint, batches, amount, spec: PruneSpec, options: SequentialOptions) -> Dict[str, Any]:
    import transformers

    opts = {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"}
    return to_jsonable({"source": ckpt.identity(), "amount": amount, "spec": dataclasses.asdict(spec),
                        "options": opts, "calibration_sha256": _calibration_digest(batches),
                        "prunekit": __version__, "torch": torch.__version__,
                        "transformers": transformers.__version__})


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    a, b = _flat(dict(old)), _flat(dict(new))
    return [f"{k} ({a.get(k, '<none>')!r} there, {b.get(k, '<none>')!r} now)"
            for k in sorted(set(a) | set(b)) if a.get(k, "<none>") != b.get(k, "<none>")]


def _read_manifest(out: Path) -> Optional[Dict[str, Any]]:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrunekitError(f"{path} is corrupt ({e}): pass resume=False to start over") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PrunekitError(f"{path} is not a prunekit offload manifest (expected format {FORMAT!r})")
    return doc


def _save_manifest(out: Path, doc: Mapping[str, Any]) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(to_jsonable(doc), indent=1, allow_nan=False))


def _remember(doc: Dict[str, Any], name: str) -> None:
    """Note a file this run wrote into out_dir (resume=False removes them)."""
    if name not in doc["written"]:
        doc["written"].append(name)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _mask_file(out: Path, k: int) -> Path:
    return out / WORK / f"masks-{k:05d}.safetensors"


def _clear_previous(out: Path, doc: Mapping[str, Any]) -> None:
    """Remove what an earlier run wrote into ``out`` (resume=False)."""
    for name in [*doc.get("written", []), HF_MASKS, HF_META, INDEX]:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / WORK, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _open_run(out: Path, identity: Dict[str, Any], resume: bool) -> Optional[Dict[str, Any]]:
    """The manifest to continue from (None: a fresh run); refuses another run's folder."""
    doc = _read_manifest(out)
    if doc is not None and resume:
        diff = _differences(doc.get("identity", {}), identity)
        if diff:
            raise PrunekitError(f"{out / MANIFEST} belongs to another run; it differs in " + "; ".join(diff[:6])
                                + ("; ..." if len(diff) > 6 else "")
                                + ". Pass resume=False to start over there, or choose another out_dir")
        return doc
    if doc is not None:
        _clear_previous(out, doc)
    elif out.exists() and any(out.iterdir()):
        raise PrunekitError(f"{out} is not empty and holds no {MANIFEST}: prune_checkpoint writes a new model "
                            "folder; choose an empty or new out_dir")
    return None


# ----------------------------------------------------------------------------- OWL, streamed

def _owl_streamed(run: "_Run", batches: List[Any], amount: float) -> Dict[str, float]:
    """OWL's per-layer sparsities with one block in memory: :func:`owl_allocation` reads each block's scores
    once, in block order; each read runs the dense pass up to that block (loading each block from the source)."""
    walk = run.walk
    with run.head():
        inputs = capture_inputs(walk.model, walk.blocks[0], batches)
    cursor = [0]
    bar = run.bar(len(walk.blocks), "owl statistics")

    def scores_of(k: int) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            if cursor[0] > k:
                raise RuntimeError(f"owl_allocation read block {k}'s scores twice or out of order: the streamed "
                                   "OWL pass computes each block once, in order")
            scores = None
            while cursor[0] <= k:
                j = cursor[0]
                with run.block(j, run.src.tensor):
                    if j == k:
                        scores = owl_block_scores(walk, j, inputs)
                    if j + 1 < len(walk.blocks):
                        inputs.advance(walk.blocks[j])
                cursor[0] += 1
                bar.update(1)
            return scores
        return compute

    lazy = {str(k): LazyScores((sum(m.weight.numel() for m in t.values()),), scores_of(k))
            for k, t in enumerate(walk.targets) if t}
    sizes = {key: s.shape[0] for key, s in lazy.items()}
    per_block = owl_allocation(lazy, amount, sizes, m=walk.options.owl_m, lam=walk.options.owl_lambda)
    bar.close()
    return {n: per_block[str(k)] for k, t in enumerate(walk.targets) for n in t}


# ----------------------------------------------------------------------------- the streamed walk

class _StreamedBlocks:
    """The blocks as a dense pass sees them (``walk.blocks[k]``, ``len``), each loaded from the source when asked
    for and the one before dropped: the allocation passes of :func:`layer_targets` (sensitivity) run unchanged
    with one block in memory (they go through the blocks in order, so each is loaded once)."""

    def __init__(self, run: "_Run"):
        self.run, self.current, self.stack = run, None, contextlib.ExitStack()

    def __len__(self) -> int:
        return len(self.run.walk.blocks)

    def __getitem__(self, k: int) -> nn.Module:
        k = range(len(self))[k]
        if self.current != k:
            self.stack.close()
            self.current = None
            self.stack.enter_context(self.run.block(k, self.run.src.tensor))
            self.current = k
        return self.run.walk.blocks[k]

    def __iter__(self) -> Iterator[nn.Module]:
        return (self[k] for k in range(len(self)))

    def close(self) -> None:
        self.stack.close()
        self.current = None


class _Run:
    """One prune_checkpoint run: the source, the skeleton's Walk, the output folder and its manifest."""

    def __init__(self, src: _Checkpoint, out: Path, walk: Walk, prefix: str, progress: bool):
        self.src, self.out, self.walk, self.prefix, self.progress = src, out, walk, prefix, progress
        self.n_shards = len(walk.blocks) + 1  # one per block, then the rest

    def bar(self, total: int, desc: str, initial: int = 0):
        return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not self.progress)

    def head(self):
        return _loaded(self.walk.model, _head_modules(self.walk.model, self.prefix), self.src.tensor)

    def block(self, k: int, read: Callable[[str], torch.Tensor]):
        return _loaded(self.walk.model, _block_modules(self.prefix, k, self.walk.blocks[k]), read)

    def written(self, k: int) -> Callable[[str], torch.Tensor]:
        path = self.out / _shard_name(k, self.n_shards)
        if not path.is_file():
            raise PrunekitError(f"{path} is missing: the manifest says block {k} is done; pass resume=False to "
                                "start over")
        return lambda key: _read(path, key)

    def write_block(self, k: int, copy_from_source: bool = False) -> Dict[str, Any]:
        """Block k's tensors to its shard (the loaded block's, or copied from the source past the last pruned
        block) and its masks to their file; returns its manifest record."""
        base = f"{self.prefix}.{k}." if self.prefix else f"{k}."
        state = self.walk.blocks[k].state_dict()
        unknown = [base + key for key in state if base + key not in self.src.info]
        if unknown:
            raise PrunekitError(f"block {k}'s tensors {unknown[:3]} are not in the source checkpoint")
        if copy_from_source:  # in the model's dtype, as from_pretrained would load them
            entries = [_Entry(base + key, t.dtype, tuple(t.shape),
                              lambda key=base + key, t=t: (self.src.tensor(key).to(t.dtype),))
                       for key, t in state.items()]
        else:
            entries = [_Entry(base + key, t.dtype, tuple(t.shape), lambda t=t: (t,)) for key, t in state.items()]
        shard = _shard_name(k, self.n_shards)
        size = _write_safetensors(self.out / shard, entries, {"format": "pt"})
        plans = {n: self.walk.plan.tensors[n] for n in self.walk.targets[k]}
        _write_safetensors(_mask_file(self.out, k), [_Entry(n, torch.uint8, tuple(tp.keep_bits.shape),
                                                            lambda tp=tp: (tp.keep_bits,)) for n, tp in plans.items()],
                           {"format": HF_FORMAT})
        tensors = {}
        for n, tp in plans.items():
            w = self.walk.model.get_parameter(n)
            tensors[n] = {"shape": list(tp.shape), "pattern": tp.pattern, "nm": list(tp.nm) if tp.nm else None,
                          "units": tp.units, "pruned_units": tp.pruned_units, "zeros": int((w == 0).sum())}
        return {"shard": shard, "bytes": size, "keys": sorted(e.name for e in entries), "tensors": tensors}

    def copy_block(self, k: int) -> Dict[str, Any]:
        return self.write_block(k, copy_from_source=True)

    def walk_blocks(self, batches: List[Any], targets_of, doc: Dict[str, Any], started: float) -> float:
        walk, blocks = self.walk, self.walk.blocks
        done = len(doc["blocks"])
        needs_data = walk.options.stat_kind != "none"
        last = last_block(walk)   # past it, blocks are copied as they are
        inputs = None
        if needs_data and done <= last:
            with self.head():
                inputs = capture_inputs(walk.model, blocks[0], batches)
            if walk.options.dense_targets:
                walk.dense = BlockInputs(list(inputs.hidden), inputs.args, inputs.kwargs)
            for j in range(done):  # resume: the finished blocks' outputs, from the pruned shards
                with self.block(j, self.written(j)):
                    inputs.advance(blocks[j])
                if walk.dense is not None:  # and the dense model's, from the source
                    with self.block(j, self.src.tensor):
                        walk.dense.advance(blocks[j])
        bar = self.bar(len(blocks), f"{walk.options.method} (blocks, streamed)", initial=done)
        for k in range(done, len(blocks)):
            if k > last:
                record = self.copy_block(k)
            else:
                with self.block(k, self.src.tensor):
                    walk_block(walk, k, inputs, targets_of)
                    record = self.write_block(k)
            for n in walk.targets[k]:
                walk.plan.tensors.pop(n, None)  # on disk now
            doc["blocks"].append(record)
            _remember(doc, record["shard"])
            doc["notes"] = list(walk.plan.notes)
            doc["time_s"] = doc.get("time_s", 0.0) + time.perf_counter() - started
            started = time.perf_counter()
            _save_manifest(self.out, doc)
            bar.update(1)
        bar.close()
        return started

    def finish(self, doc: Dict[str, Any], started: float) -> None:
        """The rest of the folder: the non-block tensors, the index, config and tokenizer files, the masks."""
        import transformers

        out, src = self.out, self.src
        in_blocks = {key for r in doc["blocks"] for key in r["keys"]}
        rest = [key for key in src.info if key not in in_blocks]
        last = _shard_name(len(self.walk.blocks), self.n_shards)
        entries = [_Entry(key, src.info[key][1], src.info[key][2], lambda key=key: (src.tensor(key),))
                   for key in rest]
        size = _write_safetensors(out / last, entries, {"format": "pt"})
        weight_map = {key: r["shard"] for r in doc["blocks"] for key in r["keys"]}
        weight_map.update({key: last for key in rest})
        total = size + sum(r["bytes"] for r in doc["blocks"])
        atomic_write_text(out / INDEX, json.dumps({"metadata": {"total_size": total},
                                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        _remember(doc, last)
        for path in sorted(src.folder.iterdir()):
            name = path.name
            if (path.is_file() and not name.endswith(_WEIGHT_SUFFIXES) and not name.endswith(".index.json")
                    and name not in (MANIFEST, HF_MASKS, HF_META)):
                data = path.read_bytes()
                atomic_write(out / name, lambda f, data=data: f.write(data))
                _remember(doc, name)
        # masks: one file (what prunekit.deploy.hf.load_pretrained reads), its digest and prunekit.json
        records = [(k, n, t) for k, r in enumerate(doc["blocks"]) for n, t in r["tensors"].items()]
        masked = any(t["pruned_units"] for _, n, t in records)  # masking.apply adds no mask when nothing is pruned
        if not masked:
            records = []
        _write_safetensors(out / HF_MASKS, [_Entry(n, torch.uint8, ((math.prod(t["shape"]) + 7) // 8,),
                                                   lambda k=k, n=n: (_read(_mask_file(out, k), n),))
                                            for k, n, t in records], {"format": HF_FORMAT})
        h = hashlib.sha256()
        with _mapped(out / HF_MASKS) as bits:
            for _, n, t in sorted(records, key=lambda r: r[1]):  # as masking.digest hashes a model's masks
                h.update(n.encode())
                h.update(unpack_bits(bits(n), math.prod(t["shape"])).numpy().tobytes())
        numel = sum(math.prod(t["shape"]) for _, _, t in records)
        zeros = sum(t["zeros"] for _, _, t in records)
        meta = {
            "format": HF_FORMAT,
            "prunekit_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "class": type(self.walk.model).__name__,
            "masks": {n: {"shape": t["shape"], "sparsity": round(t["zeros"] / math.prod(t["shape"]), 8)}
                      for _, n, t in records},
            "mask_digest": h.hexdigest()[:16],
            "global_sparsity": round(zeros / numel, 8) if numel else 0.0,
            "plan": to_jsonable(self.plan_meta(doc, time.perf_counter() - started)),
            "metadata": {"written_by": "prunekit.pruners.offload.prune_checkpoint", "source": str(src.folder)},
        }
        atomic_write_text(out / HF_META, json.dumps(meta, indent=1, allow_nan=False))
        doc["complete"] = True
        doc["time_s"] = doc.get("time_s", 0.0) + time.perf_counter() - started
        _save_manifest(out, doc)
        shutil.rmtree(out / WORK, ignore_errors=True)

    def plan_meta(self, doc: Mapping[str, Any], running: float = 0.0) -> Dict[str, Any]:
        meta = {**self.walk.plan.meta, **doc.get("meta", {})}
        meta["layer_sparsity"] = doc.get("layer_sparsity")
        meta["time_s"] = doc.get("time_s", 0.0) + running  # over every (resumed) session
        return meta

    def plan(self, doc: Mapping[str, Any]) -> Plan:
        """The run's Plan; the keep-masks are views of the memory-mapped mask file (read when used)."""
        plan = Plan(meta=self.plan_meta(doc), notes=list(doc.get("notes", [])))
        with _mapped(self.out / HF_MASKS) as stored:
            views = {n: stored(n) for n in stored.keys()}  # views of one memory map
        for r in doc["blocks"]:
            for n, t in r["tensors"].items():
                bits = views.get(n)
                if bits is None:  # nothing was pruned anywhere: no mask is stored, every entry is kept
                    bits = pack_bits(torch.ones(math.prod(t["shape"]), dtype=torch.bool))
                plan.tensors[n] = TensorPlan(n, tuple(t["shape"]), t["pattern"], units=t["units"],
                                             pruned_units=t["pruned_units"], keep_bits=bits,
                                             nm=tuple(t["nm"]) if t["nm"] else None)
        return plan


def prune_checkpoint(src_dir: PathLike, out_dir: PathLike, calib_ids: Any, amount: Optional[float] = None, *,
                     spec: Optional[PruneSpec] = None, options: Optional[SequentialOptions] = None,
                     resume: bool = True, progress: Optional[bool] = None) -> Plan:
    """Sequentially prune the Hugging Face decoder in the folder ``src_dir`` into ``out_dir``, one block in
    memory at a time (see the module docstring); returns the Plan.

    ``calib_ids``, ``amount``, ``spec`` and ``options`` are :func:`~prunekit.pruners.sequential.sequential_prune`'s
    (the result is the same, bit for bit); ``spec.allocation`` may be ``uniform`` or ``owl``. ``out_dir`` gets a
    folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads (pruned weights stored as zeros) and
    :func:`prunekit.deploy.hf.load_pretrained` loads with its masks. ``resume=True`` continues a stopped run of the
    same request in ``out_dir`` after its last finished block (a finished run's Plan is returned as it is);
    ``resume=False`` starts over. ``progress`` (default: ``options.progress``) shows a bar per block.
    """
    spec = spec or PruneSpec(criterion="sequential")
    options = options or SequentialOptions()
    nm = check_request(amount, spec)
    if spec.include_classifier:
        raise PrunekitError("prune_checkpoint prunes the decoder layers; the output head is not streamed: drop "
                            "include_classifier (or prune it in memory with sequential_prune)")
    if spec.allocation == "magnitude":
        raise PrunekitError("allocation='magnitude' ranks every weight of the model at once (one global |w| "
                            "ranking), which needs the whole model in memory; prune_checkpoint streams one block "
                            "at a time: use allocation 'uniform' or 'owl', or sequential_prune on a model in memory")
    src = _Checkpoint(src_dir)
    out = Path(out_dir)
    if out.resolve() == src.folder.resolve():
        raise PrunekitError(f"out_dir is the source folder {src.folder}: write the pruned model to another folder")
    batches = calibration_batches(calib_ids, options.batch_size)
    walk = new_walk(src.skeleton(), spec, options, amount, nm)
    walk.backup = None  # the source shards hold the original weights: no copy of every pruned weight
    run = _Run(src, out, walk, walk.plan.meta["blocks"], progress_enabled(progress if progress is not None else options.progress))
    identity = _identity(src, batches, amount, spec, options)
    doc = _open_run(out, identity, resume)
    if doc is not None and doc.get("complete"):
        return _warned(run.plan(doc))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if doc is None:
            before = set(walk.plan.meta)
            sparsity = None if nm is not None else _layer_sparsity(run, batches, spec, amount)
            doc = {"format": FORMAT, "identity": identity, "blocks": [], "written": [], "notes": [],
                   "complete": False, "time_s": 0.0, "layer_sparsity": sparsity,
                   "meta": {k: v for k, v in walk.plan.meta.items() if k not in before}}  # e.g. block_sensitivity
            _save_manifest(out, doc)
        targets_of = layer_targets(walk, batches, dataclasses.replace(spec, allocation="uniform"), amount, nm)
        if nm is None:
            targets_of = {n: dataclasses.replace(t, sparsity=doc["layer_sparsity"][n]) for n, t in targets_of.items()}
        walk.plan.notes.extend(doc["notes"])  # a resumed run's earlier notes
        run.finish(doc, run.walk_blocks(batches, targets_of, doc, started))
    return _warned(run.plan(doc))


def _layer_sparsity(run: _Run, batches: List[Any], spec: PruneSpec, amount: float) -> Dict[str, float]:
    """Each target layer's sparsity, with the dense passes of the allocation streamed block by block."""
    walk = run.walk
    if spec.allocation == "uniform":
        return {n: amount for t in walk.targets for n in t}
    if spec.allocation == "owl":  # sequential's own OWL pass keeps every block's scores: the model's size
        return _owl_streamed(run, batches, amount)
    blocks = _StreamedBlocks(run)
    try:
        with run.head():
            targets = layer_targets(dataclasses.replace(walk, blocks=blocks), batches, spec, amount, None)
    finally:
        blocks.close()
    return {n: t.sparsity for n, t in targets.items()}


def _warned(plan: Plan) -> Plan:
    for note in plan.notes:
        warnings.warn(note, PruningShortfall, stacklevel=3)
    return plan


# ----------------------------------------------------------------------------- a random checkpoint of any size

def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _random_chunks(name: str, numel: int, dtype: torch.dtype, kind: str, seed: int, std: float,
                   chunk: int = 1 << 22) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(_seed_of(seed, name))
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        if kind == "ones":
            yield torch.ones(n, dtype=dtype)
        elif kind == "zeros":
            yield torch.zeros(n, dtype=dtype)
        else:
            yield (torch.randn(n, generator=g) * std).to(dtype)


def write_random_checkpoint(out_dir: PathLike, config: Any, seed: int = 0, shard_bytes: int = 2 << 30, *,
                            dtype: Optional[torch.dtype] = None) -> Path:
    """Write a random-weight Hugging Face checkpoint for ``config`` (a transformers config, or a dict of Llama
    config fields) into ``out_dir``, shard by shard and tensor by tensor (never the model whole in memory):
    ``config.json``, ``model-0000i-of-0000n.safetensors`` of at most ``shard_bytes`` each (a bigger tensor gets
    a shard of its own) and ``model.safetensors.index.json`` (one shard: ``model.safetensors``). Returns the folder.

    Each tensor depends on ``seed`` and its name alone: normal(0, ``initializer_range`` or 0.02), norm weights
    one, norm biases and other 1-D tensors zero. ``dtype`` (default the config's, else float32).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config, Mapping):
        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    if not isinstance(config, PretrainedConfig):
        raise PrunekitError(f"config must be a transformers config or a dict of its fields, got "
                            f"{type(config).__name__}")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise PrunekitError(f"shard_bytes={shard_bytes!r} must be a positive int")
    config = copy.deepcopy(config)  # the caller's config is left as it was
    d = getattr(config, "dtype", None)
    dtype = dtype or (getattr(torch, d) if isinstance(d, str) else d if isinstance(d, torch.dtype) else torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = float(getattr(config, "initializer_range", None) or 0.02)
    owners = dict(model.named_modules())
    entries, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue  # tied weights are stored once, under their first name (as save_pretrained does)
        seen.add(id(t))
        owner = owners.get(name.rsplit(".", 1)[0] if "." in name else "")
        norm = owner is not None and "norm" in type(owner).__name__.lower()
        kind = ("ones" if name.endswith("weight") else "zeros") if norm else "normal" if t.dim() > 1 else "zeros"
        entries.append(_Entry(name, t.dtype, tuple(t.shape),
                              lambda name=name, t=t, kind=kind: _random_chunks(name, t.numel(), t.dtype, kind,
                                                                             seed, std)))
    shards: List[List[_Entry]] = [[]]
    for e in entries:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(e)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    atomic_write_text(out / "config.json", config.to_json_string())
    names = [SINGLE] if len(shards) == 1 else [_shard_name(i, len(shards)) for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, group in zip(names, shards):
        total += _write_safetensors(out / name, group, {"format": "pt"})
        weight_map.update({e.name: name for e in group})
    if len(shards) > 1:
        atomic_write_text(out / INDEX, json.dumps({"metadata": {"total_size": total},
                                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return out
