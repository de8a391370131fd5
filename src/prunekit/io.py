"""Save and load pruned models without pickle.

A saved model is a folder with two files:

- ``model.safetensors``: the state_dict (masks included), optionally in the
  compressed encoding of :mod:`prunekit.compress` (sparse tensors as bitmask +
  values or CSR);
- ``model.json``: the spec: how to rebuild the architecture (a registered
  built-in model name and its arguments, or nothing if the user passes their
  own model), the tensor shapes, the format, versions, and free-form metadata.

Loading reads only tensors and JSON: nothing from the files is executed.
Everything is checked before the model is touched, so a corrupt file or a
different architecture leaves the user's model as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, masking
from .compress import compress_state_dict, decompress_state_dict
from .models import build_model, model_spec
from .surgery.compact import compact_shapes, rebuild

FORMAT = "prunekit.model/1"
WEIGHTS = "model.safetensors"
SPEC = "model.json"
PathLike = Union[str, os.PathLike]


def _state_for_saving(model: nn.Module) -> Dict[str, torch.Tensor]:
    # non-persistent buffers (kept originals) are not part of state_dict: they stay in memory only
    sd = model.state_dict()
    return {k: v.detach().contiguous().clone() if _shares(v, sd, k) else v.detach().contiguous()
            for k, v in sd.items()}


def _shares(v: torch.Tensor, sd: Mapping[str, torch.Tensor], key: str) -> bool:
    """safetensors refuses tensors that share storage (tied weights): copy those."""
    ptr = v.untyped_storage().data_ptr()
    return any(k != key and t.untyped_storage().data_ptr() == ptr for k, t in sd.items())


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def save(model: nn.Module, path: PathLike, *, compressed: bool = False, spec: Optional[Dict[str, Any]] = None,
         metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` to the folder ``path``; returns the folder.

    ``spec`` describes how to rebuild the architecture; by default the one
    recorded by :func:`prunekit.models.build_model` is used (None for your own
    classes: pass the model to :func:`load` then).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = _state_for_saving(model)
    tensors, cmeta = (compress_state_dict(sd) if compressed else (sd, None))
    doc = {
        "format": FORMAT,
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
        "model": spec if spec is not None else model_spec(model),
        "class": type(model).__name__,
        "shapes": {k: list(v.shape) for k, v in sd.items()},
        "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()},
        "masked": [n for n, _, _ in masking.masked_parameters(model)],
        # slim (compacted) models are rebuilt from the original class + these shapes
        "compact_shapes": compact_shapes(model) if getattr(model, "_prunekit_compacted", False) else None,
        "compressed": cmeta,
        "metadata": metadata or {},
    }
    _atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic_write(folder / SPEC, lambda p: p.write_text(json.dumps(doc, indent=1)))
    return folder


def read_spec(path: PathLike) -> Dict[str, Any]:
    """The JSON spec of a saved model, validated."""
    spec_path = Path(path) / SPEC
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found: is {path} a folder written by prunekit.save?")
    try:
        doc = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec_path} is corrupt (not valid JSON: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{spec_path} is not a prunekit model spec (expected format {FORMAT!r})")
    return doc


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The saved tensors (decompressed), read without unpickling anything."""
    doc = read_spec(path)
    weights = Path(path) / WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is corrupt or truncated: {e}") from e
    sd = decompress_state_dict(tensors, doc["compressed"]) if doc.get("compressed") else tensors
    for k, shape in doc.get("shapes", {}).items():
        if k not in sd or list(sd[k].shape) != shape:
            raise ValueError(f"{weights} does not match its spec: tensor {k!r} is missing or has the wrong shape")
    return sd


def check_compatible(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise a clear error if ``sd`` does not fit ``model`` (before anything is changed)."""
    own = model.state_dict()
    own_names = set(own)
    params = {n for n, _ in model.named_parameters()}
    mask_keys = {k for k in sd if k.endswith(masking.MASK_SUFFIX) and k not in own_names
                 and k[: -len(masking.MASK_SUFFIX)] in params}
    missing = sorted(own_names - set(sd))
    unexpected = sorted(set(sd) - own_names - mask_keys)
    wrong = sorted(k for k in own_names & set(sd) if own[k].shape != sd[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:8])}")
    if wrong:
        problems.append("shape mismatch " + ", ".join(
            f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:8]))
    if problems:
        raise ValueError(f"saved weights do not fit {type(model).__name__} (a different architecture?): "
                         + "; ".join(problems))


def load(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a model saved by :func:`save`.

    Pass ``model`` (an instance of your architecture) to load into it; without
    it the spec must name a registered built-in model, which is rebuilt. A
    model saved after surgery (:func:`prunekit.surgery.compact`) comes back as
    a slim copy of ``model`` with the saved shapes; use the returned module.
    """
    doc = read_spec(path)
    sd = read_state_dict(path)
    if model is None:
        spec = doc.get("model")
        if not spec:
            raise ValueError(f"{path} was saved from a custom {doc.get('class')} model: "
                             "pass an instance of it, prunekit.load(path, model)")
        model = build_model(spec["name"], **spec.get("kwargs", {}))
    own = model.state_dict()
    if doc.get("compact_shapes") and any(k in own and own[k].shape != v.shape for k, v in sd.items()):
        try:  # saved after surgery: make the slim architecture from the original one
            model = rebuild(model, doc["compact_shapes"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"saved weights do not fit {type(model).__name__} (a different architecture?): "
                             f"{e}") from e
        model._prunekit_compacted = True
    check_compatible(model, sd)
    masking.load_state_dict(model, sd)
    return model
