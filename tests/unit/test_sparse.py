"""prunekit.sparse: CSR layers equal the dense ones, conversion follows the measurement, the input model is
never modified, masks survive a round trip, bad input gets clear errors."""
import copy
import io as _io

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save
from torch import nn

import prunekit
from prunekit.apply import masking
from prunekit.deploy import native, sparse
from prunekit.deploy.sparse import SparseConv2d, SparseLinear, csr_parts, to_dense, to_sparse

ATOL = 1e-5


def pruned_linear(out_f=30, in_f=20, amount=0.8, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    prunekit.prune(lin, amount, include_classifier=True)
    return lin


def masked_mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    prunekit.prune(m, 0.9, scope="layer", include_classifier=True)
    return m


def masked_cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(),
                      nn.Conv2d(32, 8, 3, stride=2, dilation=2, padding=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    prunekit.prune(m, 0.85, scope="layer", include_classifier=True)
    return m


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ CSR parts
def test_csr_parts_int32_and_exact():
    w = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 3.0]])
    crow, col, values = csr_parts(w)
    assert crow.dtype == col.dtype == torch.int32
    assert crow.tolist() == [0, 1, 1, 3] and col.tolist() == [1, 0, 2] and values.tolist() == [2.0, -1.0, 3.0]
    with pytest.raises(ValueError, match="2-D"):
        csr_parts(torch.zeros(2, 2, 2))


# ------------------------------------------------------------------------------ modules equal dense
@pytest.mark.parametrize("rule", [1, 4, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_linear_equals_linear(rule, bias, dtype):
    lin = pruned_linear(bias=bias, dtype=dtype)
    s = SparseLinear.from_linear(lin, mm_min_batch=rule)
    assert s.nnz == int((lin.weight != 0).sum()) and abs(s.sparsity - 0.8) < 0.01
    for shape in [(1, 20), (3, 20), (7, 20), (2, 3, 20), (20,)]:
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            assert torch.allclose(s(x), lin(x), atol=ATOL, rtol=0), shape
        assert s(x).shape == lin(x).shape
    assert s.kernel_for(1) == ("mm" if rule == 1 else "linear")
    assert s.kernel_for(8) == ("linear" if rule is None else "mm")


def test_sparse_linear_gives_input_gradients():
    lin = pruned_linear()
    s = SparseLinear.from_linear(lin, mm_min_batch=1)
    x = torch.randn(4, 20, requires_grad=True)
    s(x).sum().backward()
    want = lin.weight.detach().sum(0).expand(4, 20)
    assert torch.allclose(x.grad, want, atol=ATOL)


@pytest.mark.parametrize("conv_args, shape", [
    (dict(in_channels=4, out_channels=6, kernel_size=1), (2, 4, 5, 5)),
    (dict(in_channels=4, out_channels=6, kernel_size=1, bias=False), (1, 4, 5, 5)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (1, 4, 7, 7)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2), (3, 4, 9, 8)),
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 1), padding=(1, 0)), (4, 7, 7)),  # unbatched
])
def test_sparse_conv_equals_conv(conv_args, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(**conv_args)
    prunekit.prune(conv, 0.7, include_classifier=True)
    s = SparseConv2d(conv)
    x = torch.randn(*shape)
    with torch.no_grad():
        want, got = conv(x), s(x)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, atol=ATOL, rtol=0)
    back = s.to_conv()
    assert torch.equal(back.weight, conv.weight) and masking.masks(back).keys() == {"weight"}


@pytest.mark.parametrize("conv, match", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
    (nn.Conv2d(4, 4, 3, padding="same"), "padding='same'"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
])
def test_unsupported_convs_are_refused(conv, match):
    with pytest.raises(ValueError, match=match):
        SparseConv2d(conv)


