"""Save and load pruned models without pickle.

A saved model is a folder with two files:

- ``model.safetensors``: the state_dict (masks included), optionally in the
  compressed encoding of :mod:`prunekit.deploy.compress` (sparse tensors as bitmask +
  values or CSR; masked weights as their kept values only, the mask holding the
  positions);
- ``model.json``: the spec: how to rebuild the architecture (a registered
  built-in model name and its arguments, or nothing if the user passes their
  own model), the tensor shapes and dtypes, the compression meta, the weights
  file's SHA-256, versions, and free-form metadata.

Loading reads only tensors and JSON: nothing from the files is executed.
Everything is checked before the model is touched (structure, shapes, checksum,
compressed offsets and indices), so a corrupt, truncated, tampered or foreign
checkpoint raises a ``ValueError`` naming the file and what is wrong, and the
user's model is left as it was. :func:`load` also reads a plain state_dict
file (``.safetensors``, or a torch ``.pt``/``.pth``/``.bin``/``.ckpt`` through
``torch.load(weights_only=True)``, which refuses to run pickled code).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit._util import atomic_write, atomic_write_text
from prunekit._version import __version__
from prunekit.apply import masking
from prunekit.deploy.compress import compress_state_dict, decompress_state_dict
from prunekit.deploy.packed import PackedLinear
from prunekit.deploy.sparse import SparseConv2d, SparseLinear, to_dense
from prunekit.errors import PrunekitError
from prunekit.surgery.compact import compact_shapes, rebuild
from prunekit.zoo.models import build_model, model_spec
from prunekit.zoo.sources import trusting

FORMAT = "prunekit.model/1"
WEIGHTS = "model.safetensors"
SPEC = "model.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PathLike = Union[str, os.PathLike]
_HASH_CHUNK = 1 << 22


def _state_for_saving(model: nn.Module) -> Dict[str, torch.Tensor]:
    # non-persistent buffers (kept originals) are not part of state_dict: they stay in memory only
    sd = model.state_dict()
    return {k: v.detach().contiguous().clone() if _shares(v, sd, k) else v.detach().contiguous()
            for k, v in sd.items()}


def _shares(v: torch.Tensor, sd: Mapping[str, torch.Tensor], key: str) -> bool:
    """safetensors refuses tensors that share storage (tied weights): copy those."""
    ptr = v.untyped_storage().data_ptr()
    return any(k != key and t.untyped_storage().data_ptr() == ptr for k, t in sd.items())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: nn.Module, path: PathLike, *, compressed: bool = False, spec: Optional[Dict[str, Any]] = None,
         metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` to the folder ``path``; returns the folder.

    ``spec`` describes how to rebuild the architecture; by default the one
    recorded by :func:`prunekit.zoo.models.build_model` is used (None for your own
    classes: pass the model to :func:`load` then). ``compressed=True`` stores
    each tensor in its smallest encoding (:mod:`prunekit.deploy.compress`). A model
    converted by :func:`prunekit.deploy.sparse.to_sparse` is saved as its exact
    masked twin (``spec["sparse_layers"]`` lists what was converted): load it
    and run ``to_sparse`` on the machine it will run on.
    """
    folder = Path(path)
    masking.check_not_revived(model)  # saved revived values would differ from what load() gives back
    model, sparse_layers = _dense_equivalent(model)
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
        # converted by prunekit.deploy.sparse.to_sparse: saved as the exact masked model (its CSR kernels were chosen by
        # timing on one machine; run to_sparse again on the target); these were the layers and kernel rules
        "sparse_layers": sparse_layers,
        "metadata": metadata or {},
    }
    json.dumps(doc)  # a value JSON cannot hold fails here, before any file is written

    def write_weights(tmp: Path) -> None:  # safetensors writes by file name
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        # the checksum ties the two files together: a half-finished re-save or a flipped byte is caught on load
        doc["weights_sha256"] = _sha256(tmp)

    # each file atomically: readers see the old file or the new one, never half of one
    atomic_write(folder / WEIGHTS, write_weights, by_path=True)
    atomic_write_text(folder / SPEC, json.dumps(doc, indent=1))
    return folder


