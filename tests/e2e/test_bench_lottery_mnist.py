"""benchmarks/lottery_mnist.py --quick (LeNet-300-100 and --model vgg): JSON lines only on stdout, per
/work/shared/BENCHMARKS.md."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from benchjson import check_convention, run_quick

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lottery_mnist.py"
UNITS = {"accuracy": "frac", "accuracy_drop_pp": "pp", "sparsity": "frac", "advantage_pp": "pp", "time_s": "s"}
METHOD = r"(?P<method>lottery_rewind|random_reinit)/sparsity=(?P<s>0\.\d+)"
QUICK_TARGETS = {"0.5", "0.9", "0.95"}
# subprocesses that load MNIST and train 7 times: ~5 s (LeNet) / ~10 s (VGG) idle, 20+ s on a busy machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["lenet300", "vgg"])
def model(request):
    return request.param


@pytest.fixture(scope="module")
def run(model):
    if model == "lenet300":
        return run_quick(SCRIPT.name)   # the default model: no flag
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model", model], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cases(model):
    """The case patterns of this model's lines: every case names the model first."""
    return {"point": re.compile(rf"^{model}/{METHOD}/seed=(?P<seed>\d+)$"),
            "median": re.compile(rf"^{model}/{METHOD}/median$"),
            "dense": re.compile(rf"^{model}/dense/(seed=(?P<seed>\d+)|median)$")}


def test_every_line_follows_the_convention(records, cases, model):
    for rec in records:
        check_convention(rec, "lottery_mnist", UNITS)
        assert (cases["point"].match(rec["case"]) or cases["median"].match(rec["case"])
                or cases["dense"].match(rec["case"]) or rec["case"] == f"{model}/total"), rec["case"]
        for key in ("n", "threads", "seed"):
            if key in rec:
                assert isinstance(rec[key], int) and not isinstance(rec[key], bool), rec


def test_both_methods_at_every_target_with_the_required_metrics(records, cases):
    got = {(m["method"], m["s"], r["metric"]) for r in records for m in [cases["point"].match(r["case"])] if m}
    want = {(meth, s, metric) for meth in ("lottery_rewind", "random_reinit") for s in QUICK_TARGETS
            for metric in ("accuracy", "accuracy_drop_pp", "sparsity")}
    assert got == want
    for r in records:
        m = cases["point"].match(r["case"])
        if m:
            assert r["seed"] == int(m["seed"]) == 0


def test_drops_are_against_the_dense_round_and_sparsity_meets_the_target(records, cases, model):
    dense = next(r["value"] for r in records if r["case"] == f"{model}/dense/seed=0")
    acc = {r["case"]: r["value"] for r in records if r["metric"] == "accuracy"}
    for r in records:
        m = cases["point"].match(r["case"])
        if r["metric"] == "accuracy":
            assert 0.0 <= r["value"] <= 1.0
        if m and r["metric"] == "accuracy_drop_pp":
            assert r["value"] == pytest.approx(100.0 * (dense - acc[r["case"]]), abs=1e-3)
        if m and r["metric"] == "sparsity":
            assert r["value"] == pytest.approx(float(m["s"]), abs=1e-4)


def test_the_ticket_line_names_its_peer_the_control(records, cases):
    for r in records:
        m = cases["point"].match(r["case"])
        if m and r["metric"] == "accuracy" and m["method"] == "lottery_rewind":
            control = r["case"].replace("lottery_rewind", "random_reinit")
            peer = next(x["value"] for x in records if x["case"] == control and x["metric"] == "accuracy")
            assert r["peer"] == "random_reinit" and r["peer_value"] == peer
            assert r["ratio"] == pytest.approx(r["value"] / peer)
        elif r["metric"] != "accuracy" or (m and m["method"] == "random_reinit"):
            assert "peer" not in r


def test_medians_have_n_and_the_advantage(records, cases, model):
    median = cases["median"]
    medians = [r for r in records if median.match(r["case"])]
    assert {median.match(r["case"])["s"] for r in medians} == QUICK_TARGETS
    for r in medians:
        assert r["n"] == 1 and "seed" not in r
    adv = {median.match(r["case"])["s"]: r["value"] for r in medians if r["metric"] == "advantage_pp"}
    assert set(adv) == QUICK_TARGETS
    acc = {r["case"]: r["value"] for r in medians if r["metric"] == "accuracy"}
    for s, v in adv.items():
        want = 100.0 * (acc[f"{model}/lottery_rewind/sparsity={s}/median"]
                        - acc[f"{model}/random_reinit/sparsity={s}/median"])
        assert v == pytest.approx(want, abs=1e-3)


def test_the_log_names_the_model_built(run, model):
    built = {"lenet300": "('lenet300', {})", "vgg": "('vgg_small', {'widths': [16, 32, 64], 'hidden': 64})"}[model]
    assert f"lottery_mnist: {model} {built}, quick setting" in run.stderr
