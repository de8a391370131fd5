"""The report's decoder LLM section: llm.json (format prunekit.llm/1) read from a run folder and drawn."""
from __future__ import annotations

import copy
import html
import json
import re

import pytest

from prunekit.cli.__main__ import main
from prunekit.errors import PrunekitError
from prunekit.report import build_report
from prunekit.report.figures import block_index
from prunekit.report.runs import collect_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TENSORS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
DENSE_PPL = 24.0


def _uniform(s: float, blocks: int = 4) -> dict:
    return {f"model.layers.{i}.{t}": s for i in range(blocks) for t in TENSORS}


def _unstructured(method: str, target, sparsity: float, ppl: float, *, refit: bool = False,
                  allocation: str = "uniform", layers="uniform", recovered=None) -> dict:
    layer_sparsity = _uniform(sparsity) if layers == "uniform" else layers
    return {"kind": "unstructured", "method": method, "refit": refit, "allocation": allocation, "target": target,
            "sparsity": sparsity, "perplexity": ppl, "ppl_ratio": round(ppl / DENSE_PPL, 4), "time_s": 189.0,
            "layer_sparsity": layer_sparsity, "recovered": recovered}


def llm_doc() -> dict:
    """A sweep of 2 methods × 3 sparsities, a 2:4 run, an OWL run, a recovered run and a structured run."""
    owl = {f"model.layers.{i}.{t}": s for i, s in enumerate((0.40, 0.46, 0.54, 0.60)) for t in TENSORS}
    runs = [_unstructured("wanda", 0.3, 0.2999, 26.4), _unstructured("wanda", 0.5, 0.4999, 44.4),
            _unstructured("wanda", 0.7, 0.6999, 240.0,
                          recovered={"loss": "kl", "steps": 32, "lr": 1e-4, "perplexity": 30.1, "ppl_ratio": 1.25,
                                     "time_s": 500.0}),
            _unstructured("sparsegpt", 0.3, 0.2998, 25.2, refit=True),
            _unstructured("sparsegpt", 0.5, 0.4998, 31.92, refit=True),
            _unstructured("sparsegpt", 0.7, 0.6998, 96.0, refit=True),
            _unstructured("wanda", "2:4", 0.5, 62.4, layers=None),
            _unstructured("wanda", 0.5, 0.5001, 38.88, allocation="owl", layers=owl),
            {"kind": "structured", "unit": "layers", "amount": 2, "criterion": "block_influence",
             "removed": "layers 3, 4", "removed_layers": [3, 4], "params": 101_000_000,
             "dense_params": 134_515_008, "perplexity": 55.2, "ppl_ratio": 2.3, "time_s": 60.0,
             "tokens_per_s": 40.0, "dense_tokens_per_s": 30.1, "recovered": None}]
    return {"format": "prunekit.llm/1", "model": "smollm2",
            "dense": {"perplexity": DENSE_PPL, "params": 134_515_008, "tokens_per_s": 30.1},
            "evaluation": {"text": "austen:sensesensibility", "tokens": 4096, "context": 512},
            "calibration": {"text": "austen:prideprejudice", "windows": 64, "len": 256, "seed": 0},
            "threads": 2, "block_influence": [0.31, 0.12, 0.09, 0.04, 0.05, 0.22], "runs": runs}


def _write(folder, doc) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llm.json").write_text(json.dumps(doc))


