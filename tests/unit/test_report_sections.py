"""The report's sensitivity and lottery sections, and how a run folder is gathered (prunekit.report.runs)."""
from __future__ import annotations

import json
import re

import pytest

from prunekit.analysis.sensitivity import SensitivityResult
from prunekit.cli.__main__ import main
from prunekit.report import build_report
from prunekit.report.runs import collect_run
from prunekit.train.lottery import LotteryRecord, LotteryRound

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ["fc1.weight", "fc2.weight"]


def sensitivity() -> SensitivityResult:
    return SensitivityResult("accuracy", 0.98, [0.5, 0.9], {"fc1.weight": [0.975, 0.95], "fc2.weight": [0.97, 0.6]},
                             {"fc1.weight": 800, "fc2.weight": 200},
                             meta={"criterion": "l1", "pattern": "unstructured"})


def allocation() -> dict:
    return {"format": "prunekit.allocation/1", "target": 0.8, "weights": "params", "min_keep": 0.01,
            "metric": "accuracy", "achieved": 0.8, "sparsities": {"fc1.weight": 0.9, "fc2.weight": 0.4},
            "baseline": 0.98, "predicted_drop": 0.031, "measured": {"allocated": 0.955, "uniform_layer": 0.7,
                                                                    "global_magnitude": 0.96}}


def lottery() -> LotteryRecord:
    rounds = [LotteryRound(0, 0.0, 0.0, 10, 0.1, 0.98), LotteryRound(1, 0.5, 0.5, 10, 0.1, 0.985, 0.975, 0.2),
              LotteryRound(2, 0.9, 0.9, 10, 0.2, 0.97, 0.9, 0.4)]
    return LotteryRecord(rounds, 200, {"model": "lenet300", "data": "mnist", "seed": 0, "epochs_per_round": 6})


def results() -> dict:
    return {"sensitivity": sensitivity().to_dict(), "allocation": allocation(), "lottery": lottery().to_dict()}


def _rows(markdown: str, first_cell: str):
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {first_cell}")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sections")
    return out, build_report(results(), out)


def test_both_sections_and_their_pngs_are_written(report):
    out, paths = report
    for key in ("html", "markdown", "metrics", "sensitivity", "lottery"):
        assert paths[key].is_file(), key
    for key in ("sensitivity", "lottery"):
        assert paths[key].read_bytes()[:8] == PNG_SIGNATURE and paths[key].stat().st_size > 10_000
    page = paths["html"].read_text()
    assert "<h2>Sensitivity analysis</h2>" in page and "<h2>Lottery tickets</h2>" in page
    assert page.count("data:image/png;base64,") == 2
    # nothing from demo/prune: no empty summary, no "Figures" section (the figures are in their sections)
    assert "Summary" not in page and "No results" not in page and "<h2>Figures</h2>" not in page
    assert json.loads(paths["metrics"].read_text())["lottery"]["rewind_step"] == 200


def test_sensitivity_tables_have_the_curves_and_the_allocation(report):
    _, paths = report
    md = paths["markdown"].read_text()
    assert _rows(md, "Layer |")[0] == ["Layer", "Weights", "s=50%", "s=90%", "Allocated"]
    assert _rows(md, "fc1.weight")[0] == ["fc1.weight", "800", "97.50%", "95.00%", "90.0%"]
    assert _rows(md, "fc2.weight")[0] == ["fc2.weight", "200", "97.00%", "60.00%", "40.0%"]
    # allocation table: weights kept, and the size-weighted total (800*0.1 + 200*0.6 = 200 of 1000 kept)
    assert _rows(md, "fc1.weight")[1] == ["fc1.weight", "800", "90.00%", "80"]
    assert _rows(md, "total") == [["total", "1,000", "80.00%", "200"]]
    assert _rows(md, "uniform per layer") == [["uniform per layer", "70.00%", "-28.00 pp"]]
    assert _rows(md, "global magnitude") == [["global magnitude", "96.00%", "-2.00 pp"]]
    assert "least predicted drop (3.10 pp" in md and "accuracy 98.00% with no layer pruned" in md
    html = paths["html"].read_text()
    assert "<td>fc2.weight</td><td>200</td><td>97.00%</td><td>60.00%</td><td>40.0%</td>" in html


def test_lottery_table_compares_ticket_and_control_against_dense(report):
    _, paths = report
    md = paths["markdown"].read_text()
    assert _rows(md, "0 (dense)") == [["0 (dense)", "0.0%", "0.00%", "98.00%", "—", "—"]]
    assert _rows(md, "1 |") == [["1", "50.0%", "50.00%", "98.50% (+0.50 pp)", "97.50% (-0.50 pp)", "+1.00 pp"]]
    assert _rows(md, "2 |") == [["2", "90.0%", "90.00%", "97.00% (-1.00 pp)", "90.00% (-8.00 pp)", "+7.00 pp"]]
    assert "lenet300 on mnist, seed 0, 6 epoch(s) per round" in md and "optimizer step 200" in md


