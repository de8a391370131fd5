"""Compact storage of sparse state_dicts.

Pruned models keep their parameters dense with exact zeros, so on disk they are as
large as the original. ``compress_state_dict`` re-encodes every floating tensor in
whichever of three formats is smallest for it:

* ``dense``   -- the tensor as is (key ``name``);
* ``bitmask`` -- one bit per entry (``name::bits``, uint8) + the non-zero values
  (``name::values``, same dtype);
* ``csr``     -- the tensor viewed as ``(shape[0], -1)``: row pointers
  (``name::indptr``), column indices in the smallest integer dtype that fits
  (``name::indices``) and the values (``name::values``);
* ``masked``  -- only the kept values (``name::values``), the positions taken from
  the prunekit mask ``<name>_mask`` stored in the same state_dict (packed bits,
  see :mod:`prunekit.apply.masking`). A masked model would otherwise store its bits
  twice (mask + bitmask); chosen only where every pruned entry is zero.

The result is a flat ``{key: tensor}`` dict that ``safetensors`` can save, plus a
JSON-safe ``meta`` dict describing how to rebuild each tensor. Zeros are decoded as
+0.0 (a -0.0 in a sparse tensor is not kept); NaN/inf values are kept, since they
are non-zero.
"""
from __future__ import annotations

import json
import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from safetensors.torch import load as _st_load, save as _st_save

from prunekit.bits import pack_bits, unpack_bits
from prunekit.errors import PrunekitError

FORMATS = ("dense", "bitmask", "csr", "masked")
MASK_SUFFIX = "_mask"  # prunekit.apply.masking.MASK_SUFFIX (masking imports this module, not the reverse)
#: key of the safetensors file metadata entry that holds the JSON meta
META_KEY = "prunekit.compress"  # a file format tag: unchanged when the module moved
# Estimated bytes each extra tensor adds to the safetensors header and the meta JSON
# (key, dtype, shape, offsets); it keeps tiny tensors from being "compressed" bigger.
_PER_TENSOR_OVERHEAD = 96

Tensor = torch.Tensor






