"""benchmarks/cnn_criteria.py --quick: JSON lines per ../shared/BENCHMARKS.md, every criterion at 90% with and
without fine-tuning, torch.nn.utils.prune measured in the same run."""
import pytest
from benchjson import check_convention, run_quick

UNITS = {"accuracy": "%", "sparsity": "frac"}
CRITERIA = ("magnitude/global", "magnitude/layer", "wanda", "wanda+alloc", "wanda+owl", "wanda+sens", "taylor",
            "taylor+alloc", "taylor+sens", "sparsegpt", "sparsegpt+alloc", "sparsegpt+sens", "magnitude+refit",
            "wanda+alloc+refit", "wanda+sens+refit", "taylor+alloc+refit", "taylor+sens+refit", "taylor+alloc+steps=8", "taylor+alloc+steps=8+refit",
            "torch.nn.utils.prune")


@pytest.fixture(scope="module")
def run():
    return run_quick("cnn_criteria.py")


def test_lines_follow_the_convention(records):
    for r in records:
        check_convention(r, "cnn_criteria", UNITS)
    acc = {r["case"]: r for r in records if r["metric"] == "accuracy"}
    for crit in CRITERIA:
        for ft in (0, 1):
            r = acc[f"lenet5/{crit}/sparsity=0.9/finetune={ft}"]
            assert 0 <= r["value"] <= 100
    for r in records:
        if r["metric"] == "sparsity":  # every method (torch too, after fine-tuning) reaches the target
            assert r["value"] == pytest.approx(0.9, abs=0.01), r["case"]


def test_global_magnitude_is_compared_with_torch_in_the_same_run(records):
    acc = {r["case"]: r for r in records if r["metric"] == "accuracy"}
    for ft in (0, 1):
        ours = acc[f"lenet5/magnitude/global/sparsity=0.9/finetune={ft}"]
        torch_row = acc[f"lenet5/torch.nn.utils.prune/sparsity=0.9/finetune={ft}"]
        assert ours["peer"] == "torch.nn.utils.prune" and ours["peer_value"] == torch_row["value"]
        assert ours["ratio"] == pytest.approx(ours["value"] / ours["peer_value"])
    # without training both prune the same weights (global L1 on the same tensors, ties aside)
    assert acc["lenet5/magnitude/global/sparsity=0.9/finetune=0"]["value"] == pytest.approx(
        acc["lenet5/torch.nn.utils.prune/sparsity=0.9/finetune=0"]["value"], abs=0.5)