def test_sparse_linear_refuses_bad_weights():
    with pytest.raises(ValueError, match="float32/float64"):
        SparseLinear(torch.zeros(3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        SparseLinear(torch.zeros(3))


# ------------------------------------------------------------------------------ state, copies, corruption
def test_state_dict_is_plain_tensors_and_round_trips_without_pickle():
    s = SparseLinear.from_linear(pruned_linear(), mm_min_batch=1)
    x = torch.randn(3, 20)
    y = s(x)  # fills the CSR cache: copies must not share or break it
    sd = st_load(st_save(dict(s.state_dict())))
    assert set(sd) == {"crow_indices", "col_indices", "values", "bias", "weight_mask"}
    assert sd["crow_indices"].dtype == torch.int32
    other = SparseLinear.from_linear(pruned_linear(seed=1), mm_min_batch=1)
    assert other.nnz == s.nnz  # same amount pruned: same buffer shapes
    other(x)
    other.load_state_dict(sd)
    assert torch.equal(other(x), y)  # the cached CSR tensor is rebuilt after the buffers change
    clone = copy.deepcopy(s)
    assert torch.equal(clone(x), y)
    buf = _io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) == set(sd)


def test_tampered_buffers_raise_instead_of_reading_out_of_bounds():
    s = SparseLinear.from_linear(pruned_linear())
    with torch.no_grad():
        s.col_indices[0] = 10_000
    with pytest.raises(ValueError, match="column index out of range"):
        s(torch.randn(1, 20))
    s = SparseLinear.from_linear(pruned_linear())
    with torch.no_grad():
        s.crow_indices[-1] += 1
    with pytest.raises(ValueError, match="row pointers"):
        s(torch.randn(1, 20))
    s = SparseLinear.from_linear(pruned_linear())
    with torch.no_grad():
        s.col_indices[:2] = s.col_indices[:2].flip(0)
    assert int(s.crow_indices[1]) >= 2  # both swapped entries are in row 0: now unsorted
    with pytest.raises(ValueError, match="sorted"):
        s(torch.randn(1, 20))


# ------------------------------------------------------------------------------ to_sparse / to_dense
@pytest.mark.parametrize("make, shape", [(masked_mlp, (3, 48)), (masked_cnn, (2, 3, 8, 8)), (masked_cnn, (1, 3, 8, 8))])
def test_to_sparse_unmeasured_converts_all_and_matches(make, shape):
    model = make().train()
    before = state(model)
    x = torch.randn(*shape)
    new, report = to_sparse(model, x, measure=False)
    assert same_state(before, state(model)) and model.training  # input model untouched
    assert all(type(m) in (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Sequential) for m in model.modules())
    assert all(r["converted"] and r["reason"] == "not measured (measure=False)" for r in report)
    assert len(report) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in new.modules())
    assert new.training  # flags carried over
    with torch.no_grad():
        assert torch.allclose(new.eval()(x), model.eval()(x), atol=ATOL, rtol=0)
    back = to_dense(new)
    assert same_state(state(back), before)  # weights and prunekit masks back exactly
    assert masking.masks(back).keys() == masking.masks(model).keys()


def fake_timer(sparse_ms, dense_ms=1.0):
    """Replaces the timer: every dense form takes ``dense_ms``, every sparse kernel ``sparse_ms`` (deterministic)."""
    def timer(fns, repeat, warmup=2, evict=None):
        for f in fns.values():  # still run them: the code paths must work
            f()
        return {k: (dense_ms if k.startswith("d_") or k == "dense" else sparse_ms) for k in fns}
    return timer


@pytest.mark.parametrize("sparse_ms, converted", [(0.5, True), (0.95, False), (2.0, False)])
def test_conversion_follows_the_measurement(monkeypatch, sparse_ms, converted):
    monkeypatch.setattr(sparse, "_median_ms", fake_timer(sparse_ms))
    model = masked_cnn()
    x = torch.randn(2, 3, 8, 8)
    new, report = to_sparse(model, x, min_speedup=1.1)
    assert [r["converted"] for r in report] == [converted] * len(report)
    for r in report:
        assert r["speedup"] == pytest.approx(1.0 / sparse_ms) and r["batch"] == 2
        assert ("min_speedup=1.1" in r["reason"]) and r["threads"] == torch.get_num_threads()
    kinds = {type(m) for m in new.modules()}
    assert (SparseConv2d in kinds and SparseLinear in kinds) == converted
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=ATOL, rtol=0)


def test_kernel_rule_comes_from_the_ladder(fake_ladder):
    # "mm" measured faster only from 16 rows on: the rule must say 16, and the report the kernel for batch 4
    def times(key, batch):
        if key.startswith("d_"):
            return 10.0
        return (1.0 if key == "mm" else 2.0) if batch >= 16 else (2.0 if key == "mm" else 1.0)

    calls = fake_ladder(times)
    lin = pruned_linear(out_f=16, in_f=12)
    new, (entry,) = to_sparse(lin, torch.randn(4, 12))
    assert sorted(set(calls)) == [1, 4, 16, 64]
    assert isinstance(new, SparseLinear) and new.mm_min_batch == 16 and entry["mm_min_batch"] == 16
    assert entry["kernel"] == "linear" and entry["converted"]


