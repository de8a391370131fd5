"""Exact reconstruction of the kept weights (prunekit.pruners.reconstruct) and the sequential pruner's refit."""
from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.apply import masking
from prunekit.pruners.reconstruct import damped, layer_error, refit_rows
from prunekit.pruners.sequential import SequentialOptions
from prunekit.pruners.solvers import SOLVERS
from prunekit.pruners.sparsegpt import obs_prune
from prunekit.zoo.llm import tiny_decoder


def _problem(out=12, n=20, rows=400, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n, generator=g) @ torch.randn(n, n, generator=g) * 0.5 + torch.randn(n, generator=g)
    if outliers:  # LLM activations: a few features orders of magnitude larger (an ill-conditioned H)
        X[:, :2] *= 50
    return torch.randn(out, n, generator=g), X.t() @ X / rows


def _brute(W, H, keep, damp):
    Hd, out = damped(H, damp), torch.zeros(W.shape, dtype=torch.float64)
    for i in range(W.shape[0]):
        S = keep[i].nonzero().squeeze(1)
        if S.numel():
            out[i, S] = torch.linalg.solve(Hd[S][:, S], (Hd @ W[i].double())[S])
    return out


def test_each_row_is_the_least_squares_solution_on_its_kept_inputs():
    W, H = _problem()
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(W.shape, generator=g) > torch.linspace(0.1, 0.9, W.shape[0]).unsqueeze(1)
    keep[0] = False   # a row with nothing kept
    keep[1] = True    # and one with everything kept
    new = refit_rows(W, H, keep, damp=0.01)
    assert new.dtype == W.dtype and torch.equal(new[~keep], torch.zeros_like(new[~keep]))
    torch.testing.assert_close(new.double(), _brute(W, H, keep, 0.01), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new[1], W[1], rtol=1e-4, atol=1e-4)   # nothing pruned: nothing to repair


def test_refit_never_loses_to_sparsegpt_or_to_plain_masking():
    W, H = _problem(out=32, n=48)
    new, mask, _ = obs_prune(W, H, 0.5)
    refit = refit_rows(W, H, mask, damp=0.01)
    errors = {"masked": layer_error(W * mask, W, H), "sparsegpt": layer_error(new, W, H),
              "refit": layer_error(refit, W, H)}
    assert errors["refit"] <= errors["sparsegpt"] * (1 + 1e-6) < errors["masked"]
    assert errors["refit"] < 0.95 * errors["sparsegpt"]   # SparseGPT's update is only approximate


def test_near_singular_hessian_falls_back_and_stays_exact():
    W, H = _problem(n=16, rows=8, outliers=False)   # rank 8 of 16: only the ridge keeps it invertible
    keep = torch.ones(W.shape, dtype=torch.bool)
    keep[:, ::3] = False
    new = refit_rows(W, H, keep, damp=1e-9)
    torch.testing.assert_close(new.double(), _brute(W, H, keep, 1e-9), rtol=1e-3, atol=1e-3)


def test_small_chunks_give_the_same_rows(monkeypatch):
    W, H = _problem(out=9)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    whole = refit_rows(W, H, keep)
    monkeypatch.setattr("prunekit.pruners.reconstruct.CHUNK_BYTES", 1)   # one row per batched solve
    torch.testing.assert_close(refit_rows(W, H, keep), whole)


def test_shapes_are_checked():
    W, H = _problem()
    with pytest.raises(ValueError, match=r"\(out, in\)"):
        refit_rows(W, H[:5, :5], torch.ones(W.shape, dtype=torch.bool))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _error_to_dense(model, dense, ids):
    with torch.no_grad():
        return (model(input_ids=ids).logits - dense(input_ids=ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("method", SOLVERS.names())
def test_sequential_refit_brings_every_solver_closer_to_the_dense_model(method, ids):
    dense = tiny_decoder("llama")
    err, sparsity = {}, {}
    for refit in (False, True):
        m = tiny_decoder("llama")
        plan = prunekit.prune(m, 0.6, criterion="sequential", method=method, refit=refit, data=ids, progress=False)
        assert plan.meta["refit"] is refit
        sparsity[refit] = masking.global_sparsity(m)
        for name, mask in masking.masks(m).items():   # the refit weights are exact zeros where the mask says so
            assert bool((m.get_parameter(name)[~mask.bool()] == 0).all()), name
        err[refit] = _error_to_dense(m, dense, ids)
    assert err[True] < err[False]
    assert sparsity[True] == pytest.approx(0.6, abs=0.01) and sparsity[True] == sparsity[False]


def test_refit_options_are_validated():
    assert SequentialOptions(method="wanda", refit=True).stat_kind == "hessian"
    assert SequentialOptions(method="wanda", refit=True).dense_targets is True   # a refit aims at the dense model
    assert SequentialOptions(method="magnitude").stat_kind == "none"
    with pytest.raises(prunekit.PrunekitError, match="True or False"):
        SequentialOptions(refit="yes")
    assert SequentialOptions(method="wanda", refit=True, dense_targets=False).dense_targets is False
