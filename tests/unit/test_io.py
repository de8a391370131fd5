import json
import pickle

import pytest
import torch

import prunekit
from prunekit.apply import masking
from prunekit.deploy import io
from prunekit.zoo.models import build_model


@pytest.fixture
def pruned_lenet():
    torch.manual_seed(0)
    m = build_model("lenet300")
    prunekit.prune(m, 0.9, scope="global")
    return m


@pytest.mark.parametrize("compressed", [False, True])
def test_save_load_round_trip_rebuilds_builtin_model(pruned_lenet, tmp_path, compressed):
    io.save(pruned_lenet, tmp_path / "m", compressed=compressed)
    back = io.load(tmp_path / "m")
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(back(x), pruned_lenet(x))
    assert masking.masks(back).keys() == masking.masks(pruned_lenet).keys()
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["model"]["name"] == "lenet300" and spec["masked"]


def test_compressed_file_is_much_smaller(pruned_lenet, tmp_path):
    io.save(pruned_lenet, tmp_path / "d")
    io.save(pruned_lenet, tmp_path / "c", compressed=True)
    dense = (tmp_path / "d" / "model.safetensors").stat().st_size
    small = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert dense / small > 5


def test_custom_model_needs_an_instance(tmp_path, mlp, mlp_factory):
    prunekit.prune(mlp, 0.5)
    io.save(mlp, tmp_path / "m")
    with pytest.raises(ValueError, match="pass an instance"):
        io.load(tmp_path / "m")
    back = io.load(tmp_path / "m", mlp_factory(seed=9))
    assert torch.equal(back(torch.ones(1, 64)), mlp(torch.ones(1, 64)))


def test_wrong_architecture_is_refused_before_any_change(pruned_lenet, tmp_path):
    io.save(pruned_lenet, tmp_path / "m")
    other = build_model("lenet5")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="different architecture"):
        io.load(tmp_path / "m", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_corrupt_and_truncated_files(pruned_lenet, tmp_path):
    io.save(pruned_lenet, tmp_path / "m", compressed=True)
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:500])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        io.load(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        io.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "nothing-here")


def test_a_pickle_payload_is_never_executed(tmp_path, pruned_lenet):
    io.save(pruned_lenet, tmp_path / "m")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError):
        io.load(tmp_path / "m")
    assert not marker.exists()


def test_saving_is_atomic_no_temp_files_left(pruned_lenet, tmp_path):
    io.save(pruned_lenet, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