def test_measured_conversion_on_this_machine():
    model = masked_mlp()
    x = torch.randn(4, 48)
    new, report = to_sparse(model, x, threads=1, repeat=3)
    for r in report:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["dense_form"] in sparse.DENSE_FORMS
        assert r["kernel"] in sparse.KERNELS or r["kernel"].startswith(sparse.PACKED_PREFIX)
        assert r["threads"] == 1 and r["batch"] == 4
        assert r["cold_cache"] is False  # a tiny model stays in the cache: measured warm
        assert r["converted"] == (r["speedup"] >= 1.1)
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=ATOL, rtol=0)
    none, report = to_sparse(model, x, threads=1, repeat=1, min_speedup=1e9)
    assert not any(r["converted"] for r in report)
    assert not any(isinstance(m, SparseLinear) for m in none.modules())


class FirstOnly(nn.Sequential):
    """Only its first layer runs in forward: the others must not be converted blindly."""

    def forward(self, x):
        return self[0](x)


def test_skips_are_reported_with_reasons():
    torch.manual_seed(0)
    model = FirstOnly(nn.Linear(8, 8), nn.Conv2d(1, 1, 1), nn.Linear(8, 8).half())
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    new, report = to_sparse(model, torch.randn(2, 8), measure=False, min_sparsity=0.4)
    reasons = {r["name"]: r["reason"] for r in report}
    assert report[0]["converted"] and isinstance(new[0], SparseLinear)
    assert "not called" in reasons["1"] and "float16" in reasons["2"]
    assert [r["converted"] for r in report] == [True, False, False]
    _, report = to_sparse(model, torch.randn(2, 8), measure=False, min_sparsity=0.6)
    assert "min_sparsity=0.6" in report[0]["reason"] and not report[0]["converted"]


def test_attention_projections_are_left_alone():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ff = nn.Linear(16, 16)

        def forward(self, x):
            return self.ff(self.attn(x, x, x, need_weights=False)[0])

    model = Block().eval()
    prunekit.prune(model, 0.8, types=["Linear"], include_classifier=True)
    x = torch.randn(2, 5, 16)
    new, report = to_sparse(model, x, measure=False)
    assert [r["name"] for r in report] == ["ff"]
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=ATOL, rtol=0)


def test_layer_selection_and_bad_arguments():
    model = masked_mlp()
    x = torch.randn(1, 48)
    _, report = to_sparse(model, x, measure=False, layers=["1", "5"])
    assert [r["name"] for r in report] == ["1", "5"]
    _, report = to_sparse(model, x, measure=False, layers="[13]")
    assert [r["name"] for r in report] == ["1", "3"]
    with pytest.raises(KeyError, match="did you mean"):
        to_sparse(model, x, layers=["11"])
    with pytest.raises(ValueError, match="allowed: Linear, Conv2d"):
        to_sparse(model, x, types=["Conv1d"])
    for kw, match in [({"min_speedup": 0}, "min_speedup"), ({"min_sparsity": 2}, "min_sparsity"),
                      ({"repeat": 0}, "repeat"), ({"threads": 0}, "threads")]:
        with pytest.raises(ValueError, match=match):
            to_sparse(model, x, **kw)


