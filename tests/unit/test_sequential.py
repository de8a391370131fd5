"""The sequential (block-by-block) pruner on tiny random decoders of every supported family."""
from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.apply import masking
from prunekit.pruners import PRUNERS
from prunekit.pruners.sequential import SequentialOptions, find_blocks, sequential_prune
from prunekit.pruners.solvers import SOLVERS
from prunekit.pruners.sparsegpt import as_matrix
from prunekit.spec import PruneSpec
from prunekit.zoo.llm import tiny_decoder

ARCHS = ("llama", "qwen2", "mistral", "gpt2")


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 32), generator=g)


def _linears(model):
    return {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in masking.masks(model)}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SOLVERS.names())
def test_every_block_linear_pruned_to_the_target(arch, method, ids):
    model = tiny_decoder(arch)
    plan = prunekit.prune(model, 0.5, criterion="sequential", method=method, data=ids, progress=False)
    prefix, blocks = find_blocks(model)
    n_linear = sum(1 for b in blocks for m in b.modules() if m is not b and hasattr(m, "weight")
                   and m.weight.dim() == 2 and "Norm" not in type(m).__name__ and "Embedding" not in type(m).__name__)
    assert len(plan.tensors) == n_linear > 0
    assert all(n.startswith(prefix + ".") for n in plan.tensors)
    for name, module in _linears(model).items():
        w = as_matrix(module, module.weight.detach())[0]
        if method == "wanda":  # the paper's rule: every output row loses the same share
            assert torch.all((w == 0).sum(1) == w.shape[1] // 2), name
        else:
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1 / w.numel()), name
    assert torch.isfinite(_logits(model, ids)).all()
    assert masking.global_sparsity(model, list(plan.tensors)) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("nm", ((2, 4), (4, 8)))
def test_nm_along_the_inputs_of_each_row(arch, nm, ids):
    """GPT-2 stores its projections transposed (Conv1D): groups must still run along the inputs."""
    model = tiny_decoder(arch)
    prunekit.prune(model, criterion="sequential", method="sparsegpt", pattern="nm", nm=nm, data=ids, progress=False)
    for name, module in _linears(model).items():
        w = as_matrix(module, module.weight.detach())[0]
        assert torch.all((w.reshape(-1, nm[1]) != 0).sum(1) <= nm[0]), name


def test_first_block_matches_wanda_criterion_and_later_blocks_see_pruned_inputs(ids):
    """Block 0's inputs are the dense model's, so its Wanda masks equal the per-row Wanda criterion's on the
    dense model; later blocks are computed with earlier blocks pruned, so some masks differ."""
    seq, ref = tiny_decoder("llama"), tiny_decoder("llama")
    opts = dict(method="wanda", true_sequential=False)
    sequential_prune(seq, ids, 0.5, options=SequentialOptions(progress=False, **opts))
    names = list(masking.masks(seq))
    prunekit.prune(ref, 0.5, criterion="wanda", scope="row", include=names, data=list(ids.split(8)),
                   forward_fn=lambda m, b: m(input_ids=b), min_keep=0)
    first = [n for n in names if ".layers.0." in n]
    later = [n for n in names if ".layers.0." not in n]
    a, b = masking.masks(seq), masking.masks(ref)
    assert all(torch.equal(a[n], b[n]) for n in first)
    assert any(not torch.equal(a[n], b[n]) for n in later)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(ids):
    dense = tiny_decoder("llama")
    ref = _logits(dense, ids)
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = tiny_decoder("llama")
        prunekit.prune(m, 0.6, criterion="sequential", method=method, data=ids, progress=False)
        err[method] = (_logits(m, ids) - ref).pow(2).mean().item()
    assert err["sparsegpt"] < err["wanda"] and err["sparsegpt"] < err["magnitude"]


def test_same_seed_same_masks_and_previous_masks_kept(ids):
    a, b = tiny_decoder("qwen2"), tiny_decoder("qwen2")
    for m in (a, b):
        prunekit.prune(m, 0.3, criterion="sequential", method="wanda", data=ids, progress=False)
    assert all(torch.equal(x, masking.masks(b)[n]) for n, x in masking.masks(a).items())
    before = masking.masks(a)
    prunekit.prune(a, 0.6, criterion="sequential", method="sparsegpt", data=ids, progress=False)
    after = masking.masks(a)
    assert all(not torch.any(after[n] & ~keep) for n, keep in before.items())  # pruned stays pruned
    assert masking.global_sparsity(a, list(after)) == pytest.approx(0.6, abs=1e-3)