def _dense_equivalent(model: nn.Module) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """A model converted by :func:`prunekit.deploy.sparse.to_sparse` as its masked dense twin (same weights, same
    masks, the original architecture that :func:`load` can rebuild), with what the conversion had chosen."""

    found = {name or "<model>": {"type": type(m).__name__, "sparsity": round(m.sparsity, 6),
                                 "mm_min_batch": getattr(m, "mm_min_batch", None),
                                 "native_max_batch": getattr(m, "native_max_batch", None),
                                 "native_kernel": getattr(m, "native_kernel", None),
                                 "packed_format": getattr(m, "fmt", None)}
             for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d, PackedLinear))}
    return (to_dense(model), found) if found else (model, None)


# ------------------------------------------------------------------------------ reading the spec
def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)


def _spec_problem(doc: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the structure of a spec, or None."""
    shapes, dtypes = doc.get("shapes"), doc.get("dtypes", {})
    if not isinstance(shapes, dict) or not all(_is_shape(v) for v in shapes.values()):
        return "'shapes' must map tensor names to lists of non-negative ints"
    if not isinstance(dtypes, dict) or not all(isinstance(v, str) for v in dtypes.values()):
        return "'dtypes' must map tensor names to dtype names"
    spec = doc.get("model")
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                                 and isinstance(spec.get("kwargs", {}), dict)):
        return "'model' must be null or {\"name\": str, \"kwargs\": {...}}"
    for key in ("compressed", "compact_shapes"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            return f"{key!r} must be null or an object"
    if doc.get("compressed") is not None and set(doc["compressed"]) != set(shapes):
        return "'compressed' does not describe the same tensors as 'shapes'"
    if not isinstance(doc.get("weights_sha256", ""), str):
        return "'weights_sha256' must be a string"
    return None


def read_spec(path: PathLike) -> Dict[str, Any]:
    """The JSON spec of a saved model, validated."""
    spec_path = Path(path) / SPEC
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found: is {path} a folder written by prunekit.save?")
    try:
        doc = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PrunekitError(f"{spec_path} is corrupt (not valid JSON: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PrunekitError(f"{spec_path} is not a prunekit model spec (expected format {FORMAT!r})")
    problem = _spec_problem(doc)
    if problem:
        raise PrunekitError(f"{spec_path} is corrupt: {problem}")
    return doc


# --------------------------------------------------------------------------- reading the tensors
def _read_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrunekitError(f"{file} is corrupt or truncated (not a readable safetensors file): {e}") from e


def _check_against_spec(file: Path, doc: Dict[str, Any], sd: Mapping[str, torch.Tensor]) -> None:
    shapes, dtypes = doc["shapes"], doc.get("dtypes", {})
    if set(sd) != set(shapes):
        extra, missing = sorted(set(sd) - set(shapes)), sorted(set(shapes) - set(sd))
        raise PrunekitError(f"{file} does not match its spec: missing tensors {missing[:8]}, "
                         f"unexpected tensors {extra[:8]}")
    for k, t in sd.items():
        dtype = str(t.dtype).replace("torch.", "")
        if list(t.shape) != shapes[k] or dtypes.get(k, dtype) != dtype:
            raise PrunekitError(f"{file} does not match its spec: tensor {k!r} is {dtype} {list(t.shape)}, "
                             f"the spec says {dtypes.get(k)} {shapes[k]}")


def _check_header(file: Path, doc: Dict[str, Any]) -> None:
    """The weights file's own header (read without loading a tensor) agrees with the spec's shapes: a spec
    edited on its own cannot make the loader build or allocate anything bigger than what was saved."""
    if doc.get("compressed"):  # encoded tensors: their decoded shapes are checked in read_state_dict
        return
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            header = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrunekitError(f"{file} is corrupt or truncated (not a readable safetensors file): {e}") from e
    if header != doc["shapes"]:
        bad = sorted(set(header) ^ set(doc["shapes"])) or sorted(k for k in header if header[k] != doc["shapes"][k])
        raise PrunekitError(f"{file} does not match its spec ({SPEC}): tensors {bad[:8]} differ")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The saved tensors (decompressed), read without unpickling anything and checked against the spec."""
    doc = read_spec(path)
    weights = Path(path) / WEIGHTS
    tensors = _read_safetensors(weights)  # first: a truncated file gets the more telling error
    if doc.get("weights_sha256") and _sha256(weights) != doc["weights_sha256"]:
        raise PrunekitError(f"{weights} is corrupt: its SHA-256 differs from the one recorded in {SPEC} "
                         "(damaged or modified, or the two files come from different saves)")
    cmeta = doc.get("compressed")
    if cmeta:
        for k, info in cmeta.items():  # no decoding (and no allocation) for a shape the spec does not have
            if not isinstance(info, dict) or info.get("shape") != doc["shapes"][k]:
                raise PrunekitError(f"{weights} is corrupt: compressed meta of {k!r} disagrees with the spec's shape")
        try:
            sd = decompress_state_dict(tensors, cmeta)
        except (ValueError, RuntimeError, IndexError) as e:
            raise PrunekitError(f"{weights} is corrupt (compressed tensors do not decode): {e}") from e
    else:
        sd = tensors
    _check_against_spec(weights, doc, sd)
    return sd


def _unwrap_state_dict(obj: Any, file: Path) -> Dict[str, torch.Tensor]:
    """A dict of tensors, or one nested under the usual ``state_dict`` / ``model`` keys."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), dict)]
        obj = nested[0] if nested else obj
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise PrunekitError(f"{file} does not hold a state_dict (a dict of named tensors)")
    return dict(obj)


def read_weights_file(file: PathLike) -> Dict[str, torch.Tensor]:
    """A plain state_dict file: ``.safetensors``, or a torch checkpoint read with ``weights_only=True``.

    A pickle that tries to build anything but tensors and plain containers (code
    execution payloads included) is refused before any of it runs.
    """
    file = Path(file)
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(file)
    if suffix not in TORCH_SUFFIXES:
        raise PrunekitError(f"{file}: unknown weights file type {suffix!r}; allowed: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)}, or a folder written by prunekit.save")
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PrunekitError(f"{file} was refused: it is not a weights-only checkpoint (it would run code or build "
                         f"arbitrary objects when unpickled; nothing was executed): {str(e)[:300]}") from e
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError) as e:
        raise PrunekitError(f"{file} is corrupt or truncated (not a readable torch checkpoint): {e}") from e
    return _unwrap_state_dict(obj, file)


# ---------------------------------------------------------------------------------- loading
def check_compatible(model: nn.Module, sd: Mapping[str, Any]) -> None:
    """Raise a clear error if ``sd`` (tensors, or shapes as lists) does not fit ``model``; nothing is changed."""
    own = model.state_dict()
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in sd.items()}
    own_names = set(own)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    mask_keys = {k for k in sd if k.endswith(masking.MASK_SUFFIX) and k not in own_names
                 and k[: -len(masking.MASK_SUFFIX)] in params}
    missing = sorted(own_names - set(sd))
    unexpected = sorted(set(sd) - own_names - mask_keys)
    wrong = sorted(k for k in own_names & set(sd) if tuple(own[k].shape) != shapes[k])
    kinds = sorted(k for k in own_names & set(sd) if isinstance(sd[k], torch.Tensor)
                   and sd[k].is_floating_point() != own[k].is_floating_point())
    masks = sorted(k for k in mask_keys if shapes[k] != (math.ceil(own[k[: -len(masking.MASK_SUFFIX)]].numel() / 8),))
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:8])}")
    if wrong:
        problems.append("shape mismatch " + ", ".join(f"{k} {shapes[k]} vs model {tuple(own[k].shape)}"
                                                       for k in wrong[:8]))
    if kinds:
        problems.append(f"dtype kind mismatch (float vs integer) {', '.join(kinds[:8])}")
    if masks:
        problems.append(f"masks of the wrong size {', '.join(masks[:8])}")
    if problems:
        raise PrunekitError(f"saved weights do not fit {type(model).__name__} (a different architecture?): "
                         + "; ".join(problems))


def _build_named(path: PathLike, doc: Dict[str, Any]) -> nn.Module:
    """The built-in model the spec names, built for real only after a shape-only (meta device) twin of it
    matched the spec: spec arguments that would allocate more than the saved tensors hold are refused
    before any memory is taken."""
    spec = doc.get("model")
    if not spec:
        raise PrunekitError(f"{path} was saved from a custom {doc.get('class')} model: "
                            "pass an instance of it, prunekit.load(path, model)")
    try:
        with torch.device("meta"):
            probe = _shaped(path, doc, build_model(spec["name"], **spec.get("kwargs", {})))
        check_compatible(probe, doc["shapes"])
        return build_model(spec["name"], **spec.get("kwargs", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise PrunekitError(f"{Path(path) / SPEC} names a model that cannot be built or does not match the saved "
                            f"tensors: {e}") from e


def _model_for(path: PathLike, doc: Dict[str, Any], model: Optional[nn.Module]) -> nn.Module:
    """The model to load into: the user's, or the built-in one the spec names (slimmed if compacted)."""
    return _shaped(path, doc, _build_named(path, doc) if model is None else model)


def _shaped(path: PathLike, doc: Dict[str, Any], model: nn.Module) -> nn.Module:
    """``model``, rebuilt at the saved (slim) shapes when the save came after surgery."""
    own = model.state_dict()
    if doc.get("compact_shapes") and any(k in own and list(own[k].shape) != v for k, v in doc["shapes"].items()):
        try:  # saved after surgery: make the slim architecture from the original one
            model = rebuild(model, doc["compact_shapes"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PrunekitError(f"saved weights do not fit {type(model).__name__} (a different architecture?): "
                             f"{e}") from e
        model._prunekit_compacted = True
    return model


def load(path: PathLike, model: Optional[nn.Module] = None, *, trust_code: bool = False) -> nn.Module:
    """Load a model saved by :func:`save` (a folder), or a plain state_dict file into ``model``.

    Pass ``model`` (an instance of your architecture) to load into it; without
    it the spec must name a model prunekit can rebuild: a built-in one, ``timm:NAME`` or ``hf:DIR``
    (nothing is downloaded). A spec naming your own factory (``model.py:make``) would run that code, so it
    is refused unless ``trust_code=True``. A model saved after surgery (:func:`prunekit.surgery.compact`)
    comes back as a slim copy of ``model`` with the saved shapes; use the returned module.
    On any error ``model`` is left untouched.
    """
    with trusting(bool(trust_code)):
        return _load(Path(path), model)


def _load(p: Path, model: Optional[nn.Module]) -> nn.Module:
    if p.is_file():
        if model is None:
            raise PrunekitError(f"{p} is a weights file without a spec: pass the model to load it into, "
                             "prunekit.load(path, model)")
        sd = read_weights_file(p)
    else:
        doc = read_spec(p)
        _check_header(p / WEIGHTS, doc)
        model = _model_for(p, doc, model)
        check_compatible(model, doc["shapes"])  # before decoding: a foreign checkpoint costs no allocation
        sd = read_state_dict(p)
    check_compatible(model, sd)
    masking.load_state_dict(model, sd)
    return model
