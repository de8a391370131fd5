"""``prunekit export``: saved model folders (dense, masked, compacted) to verified ONNX files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

import prunekit  # noqa: E402
from prunekit.cli.__main__ import main  # noqa: E402
from prunekit.cli.export import _SHAPES, spec_input_shape  # noqa: E402
from prunekit.surgery import compact, plan_groups  # noqa: E402
from prunekit.zoo.models import build_model, model_spec  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: folder}: a dense, a masked (compressed file) and a compacted built-in model."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vgg = build_model("vgg_small", in_channels=3, input_size=16, widths=[8, 16], hidden=16).eval()
    x = torch.randn(2, 3, 16, 16)
    slim = compact(vgg, plan_groups(vgg, x, 0.5), x)
    lenet = build_model("lenet300")
    prunekit.prune(lenet, 0.9)
    mlp = build_model("mlp", in_features=64, hidden=[16])
    return {"dense": prunekit.save(vgg, root / "dense"), "compacted": prunekit.save(slim, root / "slim"),
            "masked": prunekit.save(lenet, root / "masked", compressed=True), "mlp": prunekit.save(mlp, root / "mlp")}


def _ort_vs_torch(path, model, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    return float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - ref).max())


@pytest.mark.slow  # a fresh process that imports torch: ~5 s
def test_export_masked_model_in_a_subprocess(saved, tmp_path):
    out = tmp_path / "sub" / "lenet.onnx"  # the folder is created
    env = {**os.environ, "PRUNEKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli.__main__", "export", str(saved["masked"]),
                           "--out", str(out), "--exporter", "torchscript", "--repeat", "3"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert f"wrote {out}" in text and "input [784]" in text and "max abs diff vs torch" in text
    assert "latency (batch 1, 1 thread(s), median): onnxruntime" in text
    model = prunekit.load(saved["masked"])
    assert _ort_vs_torch(out, model, torch.randn(4, 784)) <= TOL


def test_export_compacted_model_with_the_default_exporter(saved, tmp_path, capfd):
    out = tmp_path / "slim.onnx"
    assert main(["export", str(saved["compacted"]), "--out", str(out), "--batch", "2", "--repeat", "3",
                 "--json"]) == 0
    row = json.loads(capfd.readouterr().out)  # stdout holds the JSON only: no exporter progress lines
    assert row["exporter"] == "dynamo" and row["dynamic_batch"] and row["checked_batches"] == [2, 3]
    assert 0 <= row["max_abs_diff"] <= TOL and row["size_bytes"] == out.stat().st_size
    assert row["latency_ms_onnxruntime"] > 0 and row["latency_ms_torch"] > 0
    slim = prunekit.load(saved["compacted"])
    assert _ort_vs_torch(out, slim, torch.randn(5, 3, 16, 16)) <= TOL


def test_export_dense_model_with_opset_and_input_shape(saved, tmp_path, capsys):
    out = tmp_path / "vgg.onnx"
    assert main(["export", str(saved["dense"]), "--out", str(out), "--opset", "13", "--input-shape", "3,16,16",
                 "--static-batch", "--batch", "3", "--repeat", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["opset"] == 13 and row["exporter"] == "torchscript" and not row["dynamic_batch"]
    assert row["checked_batches"] == [3] and any("18" in n for n in row["notes"])


def test_export_with_the_input_shape_of_a_dataset(saved, tmp_path, capsys):
    out = tmp_path / "mlp.onnx"
    assert main(["export", str(saved["mlp"]), "--out", str(out), "--data", "digits", "--batch", "2",
                 "--exporter", "torchscript", "--repeat", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["checked_batches"] == [2, 3]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 8, 8]  # digits images, not the (64,) of the spec


@pytest.mark.parametrize("argv, msg", [
    (["{missing}", "--out", "{tmp}/m.onnx"], "written by prunekit.save"),
    (["{dense}", "--out", "{tmp}/m.txt"], "must end with .onnx"),
    (["{dense}", "--out", "{tmp}/m.onnx", "--input-shape", "3,x"], "--input-shape"),
    (["{dense}", "--out", "{tmp}/m.onnx", "--input-shape", "3,,16"], "--input-shape"),
    (["{dense}", "--out", "{tmp}/m.onnx", "--opset", "99"], "opset=99"),
    (["{dense}", "--out", "{tmp}/m.onnx", "--batch", "0"], "--batch"),
])
def test_user_errors_are_one_clear_line(saved, tmp_path, capsys, argv, msg):
    fill = {"missing": tmp_path / "nope", "tmp": tmp_path, "dense": saved["dense"]}
    assert main(["export", *[a.format(**fill) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit export: error:") and msg in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.txt"))


def test_missing_onnxruntime_says_how_to_install(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(saved["dense"]), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install onnxruntime" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(_SHAPES))
def test_spec_input_shape_fits_every_builtin_model(name):
    """The shape table agrees with the real models (defaults and recorded arguments)."""
    kwargs = {"in_features": 20} if name == "mlp" else {}
    model = build_model(name, **kwargs).eval()
    shape = spec_input_shape(model_spec(model))
    with torch.no_grad():
        assert model(torch.zeros(2, *shape)).shape == (2, 10)
    with pytest.raises(ValueError, match="--input-shape"):
        spec_input_shape({"name": "my_net", "kwargs": {}})
