"""deploy.packed: bitmask / 2:4 / 8-bit-delta CSR weights for batch-1 decoding, and their native kernels."""
import pytest
import torch
from torch import nn

import prunekit
from prunekit.deploy import native, packed
from prunekit.deploy.packed import PackedLinear, PackedWeight
from prunekit.deploy.sparse import to_dense, to_sparse
from prunekit.errors import PrunekitError

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the packed kernels are not built")
SHAPES = [(5, 72), (64, 576), (33, 1000), (3, 600), (7, 4)]


def sparse_weight(out_f, in_f, fmt, dtype, seed=0):
    """Random weight with the format's pattern, plus an all-zero row, and (wide layers) a row whose two
    kept columns lie more than 255 apart, which csr8 must bridge with explicit zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if fmt == "nm24":
        keep = torch.rand(out_f, in_f // 4, 4, generator=g).argsort(-1)[..., :2]
        m = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
        m[0, 0] = False  # a group that kept nothing
        m[-1, -1, 1:] = False  # and one that kept a single weight
        w = w * m.view(out_f, in_f)
    else:
        w[torch.rand(out_f, in_f, generator=g) < 0.6] = 0
        if in_f >= 600 and out_f >= 3:
            w[2] = 0
            w[2, 0], w[2, in_f - 1] = 0.5, 1.5
    if out_f > 1:
        w[1] = 0
    return w.to(dtype)


def cases():
    for fmt in packed.FORMATS:
        for dtype in packed.VALUE_DTYPES:
            for shape in SHAPES:
                if fmt != "nm24" or shape[1] % 4 == 0:
                    yield fmt, dtype, shape


@pytest.mark.parametrize("fmt,dtype,shape", list(cases()))
def test_pack_unpack_is_exact(fmt, dtype, shape, monkeypatch):
    w = sparse_weight(*shape, fmt, dtype)
    pw = packed.pack(w, fmt)
    packed.check(pw)
    assert torch.equal(packed.unpack(pw), w)
    monkeypatch.setattr(native, "library", lambda: None)   # no C compiler: torch unpacks, and matvec falls back
    assert torch.equal(packed.unpack(pw), w)
    x = torch.randn(2, shape[1])
    assert torch.allclose(packed.matvec(pw, x), x @ w.float().T, atol=1e-4)


@needs_native
@pytest.mark.parametrize("fmt,dtype,shape", list(cases()))
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_kernel_matches_float64_reference_for_any_thread_count(fmt, dtype, shape, rows):
    w = sparse_weight(*shape, fmt, dtype)
    pw = packed.pack(w, fmt)
    g = torch.Generator().manual_seed(1)
    x, bias = torch.randn(rows, shape[1], generator=g), torch.randn(shape[0], generator=g)
    ref = x.double() @ w.double().T + bias.double()
    y1 = packed.matvec(pw, x, bias, threads=1)
    assert y1.dtype == torch.float32 and y1.shape == (rows, shape[0])
    assert (y1.double() - ref).abs().max() < 1e-4
    assert torch.equal(y1, packed.matvec(pw, x, bias, threads=2))  # every row summed in one fixed order
    assert torch.equal(y1, packed.matvec(pw, x, bias, threads=5))


@needs_native
def test_thread_count_does_not_change_a_large_product():
    """Big enough that the kernel really splits rows among threads (it keeps small products on one)."""
    w = sparse_weight(1536, 576, "bitmask", torch.float32)
    pw, x = packed.pack(w), torch.randn(1, 576)
    assert torch.equal(packed.matvec(pw, x, threads=1), packed.matvec(pw, x, threads=2))


def test_bytes_per_weight_follow_the_formats_arithmetic():
    w = torch.randn(64, 576)
    w[:, ::2] = 0  # exactly 50%, also 2:4
    dense = packed.dense_bytes(w.shape, torch.float32)
    bm, nm, c8 = (packed.packed_bytes(packed.pack(w, f)) for f in packed.FORMATS)
    assert bm == 64 * 9 * 8 + 64 * 288 * 4 + 65 * 4          # mask words + values + row offsets
    assert nm == 64 * 9 * 8 + 64 * 288 * 4                    # no row offsets: fixed slots
    assert c8 == 64 * 288 * (1 + 4) + 65 * 4
    assert dense / bm > 1.85 and dense / nm > 1.88 and c8 > bm
    bf = packed.packed_bytes(packed.pack(w.bfloat16(), "bitmask"))
    assert bf == 64 * 9 * 8 + 64 * 288 * 2 + 65 * 4


def test_bad_weights_and_formats_are_refused():
    with pytest.raises(PrunekitError, match="allowed: bitmask, nm24, csr8"):
        packed.pack(torch.zeros(4, 8), "coo")
    with pytest.raises(PrunekitError, match="not 2:4"):
        packed.pack(torch.ones(4, 8), "nm24")
    with pytest.raises(PrunekitError, match="multiple of 4"):
        packed.pack(torch.zeros(4, 6), "nm24")
    with pytest.raises(PrunekitError, match="float32 or bfloat16"):
        packed.pack(torch.zeros(4, 8, dtype=torch.float64))
    w = torch.zeros(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(PrunekitError, match="NaN"):
        packed.pack(w)


@pytest.mark.parametrize("fmt", packed.FORMATS)
def test_check_refuses_buffers_that_would_read_out_of_bounds(fmt):
    w = sparse_weight(6, 200, fmt, torch.float32)
    good = packed.pack(w, fmt)
    packed.check(good)
    bad = []
    if fmt != "csr8":
        mask = good.mask.clone()
        mask[0, -1] |= 1 << 62  # a bit past input 199
        bad.append(PackedWeight(fmt, good.shape, good.values, mask=mask, rowptr=good.rowptr))
        bad.append(PackedWeight(fmt, good.shape, good.values[:-20].contiguous(), mask=good.mask, rowptr=good.rowptr))
    if fmt == "bitmask":
        rp = good.rowptr.clone()
        rp[3] += 1
        bad.append(PackedWeight(fmt, good.shape, good.values, mask=good.mask, rowptr=rp))
    if fmt == "csr8":
        delta = good.delta.clone()
        delta[int(good.rowptr[1]) - 1] = 255  # row 0's last column walks past the input
        bad.append(PackedWeight(fmt, good.shape, good.values, rowptr=good.rowptr, delta=delta))
        bad.append(PackedWeight(fmt, good.shape, good.values, rowptr=good.rowptr, delta=good.delta[:-1]))
    for pw in bad:
        with pytest.raises(PrunekitError, match="packed weight"):
            packed.check(pw)


def test_module_revalidates_buffers_after_load_state_dict():
    lin = nn.Linear(200, 6)
    with torch.no_grad():
        lin.weight.copy_(sparse_weight(6, 200, "bitmask", torch.float32))
    mod = PackedLinear.from_linear(lin)
    sd = mod.state_dict()
    sd["rowptr"] = sd["rowptr"].clone()
    sd["rowptr"][-1] += 1000  # would let the kernel read past the values
    mod.load_state_dict(sd)
    with pytest.raises(PrunekitError, match="rowptr"):
        mod(torch.randn(1, 200))


@pytest.mark.parametrize("fmt", packed.FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 40])  # kernel, kernel, unpacked GEMM (a prompt)
def test_packed_linear_matches_the_masked_layer(fmt, rows):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    opts = dict(pattern="nm", nm="2:4") if fmt == "nm24" else {}
    prunekit.prune(lin, 0.5 if fmt == "nm24" else 0.7, include_classifier=True, **opts)
    mod = PackedLinear.from_linear(lin, fmt=fmt)
    x = torch.randn(2, rows, 96)
    with torch.no_grad():
        assert torch.allclose(mod(x), lin(x), atol=1e-5)
        assert torch.equal(mod.weight, lin.weight)
    assert mod.sparsity == pytest.approx(float((lin.weight == 0).float().mean()))
    assert torch.equal(mod.to_linear().weight, lin.weight.detach())


def test_packed_linear_passes_gradients_to_its_input():
    lin = nn.Linear(16, 4)
    mod = PackedLinear.from_linear(lin)
    x = torch.randn(1, 16, requires_grad=True)
    mod(x).sum().backward()
    assert torch.allclose(x.grad, lin.weight.detach().sum(0))


def test_bfloat16_layer_keeps_its_dtype():
    lin = nn.Linear(64, 8).to(torch.bfloat16)
    prunekit.prune(lin, 0.5, include_classifier=True)
    mod = PackedLinear.from_linear(lin)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y, ref = mod(x), lin(x)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------ to_sparse on a decoder
transformers = pytest.importorskip("transformers")


def pruned_tiny_llama(dtype=torch.float32):
    from prunekit.zoo.llm import tiny_decoder

    model = tiny_decoder("llama", seed=0, num_hidden_layers=2, tie_word_embeddings=True, pad_token_id=0)
    prunekit.prune(model, 0.6)
    return model.to(dtype).eval()


@needs_native
def test_to_sparse_converts_a_decoder_and_generate_runs_unchanged():
    model = pruned_tiny_llama()
    new, report = to_sparse(model, torch.tensor([[5]]), measure=False, min_sparsity=0.5,
                            formats=("bitmask",))
    # measure=False picks CSR for float32: ask the packed path directly on every decoder Linear
    for entry in report:
        if entry["converted"]:
            name = entry["name"]
            parent, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent), attr, PackedLinear.from_linear(model.get_submodule(name)))
    n_packed = sum(isinstance(m, PackedLinear) for m in new.modules())
    assert n_packed == 2 * 7  # q, k, v, o, gate, up, down in each block; the tied lm_head stays dense
    ids = torch.tensor([[3, 7, 11, 2, 9]])
    with torch.no_grad():
        want, got = model(ids).logits, new(ids).logits  # a 5-token prompt: the packed kernels
        assert (want - got).abs().max() < 1e-4
        out_dense = model.generate(ids, max_new_tokens=8, do_sample=False)
        out_packed = new.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out_dense, out_packed)


@needs_native
def test_to_sparse_measures_packed_formats_and_keeps_the_fastest(fake_ladder):
    model = pruned_tiny_llama()
    times = {"linear": 9.0, "mm": 9.0, "native": 8.0, "native_simd": 8.5, "packed_bitmask": 2.0,
             "packed_csr8": 3.0}
    fake_ladder(lambda key, batch: 10.0 if key.startswith("d_") else times[key])
    new, report = to_sparse(model, torch.tensor([[5]]), min_speedup=1.1)
    converted = [e for e in report if e["converted"]]
    assert converted and all(e["kernel"] == "packed_bitmask" for e in converted)
    assert all(e["speedup"] == pytest.approx(5.0) for e in converted)
    assert all(isinstance(new.get_submodule(e["name"]), PackedLinear) for e in converted)
    with torch.no_grad():
        ids = torch.tensor([[1, 2]])
        assert (model(ids).logits - new(ids).logits).abs().max() < 1e-4
    back = to_dense(new)
    assert not any(isinstance(m, PackedLinear) for m in back.modules())


@needs_native
def test_to_sparse_packs_a_bfloat16_decoder():
    model = pruned_tiny_llama(torch.bfloat16)
    new, report = to_sparse(model, torch.tensor([[5]]), measure=False, min_sparsity=0.5)
    assert sum(isinstance(m, PackedLinear) for m in new.modules()) == 14
    ids = torch.tensor([[3, 7, 11]])
    with torch.no_grad():
        want, got = model(ids).logits.float(), new(ids).logits.float()
    assert (want - got).abs().max() < 0.1 * want.abs().max()


def test_to_sparse_refuses_unknown_formats():
    with pytest.raises(PrunekitError, match="allowed: bitmask, nm24, csr8"):
        to_sparse(nn.Linear(4, 4), torch.randn(1, 4), formats=("bsr",))


@needs_native
def test_copies_and_swapped_buffers_get_their_own_native_call():
    """The module caches its native call (raw pointers): a deep copy and a swapped buffer must not reuse it."""
    import copy
    import gc

    w = sparse_weight(40, 128, "bitmask", torch.float32)
    mod, x = PackedLinear(w), torch.randn(1, 128)
    y = mod(x)
    clone = copy.deepcopy(mod)
    del mod
    gc.collect()
    assert torch.equal(clone(x), y)
    with torch.no_grad():
        clone.values.mul_(2)               # in place: the same tensor, a new version
    assert torch.allclose(clone(x), 2 * y, atol=1e-5)
    clone.values = clone.values / 2        # a new tensor in the buffer's place
    assert torch.allclose(clone(x), y, atol=1e-5)


@needs_native
@pytest.mark.parametrize("min_speedup,packs", [(1.1, True), (50.0, False)])
def test_the_whole_model_decides_for_packed_formats(fake_ladder, min_speedup, packs):
    """Alone, every layer measures dense fastest; the whole model runs faster with every layer packed as bitmask:
    they are all converted (only if the whole model gains min_speedup over dense), with the whole model's speedup."""
    model = pruned_tiny_llama()

    def times(key, batch):
        if key.startswith("model:"):
            return {"model:as measured": 10.0, "model:dense": 10.0, "model:packed_bitmask": 4.0}.get(key, 9.0)
        return 1.0 if key.startswith("d_") else 2.0

    fake_ladder(times)
    new, report = to_sparse(model, torch.tensor([[5]]), min_speedup=min_speedup, formats=("bitmask", "csr8"))
    blocks = [e for e in report if e["name"] != "lm_head"]   # the tied lm_head is dense: no candidate
    assert len(blocks) == 14 and all(set(e["model_ms"]) == {"as measured", "dense", "packed_bitmask", "packed_csr8"}
                                     for e in blocks)
    for e in blocks:
        mod = new.get_submodule(e["name"])
        assert e["converted"] == packs and isinstance(mod, PackedLinear) == packs
        if packs:
            assert e["kernel"] == "packed_bitmask" and e["speedup"] == pytest.approx(10.0 / 4.0)
            assert "with 14 layer(s), after timing the whole model" in e["reason"]
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        assert (model(ids).logits - new(ids).logits).abs().max() < 1e-4


