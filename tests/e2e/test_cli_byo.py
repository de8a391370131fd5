"""Bring your own model and data, end to end from the command line: a timm resnet18 on a folder of PNGs,
pruned by surgery with fine-tuning, evaluated, exported to ONNX and reported (in-process, one torch thread)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import prunekit
from prunekit.cli.__main__ import main
from prunekit.zoo.data import get_loaders, recorded_options
from prunekit.zoo.timm_compat import import_timm

ort = pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(import_timm() is None, reason="timm not installed")]

COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 classes x 16 noisy 32x32 PNGs whose colour gives the class away: learnable in one epoch."""
    root = tmp_path_factory.mktemp("byo") / "imgs"
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(16):
            pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_timm_resnet18_on_an_image_folder_prune_eval_export_report(images, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["prune", "--model", "timm:resnet18", "--data", str(images), "--input-size", "32",
                 "--schedule", "surgery", "--sparsity", "0.5", "--dense-epochs", "1", "--epochs", "1",
                 "--batch-size", "16", "--no-progress", "--out", str(run)]) == 0
    assert "pruned model:" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    final = results["methods"][0]["final"]
    assert final["compacted"] and "accuracy_before_finetune" in final                      # fine-tuned, then cut
    assert final["params"] < 0.5 * results["dense"]["params"] and final["macs"] < results["dense"]["macs"]
    assert results["data"]["classes"] == sorted(COLOURS) and results["data"]["input_shape"] == [3, 32, 32]
    spec = json.loads((run / "model" / "model.json").read_text())
    assert spec["model"] == {"name": "timm:resnet18", "kwargs": {"num_classes": 3, "in_chans": 3}}

    # eval: the recorded data, read the same way (size, ImageNet stats, the same held-out images)
    assert main(["eval", str(run / "model"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["params"] == final["params"] and row["accuracy"] == pytest.approx(final["accuracy"])
    assert main(["eval", str(run / "model")]) == 0
    table = capsys.readouterr().out
    assert f"{100 * final['accuracy']:.2f}%" in table

    # export: the input shape comes from the recorded data; onnxruntime agrees with the loaded model
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(run / "model"), "--out", str(onnx_file), "--exporter", "torchscript",
                 "--repeat", "2", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert onnx_file.is_file() and exported["max_abs_diff"] <= 1e-4
    record = spec["metadata"]["data"]
    _, test, _ = get_loaders(record["name"], options=recorded_options(record), seed=record["split_seed"],
                             limit_train=1)
    x = next(iter(test))[0]
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = prunekit.load(run / "model").eval()(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4

    # report: the run's model and data in the page
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "timm:resnet18" in page and str(images) in page