# ------------------------------------------------------------------------- encoding
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _parse_dtype(name: object, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PrunekitError(f"{where}: unknown dtype {name!r}")
    return dtype


def _index_dtype(limit: int) -> torch.dtype:
    """Smallest signed integer dtype holding ``limit`` (signed: torch's uint16/uint32 lack most ops)."""
    for dtype in (torch.int16, torch.int32):
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _csr_view(t: Tensor) -> Tensor:
    # 1-D (and 0-D) tensors become a single row so very sparse vectors can use CSR too
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def _sizes(t: Tensor, nnz: int, kept: Optional[int]) -> Dict[str, int]:
    """Estimated serialized bytes of ``t`` in each format (``kept``: entries a usable mask keeps)."""
    item, numel = t.element_size(), t.numel()
    rows, cols = _csr_view(t).shape
    idx_item = torch.empty(0, dtype=_index_dtype(max(cols - 1, 0))).element_size()
    ptr_item = torch.empty(0, dtype=_index_dtype(nnz)).element_size()
    sizes = {
        "dense": numel * item,
        "bitmask": (numel + 7) // 8 + nnz * item + _PER_TENSOR_OVERHEAD + 16,
        "csr": (rows + 1) * ptr_item + nnz * (idx_item + item) + 2 * _PER_TENSOR_OVERHEAD + 48,
    }
    if kept is not None:  # the bits are already paid for by the mask buffer
        sizes["masked"] = kept * item + _PER_TENSOR_OVERHEAD + 16
    return sizes


def _usable_mask(sd: Dict[str, Tensor], name: str, t: Tensor) -> Optional[Tensor]:
    """The keep-mask stored next to ``name`` (``<name>_mask``) if it can rebuild ``t`` exactly, else None."""
    packed = sd.get(name + MASK_SUFFIX)
    if (not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1
            or packed.numel() != (t.numel() + 7) // 8 or not t.is_floating_point() or t.numel() == 0):
        return None
    keep = unpack_bits(packed.detach().cpu(), t.numel()).reshape(t.shape)
    if bool(t.masked_select(~keep).ne(0).any()):  # a pruned entry that is not zero (or NaN): not rebuildable
        return None
    return keep


def _encode(name: str, t: Tensor, fmt: str, nonzero: Tensor, keep: Optional[Tensor]) -> Tuple[Dict[str, Tensor], dict]:
    """Encode one tensor in ``fmt``; ``nonzero`` is ``t != 0``, ``keep`` its usable mask (masked format)."""
    meta = {"format": fmt, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    if fmt == "dense":
        return {name: t}, meta
    if fmt == "masked":
        meta.update(nnz=int(keep.sum()), mask=name + MASK_SUFFIX)
        return {f"{name}::values": t.reshape(-1)[keep.reshape(-1)]}, meta
    nnz = int(nonzero.sum())
    meta["nnz"] = nnz
    if fmt == "bitmask":
        values = t.reshape(-1)[nonzero.reshape(-1)]
        return {f"{name}::bits": pack_bits(nonzero), f"{name}::values": values}, meta
    view, mask = _csr_view(t), _csr_view(nonzero)
    rows, cols = view.shape
    meta.update(rows=rows, cols=cols)
    ptr = torch.zeros(rows + 1, dtype=torch.int64, device=t.device)
    torch.cumsum(mask.sum(dim=1), dim=0, out=ptr[1:])
    # nonzero() lists entries in row-major order, matching view[mask]
    cols_idx = mask.nonzero()[:, 1].to(_index_dtype(max(cols - 1, 0)))
    return {
        f"{name}::indptr": ptr.to(_index_dtype(nnz)),
        f"{name}::indices": cols_idx,
        f"{name}::values": view[mask],
    }, meta


def _choose(t: Tensor, nonzero: Tensor, min_sparsity: float, allowed: Sequence[str], keep: Optional[Tensor]) -> str:
    if not t.is_floating_point() or t.numel() == 0:
        return "dense"  # integer/bool buffers (step counters, indices, masks) are small and rarely sparse
    candidates = [f for f in allowed if f != "masked" or keep is not None]
    nnz = int(nonzero.sum())
    if not candidates or (1.0 - nnz / t.numel() < min_sparsity and "dense" in allowed):
        return "dense"
    sizes = _sizes(t, nnz, None if keep is None else int(keep.sum()))
    return min(candidates, key=lambda f: sizes[f])


def _check_formats(formats: Optional[Iterable[str]]) -> Tuple[str, ...]:
    allowed = tuple(FORMATS if formats is None else formats)
    unknown = [f for f in allowed if f not in FORMATS]
    if unknown or not allowed:
        raise PrunekitError(f"unknown/empty formats {unknown or allowed!r}; allowed: {', '.join(FORMATS)}")
    return allowed


def compress_state_dict(
    sd: Dict[str, Tensor], *, min_sparsity: float = 0.0, formats: Optional[Iterable[str]] = None
) -> Tuple[Dict[str, Tensor], dict]:
    """Encode each floating tensor of ``sd`` in its smallest format.

    ``min_sparsity``: tensors with a smaller fraction of zeros stay dense.
    ``formats``: restrict the candidate formats (default: all of :data:`FORMATS`);
    non-floating tensors are always stored dense, and ``masked`` applies only to
    tensors with a usable ``<name>_mask`` (otherwise, alone, it means dense).
    Returns ``(tensors, meta)``: contiguous CPU tensors ready for ``safetensors`` and a
    JSON-safe ``{name: {"format", "shape", "dtype", ...}}``.
    """
    allowed = _check_formats(formats)
    tensors: Dict[str, Tensor] = {}
    meta: dict = {}
    for name, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise PrunekitError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu()
        nonzero = t != 0
        keep = _usable_mask(sd, name, t) if "masked" in allowed else None
        fmt = _choose(t, nonzero, min_sparsity, allowed, keep)
        encoded, meta[name] = _encode(name, t, fmt, nonzero, keep)
        for key, enc in encoded.items():
            if key in tensors:
                raise PrunekitError(f"key collision on {key!r}: state_dict names must not contain '::'")
            tensors[key] = enc.contiguous()
    return _unshare(tensors), meta


def _unshare(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Clone tensors whose storage is already used (tied weights, views): safetensors refuses shared memory."""
    seen, out = set(), {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


# ------------------------------------------------------------------------- decoding
def _get(tensors: Dict[str, Tensor], key: str, dtype: Optional[torch.dtype], numel: Optional[int]) -> Tensor:
    if key not in tensors:
        raise PrunekitError(f"missing tensor {key!r}")
    t = tensors[key]
    if t.dim() != 1:
        raise PrunekitError(f"tensor {key!r} must be 1-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise PrunekitError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    if dtype is None and (t.is_floating_point() or t.dtype == torch.bool or t.is_complex()):
        raise PrunekitError(f"tensor {key!r} must hold integers, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise PrunekitError(f"tensor {key!r} has {t.numel()} entries, expected {numel}")
    return t


def _check_entry(name: str, info: object) -> Tuple[str, list, torch.dtype, int]:
    if not isinstance(info, dict):
        raise PrunekitError(f"meta[{name!r}] must be a dict, got {type(info).__name__}")
    fmt = info.get("format")
    if fmt not in FORMATS:
        raise PrunekitError(f"meta[{name!r}]: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise PrunekitError(f"meta[{name!r}]: shape must be a list of non-negative ints, got {shape!r}")
    dtype = _parse_dtype(info.get("dtype"), f"meta[{name!r}]")
    if fmt != "dense":
        nnz = info.get("nnz")
        if not isinstance(nnz, int) or not 0 <= nnz <= math.prod(shape):
            raise PrunekitError(f"meta[{name!r}]: nnz must be an int in [0, numel], got {nnz!r}")
    return fmt, shape, dtype, math.prod(shape)


def _scatter_kept(name: str, info: dict, tensors, dtype, keep: Tensor, what: str) -> Tensor:
    """The dense tensor whose ``keep`` entries are the stored values (their count checked against meta)."""
    kept = int(keep.sum())
    if kept != info["nnz"]:
        raise PrunekitError(f"{name!r}: {what} {kept} entries but meta says nnz={info['nnz']}")
    out = torch.zeros(keep.numel(), dtype=dtype)
    out[keep] = _get(tensors, f"{name}::values", dtype, kept)
    return out


def _decode_bitmask(name: str, info: dict, tensors, dtype, numel) -> Tensor:
    mask = unpack_bits(_get(tensors, f"{name}::bits", torch.uint8, (numel + 7) // 8), numel)
    return _scatter_kept(name, info, tensors, dtype, mask, "bitmask sets")


def _decode_masked(name: str, info: dict, tensors, dtype, numel, meta: dict) -> Tensor:
    key = name + MASK_SUFFIX
    if info.get("mask") != key:
        raise PrunekitError(f"{name!r}: masked format must name its mask {key!r}, got {info.get('mask')!r}")
    mask_info = meta.get(key)
    if not isinstance(mask_info, dict) or mask_info.get("format") != "dense" or mask_info.get("dtype") != "uint8":
        raise PrunekitError(f"{name!r}: its mask {key!r} is not stored as a dense uint8 tensor")
    keep = unpack_bits(_get(tensors, key, torch.uint8, (numel + 7) // 8), numel)
    return _scatter_kept(name, info, tensors, dtype, keep, "mask keeps")


def _decode_csr(name: str, info: dict, tensors, dtype, numel) -> Tensor:
    rows, cols, nnz = info.get("rows"), info.get("cols"), info["nnz"]
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 0 or cols < 0 or rows * cols != numel:
        raise PrunekitError(f"{name!r}: csr rows={rows!r} x cols={cols!r} does not match {numel} entries")
    ptr = _get(tensors, f"{name}::indptr", None, rows + 1).long()
    idx = _get(tensors, f"{name}::indices", None, nnz).long()
    values = _get(tensors, f"{name}::values", dtype, nnz)
    counts = ptr.diff()
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((counts < 0).any()):
        raise PrunekitError(f"{name!r}: csr row pointers must rise from 0 to nnz={nnz}")
    if nnz and (int(idx.min()) < 0 or int(idx.max()) >= cols):
        raise PrunekitError(f"{name!r}: csr column index out of range [0, {cols})")
    row_idx = torch.repeat_interleave(torch.arange(rows), counts)
    out = torch.zeros(rows, cols, dtype=dtype)
    out[row_idx, idx] = values
    return out


def decompress_state_dict(tensors: Dict[str, Tensor], meta: dict) -> Dict[str, Tensor]:
    """Rebuild the original state_dict from :func:`compress_state_dict` output.

    Raises ``ValueError`` on any inconsistency between ``meta`` and ``tensors``.
    Tensors not referenced by ``meta`` are ignored (the file may hold other data).
    """
    if not isinstance(meta, dict):
        raise PrunekitError(f"meta must be a dict, got {type(meta).__name__}")
    out: Dict[str, Tensor] = {}
    for name, info in meta.items():
        fmt, shape, dtype, numel = _check_entry(name, info)
        if fmt == "dense":
            t = tensors.get(name)
            if t is None:
                raise PrunekitError(f"missing tensor {name!r}")
            if t.dtype != dtype or list(t.shape) != shape:
                raise PrunekitError(f"{name!r}: dense tensor is {t.dtype} {list(t.shape)}, meta says {dtype} {shape}")
            out[name] = t
            continue
        if fmt == "masked":
            flat = _decode_masked(name, info, tensors, dtype, numel, meta)
        else:
            flat = (_decode_bitmask if fmt == "bitmask" else _decode_csr)(name, info, tensors, dtype, numel)
        out[name] = flat.reshape(shape)
    return out


# ------------------------------------------------------------------------ files/sizes
def to_bytes(sd: Dict[str, Tensor], *, min_sparsity: float = 0.0) -> bytes:
    """Compressed safetensors bytes; the meta JSON lives in the file metadata under :data:`META_KEY`."""
    tensors, meta = compress_state_dict(sd, min_sparsity=min_sparsity)
    return _st_save(tensors, metadata={META_KEY: json.dumps(meta)})


def from_bytes(data: bytes) -> Dict[str, Tensor]:
    """Inverse of :func:`to_bytes`."""
    # safetensors layout: u64 little-endian header length, then the JSON header
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise PrunekitError(f"not a prunekit compressed safetensors file (no {META_KEY!r} metadata)") from exc
    return decompress_state_dict(_st_load(data), meta)


def compressed_size_bytes(sd: Dict[str, Tensor], *, min_sparsity: float = 0.0) -> int:
    """Bytes of the compressed safetensors file, meta JSON included."""
    return len(to_bytes(sd, min_sparsity=min_sparsity))


def dense_size_bytes(sd: Dict[str, Tensor]) -> int:
    """Bytes of ``sd`` saved as a plain safetensors file."""
    return len(_st_save(_unshare(dict(sd))))
