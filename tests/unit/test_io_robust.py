"""Loading checkpoints that are truncated, corrupt, tampered, foreign or malicious: a clear error naming the
file, nothing executed, the target model untouched. Also: compressed saving stores the exact weights, small."""
import hashlib
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit
from prunekit.apply import masking
from prunekit.deploy import io
from prunekit.zoo.models import build_model


def small_model(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", in_features=40, hidden=[48, 32], num_classes=6)


@pytest.fixture
def pruned():
    m = small_model()
    prunekit.prune(m, 0.9, scope="layer", include_classifier=True)
    return m


@pytest.fixture
def saved(pruned, tmp_path):
    return io.save(pruned, tmp_path / "m", compressed=True)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def load_fails(path, match, model=None):
    """load() raises ValueError matching ``match`` and naming the file; ``model`` (or a fresh one) stays as it was."""
    target = small_model(seed=5) if model is None else model
    before = snapshot(target)
    with pytest.raises(ValueError, match=match) as err:
        io.load(path, target)
    assert_untouched(target, before)
    return str(err.value)


def rewrite_spec(folder, change):
    doc = json.loads((folder / io.SPEC).read_text())
    change(doc)
    (folder / io.SPEC).write_text(json.dumps(doc))


def resign(folder):
    """Record the weights file's new checksum, so that a deeper check than the digest has to catch the change."""
    digest = hashlib.sha256((folder / io.WEIGHTS).read_bytes()).hexdigest()
    rewrite_spec(folder, lambda d: d.update(weights_sha256=digest))


# ------------------------------------------------------------------------ the good path
@pytest.mark.parametrize("compressed", [False, True])
def test_round_trip_is_exact_masks_included(pruned, tmp_path, compressed):
    io.save(pruned, tmp_path / "m", compressed=compressed)
    back = io.load(tmp_path / "m")
    want, got = pruned.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert masking.masks(back).keys() == masking.masks(pruned).keys()


def test_masked_weights_are_stored_without_a_second_bitmask(saved):
    doc = json.loads((saved / io.SPEC).read_text())
    weights = [k for k in doc["shapes"] if k.endswith(".weight")]
    assert weights and all(doc["compressed"][k]["format"] == "masked" for k in weights)
    keys = load_file(str(saved / io.WEIGHTS)).keys()
    assert not any(k.endswith("::bits") for k in keys)


def test_90_percent_folder_is_over_5x_smaller_than_the_dense_state_dict(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", in_features=256, hidden=[256, 256], num_classes=256)
    dense = tmp_path / "dense.safetensors"
    save_file(model.state_dict(), str(dense))  # what one saves without prunekit
    prunekit.prune(model, 0.9, scope="layer", include_classifier=True)
    folder = io.save(model, tmp_path / "c", compressed=True)
    packed = sum(f.stat().st_size for f in folder.iterdir())  # the JSON spec counts too
    assert dense.stat().st_size / packed >= 5.0


# ------------------------------------------------------------------------ truncated / corrupt
@pytest.mark.parametrize("keep", [0, 7, 60, -200, -1])
def test_truncated_weights(saved, keep):
    w = saved / io.WEIGHTS
    data = w.read_bytes()
    w.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    msg = load_fails(saved, "corrupt or truncated")
    assert str(w) in msg


def test_flipped_byte_in_the_values_is_caught_by_the_checksum(saved):
    w = saved / io.WEIGHTS
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40  # still a well-formed safetensors file: only the checksum can tell
    w.write_bytes(bytes(data))
    load_fails(saved, "SHA-256 differs")


def test_files_from_two_different_saves_are_refused(pruned, tmp_path):
    io.save(pruned, tmp_path / "a", compressed=True)
    prunekit.prune(pruned, 0.95, scope="layer", include_classifier=True)
    io.save(pruned, tmp_path / "b", compressed=True)
    (tmp_path / "a" / io.WEIGHTS).write_bytes((tmp_path / "b" / io.WEIGHTS).read_bytes())
    load_fails(tmp_path / "a", "SHA-256 differs")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
    ("[1, 2]", "not a prunekit model spec"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
])
def test_corrupt_json(saved, text, match):
    (saved / io.SPEC).write_bytes(text.encode("latin-1"))
    assert str(saved / io.SPEC) in load_fails(saved, match)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(shapes=[1, 2]), "'shapes'"),
    (lambda d: d["shapes"].update({"classifier.1.weight": [48, -40]}), "'shapes'"),
    (lambda d: d.update(dtypes={"x": 3}), "'dtypes'"),
    (lambda d: d.update(model="mlp"), "'model'"),
    (lambda d: d.update(compressed=[]), "'compressed'"),
    (lambda d: d["compressed"].pop("classifier.1.bias"), "same tensors"),
    (lambda d: d.update(model={"name": "no_such_model", "kwargs": {}}), "cannot be built.*known"),
])
def test_tampered_spec(saved, change, match):
    rewrite_spec(saved, change)
    with pytest.raises(ValueError, match=match) as err:
        io.load(saved)
    assert str(saved) in str(err.value)


# ------------------------------------------------------------------------ tampered compressed data
def tamper_tensors(folder, change):
    w = folder / io.WEIGHTS
    tensors = load_file(str(w))
    change(tensors)
    save_file(tensors, str(w))
    resign(folder)