def _rows(markdown: str):
    """The table rows of the LLM section, as lists of cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if re.match(r"\| (dense|unstructured|structured) \|", line)]


def _row(markdown: str, method: str, target: str, allocation: str = "uniform"):
    found = [r for r in _rows(markdown) if r[1] == method and r[3] == target and r[2] == allocation]
    assert len(found) == 1, (method, target, _rows(markdown))
    return found[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("llm_run")
    _write(run, llm_doc())
    results, notes = collect_run(run)
    return results, notes, build_report(results, run / "report")


# ----------------------------------------------------------------------------- block index parser
@pytest.mark.parametrize("name, index", [
    ("model.layers.12.mlp.up_proj", 12),            # Llama, Mistral, Qwen
    ("model.layers.1.self_attn.q_proj", 1),
    ("transformer.h.3.attn.c_attn", 3),             # GPT-2
    ("h.7.mlp.c_fc", 7),
    ("model.decoder.layers.5.fc1", 5),              # OPT
    ("model_layers_21_mlp_gate_proj", 21),          # names flattened with "_"
    ("model.embed_tokens", None),                   # outside the blocks
    ("lm_head", None),
    ("transformer.wte", None),
])
def test_block_index_finds_the_decoder_block_of_a_tensor(name, index):
    assert block_index(name) == index


# ----------------------------------------------------------------------------- a full run folder
def test_collect_run_reads_a_folder_holding_only_llm_json(report):
    results, notes, _ = report
    assert notes == [] and "notes" not in results
    assert results["title"] == "prunekit report: decoder LLM pruning (smollm2)"
    assert len(results["llm"]["runs"]) == 9 and results["llm"]["skipped"] == []


def test_figures_are_written_and_embedded(report):
    _, _, paths = report
    for key in ("llm_perplexity", "llm_block_sparsity", "llm_block_influence"):
        assert paths[key].read_bytes()[:8] == PNG_SIGNATURE and paths[key].stat().st_size > 10_000, key
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3
    for key in ("llm_perplexity", "llm_block_sparsity", "llm_block_influence"):
        assert f'id="{key}"' in page
    # the figures sit in their section, after its table; no empty summary and no "Figures" heading
    assert page.index("<h2>Decoder LLM pruning</h2>") < page.index("<table") < page.index('id="llm_perplexity"')
    assert "Summary" not in page and "No results" not in page and "<h2>Figures</h2>" not in page


def test_table_has_every_run_with_its_numbers(report):
    _, _, paths = report
    md = paths["markdown"].read_text()
    assert len(_rows(md)) == 10  # dense + 9 runs
    assert _rows(md)[0][:7] == ["dense", "—", "—", "—", "0.00%", "24.00", "1.00×"]
    assert _row(md, "wanda", "50%") == ["unstructured", "wanda", "uniform", "50%", "49.99%", "44.40", "1.85×",
                                        "189.0", "—", "—", "—"]
    assert _row(md, "sparsegpt+refit", "50%")[4:7] == ["49.98%", "31.92", "1.33×"]
    assert _row(md, "wanda", "2:4")[4:7] == ["50.00%", "62.40", "2.60×"]
    assert _row(md, "wanda", "50%", "owl")[4:7] == ["50.01%", "38.88", "1.62×"]
    # the recovered run: its perplexity and ratio after recovery, with the loss
    assert _row(md, "wanda", "70%")[5:9] == ["240.00", "10.00×", "189.0", "30.10 (1.25×, kl, 32 steps)"]
    # structured: the share of parameters removed, the params, the decoding speedup (40 / 30.1)
    removed = f"{100 * (1 - 101_000_000 / 134_515_008):.2f}%"
    assert _row(md, "layers", "2", "—") == ["structured", "layers", "—", "2", removed, "55.20", "2.30×", "60.0",
                                             "—", "101,000,000", "40.0 (1.33×)"]
    assert "- layers 2: removed layers 3, 4" in md
    page = paths["html"].read_text()
    assert "<td>wanda</td><td>uniform</td><td>50%</td><td>49.99%</td><td>44.40</td><td>1.85×</td>" in page


def test_text_names_the_dense_baseline_and_the_best_runs(report):
    _, _, paths = report
    md = paths["markdown"].read_text()
    assert "dense perplexity 24.00 on 4,096 tokens of austen:sensesensibility (context 512)" in md
    assert "Calibration: 64 windows of 256 tokens of austen:prideprejudice, seed 0." in md
    # sparsegpt+refit (1.33×) beats owl wanda (1.62×) and uniform wanda (1.85×) at 50%
    assert ("Before any recovery, best at 50%: sparsegpt+refit, 1.33× dense perplexity; "
            "best at 2:4: wanda, 2.60× dense perplexity.") in md


def test_block_sparsity_figure_needs_a_non_uniform_run(tmp_path):
    doc = llm_doc()
    doc["runs"] = [r for r in doc["runs"] if r.get("allocation") != "owl"]
    paths = build_report({"llm": doc}, tmp_path)
    assert "llm_block_sparsity" not in paths and not (tmp_path / "llm_block_sparsity.png").exists()
    assert {"llm_perplexity", "llm_block_influence"} <= set(paths)
    # without a structured 'layers' run the influence bars are still drawn, with nothing highlighted
    doc["runs"] = [r for r in doc["runs"] if r["kind"] == "unstructured"]
    assert build_report({"llm": doc}, tmp_path / "b")["llm_block_influence"].stat().st_size > 10_000


# ----------------------------------------------------------------------------- partial and broken files
def test_a_partial_file_shows_what_there_is(tmp_path):
    _write(tmp_path, {"format": "prunekit.llm/1", "runs": [{"kind": "unstructured", "method": "wanda",
                                                           "target": 0.5, "perplexity": 40.0}]})
    results, notes = collect_run(tmp_path)
    assert notes == [] and results["title"] == "prunekit report: decoder LLM pruning"
    paths = build_report(results, tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "the dense perplexity was not measured" in md
    # no dense perplexity: no ratio, the curve is not drawn; the run's row keeps what it has
    assert _rows(md) == [["unstructured", "wanda", "uniform", "50%", "40.00"]]
    assert not any(k.startswith("llm_") for k in paths)
    empty = build_report({"llm": {"format": "prunekit.llm/1", "runs": []}}, tmp_path / "empty")
    assert "holds no runs" in empty["markdown"].read_text()


def test_runs_with_a_non_numeric_value_are_skipped_with_a_note(tmp_path):
    doc = llm_doc()
    doc["runs"][1]["perplexity"] = "n/a"
    doc["runs"][2]["recovered"]["perplexity"] = "high"
    doc["runs"][3]["target"] = "half"
    doc["runs"].append(["not", "a", "run"])
    doc["dense"]["tokens_per_s"] = "fast"
    _write(tmp_path, doc)
    results, notes = collect_run(tmp_path)
    assert len(results["llm"]["runs"]) == 7 and results["notes"] == notes
    assert "llm.json: run 2 (wanda) was skipped: not a number: perplexity ('n/a')" in notes
    assert "llm.json: run 4 (sparsegpt) was skipped: not a number: target ('half': a sparsity or 'N:M')" in notes
    assert "llm.json: run 10 is not an object: skipped" in notes
    assert "llm.json: run 3 (wanda) recovered is malformed: the recovery is not shown" in notes
    assert "llm.json: dense tokens_per_s ('fast') is not a number: not shown" in notes
    md = build_report(results, tmp_path / "report")["markdown"].read_text()
    assert "44.40" not in md and _row(md, "wanda", "70%")[8] == "—"
    assert "- llm.json: run 2 (wanda) was skipped" in md  # said at the top of the report


def test_a_malformed_llm_json_becomes_a_note(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"title": "demo", "methods": []}))
    _write(tmp_path, {**llm_doc(), "format": "prunekit.llm/2"})
    results, notes = collect_run(tmp_path)
    assert "llm" not in results and len(notes) == 1
    assert notes[0].startswith("llm.json was skipped: ") and "not a record of `prunekit llm`" in notes[0]
    assert html.escape(notes[0]) in build_report(results, tmp_path / "report")["html"].read_text()
    _write(tmp_path, {**llm_doc(), "runs": {"wanda": 0.5}})
    assert "has no list of 'runs'" in collect_run(tmp_path)[1][0]


@pytest.mark.parametrize("text", [json.dumps({**llm_doc(), "format": "prunekit.lottery/1"}),
                                  json.dumps({"format": "prunekit.llm/1", "runs": None}), "{not json"])
def test_a_folder_with_only_a_broken_llm_json_fails(tmp_path, text):
    (tmp_path / "llm.json").write_text(text)
    with pytest.raises(PrunekitError, match="nothing to report: llm.json was skipped"):
        collect_run(tmp_path)


def test_the_report_command_renders_an_llm_folder(tmp_path, capsys):
    doc = llm_doc()
    bad = copy.deepcopy(doc["runs"][0])
    bad["ppl_ratio"] = True  # a flag, not a number
    _write(tmp_path / "run", {**doc, "runs": doc["runs"] + [bad]})
    assert main(["report", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert "report written" in captured.out
    assert "warning: llm.json: run 10 (wanda) was skipped: not a number: ppl_ratio (True)" in captured.err
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "<h2>Decoder LLM pruning</h2>" in page and "best at 50%: sparsegpt+refit" in page
    assert (tmp_path / "run" / "report" / "llm_perplexity.png").read_bytes()[:8] == PNG_SIGNATURE
    (tmp_path / "run" / "llm.json").write_text('{"format": "prunekit.llm/1"}')
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit report: error:") and "llm.json was skipped" in err[0]