@needs_native
def test_whole_model_timing_can_be_switched_off(fake_ladder):
    model = pruned_tiny_llama()
    fake_ladder(lambda key, batch: 4.0 if key == "model:packed_bitmask" else 1.0 if key.startswith("d_") else 2.0)
    new, report = to_sparse(model, torch.tensor([[5]]), model_timing=False)
    assert not any(e["converted"] or "model_ms" in e for e in report)


@needs_native
@pytest.mark.skipif(not native.simd(), reason="the library here is already the portable one")
def test_portable_loop_computes_what_the_vector_loop_computes(tmp_path):
    """A CPU without AVX-512 runs the portable C loop: build it here (-mno-avx512f) and compare."""
    import ctypes
    import shutil
    import subprocess
    from importlib import resources

    cc = shutil.which("cc") or shutil.which("gcc")
    src = resources.files("prunekit.deploy").joinpath("_native", "packed.c")
    so = tmp_path / "portable.so"
    subprocess.run([cc, "-O2", "-fPIC", "-shared", "-mno-avx512f", str(src), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.prunekit_packed_mv.argtypes = [cint, cint, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, cint]
    assert lib.prunekit_packed_simd() == 0
    g = torch.Generator().manual_seed(3)
    for fmt, dtype, (out_f, in_f) in cases():
        kernel = packed.Kernel(packed.pack(sparse_weight(out_f, in_f, fmt, dtype), fmt), torch.randn(out_f))
        x = torch.randn(3, in_f, generator=g)
        y = torch.empty(3, out_f)
        assert lib.prunekit_packed_mv(*kernel.args, 3, x.data_ptr(), y.data_ptr(), 1) == 0
        assert torch.allclose(y, kernel(x), atol=1e-5, rtol=1e-5), (fmt, dtype, out_f, in_f)
