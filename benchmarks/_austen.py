"""What every LLM benchmark shares: SmolLM2-135M-Instruct (fp32, fetched by the install step), *Pride and
Prejudice* to calibrate and recover on, and the start of *Sense and Sensibility* to evaluate (no overlap)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prunekit.analysis.perplexity import token_windows
from prunekit.zoo.llm import calibration_windows, load_smollm2, read_text


@dataclass
class Austen:
    dense: Any                 # the dense LlamaForCausalLM
    tok: Any                   # its tokenizer
    text_ids: torch.Tensor     # Pride and Prejudice, 1-D token ids (recovery windows come from here too)
    calib: torch.Tensor        # (windows, len) calibration windows
    eval_ids: torch.Tensor     # Sense and Sensibility, 1-D token ids
    windows: torch.Tensor      # (n, context) evaluation windows


def austen(calib_windows: int, calib_len: int, tokens: int, context: int, seed: int) -> Austen:
    dense, tok = load_smollm2()
    text_ids = tok(read_text("austen:prideprejudice"), return_tensors="pt").input_ids[0]
    eval_ids = tok(read_text("austen:sensesensibility"), return_tensors="pt").input_ids[0]
    return Austen(dense, tok, text_ids, calibration_windows(text_ids, calib_windows, calib_len, seed=seed), eval_ids,
                  token_windows(eval_ids, context, tokens))