def test_owl_allocation_keeps_the_average_and_the_spread(ids):
    model = tiny_decoder("llama", num_hidden_layers=4)
    plan = prunekit.prune(model, 0.6, criterion="sequential", method="wanda", allocation="owl", owl_lambda=0.1,
                          data=ids, progress=False)
    per_layer = plan.meta["layer_sparsity"]
    sizes = {n: model.get_parameter(n).numel() for n in per_layer}
    mean = sum(per_layer[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.6, abs=1e-6)
    blocks = {n.split(".layers.")[1].split(".")[0]: s for n, s in per_layer.items()}
    assert len(set(round(s, 9) for s in blocks.values())) > 1          # not uniform
    assert max(blocks.values()) - min(blocks.values()) <= 0.2 + 1e-9    # within target +- lambda
    assert masking.global_sparsity(model, list(plan.tensors)) == pytest.approx(0.6, abs=2e-3)


def test_a_failure_leaves_the_model_as_it_was(ids, monkeypatch):
    model = tiny_decoder("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    solver = SOLVERS.get("sparsegpt")
    calls = {"n": 0}
    original = solver.solve

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # inside the second block
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(solver, "solve", failing)
    with pytest.raises(RuntimeError, match="boom"):
        prunekit.prune(model, 0.5, criterion="sequential", method="sparsegpt", data=ids, progress=False)
    assert not masking.is_masked(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="bogus"), "magnitude, sparsegpt, wanda"),
    (dict(pattern="nm", nm=(2, 4)), "drop amount"),
    (dict(allocation="bogus"), "uniform, magnitude, owl"),
    (dict(owl_m=0), "owl_m"),
    (dict(batch_size=0), "batch_size"),
    (dict(include="nothing.*"), "matches no prunable layer"),
])
def test_bad_requests_are_refused_before_any_change(kwargs, match, ids):
    model = tiny_decoder("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.PrunekitError, match=match):
        prunekit.prune(model, 0.5, criterion="sequential", data=ids, progress=False, **kwargs)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_data_and_model_shape_errors(ids):
    with pytest.raises(prunekit.PrunekitError, match="integer tensor"):
        sequential_prune(tiny_decoder("llama"), ids.float(), 0.5)
    with pytest.raises(prunekit.PrunekitError, match="no stack of blocks"):
        sequential_prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), ids, 0.5)
    with pytest.raises(prunekit.PrunekitError, match="calibration tokens"):
        prunekit.prune(tiny_decoder("llama"), 0.5, criterion="sequential")


def test_registered_as_a_whole_model_pruner():
    assert "sequential" in PRUNERS
    assert PRUNERS.get("sequential").describe()["patterns"] == ("unstructured", "nm")
    assert PruneSpec(criterion="sequential").criterion_name == "sequential"


