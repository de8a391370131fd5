"""prunekit.native: the C sparse kernel builds here, equals F.linear, does not depend on the thread count,
is validated before it reads memory, and prunekit falls back to torch's kernels when it cannot build."""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load, save as st_save
from torch import nn

from prunekit.deploy import native, sparse
from prunekit.deploy.sparse import SparseLinear, csr_parts, to_sparse

needs_native = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.unavailable_reason()}")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A private cache and a cleared loader, restored afterwards (other tests keep the real library)."""
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    native._load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native._load.cache_clear()


def sparse_weight(out_f, in_f, density, seed=0, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[torch.rand(out_f, in_f, generator=g) >= density] = 0
    for r in empty_rows:
        w[r] = 0
    return w


def sparse_linear(out_f, in_f, density, seed=0):
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(sparse_weight(out_f, in_f, density, seed=seed))
    return lin


def close(got, want):
    return torch.allclose(got, want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=0)


def run_native(w, x, b=None, threads=1, simd=False):
    crow, col, values = csr_parts(w)
    return native.spmm(crow, col.to(native.col_dtype(w.shape[1])), values, x, b, w.shape[1], threads=threads,
                       simd=simd)


def test_builds_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert native.available(), native.unavailable_reason()
        assert native.unavailable_reason() == ""


@needs_native
@pytest.mark.parametrize("out_f, in_f, batch, bias", [
    (37, 53, 1, True), (37, 53, 3, False), (40, 33, 8, True), (33, 40, 17, True),  # 17: a partial block of 8
    (64, 40_000, 2, True),  # above 32767: the 16-bit indices wrap in int16 and must be read back unsigned
    (8, 70_000, 1, False),  # wider than 65536: int32 column indices
])
@pytest.mark.parametrize("simd", [False, True])
def test_equals_linear(out_f, in_f, batch, bias, simd):
    w = sparse_weight(out_f, in_f, 0.1 if in_f > 1000 else 0.3, empty_rows=(1, 5))
    b = torch.randn(out_f) if bias else None
    x = torch.randn(batch, in_f)
    got = run_native(w, x, b, simd=simd)
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (batch, out_f)
    assert torch.allclose(got, want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=0)
    assert torch.equal(got[:, 1], torch.zeros(batch) if b is None else b[1].expand(batch))  # empty row: bias only


@needs_native
def test_all_zero_matrix_and_exact_small_case():
    w = torch.zeros(4, 6)
    assert torch.equal(run_native(w, torch.randn(2, 6), torch.arange(4.0)), torch.arange(4.0).expand(2, 4))
    w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, -3.0]])
    x = torch.tensor([[1.0, 10.0, 100.0]])
    assert torch.equal(run_native(w, x, torch.tensor([0.5, 0.25])), torch.tensor([[20.5, -298.75]]))


@needs_native
def test_thread_count_does_not_change_a_bit():
    w = sparse_weight(512, 700, 0.2, seed=3)  # ~72k non-zeros: enough work that threads really start
    x = torch.randn(5, 700)
    one = run_native(w, x, threads=1)
    for t in (2, 3, 7):
        assert torch.equal(run_native(w, x, threads=t), one)
    for simd in (False, True):
        assert torch.equal(run_native(w, x[:1], threads=2, simd=simd), run_native(w, x[:1], threads=1, simd=simd))


@needs_native
def test_sparse_linear_native_kernel_round_trips():
    lin = sparse_linear(24, 40_000, 0.05, seed=1)
    s = SparseLinear.from_linear(lin, native_max_batch=4, mm_min_batch=16)
    assert s.col_indices.dtype == torch.int16  # 6 bytes per non-zero instead of 8
    assert [s.kernel_for(n) for n in (1, 4, 5, 16)] == ["native", "native", "linear", "mm"]
    x = torch.randn(3, 40_000)
    with torch.no_grad():
        want = lin(x)
        y = s(x)
        assert close(y, want)
        x20 = torch.randn(20, 40_000)
        assert close(s(x20), lin(x20))  # the mm path
    assert torch.equal(s.to_linear().weight, lin.weight)  # the widened indices give back the exact weight
    sd = st_load(st_save(dict(s.state_dict())))
    assert sd["col_indices"].dtype == torch.int16
    twin = copy.deepcopy(s)
    twin.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(twin(x), y)


