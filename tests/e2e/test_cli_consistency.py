"""The commands behave alike (issue 14, "CLI consistency"): ``prune --quick`` and ``lottery --recipe`` like the
other commands' ``--quick`` / ``--recipe``; every command prints accuracy the same way (``98.04%``: percent, two
decimals; JSON keeps fractions); ``prunekit report`` renders an advise folder; an unknown criterion names every
criterion and pruner, from the command line and from the API. Tiny settings (sklearn's 8x8 digits, a small MLP),
through ``prunekit.cli.__main__.main`` in this process: seconds per command.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import prunekit
import prunekit.cli.lottery as cli_lottery
import prunekit.cli.prune as cli_prune
from prunekit.cli.__main__ import build_parser, main
from prunekit.criteria import CRITERIA
from prunekit.errors import UnknownNameError
from prunekit.pruners import PRUNERS

README = Path(__file__).resolve().parents[2] / "README.md"
MLP = ["--model", "mlp", "--set", "model_kwargs={in_features: 64, hidden: [32]}", "--data", "digits"]
PERCENT = re.compile(r"(?<![\d.])\d{1,3}\.\d{2}%")   # 98.04%, 100.00%, 7.50%
FRACTION = re.compile(r"(?<![\d.])0\.\d{2,}(?![\d%])")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)   # --threads default: 1
    return tmp_path


def _args(*argv):
    return build_parser().parse_args(list(argv))


def _column(out: str, name: str):
    """The cells of column ``name`` of the first table in ``out`` (columns split on 2+ spaces)."""
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if re.search(rf"(^|\s){re.escape(name)}(\s|$)", ln)
             and i + 1 < len(lines) and set(lines[i + 1].replace(" ", "")) == {"-"})
    spans = [m.span() for m in re.finditer(r"-+", lines[i + 1])]   # every cell is padded to its column's width
    a, b = spans[[lines[i][x:y].strip() for x, y in spans].index(name)]
    return [ln[a:b].strip() for ln in itertools.takewhile(str.strip, lines[i + 2:])]


# ----------------------------------------------------------------------------- prune --quick


def test_prune_quick_is_the_tiny_setting_and_flags_and_smaller_recipe_values_stand(tmp_path):
    config = cli_prune.resolve_config(_args("prune", "--quick"))
    assert (config["limit_train"], config["limit_test"]) == (2000, 500)
    assert config["dense"]["epochs"] == 2 and config["finetune"]["epochs"] == 1
    assert config["gradual"]["epochs"] == 2 and config["gradual"]["prune_epochs"] == 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"limit_train": 300, "dense": {"epochs": 40}}))
    config = cli_prune.resolve_config(_args("prune", "--quick", "--recipe", str(tmp_path / "r.yaml"),
                                            "--dense-epochs", "3", "--limit-test", "5000"))
    assert config["limit_train"] == 300 and config["dense"]["epochs"] == 3 and config["limit_test"] == 5000
    config = cli_prune.resolve_config(_args("prune"))   # without --quick: the recipe defaults
    assert config["limit_train"] is None and config["dense"]["epochs"] == 40


def test_prune_quick_runs_and_prints_accuracy_in_percent(cwd, capsys):
    assert main(["prune", "--quick", *MLP, "--out", "run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    cells = _column(out, "accuracy")
    assert len(cells) == 2 and all(PERCENT.fullmatch(c) for c in cells), cells
    config = yaml.safe_load((cwd / "run" / "config.yaml").read_text())
    assert config["dense"]["epochs"] == 2 and config["limit_test"] == 500
    results = json.loads((cwd / "run" / "results.json").read_text())
    assert 0 <= results["dense"]["accuracy"] <= 1   # JSON keeps the fraction

    # eval prints the same way; --json keeps fractions
    assert main(["eval", "run/model", "--limit-test", "100"]) == 0
    out = capsys.readouterr().out
    assert PERCENT.fullmatch(_column(out, "accuracy")[0]) and PERCENT.fullmatch(_column(out, "top5")[0]), out
    assert main(["eval", "run/model", "--limit-test", "100", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1

    # advise on the same model, then `prunekit report` of its folder
    assert main(["advise", "--checkpoint", "run/model", "--data", "digits", "--limit-test", "100", "--candidates",
                 "dense,unstructured:0.9", "--repeat", "1", "--out", "adv", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert all(PERCENT.fullmatch(c) for c in _column(out, "accuracy")), out
    assert main(["report", "adv"]) == 0
    assert "report written: adv/report/report.html" in capsys.readouterr().out
    page = (cwd / "adv" / "report" / "report.html").read_text(encoding="utf-8")
    advice = json.loads((cwd / "adv" / "advice.json").read_text())
    assert f"Recommended: {advice['recommended']}" in page and "unstructured 90%" in page
    assert PERCENT.search(page) and "<table" in page
    assert main(["report", "adv/advice.json", "--out", "adv/r2"]) == 0   # the file itself too
    assert (cwd / "adv" / "r2" / "report.md").is_file()


def test_report_of_a_folder_without_run_files_names_what_it_takes(cwd, capsys):
    (cwd / "nothing").mkdir()
    assert main(["report", "nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "advice.json" in err[0] and "'advise'" in err[0] and "results.json" in err[0]
    (cwd / "bad").mkdir()
    (cwd / "bad" / "advice.json").write_text("{}")
    assert main(["report", "bad"]) == 2
    assert "not an advice document" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lottery --recipe


def test_lottery_recipe_fields_flags_override_and_quick_caps(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mlp", "data": "digits", "rounds": 3, "final-sparsity": 0.9,
                                      "rewind": 5, "limit_train": 400}))
    config = cli_lottery.resolve(_args("lottery", "--recipe", str(recipe), "--rounds", "1"))
    assert config["model"] == "mlp" and config["rounds"] == 1 and config["final_sparsity"] == 0.9
    assert config["rewind"] == 5 and config["limit_train"] == 400 and config["epochs"] == 2   # default
    config = cli_lottery.resolve(_args("lottery", "--recipe", str(recipe), "--quick"))
    assert config["rounds"] == 2 and config["final_sparsity"] == 0.8 and config["limit_train"] == 400
    assert config["limit_test"] == 300 and config["epochs"] == 1


@pytest.mark.parametrize("recipe, said", [
    ({"rounds": 2, "sparsity": 0.9}, "unknown recipe field 'sparsity'; allowed: model, data, seed, rounds"),
    ({"rounds": "two"}, "recipe field 'rounds' must be an integer, got 'two'"),
    (["rounds"], "must be a YAML mapping"),
])
def test_a_bad_lottery_recipe_is_one_line_before_any_work(cwd, capsys, recipe, said):
    (cwd / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["lottery", "--recipe", "r.yaml", "--out", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not (cwd / "run").exists()


def test_lottery_from_a_recipe_writes_its_config_and_prints_percent(cwd, capsys):
    (cwd / "r.yaml").write_text(yaml.safe_dump({
        "model": "mlp", "data": "digits", "rounds": 1, "final_sparsity": 0.5, "epochs": 1, "limit_train": 300,
        "limit_test": 100, "out": "lot"}))
    assert main(["lottery", "--recipe", "r.yaml", "--no-progress"]) == 0
    out = capsys.readouterr().out
    ticket, reinit = _column(out, "ticket_acc"), _column(out, "reinit_acc")
    assert len(ticket) == 2 and all(PERCENT.fullmatch(c) for c in ticket) and PERCENT.fullmatch(reinit[1]), out
    config = yaml.safe_load((cwd / "lot" / "config.yaml").read_text())
    assert config["rounds"] == 1 and config["model"] == "mlp" and config["threads"] == 1
    record = json.loads((cwd / "lot" / "lottery.json").read_text())
    assert record["meta"]["model_kwargs"]["in_features"] == 64   # the recipe's model on the recipe's data


def test_sensitivity_prints_accuracy_in_percent(cwd, capsys):
    assert main(["sensitivity", "--quick", *MLP, "--sparsities", "0.5,0.9", "--out", "sens", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"baseline \d{1,3}\.\d{2}%", out), out
    assert all(PERCENT.fullmatch(c) for c in _column(out, "s=0.5") + _column(out, "accuracy")), out
    assert "drop_pp" in out and not FRACTION.search(out.split("allocation for target")[1].split("\n", 2)[2]), out


# ----------------------------------------------------------------------------- unknown criterion


def test_the_api_names_every_criterion_and_pruner_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnknownNameError) as err:
        prunekit.prune(model, 0.5, criterion="bogus")
    text = str(err.value)
    assert text.startswith("unknown criterion 'bogus'; known: ")
    for name in CRITERIA.names() + PRUNERS.names():
        assert re.search(rf"\b{name}\b", text), (name, text)
    assert "sparsegpt" in text and "sequential" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_readme_quotes_the_unknown_criterion_error_as_it_is():
    quoted = re.search(r"`(unknown criterion 'x'; known: [^`]*)`", README.read_text(encoding="utf-8"))
    assert quoted, "README.md no longer quotes the unknown-criterion error"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(UnknownNameError) as err:
        prunekit.prune(model, 0.5, criterion="x")
    assert quoted.group(1) == str(err.value)


def test_the_command_line_names_every_criterion_and_pruner(cwd, capsys):
    assert main(["prune", "--criterion", "bogus", "--out", "run"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "unknown criterion 'bogus'" in line
    for name in CRITERIA.names() + PRUNERS.names():
        assert re.search(rf"\b{name}\b", line), (name, line)
    assert not (cwd / "run").exists()
