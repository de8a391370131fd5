"""prunekit.export: ONNX export of dense, masked and compacted models, checked with onnxruntime (CPU)."""
import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import prunekit  # noqa: E402
from prunekit.apply import masking  # noqa: E402
from prunekit.deploy.export import ExportError, export_onnx, onnx_latency, onnx_session  # noqa: E402
from prunekit.surgery import compact, plan_groups  # noqa: E402
from prunekit.zoo.models import MLP, LeNet5, MobileNetV2CIFAR, ResNetCIFAR, VGGSmall  # noqa: E402

TOL = 1e-4


def randomize_bn(model, seed=0):
    """Trained-looking BN statistics (fresh ones are 0/1 and would hide wrong folding)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.encoder(x).mean(1))


class CrossAttention(nn.Module):
    """Two inputs with different sequence lengths: both get the dynamic batch dimension."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, q, kv):
        return self.attn(q, kv, kv, need_weights=False)[0]


def tiny_vgg():
    return randomize_bn(VGGSmall(in_channels=3, input_size=16, widths=(8, 16), hidden=16))


KINDS = {  # name: (builder, example input shapes with batch 1)
    "mlp": (lambda: MLP(64, hidden=(32, 16)), [(1, 64)]),
    "lenet5": (lambda: LeNet5(input_size=16), [(1, 1, 16, 16)]),
    "vgg": (tiny_vgg, [(1, 3, 16, 16)]),
    "resnet": (lambda: randomize_bn(ResNetCIFAR(widths=(8, 16), blocks=(1, 1))), [(1, 3, 16, 16)]),
    "mobilenetv2": (lambda: randomize_bn(MobileNetV2CIFAR(cfg=((1, 8, 1, 1), (2, 16, 2, 2)), stem=8, last=32)),
                    [(1, 3, 16, 16)]),
    "transformer": (Encoder, [(1, 6, 16)]),
    "mha": (CrossAttention, [(1, 5, 16), (1, 7, 16)]),
}
SLOW_KINDS = {"mobilenetv2", "transformer"}  # 3-8 s each on a busy machine (the dynamo exporter)


def build(name, seed=0):
    torch.manual_seed(seed)
    builder, shapes = KINDS[name]
    return builder().eval(), tuple(torch.randn(*s) for s in shapes)


def ort_run(path, inputs):
    sess = onnx_session(path)
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)[0]


def assert_close_to_torch(path, model, inputs):
    with torch.no_grad():
        ref = model(*inputs).numpy()
    out = ort_run(path, inputs)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=TOL, atol=TOL)


def rebatch(inputs, batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, *x.shape[1:], generator=gen) for x in inputs)


# ----------------------------------------------------------------------------- dense models, all kinds

@pytest.mark.parametrize("name", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KINDS else k
                                  for k in KINDS if k not in ("mlp", "lenet5", "vgg")])  # in other tests
def test_dense_export_matches_torch_at_other_batch_sizes(name, tmp_path, capfd):
    model, x = build(name)
    res = export_onnx(model, x, tmp_path / f"{name}.onnx")
    assert capfd.readouterr().out == ""  # the exporters' progress lines would break the benchmarks' JSON stdout
    assert res.exporter == "dynamo" and res.opset == 20 and res.dynamic_batch
    assert res.path == tmp_path / f"{name}.onnx" and res.size_bytes == res.path.stat().st_size
    assert 0 <= res.max_abs_diff <= TOL and res.checked_batches == (1, 2)
    for batch in (1, 5):  # fresh inputs, checked independently of the export's own check
        assert_close_to_torch(res.path, model, rebatch(x, batch))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.onnx"]  # no temporary or .data file left


# ----------------------------------------------------------------------------- masked models

def _find_initializer(proto, weight: torch.Tensor):
    """The initializer holding ``weight`` (as is or transposed), by value."""
    w = weight.detach().numpy()
    for init in proto.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        for cand in (arr, arr.T):
            if cand.shape == w.shape and np.array_equal(cand, w):
                return init.name, cand
    return None, None


