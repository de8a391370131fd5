"""Save a pruned Hugging Face causal LM so that plain ``transformers`` loads it, and prunekit gets its masks back.

:func:`save_pretrained` writes a folder that ``transformers.AutoModelForCausalLM.from_pretrained(folder)``
loads with no prunekit installed:

- ``config.json`` and ``model.safetensors`` (Hugging Face's own ``save_pretrained``, from
  :func:`prunekit.apply.masking.plain_state_dict`: dense weights whose pruned entries are exact zeros, no
  ``*_mask`` buffers, tied weights stored once as transformers expects), the tokenizer's files if one is given;
- ``prunekit_masks.safetensors``: the packed 1-bit keep-masks by parameter name, so that masks are restored
  exactly (a kept weight that happens to be zero stays kept, and stays trainable);
- ``prunekit.json``: prunekit's version, the masked tensors with their shapes and sparsities, a digest of
  the masks, and the plan's metadata if one is given.

The folder is written under a temporary name beside ``directory`` and renamed into place once whole, so a
failed save leaves no half-written folder (an existing folder is replaced only then).

:func:`load_pretrained` builds the model with ``transformers`` from the folder (``trust_remote_code=False``:
nothing from the folder is executed) and puts the masks back through :func:`prunekit.apply.masking.load_state_dict`,
after checking them against the model (names, shapes, bit counts, digest, zeros where pruned).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit._util import atomic_folder, to_jsonable
from prunekit._version import __version__
from prunekit.apply import masking
from prunekit.bits import unpack_bits
from prunekit.errors import InvalidTypeError, PrunekitError
from prunekit.plan import Plan

FORMAT = "prunekit.hf/1"
MASKS = "prunekit_masks.safetensors"
META = "prunekit.json"
PathLike = Union[str, os.PathLike]


def _mask_doc(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    sparsity = masking.sparsity(model)
    return {name: {"shape": list(module._parameters[pname].shape), "sparsity": round(sparsity[name], 8)}
            for name, module, pname in masking.masked_parameters(model)}


def save_pretrained(model: nn.Module, directory: PathLike, tokenizer: Any = None, *, plan: Optional[Plan] = None,
                    metadata: Optional[Dict[str, Any]] = None, files: Optional[Dict[str, str]] = None) -> Path:
    """Write ``model`` (a Hugging Face ``PreTrainedModel``, pruned with prunekit or not) to the folder
    ``directory``; returns the folder.

    Plain ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads it (pruned weights are stored
    as zeros); :func:`load_pretrained` also restores the masks. ``tokenizer`` (anything with
    ``save_pretrained``) is saved with it; ``plan`` (what :func:`prunekit.prune` returned) records its
    metadata, and ``metadata`` free-form JSON, in ``prunekit.json``; ``files`` maps plain file names to text
    written beside them (``llm.json`` for the report), in the same atomic step. A model whose pruned weights moved off
    zero (trained without the masks) is refused, as :func:`prunekit.save` refuses it.
    """
    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise InvalidTypeError(f"save_pretrained needs a Hugging Face model (with .config and .save_pretrained), "
                               f"got {type(model).__name__}: use prunekit.save for other models")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise InvalidTypeError(f"tokenizer must have save_pretrained (a Hugging Face tokenizer), got "
                               f"{type(tokenizer).__name__}")
    masking.check_not_revived(model, doing="save")
    import transformers

    target = Path(directory)
    packed = {name: module._buffers[pname + masking.MASK_SUFFIX].detach().cpu().contiguous()
              for name, module, pname in masking.masked_parameters(model)}
    doc = {
        "format": FORMAT,
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "class": type(model).__name__,
        "masks": _mask_doc(model),
        "mask_digest": masking.digest(model),
        "global_sparsity": round(masking.global_sparsity(model), 8) if packed else 0.0,
        "plan": to_jsonable(plan.meta) if plan is not None else None,
        "metadata": to_jsonable(metadata or {}),
    }
    text = json.dumps(doc, indent=1, allow_nan=False)  # fails here, before anything is written
    extra = dict(files or {})
    bad = [n for n in extra if Path(n).name != n or n in (META, MASKS) or not n.endswith((".json", ".txt", ".md"))]
    if bad:
        raise PrunekitError(f"files: {', '.join(map(repr, bad))} must be plain .json/.txt/.md file names other "
                            f"than {META} and {MASKS}")

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp), state_dict=masking.plain_state_dict(model), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_file(packed, str(tmp / MASKS), metadata={"format": FORMAT})
        (tmp / META).write_text(text, encoding="utf-8")
        for name, content in extra.items():
            (tmp / name).write_text(content, encoding="utf-8")

    atomic_folder(target, fill)
    return target


# ------------------------------------------------------------------------------------------------ loading
def read_meta(directory: PathLike) -> Dict[str, Any]:
    """The ``prunekit.json`` of a folder written by :func:`save_pretrained`, checked for structure."""
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} was not written by prunekit.deploy.hf.save_pretrained "
                                "(load a plain Hugging Face folder with transformers directly)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PrunekitError(f"{path} is corrupt (not valid JSON: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PrunekitError(f"{path} is not a prunekit Hugging Face folder description (expected format {FORMAT!r})")
    masks = doc.get("masks")
    if not isinstance(masks, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shape"), list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v["shape"])
            for v in masks.values()):
        raise PrunekitError(f"{path} is corrupt: 'masks' must map parameter names to {{\"shape\": [ints], ...}}")
    if not isinstance(doc.get("mask_digest", ""), str):
        raise PrunekitError(f"{path} is corrupt: 'mask_digest' must be a string")
    return doc


def _read_masks(directory: Path, doc: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The packed masks, checked against ``prunekit.json`` and the model before anything is changed."""
    file = directory / MASKS
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the masks of {directory} are missing")
    try:
        packed = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrunekitError(f"{file} is corrupt or truncated (not a readable safetensors file): {e}") from e
    expected = doc["masks"]
    if set(packed) != set(expected):
        raise PrunekitError(f"{file} does not match {META}: masks missing {sorted(set(expected) - set(packed))[:8]}, "
                            f"unexpected {sorted(set(packed) - set(expected))[:8]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(packed) - set(params))
    if unknown:
        raise PrunekitError(f"{file} has masks for tensors the {type(model).__name__} does not have: {unknown[:8]}")
    for name, bits in packed.items():
        shape = tuple(params[name].shape)
        if tuple(expected[name]["shape"]) != shape:
            raise PrunekitError(f"{file}: mask {name!r} is for shape {tuple(expected[name]['shape'])}, the model's "
                                f"tensor has shape {shape}")
        numel = params[name].numel()
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != math.ceil(numel / 8):
            raise PrunekitError(f"{file}: mask {name!r} must be {math.ceil(numel / 8)} packed bytes (uint8) for "
                                f"{numel} entries, got {bits.dtype} of shape {tuple(bits.shape)}")
        if numel % 8 and int(bits[-1]) & ((1 << (8 - numel % 8)) - 1):
            raise PrunekitError(f"{file}: mask {name!r} has bits set past its {numel} entries (tampered)")
        pruned = ~unpack_bits(bits, numel).reshape(shape)
        if bool(params[name].detach()[pruned].any()):
            raise PrunekitError(f"{file}: mask {name!r} prunes weights that are not zero in the saved model (the "
                                "masks and the weights do not belong together: tampered, or from another save)")
    return packed


def load_pretrained(directory: PathLike) -> nn.Module:
    """Load a folder written by :func:`save_pretrained`: the model built by transformers
    (``AutoModelForCausalLM``, no remote code), with prunekit's masks restored exactly.

    The masks are validated against the model (names, shapes, bit counts, that pruned weights are zero,
    the digest recorded at save time) and a mismatch raises :class:`PrunekitError` naming it.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(directory)
    doc = read_meta(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
    packed = _read_masks(folder, doc, model)
    masking.load_state_dict(model, {name + masking.MASK_SUFFIX: bits for name, bits in packed.items()}, strict=False)
    if doc.get("mask_digest") and masking.digest(model) != doc["mask_digest"]:
        masking.remove(model)
        raise PrunekitError(f"{folder / MASKS} does not match the digest recorded in {META} (tampered, or the two "
                            "files come from different saves)")
    return model