@needs_native
def test_torch_kernels_read_the_same_16_bit_indices():
    lin = sparse_linear(6, 40_000, 0.05, seed=2)
    s = SparseLinear.from_linear(lin, native_max_batch=1, mm_min_batch=2)
    x = torch.randn(2, 40_000)
    with torch.no_grad():
        nat = torch.cat([s(x[:1]), s(x[1:])])  # batch 1: native
        mm = s(x)  # batch 2: torch's mm on the widened indices
        assert close(nat, mm)


@needs_native
def test_gradients_fall_back_to_torch():
    lin = sparse_linear(8, 20, 0.3)
    s = SparseLinear.from_linear(lin, native_max_batch=64)
    x = torch.randn(2, 20, requires_grad=True)
    s(x).sum().backward()  # the C kernel has no autograd: this must take torch's path
    assert torch.allclose(x.grad, lin.weight.sum(0).expand(2, 20), atol=1e-6)
    assert torch.allclose(s(x.double().detach().float()), lin(x).detach(), atol=1e-5)


@needs_native
def test_tampered_16_bit_indices_are_refused_before_the_kernel_reads():
    lin = sparse_linear(8, 20, 0.5)
    s = SparseLinear.from_linear(lin, native_max_batch=8)
    with torch.no_grad():
        s.col_indices[0] = 30_000
    with pytest.raises(ValueError, match="column index out of range"):
        s(torch.randn(1, 20))


