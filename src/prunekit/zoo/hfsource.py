"""``hf:DIR`` model sources: a classifier from a local Hugging Face folder, never from the network.

The folder's ``config.json`` chooses the auto class (image classification when the config describes images,
sequence classification otherwise); its weights, when it has any, are read with ``local_files_only=True``.
No remote code is ever run (``trust_remote_code=False``; a config with an ``auto_map`` is refused). The
saved spec records the final config itself, so a pruned model is rebuilt from the spec alone (the weights
come from the saved file). The model is wrapped so that ``model(x)`` returns the logits tensor the rest of
prunekit (training, evaluation, export) expects, not a ``ModelOutput``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from prunekit.errors import PrunekitError

log = logging.getLogger("prunekit")
TASKS = ("image-classification", "sequence-classification")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class HFClassifier(nn.Module):
    """A Hugging Face ``...ForImageClassification`` / ``...ForSequenceClassification`` returning logits."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise PrunekitError("hf: model sources need transformers: pip install transformers") from e
    return transformers


def _task(config: Any, task: Any) -> str:
    if task is not None:
        if task not in TASKS:
            raise PrunekitError(f"unknown Hugging Face task {task!r}; allowed: {', '.join(TASKS)}")
        return task
    archs = " ".join(getattr(config, "architectures", None) or [])
    images = "ImageClassification" in archs or hasattr(config, "num_channels") or hasattr(config, "image_size")
    return TASKS[0] if images else TASKS[1]


def _config(folder: str, recorded: Any, overrides: Dict[str, Any]) -> Any:
    """The config: recorded in a saved spec (rebuilding), else the folder's; ``overrides`` set on it."""
    tf = _transformers()
    if recorded is not None:
        if not isinstance(recorded, dict) or not isinstance(recorded.get("model_type"), str):
            raise PrunekitError("an hf: model spec's 'config' must be a config dict with a 'model_type'")
        doc = recorded
    else:
        doc = json.loads((Path(folder) / "config.json").read_text())
    if doc.get("auto_map"):
        raise PrunekitError(f"hf:{folder} needs custom code (auto_map in its config), which prunekit never runs")
    doc = {k: v for k, v in doc.items() if k not in ("transformers_version", "_name_or_path")}
    try:
        config = tf.AutoConfig.for_model(**doc)
        for k, v in overrides.items():
            setattr(config, k, v)
    except (ValueError, KeyError, TypeError) as e:
        raise PrunekitError(f"hf:{folder}: cannot make its config: {e}") from e
    return config


def build_hf(folder: str, kwargs: Dict[str, Any]) -> Tuple[nn.Module, Dict[str, Any]]:
    """The wrapped classifier and the spec kwargs that rebuild it (``{"task", "config"}``).

    ``kwargs``: ``config`` (a recorded config: rebuild from it, no folder read), ``task`` (one of TASKS), and
    config fields to override (``num_labels`` from the data, ...). A folder's weights are loaded only when
    building from the folder; a new head (more or fewer labels than saved) starts untrained.
    """
    tf = _transformers()
    kwargs = dict(kwargs)
    recorded, task = kwargs.pop("config", None), kwargs.pop("task", None)
    config = _config(folder, recorded, kwargs)
    task = _task(config, task)
    auto = tf.AutoModelForImageClassification if task == TASKS[0] else tf.AutoModelForSequenceClassification
    has_weights = recorded is None and any((Path(folder) / w).is_file() for w in _WEIGHTS)
    try:
        if has_weights:
            model = auto.from_pretrained(folder, config=config, local_files_only=True, trust_remote_code=False,
                                         ignore_mismatched_sizes=True)
        else:
            model = auto.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise PrunekitError(f"hf:{folder}: cannot build a {task} model: {e}") from e
    spec = {"task": task, "config": json.loads(config.to_json_string(use_diff=False))}
    return HFClassifier(model, task), spec
