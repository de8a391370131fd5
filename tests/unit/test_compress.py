import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from prunekit.bits import pack_bits, unpack_bits
from prunekit.deploy.compress import (
    FORMATS,
    compress_state_dict,
    compressed_size_bytes,
    decompress_state_dict,
    dense_size_bytes,
    from_bytes,
    to_bytes,
)


def sparse(shape, sparsity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def roundtrip(sd, **kw):
    tensors, meta = compress_state_dict(sd, **kw)
    json.dumps(meta)  # meta must be JSON-safe
    # go through real safetensors bytes, as a file would
    meta_back = json.loads(json.dumps(meta))
    return decompress_state_dict(st_load(st_save(tensors)), meta_back), meta


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000, 12345])
def test_pack_unpack_roundtrip(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), bits)
    # same layout as numpy.packbits (MSB first), so other tools can read it
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy()))


def test_pack_bits_multidim_flattens_row_major():
    bits = torch.rand(3, 5, 7) < 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), bits.numel()), bits.reshape(-1))


def test_unpack_bits_wrong_length_raises():
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 30)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int32), 16)


def test_pack_unpack_4m_is_one_bit_per_entry():
    # speed is measured by the benchmarks; here the structure: 1 bit per entry, an odd length round-trips
    bits = torch.rand(4_000_001) < 0.1
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (bits.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, bits.numel()), bits)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(300,), (64, 48), (8, 4, 3, 3)])
def test_roundtrip_exact(shape, sparsity):
    sd = {"w": sparse(shape, sparsity)}
    out, _ = roundtrip(sd)
    assert_same(out["w"], sd["w"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_format_and_dtype_roundtrips(fmt, dtype):
    t = sparse((33, 17), 0.8, dtype=dtype)
    t[0, 0], t[1, 1] = float("nan"), float("inf")  # special values are non-zero: kept
    sd = {"w": t, "w_mask": pack_bits(t != 0)} if fmt == "masked" else {"w": t}
    out, meta = roundtrip(sd, formats=[fmt])
    assert meta["w"]["format"] == fmt
    assert meta["w"]["dtype"] == str(dtype).replace("torch.", "")
    assert_same(out["w"], t)


def test_int_bool_scalar_and_empty_tensors_stay_dense():
    sd = {
        "steps": torch.tensor(7),
        "idx": torch.zeros(1000, dtype=torch.int64),
        "flags": torch.zeros(50, dtype=torch.bool),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(0.0),
    }
    out, meta = roundtrip(sd)
    for k, v in sd.items():
        assert meta[k]["format"] == "dense"
        assert_same(out[k], v)


def test_chosen_format_is_smallest():
    for sparsity, seed in [(0.0, 1), (0.5, 2), (0.9, 3), (0.999, 4)]:
        sd = {"w": sparse((256, 256), sparsity, seed=seed)}
        sizes = {f: len(st_save(compress_state_dict(sd, formats=[f])[0])) for f in FORMATS if f != "masked"}
        chosen = compress_state_dict(sd)[1]["w"]["format"]
        assert sizes[chosen] == min(sizes.values()), (sparsity, chosen, sizes)
    assert compress_state_dict({"w": sparse((256, 256), 0.0)})[1]["w"]["format"] == "dense"
    assert compress_state_dict({"w": sparse((256, 256), 0.999)})[1]["w"]["format"] == "csr"


def test_90_percent_sparse_is_5x_smaller():
    sd = {"w": sparse((512, 512), 0.9)}
    dense, packed = dense_size_bytes(sd), compressed_size_bytes(sd)
    assert dense >= 512 * 512 * 4
    assert dense / packed >= 5.0


def test_min_sparsity_keeps_dense():
    sd = {"w": sparse((128, 128), 0.5)}
    assert compress_state_dict(sd)[1]["w"]["format"] != "dense"
    assert compress_state_dict(sd, min_sparsity=0.6)[1]["w"]["format"] == "dense"


def test_csr_uses_smallest_index_dtype():
    narrow, _ = compress_state_dict({"w": sparse((10, 1000), 0.99)}, formats=["csr"])
    wide, _ = compress_state_dict({"w": sparse((2, 40000), 0.999)}, formats=["csr"])
    assert narrow["w::indices"].dtype == torch.int16
    assert wide["w::indices"].dtype == torch.int32


def test_tied_weights_and_file_bytes_roundtrip():
    w = sparse((64, 64), 0.9)
    sd = {"a.weight": w, "b.weight": w, "view": w[0]}  # shared storage: safetensors would refuse it
    out = from_bytes(to_bytes(sd))
    for k, v in sd.items():
        assert_same(out[k], v)
    assert dense_size_bytes(sd) > 0


def test_unknown_format_argument_raises():
    with pytest.raises(ValueError, match="allowed"):
        compress_state_dict({"w": torch.zeros(3)}, formats=["zip"])


@pytest.fixture
def packed():
    sd = {"bm": sparse((64, 64), 0.7, seed=5), "csr": sparse((64, 64), 0.99, seed=6), "d": torch.randn(4)}
    tensors, meta = compress_state_dict(sd, formats=None)
    assert meta["bm"]["format"] == "bitmask" and meta["csr"]["format"] == "csr"
    return tensors, meta


def corrupt(meta, name, **changes):
    meta = json.loads(json.dumps(meta))
    meta[name].update(changes)
    return meta


@pytest.mark.parametrize(
    "name, changes, match",
    [
        ("bm", {"format": "zip"}, "allowed: dense, bitmask, csr"),
        ("bm", {"shape": [64, 65]}, "packed bytes|entries"),
        ("bm", {"shape": [64, -64]}, "shape"),
        ("bm", {"dtype": "float16"}, "dtype"),
        ("bm", {"dtype": "nonsense"}, "unknown dtype"),
        ("bm", {"nnz": 3}, "nnz"),
        ("csr", {"nnz": 5}, "entries|nnz"),
        ("csr", {"rows": 32}, "rows"),
        ("d", {"shape": [5]}, "meta says"),
    ],
)
def test_corrupt_meta_raises(packed, name, changes, match):
    tensors, meta = packed
    with pytest.raises(ValueError, match=match):
        decompress_state_dict(tensors, corrupt(meta, name, **changes))


def test_corrupt_tensors_raise(packed):
    tensors, meta = packed
    for key, bad in [
        ("bm::values", tensors["bm::values"][:-1]),
        ("csr::indices", tensors["csr::indices"] + 1000),
        ("csr::indptr", tensors["csr::indptr"].flip(0)),
    ]:
        with pytest.raises(ValueError):
            decompress_state_dict({**tensors, key: bad}, meta)
    missing = {k: v for k, v in tensors.items() if k != "csr::values"}
    with pytest.raises(ValueError, match="missing"):
        decompress_state_dict(missing, meta)
    with pytest.raises(ValueError, match="dict"):
        decompress_state_dict(tensors, {"bm": "bitmask"})
    with pytest.raises(ValueError, match="metadata"):
        from_bytes(st_save({"x": torch.zeros(2)}))


# ------------------------------------------------------------------ masked format (prunekit masks)
def masked_sd(shape=(64, 48), sparsity=0.9, seed=0):
    w = sparse(shape, sparsity, seed=seed)
    keep = w != 0
    keep.view(-1)[:5] = True  # kept entries may be exactly zero: they still come back as kept zeros
    return {"w": w, "w_mask": pack_bits(keep), "b": torch.randn(shape[0])}


def test_masked_weights_store_their_bits_once():
    sd = masked_sd()
    tensors, meta = compress_state_dict(sd)
    assert meta["w"]["format"] == "masked" and meta["w"]["mask"] == "w_mask"
    assert meta["w_mask"]["format"] == "dense"
    assert not any(k.endswith("::bits") for k in tensors)  # the mask is the only copy of the positions
    keep = unpack_bits(sd["w_mask"], sd["w"].numel())
    assert tensors["w::values"].numel() == int(keep.sum()) == meta["w"]["nnz"]
    out, _ = roundtrip(sd)
    for k, v in sd.items():
        assert_same(out[k], v)
    as_bitmask = len(st_save(compress_state_dict(sd, formats=["dense", "bitmask", "csr"])[0]))
    assert len(st_save(tensors)) < as_bitmask - 64 * 48 // 8 + 64  # about one bitmask smaller


def test_masked_90_percent_model_is_7x_smaller():
    sd = masked_sd((512, 512), 0.9)
    dense = dense_size_bytes({k: v for k, v in sd.items() if k != "w_mask"})  # the plain model's state_dict
    assert 6.5 <= dense / compressed_size_bytes(sd) <= 8.0  # 4 B/weight vs 1/8 + 0.1 * 4


def test_mask_not_matching_the_zeros_falls_back():
    sd = masked_sd()
    keep = unpack_bits(sd["w_mask"], sd["w"].numel()).reshape(sd["w"].shape)
    pos = (~keep).nonzero()[0]
    sd["w"][pos[0], pos[1]] = 1.5  # a pruned entry that is not zero: the mask cannot rebuild it
    _, meta = compress_state_dict(sd)
    assert meta["w"]["format"] in ("bitmask", "csr")
    out, _ = roundtrip(sd)
    assert_same(out["w"], sd["w"])
    # masked alone but not usable (no mask) means dense
    assert compress_state_dict({"w": sparse((8, 8), 0.9)}, formats=["masked"])[1]["w"]["format"] == "dense"
    # a mask of the wrong length is ignored, not trusted
    bad = {"w": sd["w"], "w_mask": torch.zeros(3, dtype=torch.uint8)}
    assert compress_state_dict(bad)[1]["w"]["format"] != "masked"


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda t, m: m["w"].update(mask="b"), "must name its mask"),
        (lambda t, m: m["w"].update(nnz=m["w"]["nnz"] - 1), "nnz"),
        (lambda t, m: m["w_mask"].update(format="bitmask", nnz=0), "dense uint8|missing"),
        (lambda t, m: t.update(w_mask=t["w_mask"][:-1]), "entries"),
        (lambda t, m: t.update(w_mask=torch.cat([torch.zeros(1, dtype=torch.uint8), t["w_mask"][1:]])), "nnz"),
        (lambda t, m: t.pop("w_mask"), "missing"),
        (lambda t, m: t.update({"w::values": t["w::values"][:-1]}), "entries"),
    ],
)
def test_tampered_masked_entries_raise(tamper, match):
    tensors, meta = compress_state_dict(masked_sd())
    tensors, meta = dict(tensors), json.loads(json.dumps(meta))
    tamper(tensors, meta)
    with pytest.raises(ValueError, match=match):
        decompress_state_dict(tensors, meta)