def test_dense_forms_compute_the_same():
    model = masked_mlp()
    x = torch.randn(3, 48)
    for form in sparse.DENSE_FORMS:
        other = sparse.to_dense_form(model, form)
        assert sum(isinstance(m, sparse.DenseLinear) for m in other.modules()) == 3
        with torch.no_grad():
            assert torch.allclose(other(x), model(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="allowed: linear, addmm_t, matmul_t"):
        sparse.to_dense_form(model, "gemm")


# ------------------------------------------------------------------------------ break-even
def test_break_even_interpolation():
    rows = [{"sparsity": s, "speedup": v} for s, v in [(0.5, 0.4), (0.7, 0.8), (0.8, 1.2), (0.9, 3.0)]]
    assert sparse._break_even(rows) == (pytest.approx(0.75), "exact")
    dip = rows + [{"sparsity": 0.6, "speedup": 1.1}]  # a lucky point below a slower one does not count
    assert sparse._break_even(dip) == (pytest.approx(0.75), "exact")
    assert sparse._break_even([{"sparsity": 0.5, "speedup": 1.5}, {"sparsity": 0.9, "speedup": 4}]) == (0.5, "below")
    assert sparse._break_even([{"sparsity": 0.5, "speedup": 0.1}, {"sparsity": 0.9, "speedup": 0.9}]) == (0.9, "above")


def test_measure_break_even_runs_every_form(monkeypatch):
    out = sparse.measure_break_even(16, 24, 2, sparsities=(0.9, 0.5), threads=1, repeat=1)
    assert out["shape"] == [16, 24] and out["batch"] == 2 and out["threads"] == 1
    assert [r["sparsity"] for r in out["rows"]] == [0.5, 0.9]
    for r in out["rows"]:
        packed_kernels = {sparse.PACKED_PREFIX + f for f in ("bitmask", "csr8")}   # random sparsity is not 2:4
        assert r["dense_form"] in sparse.DENSE_FORMS and r["kernel"] in set(sparse.KERNELS) | packed_kernels
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        if native.available():   # the packed formats compete too
            assert packed_kernels <= set(r["kernels_ms"])
    assert out["bound"] in ("exact", "below", "above") and 0.5 <= out["break_even"] <= 0.9
    assert torch.get_num_threads() >= 1
    monkeypatch.setattr(sparse, "_median_ms", fake_timer(0.5))
    assert sparse.measure_break_even(8, 8, 1, sparsities=(0.5, 0.9))["bound"] == "below"
    with pytest.raises(ValueError, match="fractions"):
        sparse.measure_break_even(8, 8, 1, sparsities=(0.5, 1.0))


def test_cold_cache_measurement_evicts_before_every_timed_call(monkeypatch):
    assert sparse.llc_bytes() >= 2**20
    calls = []

    class Spy:
        def __call__(self):
            calls.append(1)

    monkeypatch.setattr(sparse, "_Evict", Spy)
    times = sparse._median_ms({"a": lambda: None, "b": lambda: None}, repeat=3, warmup=1, evict=Spy())
    assert set(times) == {"a", "b"} and len(calls) == 2 * (3 + 1)  # every call, warm-up included
    calls.clear()
    lin = pruned_linear()
    _, (entry,) = to_sparse(lin, torch.randn(2, 20), repeat=2, cold_cache=True, min_speedup=1e-9)
    assert entry["cold_cache"] and entry["converted"] and len(calls) > 0
    calls.clear()
    _, (entry,) = to_sparse(lin, torch.randn(2, 20), repeat=2, cold_cache=False)
    assert not entry["cold_cache"] and not calls
    out = sparse.measure_break_even(8, 8, 1, sparsities=(0.5,), repeat=1, cold_cache=True)
    assert out["cold_cache"] and calls


def test_cache_decision_counts_the_converted_model_not_the_dense_one(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100))
    prunekit.prune(model, 0.9, include_classifier=True)
    cands = [("0", model[0]), ("2", model[2])]
    # per layer: 1000 non-zeros x (4-byte value + 2-byte index) + 101 row pointers; biases stay dense
    want = 2 * (1000 * 6 + 4 * 101) + 2 * 100 * 4 + sum(b.numel() * b.element_size() for b in model.buffers())
    assert sparse._sparse_footprint(model, cands) == want
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(sparse, "llc_bytes", lambda: (want + dense_bytes) // 2)  # dense does not fit, sparse does
    monkeypatch.setattr(sparse, "_median_ms", fake_timer(0.5))
    _, report = to_sparse(model, torch.randn(1, 100))
    assert [r["cold_cache"] for r in report] == [False, False]


def test_break_even_in_a_stream_times_a_chain_of_distinct_layers(monkeypatch):
    """stream=True: enough copies of the shape to fill twice the last-level cache, no eviction, times per layer."""
    monkeypatch.setattr(sparse, "llc_bytes", lambda: 4 * 16 * 24 * 4)   # a tiny "cache": 8 copies of 16x24 fp32
    seen = []

    def timer(fns, repeat, warmup=2, evict=None):
        seen.append(evict)
        out = {}
        for k, f in fns.items():
            calls = f()
            assert len(calls) == 8   # each timed fn runs every copy
            out[k] = 8.0 if k.startswith("d_") else 4.0
        return out

    monkeypatch.setattr(sparse, "_median_ms", timer)
    res = sparse.measure_break_even(16, 24, 1, sparsities=(0.5,), stream=True, cold_cache=True)
    assert res["stream"] == 8 and res["cold_cache"] is False and seen == [None]
    row = res["rows"][0]
    assert row["dense_ms"] == 1.0 and row["sparse_ms"] == 0.5 and row["speedup"] == 2.0