def test_masked_export_has_no_masks_and_keeps_zeros(tmp_path, capfd):
    model, x = build("lenet5")
    prunekit.prune(model, 0.7, include_classifier=True)
    keep = masking.masks(model)
    assert set(keep) == {"features.0.weight", "features.2.weight", "classifier.1.weight", "classifier.3.weight"}
    res = export_onnx(model, x, tmp_path / "masked.onnx")
    assert capfd.readouterr().out == ""  # the exporters' progress lines would break the benchmarks' JSON stdout
    assert res.exporter == "dynamo" and res.max_abs_diff <= TOL
    proto = onnx.load(str(res.path))
    names = [i.name for i in proto.graph.initializer] + [i.name for i in proto.graph.input]
    assert not [n for n in names if "mask" in n]
    assert not [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert [i.name for i in proto.graph.input] == ["input"]
    w = model.get_parameter("classifier.1.weight")
    name, stored = _find_initializer(proto, w)
    assert name is not None, "the pruned fc weight is not stored as is"
    assert np.array_equal(stored == 0, ~keep["classifier.1.weight"].numpy())  # zeros exactly where pruned
    assert (stored == 0).mean() > 0.6
    assert_close_to_torch(res.path, model, rebatch(x, 3))
    assert masking.masks(model).keys() == keep.keys()  # the user's model still has its masks


# ----------------------------------------------------------------------------- compacted models

def weight_bytes(path):
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)


def test_compacted_export_is_smaller_and_matches_the_masked_model(tmp_path):
    model, (x,) = build("vgg")
    plan = plan_groups(model, x, 0.5, criterion="l1", scope="layer")
    masked = masking.apply(copy.deepcopy(model), plan).eval()
    slim = compact(model, plan, x).eval()
    small = export_onnx(slim, x, tmp_path / "slim.onnx")  # the default (dynamo) exporter
    assert small.exporter == "dynamo" and small.max_abs_diff <= TOL
    assert_close_to_torch(small.path, masked, rebatch((x,), 4))  # compacted ONNX == masked torch model
    first_conv = [i for i in onnx.load(str(small.path)).graph.initializer if len(i.dims) == 4][0]
    assert first_conv.dims[0] == 4  # 8 output channels -> 4
    # sizes with the same (fast) exporter: dynamo files also hold ~10 KB of node metadata
    dense = export_onnx(model, x, tmp_path / "dense.onnx", exporter="torchscript")
    small_ts = export_onnx(slim, x, tmp_path / "slim_ts.onnx", exporter="torchscript")
    assert small_ts.size_bytes < 0.5 * dense.size_bytes
    assert weight_bytes(small.path) < 0.4 * weight_bytes(dense.path)  # half the channels: ~1/4 of the conv weights


