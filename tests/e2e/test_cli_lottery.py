"""``prunekit lottery`` end to end on tiny settings (sklearn's 8x8 digits: no MNIST to load), through
``prunekit.cli.__main__.main`` in this process; then ``prunekit report`` on its folder."""
from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import pytest
import torch

import prunekit
from prunekit.analysis.metrics import evaluate
from prunekit.cli.__main__ import main
from prunekit.train.lottery import LotteryRecord
from prunekit.zoo.data import get_loaders

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRUNED = ["classifier.1.weight", "classifier.3.weight"]   # LeNet-300-100 without its classifier
ARGS = ["--quick", "--data", "digits", "--seed", "0", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lottery") / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["lottery", *ARGS, "--out", str(out)])
    return code, out, buf.getvalue()


def test_writes_the_record_the_figure_and_the_ticket(quick_run):
    code, out, stdout = quick_run
    assert code == 0
    rec = LotteryRecord.load(out / "lottery.json")
    # --quick: 2 rounds to 80%, each pruning the same share of the survivors (1 - sqrt(0.2) = 0.5528)
    assert [r.round for r in rec.rounds] == [0, 1, 2]
    assert [r.target for r in rec.rounds] == pytest.approx([0.0, 1 - 0.2 ** 0.5, 0.8])
    assert [r.sparsity for r in rec.rounds] == pytest.approx([0.0, 1 - 0.2 ** 0.5, 0.8], abs=1e-4)
    assert rec.rewind_step == 0 and rec.rounds[0].reinit_accuracy is None
    for r in rec.rounds[1:]:
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.reinit_accuracy <= 1.0 and r.steps == 8  # 1000 / 128
    m = rec.meta
    assert (m["model"], m["data"], m["n_train"], m["n_test"], m["epochs_per_round"]) == ("lenet300", "digits", 1000,
                                                                                         300, 1)
    assert m["model_kwargs"] == {"in_features": 64, "num_classes": 10} and m["seed"] == 0 and m["reinit_seed"] == 1
    # --threads: 1 by default, torch's own count where OMP_NUM_THREADS is set; recorded
    assert m["threads"] == (torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS", "").strip() else 1)
    assert (out / "lottery.png").read_bytes()[:8] == PNG_MAGIC
    # the saved ticket is the last round's model: its sparsity and its accuracy on the same test images
    ticket = prunekit.load(out / "ticket")
    assert prunekit.apply.global_sparsity(ticket, PRUNED) == pytest.approx(0.8, abs=1e-4)
    _, test, _ = get_loaders("digits", seed=0, limit_train=1000, limit_test=300)
    assert evaluate(ticket, test)["accuracy"] == pytest.approx(rec.rounds[-1].accuracy, abs=1e-9)
    for needle in ("ticket_acc", "reinit_acc", "lottery.json", "prunekit report"):
        assert needle in stdout


def test_report_picks_the_run_up(quick_run, capsys):
    _, out, _ = quick_run
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "report.html").read_text()
    rec = LotteryRecord.load(out / "lottery.json")
    assert "<h2>Lottery tickets</h2>" in page and "lenet300 on digits" in page
    last = rec.rounds[-1]
    assert f"<td>{100 * last.accuracy:.2f}%" in page and f"<td>{100 * last.reinit_accuracy:.2f}%" in page
    assert (out / "report" / "lottery.png").read_bytes()[:8] == PNG_MAGIC


def test_the_same_seed_gives_the_same_numbers(quick_run, tmp_path, capsys):
    _, out, _ = quick_run
    assert main(["lottery", *ARGS, "--out", str(tmp_path / "again")]) == 0
    a, b = (json.loads((d / "lottery.json").read_text()) for d in (out, tmp_path / "again"))
    a["meta"].pop("wall_time_s"), b["meta"].pop("wall_time_s")
    assert a == b


@pytest.mark.parametrize("args, needle", [
    (["--rewind", "late"], "'init' or an optimizer step"),
    (["--rewind", "1000"], "not inside round 0"),             # 8 steps per round in --quick
    (["--final-sparsity", "1.0"], "fraction in (0, 1)"),
    (["--rounds", "0"], "rounds=0"),
    (["--model", "resnet9000"], "unknown model"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, args, needle):
    assert main(["lottery", *ARGS, "--out", str(tmp_path / "run"), *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunekit lottery: error:") and needle in lines[0], lines
    assert not (tmp_path / "run").exists()