def test_sensitivity_allocation_spares_the_sensitive_block(ids):
    """Block 2's MLP made to dominate its output: pruning it costs more relative error, so it keeps more."""
    model = tiny_decoder("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(30.0)
    plan = prunekit.prune(model, 0.5, criterion="sequential", method="magnitude", allocation="sensitivity",
                          data=ids, progress=False)
    per_layer, curves = plan.meta["layer_sparsity"], plan.meta["block_sensitivity"]
    assert set(curves) == {"0", "1", "2", "3"} and all(len(c) == 9 for c in curves.values())
    assert all(c[0] < c[-1] for c in curves.values())   # more pruned, more error
    block = {k: per_layer[f"model.layers.{k}.mlp.down_proj.weight"] for k in range(4)}
    assert block[2] < 0.5 and block[2] == min(block.values())
    sizes = {n: model.get_parameter(n).numel() for n in per_layer}
    assert sum(per_layer[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.5, abs=1e-9)
    assert masking.global_sparsity(model, list(plan.tensors)) == pytest.approx(0.5, abs=1e-3)


def test_dense_targets_reconstruct_closer_to_the_dense_model(ids):
    dense = tiny_decoder("llama")
    ref = _logits(dense, ids)
    err = {}
    for flag in (False, True):
        m = tiny_decoder("llama")
        prunekit.prune(m, 0.6, criterion="sequential", method="sparsegpt", dense_targets=flag, data=ids,
                       progress=False)
        err[flag] = (_logits(m, ids) - ref).pow(2).mean().item()
        assert masking.global_sparsity(m) == pytest.approx(0.6, abs=1e-3)
    assert err[True] < err[False]
    with pytest.raises(prunekit.PrunekitError, match="sparsegpt"):
        prunekit.prune(tiny_decoder("llama"), 0.5, criterion="sequential", method="wanda", dense_targets=True,
                       data=ids)


def test_sensitivity_allocation_is_refused_outside_the_sequential_pruner():
    with pytest.raises(prunekit.PrunekitError, match="sequential"):
        prunekit.prune(tiny_decoder("llama"), 0.5, criterion="l1", allocation="sensitivity")


def test_cli_choices_equal_the_registries():
    """prunekit llm lists its choices statically (its help imports no torch): they must not drift."""
    from prunekit.cli import llm as cli_llm
    from prunekit.pruners.sequential import SEQUENTIAL_ALLOCATIONS

    assert set(cli_llm.METHODS) == set(SOLVERS.names())
    assert set(cli_llm.ALLOCATIONS) == set(SEQUENTIAL_ALLOCATIONS)


def test_dense_targets_default_follows_the_solver():
    assert SequentialOptions(method="sparsegpt").dense_targets is True
    assert SequentialOptions(method="wanda").dense_targets is False
    assert SequentialOptions(method="sparsegpt", dense_targets=False).dense_targets is False


def test_blocks_left_out_stay_dense_and_later_blocks_still_see_both_streams(ids):
    """Only block 1 selected: block 0 stays exactly dense, and both streams go through it, so at block 1 the
    pruned and dense hidden states are the same and dense targets change nothing for its first group, q/k/v
    (W* = W exactly); later groups read outputs of pruned layers, where the dense targets do differ."""
    dense, runs = tiny_decoder("llama"), {}
    for flag in (True, False):
        model = tiny_decoder("llama")
        plan = prunekit.prune(model, 0.5, criterion="sequential", method="sparsegpt", include="model.layers.1.*",
                              dense_targets=flag, data=ids, progress=False)
        assert {n.split(".")[2] for n in plan.tensors} == {"1"} and plan.meta["dense_targets"] is flag
        for (n, p), q in zip(model.model.layers[0].named_parameters(), dense.model.layers[0].parameters()):
            assert torch.equal(p, q), n
        runs[flag] = model.model.layers[1].state_dict()
    first = [k for k in runs[True] if k.split(".")[1] in ("q_proj", "k_proj", "v_proj")]
    assert len(first) == 6 and all(torch.equal(runs[True][k], runs[False][k]) for k in first)  # weights, masks
    assert not torch.equal(runs[True]["mlp.down_proj.weight"], runs[False]["mlp.down_proj.weight"])


@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
def test_include_classifier_prunes_the_head_last_tied_embeddings_with_it(method, ids):
    model = tiny_decoder("llama")
    tied = model.get_input_embeddings().weight is model.lm_head.weight
    plan = prunekit.prune(model, 0.5, criterion="sequential", method=method, data=ids, include_classifier=True,
                          progress=False)
    head = plan.tensors["lm_head.weight"]
    assert head.sparsity == pytest.approx(0.5, abs=0.01) and plan.meta["targets"][-1] == "lm_head.weight"
    assert plan.meta["layer_sparsity"]["lm_head.weight"] == pytest.approx(head.sparsity)
    w = model.lm_head.weight
    assert (w == 0).float().mean().item() == pytest.approx(head.sparsity, abs=1e-6)
    if tied:   # one tensor under two names: the embedding lookups see the same zeros
        assert model.get_input_embeddings().weight is w and any("tied" in n for n in plan.notes)
    assert torch.isfinite(_logits(model, ids)).all()


def test_head_without_output_embeddings_is_refused_before_any_change(ids, monkeypatch):
    from prunekit.pruners.offload import prune_checkpoint

    def no_walk(*args, **kwargs):
        raise AssertionError("the blocks were walked before the request was checked")
    monkeypatch.setattr("prunekit.pruners.sequential.capture_inputs", no_walk)
    model = tiny_decoder("llama")
    model.get_output_embeddings = lambda: None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.PrunekitError, match="get_output_embeddings"):
        prunekit.prune(model, 0.5, criterion="sequential", data=ids, include_classifier=True, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(prunekit.PrunekitError, match="drop include_classifier"):
        prune_checkpoint("nowhere", "out", ids, 0.5, spec=PruneSpec(criterion="sequential", include_classifier=True))
