"""benchmarks/lottery_mnist.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
import re
from pathlib import Path

import pytest
from benchjson import check_convention, run_quick

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lottery_mnist.py"
UNITS = {"accuracy": "frac", "accuracy_drop_pp": "pp", "sparsity": "frac", "advantage_pp": "pp", "time_s": "s"}
POINT = re.compile(r"^lenet300/(?P<method>lottery_rewind|random_reinit)/sparsity=(?P<s>0\.\d+)/seed=(?P<seed>\d+)$")
MEDIAN = re.compile(r"^lenet300/(?P<method>lottery_rewind|random_reinit)/sparsity=(?P<s>0\.\d+)/median$")
DENSE = re.compile(r"^lenet300/dense/(seed=(?P<seed>\d+)|median)$")
QUICK_TARGETS = {"0.5", "0.9", "0.95"}
pytestmark = pytest.mark.slow  # a subprocess that loads MNIST and trains 7 times: ~5 s idle, 20+ s on a busy machine


@pytest.fixture(scope="module")
def run():
    return run_quick(SCRIPT.name)


def test_every_line_follows_the_convention(records):
    for rec in records:
        check_convention(rec, "lottery_mnist", UNITS)
        assert (POINT.match(rec["case"]) or MEDIAN.match(rec["case"]) or DENSE.match(rec["case"])
                or rec["case"] == "lenet300/total"), rec["case"]
        for key in ("n", "threads", "seed"):
            if key in rec:
                assert isinstance(rec[key], int) and not isinstance(rec[key], bool), rec


def test_both_methods_at_every_target_with_the_required_metrics(records):
    got = {(m["method"], m["s"], r["metric"]) for r in records for m in [POINT.match(r["case"])] if m}
    want = {(meth, s, metric) for meth in ("lottery_rewind", "random_reinit") for s in QUICK_TARGETS
            for metric in ("accuracy", "accuracy_drop_pp", "sparsity")}
    assert got == want
    for r in records:
        m = POINT.match(r["case"])
        if m:
            assert r["seed"] == int(m["seed"]) == 0


def test_drops_are_against_the_dense_round_and_sparsity_meets_the_target(records):
    dense = next(r["value"] for r in records if r["case"] == "lenet300/dense/seed=0")
    acc = {r["case"]: r["value"] for r in records if r["metric"] == "accuracy"}
    for r in records:
        m = POINT.match(r["case"])
        if r["metric"] == "accuracy":
            assert 0.0 <= r["value"] <= 1.0
        if m and r["metric"] == "accuracy_drop_pp":
            assert r["value"] == pytest.approx(100.0 * (dense - acc[r["case"]]), abs=1e-3)
        if m and r["metric"] == "sparsity":
            assert r["value"] == pytest.approx(float(m["s"]), abs=1e-4)


def test_the_ticket_line_names_its_peer_the_control(records):
    for r in records:
        m = POINT.match(r["case"])
        if m and r["metric"] == "accuracy" and m["method"] == "lottery_rewind":
            control = r["case"].replace("lottery_rewind", "random_reinit")
            peer = next(x["value"] for x in records if x["case"] == control and x["metric"] == "accuracy")
            assert r["peer"] == "random_reinit" and r["peer_value"] == peer
            assert r["ratio"] == pytest.approx(r["value"] / peer)
        elif r["metric"] != "accuracy" or (m and m["method"] == "random_reinit"):
            assert "peer" not in r


def test_medians_have_n_and_the_advantage(records):
    medians = [r for r in records if MEDIAN.match(r["case"])]
    assert {MEDIAN.match(r["case"])["s"] for r in medians} == QUICK_TARGETS
    for r in medians:
        assert r["n"] == 1 and "seed" not in r
    adv = {MEDIAN.match(r["case"])["s"]: r["value"] for r in medians if r["metric"] == "advantage_pp"}
    assert set(adv) == QUICK_TARGETS
    acc = {r["case"]: r["value"] for r in medians if r["metric"] == "accuracy"}
    for s, v in adv.items():
        want = 100.0 * (acc[f"lenet300/lottery_rewind/sparsity={s}/median"]
                        - acc[f"lenet300/random_reinit/sparsity={s}/median"])
        assert v == pytest.approx(want, abs=1e-3)