def test_native_kernel_needs_float32_and_a_known_loop():
    lin = nn.Linear(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        SparseLinear.from_linear(lin, native_max_batch=4)
    with pytest.raises(ValueError, match="native, native_simd"):
        SparseLinear.from_linear(nn.Linear(10, 4), native_max_batch=4, native_kernel="fast")


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_NATIVE", "0")
    assert not native.available() and "PRUNEKIT_NATIVE=0" in native.unavailable_reason()
    with pytest.raises(RuntimeError, match="not available"):
        run_native(sparse_weight(3, 3, 0.5), torch.randn(1, 3))
    lin = sparse_linear(8, 16, 0.2)
    new, (entry,) = to_sparse(lin, torch.randn(1, 16), min_speedup=1e-9, repeat=1)
    assert entry["converted"] and "native" not in entry["kernels_ms"] and entry["native_max_batch"] is None
    assert entry["kernel"] in sparse.TORCH_KERNELS


def test_a_failing_compiler_leaves_torch_kernels(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exists and always fails
    assert not native.available()
    assert "failed" in native.unavailable_reason()
    assert not list(fresh_native.glob("native/*.so"))  # nothing half-written is left to load later
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    native._load.cache_clear()
    assert "no C compiler" in native.unavailable_reason()


@needs_native
def test_built_once_into_the_cache(fresh_native):
    assert native.available()
    (lib,) = fresh_native.glob("native/spmm-*.so")
    stamp = lib.stat().st_mtime_ns
    native._load.cache_clear()
    assert native.available() and lib.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert sorted(p.name for p in (fresh_native / "native").iterdir()) == [lib.name]  # no temp files left


@needs_native
def test_to_sparse_sets_the_native_rule_from_the_ladder(fake_ladder):
    # native measured fastest up to 4 rows, slower from 16 on: native_max_batch must be 4
    whole_model = {"model:as measured": 1.0, "model:native": 2.0}  # agrees with the per-layer choice

    def times(key, batch):
        if key in whole_model:
            return whole_model[key]
        if key.startswith("d_"):
            return 10.0
        return {"native": 0.5 if batch <= 4 else 3.0, "native_simd": 0.4 if batch <= 4 else 3.0,
                "linear": 1.0, "mm": 2.0}[key]

    fake_ladder(times)
    lin = sparse_linear(16, 12, 0.3)
    new, (entry,) = to_sparse(lin, torch.randn(2, 12))
    assert new.native_max_batch == 4 and entry["native_max_batch"] == 4 and new.mm_min_batch is None
    assert new.native_kernel == "native_simd"  # the faster of the two native loops at batch 1
    assert entry["kernel"] == "native_simd" and entry["speedup"] == pytest.approx(25.0)
    assert new.col_indices.dtype == torch.int16
    x = torch.randn(2, 12)
    with torch.no_grad():
        assert torch.allclose(new(x), lin(x), atol=1e-5)


def test_saving_a_converted_model_keeps_the_masked_weights(tmp_path):
    import prunekit
    from prunekit.deploy import io as pio
    from prunekit.zoo.models import build_model

    model = build_model("lenet300")
    prunekit.prune(model, 0.9, include_classifier=True)
    x = torch.randn(2, 1, 28, 28)
    fast, report = to_sparse(model, x, measure=False)
    assert any(r["converted"] for r in report)
    folder = prunekit.save(fast, tmp_path / "m", compressed=True)
    spec = pio.read_spec(folder)
    assert set(spec["sparse_layers"]) == {r["name"] for r in report if r["converted"]}
    back = prunekit.load(folder)  # the built-in architecture, masked: convert again on the target machine
    assert type(back) is type(model)
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.allclose(back(x), fast(x), atol=1e-5)
    assert pio.read_spec(prunekit.save(model, tmp_path / "plain"))["sparse_layers"] is None


@needs_native
def test_one_openmp_runtime_shared_with_torch():
    import pathlib

    maps = pathlib.Path("/proc/self/maps")
    if not native.parallel() or not maps.exists():
        pytest.skip("built without OpenMP, or no /proc to inspect")
    run_native(sparse_weight(64, 64, 0.5), torch.randn(1, 64), threads=2)
    # other wheels bundle their own renamed copies (libgomp-<hash>.so); the soname the kernel links against
    # must resolve to the copy torch loaded, not to a second libgomp.so.1 with a pool fighting torch's threads
    gomp = {line.split()[-1] for line in maps.read_text().splitlines() if line.endswith("/libgomp.so.1")}
    assert len(gomp) == 1 and "torch" in next(iter(gomp)), gomp


@needs_native
def test_arguments_that_would_read_outside_the_buffers_are_refused():
    w = sparse_weight(6, 10, 0.5)
    crow, col, values = csr_parts(w)
    col16 = col.to(torch.int16)
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"shape \(batch, 10\)"):
        native.spmm(crow, col16, values, torch.randn(2, 9), None, 10)  # input narrower than the weight
    with pytest.raises(ValueError, match="do not fit"):
        native.spmm(crow, col16, values[:-1], x, None, 10)
    with pytest.raises(ValueError, match="do not fit"):
        native.spmm(crow, col16, values, x, torch.zeros(5), 10)  # bias of the wrong length
    with pytest.raises(ValueError, match="float32"):
        native.spmm(crow, col16, values.double(), x, None, 10)
    with pytest.raises(ValueError, match="int32 row pointers"):
        native.spmm(crow.long(), col16, values, x, None, 10)
    # strided views are made contiguous, not read with the wrong strides
    wide = torch.stack([values, values], 1)[:, 0]
    assert not wide.is_contiguous()
    assert close(native.spmm(crow, col16, wide, x, None, 10), x @ w.t())


@needs_native
def test_the_whole_model_settles_which_native_loop_runs(fake_ladder):
    # per layer the vectorised loop measures faster; timed as a whole model the scalar one wins: it is kept.
    # Every layer chose the vectorised loop, so "model:native_simd" (the same assignment) is never timed.
    times = {"model:as measured": 2.0, "model:native": 1.0, "native": 0.5, "native_simd": 0.4, "linear": 1.0,
             "mm": 2.0}
    fake_ladder(lambda key, batch: 10.0 if key.startswith("d_") else times[key])
    model = nn.Sequential(sparse_linear(16, 12, 0.3), nn.ReLU(), sparse_linear(8, 16, 0.3, seed=1))
    x = torch.randn(1, 12)
    new, report = to_sparse(model, x)
    assert [m.native_kernel for m in new.modules() if isinstance(m, SparseLinear)] == ["native", "native"]
    for r in report:
        assert r["kernel"] == "native" and "whole model" in r["reason"]
        assert r["sparse_ms"] == 0.5 and r["speedup"] == pytest.approx(r["dense_ms"] / 0.5)
    with torch.no_grad():
        assert close(new(x), model(x))
