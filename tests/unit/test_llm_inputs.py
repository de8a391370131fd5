"""A user's model and text for the LLM commands: prunekit.zoo.llm.load_causal_lm / read_text / calibration_windows."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.zoo.assets import smollm2_dir
from prunekit.zoo.llm import calibration_windows, load_causal_lm, read_text, tiny_decoder


def test_read_text_from_files_and_austen(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("It was the best of times.", encoding="utf-8")
    assert read_text(txt) == "It was the best of times."
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n", encoding="utf-8")
    assert read_text(jl) == "one\n\ntwo"
    assert read_text("austen:persuasion").lstrip().upper().startswith("PERSUASION")


@pytest.mark.parametrize("content, match", [('{"txt": "x"}', "'text' string"), ("[1, 2]", "'text' string")])
def test_read_text_refuses_bad_jsonl(tmp_path, content, match):
    jl = tmp_path / "bad.jsonl"
    jl.write_text(content + "\n", encoding="utf-8")
    with pytest.raises(PrunekitError, match=match):
        read_text(jl)


def test_read_text_names_what_it_takes(tmp_path):
    with pytest.raises(PrunekitError, match="austen:<book>"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(PrunekitError, match="prideprejudice"):
        read_text("austen:hamlet")


def test_calibration_windows_are_seeded_slices():
    ids = torch.arange(1000)
    a, b = calibration_windows(ids, 8, 64, seed=3), calibration_windows(ids, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, b)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)   # consecutive tokens of the text
    assert not torch.equal(a, calibration_windows(ids, 8, 64, seed=4))
    with pytest.raises(PrunekitError, match="need more"):
        calibration_windows(torch.arange(10), 2, 64)


def test_load_causal_lm_from_a_folder(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_decoder("qwen2")
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp_path)
    loaded, tok = load_causal_lm(tmp_path)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        # the same weights (attention kernels may differ: eager in tiny_decoder, transformers' default here)
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert not loaded.training and tok("hello").input_ids
    with pytest.raises(PrunekitError, match="config.json"):
        load_causal_lm(tmp_path / "nope")