def test_partial_inputs_render_what_exists_and_say_what_is_missing(tmp_path):
    only_curves = build_report({"sensitivity": sensitivity().to_dict()}, tmp_path / "a")
    md = only_curves["markdown"].read_text()
    assert "allocation.json was not found" in md and "Allocated" not in md  # the empty column is dropped
    assert "lottery" not in only_curves and "sensitivity" in only_curves
    only_alloc = build_report({"allocation": allocation()}, tmp_path / "b")
    md = only_alloc["markdown"].read_text()
    assert "sensitivity.json was not found" in md and "sensitivity" not in only_alloc
    assert _rows(md, "fc1.weight") == [["fc1.weight", "90.00%"]]  # no weights known: those columns dropped
    # a lottery without the control and without accuracies: the table still renders, the figure only with data
    rec = lottery().to_dict()
    for r in rec["rounds"]:
        r["reinit_accuracy"] = None
    no_control = build_report({"lottery": rec}, tmp_path / "c")
    assert "Re-init" not in no_control["markdown"].read_text() and "lottery" in no_control
    for r in rec["rounds"]:
        r["accuracy"] = None
    bare = build_report({"lottery": rec, "notes": ["lottery.json came from an old run"]}, tmp_path / "d")
    assert "lottery" not in bare and "lottery.json came from an old run" in bare["html"].read_text()
    empty = build_report({"lottery": {"rounds": []}}, tmp_path / "e")
    assert "holds no rounds" in empty["markdown"].read_text()


def test_sections_follow_a_demo_report(tmp_path):
    from test_report import make_results

    res = {**make_results(), "lottery": lottery().to_dict()}
    page = build_report(res, tmp_path)["html"].read_text()
    heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert heads[:5] == ["Conclusion", "Summary", "Figures", "Lottery tickets", "Methods"]
    assert page.index('id="tradeoff"') < page.index("<h2>Lottery tickets</h2>") < page.index('id="lottery"')


# ----------------------------------------------------------------------------- run folders

def _folder(tmp_path, *, sens=True, alloc=True, lot=True):
    tmp_path.mkdir(exist_ok=True)
    if sens:
        sensitivity().save(tmp_path / "sensitivity.json")
    if alloc:
        (tmp_path / "allocation.json").write_text(json.dumps(allocation()))
    if lot:
        lottery().save(tmp_path / "lottery.json")
    return tmp_path


def test_collect_run_finds_every_file_and_titles_the_report(tmp_path):
    res, notes = collect_run(_folder(tmp_path))
    assert notes == [] and "notes" not in res
    assert res["sensitivity"] == sensitivity().to_dict() and res["allocation"] == allocation()
    assert res["lottery"] == lottery().to_dict()
    assert res["title"] == "prunekit report: sensitivity analysis and lottery tickets (lenet300 on mnist)"
    # a file of the folder names the folder
    assert collect_run(tmp_path / "lottery.json")[0] == res
    # results.json (demo, prune) keeps its title, and the extra sections join it
    (tmp_path / "results.json").write_text(json.dumps({"title": "demo", "methods": []}))
    res, _ = collect_run(tmp_path)
    assert res["title"] == "demo" and {"sensitivity", "allocation", "lottery"} <= set(res)


def test_collect_run_notes_partial_and_broken_files(tmp_path):
    _folder(tmp_path, alloc=False)
    (tmp_path / "lottery.json").write_text('{"format": "prunekit.lottery/1", "rounds": "no"}')
    res, notes = collect_run(tmp_path)
    assert set(res) == {"title", "sensitivity", "notes"} and res["notes"] == notes
    assert len(notes) == 2 and notes[0].startswith("lottery.json was skipped: malformed lottery record")
    assert "without allocation.json" in notes[1]
    (tmp_path / "sensitivity.json").unlink()
    with pytest.raises(ValueError, match="nothing to report: lottery.json was skipped"):
        collect_run(tmp_path)
    (tmp_path / "lottery.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds none of results.json, sensitivity.json"):
        collect_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        collect_run(tmp_path / "missing")


def test_report_command_renders_a_sensitivity_and_lottery_folder(tmp_path, capsys):
    _folder(tmp_path / "run", alloc=False)
    assert main(["report", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert "report written" in captured.out and "warning: sensitivity.json was found without" in captured.err
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "<h2>Sensitivity analysis</h2>" in page and "<h2>Lottery tickets</h2>" in page
    assert (tmp_path / "run" / "report" / "lottery.png").read_bytes()[:8] == PNG_SIGNATURE
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit report: error:") and "holds none of" in err[0]
