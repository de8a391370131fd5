"""Decoder LLMs for the LLM pruning code: the real SmolLM2-135M-Instruct from the cache, and tiny random
Hugging Face causal LMs of the common architectures for unit tests.

    model, tokenizer = load_smollm2()            # LlamaForCausalLM, 30 layers, 9 / 3 heads, eval mode
    tiny = tiny_decoder("qwen2", seed=0)          # hidden 64, 4 layers, 4 query / 2 KV heads, vocab 256
    tiny(torch.randint(0, 256, (2, 16))).logits   # (2, 16, 256)

transformers is imported inside the functions (importing prunekit stays light); nothing is downloaded:
:func:`load_smollm2` reads the folder :func:`prunekit.zoo.assets.smollm2_dir` made from the fetched GGUF.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from prunekit._util import check_choice
from prunekit.errors import PrunekitError
from prunekit.zoo.assets import AUSTEN_BOOKS, austen_text, smollm2_dir

__all__ = ["TINY_ARCHS", "calibration_windows", "load_causal_lm", "load_smollm2", "read_text", "tiny_config",
           "tiny_decoder"]

TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt2")

# the shared shape of every tiny decoder, in Llama's names (GPT-2's own names are mapped below)
_TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
_GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
               "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"}


def load_smollm2(dtype: torch.dtype = torch.float32,
                 cache_dir: Optional[Union[str, os.PathLike]] = None) -> Tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its tokenizer.

    Read from the cache only (converted once from the fetched GGUF); a PrunekitError names the fetch
    command when the asset is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The config of :func:`tiny_decoder` (``overrides`` in Llama's names or the architecture's own)."""
    check_choice(arch, TINY_ARCHS, "tiny decoder architecture")
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "gpt2": transformers.GPT2Config}[arch]
    kwargs: Dict[str, Any] = dict(_TINY)
    if arch == "gpt2":  # no grouped-query attention; GPT-2 spells the sizes its own way
        del kwargs["num_key_value_heads"]
        kwargs = {_GPT2_NAMES.get(k, k): v for k, v in kwargs.items()}
        overrides = {_GPT2_NAMES.get(k, k): v for k, v in overrides.items()}
    if arch == "mistral":
        kwargs["sliding_window"] = None  # full attention, as in the other architectures
    known = cls().to_dict()
    unknown = sorted(k for k in overrides if k not in known and k not in getattr(cls, "attribute_map", {}))
    if unknown:
        raise PrunekitError(f"unknown {arch} config option(s) {', '.join(unknown)}")
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_decoder(arch: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small random-weight Hugging Face causal LM (eval mode) for ``arch`` in :data:`TINY_ARCHS`.

    Hidden 64, 4 layers, 4 query heads (2 KV heads where the architecture groups them), MLP 128, vocab
    256, 512 positions, eager attention; ``overrides`` change the config. The weights depend on ``seed``
    alone (the global RNG is left as it was).
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


# ----------------------------------------------------------------------------- a user's model and text

def load_causal_lm(spec: Union[str, os.PathLike], dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from ``"smollm2"``, a Hugging Face model folder (config.json + safetensors) or a
    ``.gguf`` file (dequantised to ``dtype``). Never remote code, never a download (local files only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(spec) == "smollm2":
        return load_smollm2(dtype)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from transformers import GgufConfig

        kw = dict(gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True), **kw)
        return model.eval(), AutoTokenizer.from_pretrained(path.parent, **kw)
    if not (path / "config.json").is_file():
        raise PrunekitError(f"--model {str(spec)!r}: expected 'smollm2', a Hugging Face model folder with "
                            "config.json, or a .gguf file")
    kw = dict(local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(path, **kw)


def read_text(spec: Union[str, os.PathLike]) -> str:
    """Text from ``"austen:<book>"`` (a novel fetched by the install step), a ``.txt`` file, or a ``.jsonl``
    file of ``{"text": ...}`` records (joined by blank lines)."""
    s = str(spec)
    if s.startswith("austen:"):
        return austen_text(s.split(":", 1)[1])
    path = Path(s).expanduser()
    if not path.is_file():
        raise PrunekitError(f"text {s!r}: not a file; give austen:<book> ({', '.join(AUSTEN_BOOKS)}) or a "
                            ".txt / .jsonl file")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise PrunekitError(f"{path}:{i}: each .jsonl line must be an object with a 'text' string")
                records.append(rec["text"])
        return "\n\n".join(records)
    return path.read_text(encoding="utf-8")


def calibration_windows(ids: torch.Tensor, n: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``length`` consecutive tokens at random places in ``ids`` (1-D), as the papers
    sample calibration segments; the same seed gives the same windows."""
    if ids.dim() != 1 or ids.numel() <= length:
        raise PrunekitError(f"calibration text has {ids.numel()} tokens; windows of {length} need more")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])