@pytest.mark.parametrize("change, match", [
    (lambda d: d["compressed"]["classifier.1.weight"].update(nnz=3), "nnz"),
    (lambda d: d["compressed"]["classifier.1.weight"].update(mask="classifier.3.weight_mask"), "mask"),
    (lambda d: d["compressed"]["classifier.1.weight"].update(format="zip"), "unknown format"),
    (lambda d: d["compressed"]["classifier.1.weight"].update(shape=[10**6, 10**6]), "disagrees"),
    (lambda d: d["compressed"]["classifier.1.bias"].update(dtype="float16"), "meta says torch.float16"),
])
def test_tampered_compressed_meta(saved, change, match):
    rewrite_spec(saved, change)
    msg = load_fails(saved, match)
    assert str(saved / io.WEIGHTS) in msg


def test_csr_indices_out_of_range_and_wrong_lengths(tmp_path):
    # very sparse tensors without masks are stored as CSR
    def wide():
        torch.manual_seed(0)
        return build_model("mlp", in_features=400, hidden=[48], num_classes=6)

    model = wide()
    with torch.no_grad():
        model.classifier[1].weight.zero_()[:4, :3] = 0.5
    folder = io.save(model, tmp_path / "m", compressed=True)
    doc = json.loads((folder / io.SPEC).read_text())
    assert doc["compressed"]["classifier.1.weight"]["format"] == "csr"
    key, ptr = "classifier.1.weight::indices", "classifier.1.weight::indptr"
    for change, match in [(lambda t: t.update({key: t[key] + 400}), "column index out of range"),
                          (lambda t: t.update({key: t[key][:-1]}), "entries"),
                          (lambda t: t.update({ptr: t[ptr].flip(0)}), "row pointers")]:
        io.save(model, folder, compressed=True)
        tamper_tensors(folder, change)
        load_fails(folder, match, model=wide())


def test_values_of_the_wrong_length(saved):
    key = "classifier.1.weight::values"
    tamper_tensors(saved, lambda t: t.update({key: t[key][:-2]}))
    load_fails(saved, "entries")


def test_bad_offsets_in_the_safetensors_header(saved):
    w = saved / io.WEIGHTS
    data = w.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 10**9]  # points far past the end of the file
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    w.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    resign(saved)
    load_fails(saved, "corrupt or truncated")


# ------------------------------------------------------------------------ foreign architecture
def test_checkpoint_of_a_different_architecture(saved):
    other = build_model("mlp", in_features=40, hidden=[48, 33], num_classes=6)
    load_fails(saved, "different architecture.*shape mismatch", model=other)
    deeper = build_model("mlp", in_features=40, hidden=[48, 32, 16], num_classes=6)
    load_fails(saved, "different architecture.*missing", model=deeper)


def test_state_dict_files_of_a_different_architecture(tmp_path):
    foreign = build_model("lenet5").state_dict()
    save_file(foreign, str(tmp_path / "w.safetensors"))
    torch.save(foreign, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        load_fails(tmp_path / name, "different architecture")


def test_plain_state_dict_files_load_into_a_model(pruned, tmp_path):
    sd = pruned.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.pt")  # the usual training-script wrapper
    for name in ("w.safetensors", "w.pt"):
        back = io.load(tmp_path / name, small_model(seed=7))
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in sd.items())
        assert masking.masks(back).keys() == masking.masks(pruned).keys()
    with pytest.raises(ValueError, match="without a spec"):
        io.load(tmp_path / "w.pt")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="allowed: .safetensors"):
        io.load(tmp_path / "w.txt", small_model())


# ------------------------------------------------------------------------ code execution
class Payload:
    """Unpickling this calls ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    evil = {"classifier.1.weight": Payload(marker)}
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(evil, path)  # zip container
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))  # legacy raw pickle
    assert not marker.exists()
    msg = load_fails(path, "refused")
    assert str(path) in msg and "nothing was executed" in msg
    assert not marker.exists()


def test_a_pickle_disguised_as_the_weights_file_never_runs(saved, tmp_path):
    marker = tmp_path / "pwned"
    (saved / io.WEIGHTS).write_bytes(pickle.dumps(Payload(marker)))
    load_fails(saved, "corrupt or truncated")
    assert not marker.exists()


def test_old_spec_without_checksum_still_loads(pruned, saved):
    rewrite_spec(saved, lambda d: d.pop("weights_sha256"))
    back = io.load(saved)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in pruned.state_dict().items())


def _peak_rss_growth_mb(fn):
    """Peak RSS growth (MB) while fn runs, from a fresh high-water mark (Linux /proc)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return (int(status["VmHWM"].split()[0]) - int(status["VmRSS"].split()[0])) / 1024


@pytest.mark.parametrize("compressed", [False, True])
def test_spec_model_kwargs_that_would_allocate_gigabytes_are_refused_first(pruned, tmp_path, compressed):
    # issue 11.1: "hidden": [268435456] tried to build a 16 GiB MLP before any check
    folder = io.save(pruned, tmp_path / "m", compressed=compressed)
    spec = json.loads((folder / io.SPEC).read_text())
    spec["model"]["kwargs"]["hidden"] = [268435456]
    (folder / io.SPEC).write_text(json.dumps(spec))
    errors = []

    def load():
        with pytest.raises(prunekit.PrunekitError, match="does not match the saved tensors") as e:
            prunekit.load(folder)
        errors.append(e)

    assert _peak_rss_growth_mb(load) < 100 and errors


def test_spec_shapes_edited_to_match_huge_kwargs_are_refused_by_the_weights_header(pruned, tmp_path):
    folder = io.save(pruned, tmp_path / "m")
    spec = json.loads((folder / io.SPEC).read_text())
    spec["model"]["kwargs"]["hidden"] = [268435456, 32]
    spec["shapes"]["layers.0.weight"] = [268435456, 40]
    (folder / io.SPEC).write_text(json.dumps(spec))
    with pytest.raises(prunekit.PrunekitError, match="does not match its spec"):
        prunekit.load(folder)
