"""``prunekit llm prune`` / ``llm eval`` end to end, in subprocesses, on a tiny random Llama that uses SmolLM2's
tokenizer (fetched by the install step), calibrated and evaluated on Jane Austen."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from prunekit.zoo.llm import load_smollm2, tiny_decoder

pytestmark = pytest.mark.slow


def _cli(*args, cwd):
    env = {**os.environ, "PRUNEKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "prunekit.cli.__main__", "llm", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with SmolLM2's vocabulary, saved as a plain transformers folder with the tokenizer."""
    _, tok = load_smollm2()
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_decoder("llama", vocab_size=len(tok), num_hidden_layers=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TEXT = ["--tokens", 256, "--context", 128]


def test_prune_saves_a_transformers_folder_and_reports_perplexity(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    r = _cli("prune", "--model", tiny_dir, "--method", "sparsegpt", "--sparsity", 0.5, "--calib-windows", 4,
             "--calib-len", 32, "--out", out, *TEXT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert summary["perplexity"] > 1 and summary["dense_perplexity"] > 1
    assert summary["ppl_ratio"] == pytest.approx(summary["perplexity"] / summary["dense_perplexity"])
    model = AutoModelForCausalLM.from_pretrained(out)   # plain transformers, no prunekit
    q = model.model.layers[1].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
    assert (model.lm_head.weight != 0).all()   # the tied embeddings are not pruned
    r = _cli("eval", out, *TEXT, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["perplexity"] == pytest.approx(summary["perplexity"], rel=1e-4)
    assert res["tokens"] == 2 * 127 and res["windows"] == 2


def test_nm_with_owl_and_bad_flags_refused_before_loading(tiny_dir, tmp_path):
    for flags, msg in ((["--sparsity", 0.5, "--nm", "2:4"], "exactly one of"),
                       (["--nm", "4:4"], "N:M"), (["--sparsity", 1.5], "fraction"),
                       (["--nm", "2:4", "--allocation", "owl"], "allocation must be uniform"),
                       (["--structured", "ffn", "--sparsity", 0.5], "takes --amount"),
                       (["--structured", "layers"], "needs --amount"),
                       (["--sparsity", 0.5, "--amount", 2], "--amount is for --structured"),
                       (["--sparsity", 0.5, "--recover", "kl", "--no-eval"], "drop --no-eval"),
                       (["--sparsity", 0.5, "--recover", "kl", "--recover-steps", 0], "--recover-steps"),
                       (["--sparsity", 0.5, "--method", "wanda", "--no-dense-targets"], "--refit"),
                       (["--sparsity", 0.5, "--tokens", 100], "at least one --context")):
        r = _cli("prune", "--model", "no/such/model", *flags, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
    r = _cli("prune", "--model", tmp_path / "missing", "--sparsity", 0.5, "--no-eval", cwd=tmp_path)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_wanda_nm_no_eval(tiny_dir, tmp_path):
    out = tmp_path / "nm"
    r = _cli("prune", "--model", tiny_dir, "--method", "wanda", "--nm", "2:4", "--calib-windows", 2, "--calib-len",
             32, "--no-eval", "--prune-head", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["perplexity"] is None
    from prunekit.deploy.hf import load_pretrained

    model = load_pretrained(out)
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.all((w.reshape(-1, 4) != 0).sum(1) <= 2)
    head = model.lm_head.weight   # --prune-head: the output head is 2:4 too
    assert torch.all((head.reshape(-1, 4) != 0).sum(1) <= 2) and (head == 0).float().mean().item() >= 0.49


def test_sweep_flags_refused_before_loading(tmp_path):
    for flags, msg in ((["--methods", "wanda,bogus"], "allowed: magnitude, wanda, sparsegpt"),
                       (["--allocations", "even"], "allowed: uniform"), (["--sparsities", "0.5,x"], "numbers"),
                       (["--sparsities", "1.2"], "fractions in (0, 1)"), (["--nm", "5:4"], "N:M")):
        r = _cli("sweep", "--model", "no/such/model", *flags, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)


def test_structured_depth_with_recovery_saves_a_smaller_model_and_llm_json(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "depth"
    r = _cli("prune", "--model", tiny_dir, "--structured", "layers", "--amount", 1, "--recover", "ce",
             "--recover-steps", 2, "--recover-windows", 4, "--recover-batch", 2, "--calib-windows", 4, "--calib-len",
             32, "--out", out, *TEXT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["kind"] == "structured" and summary["removed"].startswith("layers ")
    rec = summary["recovered"]
    assert rec["loss"] == "ce" and rec["steps"] == 2 and rec["ppl_ratio"] == pytest.approx(
        rec["perplexity"] / summary["dense_perplexity"])
    assert summary["tokens_per_s"] > 0 and summary["dense_tokens_per_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    doc = json.loads((out / "llm.json").read_text())
    assert doc["format"] == "prunekit.llm/1" and len(doc["block_influence"]) == 2
    assert doc["runs"][0]["removed_layers"] == [int(summary["removed"].split()[-1])]
    assert doc["dense"]["params"] > doc["runs"][0]["params"]


def test_sweep_writes_one_record_per_method_target_and_allocation(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    r = _cli("sweep", "--model", tiny_dir, "--methods", "magnitude,wanda", "--sparsities", "0.5", "--nm", "2:4",
             "--allocations", "uniform,owl", "--refit", "--calib-windows", 4, "--calib-len", 32, "--out", out, *TEXT,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "llm.json").read_text())
    got = sorted((x["method"], str(x["target"]), x["allocation"]) for x in doc["runs"])
    assert got == sorted((m, t, a) for m in ("magnitude", "wanda") for t, a in
                         (("0.5", "uniform"), ("0.5", "owl"), ("2:4", "uniform")))
    for run in doc["runs"]:
        assert run["refit"] is True and run["ppl_ratio"] == pytest.approx(run["perplexity"] / doc["dense"]["perplexity"])
        assert run["sparsity"] == pytest.approx(0.5, abs=0.02)
    owl = next(x for x in doc["runs"] if x["allocation"] == "owl" and x["method"] == "wanda")
    assert len(set(round(v, 6) for v in owl["layer_sparsity"].values())) > 1   # OWL spreads the sparsities
    assert len(doc["block_influence"]) == 2


def test_bench_prints_dense_and_sparse_speed_bytes_and_perplexity(tiny_dir, tmp_path):
    """A 60%-pruned tiny Llama: the table's rows, its roofline, equal perplexity; bad flags refused first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import prunekit
    from prunekit.cli.llm_bench import FORMATS
    from prunekit.deploy.hf import save_pretrained
    from prunekit.deploy.packed import FORMATS as PACKED

    assert FORMATS == PACKED
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    prunekit.prune(model, 0.6)
    out = save_pretrained(model, tmp_path / "pruned", AutoTokenizer.from_pretrained(tiny_dir))
    r = _cli("bench", out, "--formats", "bogus", cwd=tmp_path)
    assert r.returncode != 0 and "allowed: bitmask, nm24, csr8" in r.stderr
    r = _cli("bench", out, *TEXT, "--prompt-tokens", 8, "--new-tokens", 4, "--repeat", 1, "--convert-repeat", 1,
             "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    dense, sparse = doc["rows"]
    assert dense["kernels"] == "dense" and doc["dtype"] == "fp32"
    assert doc["layers"] == 15   # 7 Linear layers per block, and the (dense, tied) lm_head, which never converts
    assert all(row["tokens_per_s"] > 0 and row["decoder_tokens_per_s"] > 0 for row in doc["rows"])
    assert sparse["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)   # the same weights
    assert doc["roofline"] == pytest.approx(dense["bytes_per_token"] / sparse["bytes_per_token"])
    if doc["converted"]:   # whichever layers measured faster run packed or CSR, and read fewer bytes
        assert sparse["bytes_per_token"] < dense["bytes_per_token"]
    else:
        assert sparse["bytes_per_token"] == dense["bytes_per_token"]