def test_static_batch_fixes_the_batch_dimension(tmp_path):
    model, x = build("mlp")
    x = (torch.randn(3, 64),)
    res = export_onnx(model, x, tmp_path / "static.onnx", dynamic_batch=False, exporter="torchscript")
    assert not res.dynamic_batch and res.checked_batches == (3,)
    dims = onnx.load(str(res.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 64]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        ort_run(res.path, rebatch(x, 5))


# ----------------------------------------------------------------------------- the user's model

def test_users_model_is_unchanged(tmp_path):
    model, (x,) = build("vgg")
    prunekit.prune(model, 0.5)
    model.train()
    model.features[1].eval()  # a deliberately frozen BN must stay frozen, the others in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")  # the fast one: the copy is what counts
    after = model.state_dict()
    assert before.keys() == after.keys()  # masks included
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too: no train-mode forward
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads


# ----------------------------------------------------------------------------- exporters and opsets

def test_low_opset_falls_back_to_torchscript_with_a_note(tmp_path):
    model, x = build("vgg")
    res = export_onnx(model, x, tmp_path / "op13.onnx", opset=13)
    assert res.exporter == "torchscript" and res.opset == 13
    assert any("dynamo" in n and "18" in n for n in res.notes)
    proto = onnx.load(str(res.path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert_close_to_torch(res.path, model, rebatch(x, 2))
    with pytest.raises(ValueError, match="no exporter can write opset 13"):
        export_onnx(model, x, tmp_path / "d13.onnx", opset=13, exporter="dynamo")


def test_dynamo_failure_falls_back_to_torchscript_with_the_reason(tmp_path, monkeypatch, caplog):
    import prunekit.deploy.export as E

    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure\nwith details")

    monkeypatch.setattr(E, "_export_dynamo", broken)
    model, x = build("mlp")
    with caplog.at_level("WARNING", logger="prunekit.deploy.export"):
        res = export_onnx(model, x, tmp_path / "m.onnx")
    assert res.exporter == "torchscript" and res.max_abs_diff <= TOL
    assert res.notes == ("dynamo exporter failed: RuntimeError: simulated dynamo failure",)
    assert "simulated dynamo failure" in caplog.text and "trying the next exporter" in caplog.text
    with pytest.raises(ExportError, match="dynamo: RuntimeError: simulated dynamo failure"):
        export_onnx(model, x, tmp_path / "d.onnx", exporter="dynamo")


def test_without_onnxscript_torchscript_is_used(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    model, x = build("mlp")
    res = export_onnx(model, x, tmp_path / "m.onnx")
    assert res.exporter == "torchscript" and res.notes == (
        "dynamo exporter skipped: onnxscript is not installed (pip install onnxscript)",)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad, msg", [("model.txt", "must end with .onnx"), ("adir.onnx", "is a directory"),
                                      ("afile/m.onnx", "is a file")])
def test_bad_paths(tmp_path, bad, msg):
    (tmp_path / "adir.onnx").mkdir()
    (tmp_path / "afile").write_text("x")
    model, x = build("mlp")
    with pytest.raises(ValueError, match=msg):
        export_onnx(model, x, tmp_path / bad)


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"opset": 3}, ValueError, r"\[7, 23\]"), ({"opset": "17"}, ValueError, "integer"),
    ({"exporter": "onnxscript"}, ValueError, "auto, dynamo, torchscript"), ({"atol": -1}, ValueError, "atol"),
])
def test_bad_arguments(tmp_path, kwargs, exc, msg):
    model, x = build("mlp")
    with pytest.raises(exc, match=msg):
        export_onnx(model, x, tmp_path / "m.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


def test_bad_inputs(tmp_path):
    model, x = build("mha")
    with pytest.raises(TypeError, match="tensor"):
        export_onnx(model, [x[0], 3], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="batch"):
        export_onnx(model, (torch.randn(2, 5, 16), torch.randn(3, 7, 16)), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"does not run on example_inputs of shapes \[\(1, 5, 8\)"):
        export_onnx(model, (torch.randn(1, 5, 8), torch.randn(1, 7, 8)), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_missing_onnxruntime_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    model, x = build("mlp")
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        export_onnx(model, x, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
    res = export_onnx(model, x, tmp_path / "m.onnx", check=False, exporter="torchscript")  # no check: no ORT
    assert res.max_abs_diff is None and res.checked_batches == () and res.path.is_file()


class CumMax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, 1)[0]


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


def test_unsupported_op_is_named_and_the_old_file_is_kept(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match="operator aten::cummax is not supported") as info:
        export_onnx(CumMax(), torch.randn(2, 4), path)
    assert info.value.op == "aten::cummax"
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_outputs_that_differ_fail_the_check(tmp_path):
    with pytest.raises(ExportError, match="differs from torch") as info:
        export_onnx(Noisy(), torch.randn(2, 4), tmp_path / "m.onnx", exporter="torchscript")
    assert info.value.op is None
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- latency

def test_onnx_latency(tmp_path):
    model, x = build("mlp")
    res = export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")
    ms = onnx_latency(res.path, torch.randn(8, 64), threads=1, repeat=5)
    assert isinstance(ms, float) and 0 < ms < 1000
    sess = onnx_session(res.path, threads=1)
    assert onnx_latency(sess, {"input": np.zeros((2, 64), np.float32)}, repeat=3) > 0
    with pytest.raises(ValueError, match="input"):
        onnx_latency(sess, (torch.randn(2, 64), torch.randn(2, 64)))
    with pytest.raises(ValueError, match="threads"):
        onnx_latency(res.path, x, threads=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        onnx_latency(tmp_path / "nope.onnx", x)
