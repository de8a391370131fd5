import json

import pytest
import torch
import torch.nn as nn

from prunekit.analysis.metrics import (
    count_macs,
    count_parameters,
    evaluate,
    format_table,
    layer_table,
    measure_latency,
    size_on_disk,
    summarize,
)


def half_zeroed_linear(i=784, o=300):
    torch.manual_seed(0)
    layer = nn.Linear(i, o)
    with torch.no_grad():
        layer.weight.view(-1)[: layer.weight.numel() // 2] = 0.0
    return layer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class ConstantClassifier(nn.Module):
    """Always predicts ``cls`` among ``classes`` (second-best is class cls+1, etc.)."""

    def __init__(self, classes, cls=0):
        super().__init__()
        self.classes, self.cls = classes, cls
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        scores = -((torch.arange(self.classes) - self.cls) % self.classes).float()
        return scores.expand(x.shape[0], -1) + self.dummy


def make_loader(labels, batch=4):
    labels = torch.tensor(labels)
    return [(torch.randn(len(chunk), 2), chunk) for chunk in labels.split(batch)]


def test_count_parameters_half_zeroed():
    layer = half_zeroed_linear()
    counts = count_parameters(layer)
    assert counts["total"] == 784 * 300 + 300
    assert counts["nonzero"] == 784 * 300 // 2 + 300


def test_linear_macs_and_effective_halve():
    x = torch.randn(1, 784)
    dense = nn.Linear(784, 300)
    assert count_macs(dense, x) == {"dense": 235200, "effective": 235200}
    macs = count_macs(half_zeroed_linear(), x)
    assert macs["dense"] == 235200 and macs["effective"] == 117600


def test_conv_macs_formula():
    conv = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 3, 32, 32)
    out_h = out_w = (32 + 2 - 3) // 2 + 1
    expected = 2 * 16 * out_h * out_w * 3 * 3 * 3  # batch * C_out * H * W * C_in * k * k
    assert count_macs(conv, x)["dense"] == expected
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    assert count_macs(grouped, torch.randn(1, 8, 10, 10))["dense"] == 8 * 10 * 10 * 2 * 3 * 3


def test_layer_table_rows_and_macs():
    model = Net()
    with torch.no_grad():
        model.fc.weight[:, ::4] = 0.0  # 75% density
    model.train()
    model.bn.eval()  # mixed modes must survive
    stats_before = model.bn.running_mean.clone()
    rows = layer_table(model, torch.randn(2, 3, 8, 8))
    assert [r["name"] for r in rows] == ["conv", "bn", "fc"]
    assert [r["type"] for r in rows] == ["Conv2d", "BatchNorm2d", "Linear"]
    fc = rows[2]
    assert fc["params"] == 512 * 10 + 10
    assert fc["nonzeros"] == 512 * 10 * 3 // 4 + 10
    assert fc["sparsity"] == pytest.approx(1 - fc["nonzeros"] / fc["params"])
    assert fc["macs_dense"] == 2 * 512 * 10
    assert fc["macs_effective"] == 2 * 512 * 10 * 3 // 4
    assert rows[0]["macs_dense"] == rows[0]["macs_effective"] == 2 * 8 * 8 * 8 * 27
    assert model.training and not model.bn.training and model.conv.training
    assert torch.equal(model.bn.running_mean, stats_before)  # the forward ran in eval mode
    assert "macs_dense" not in layer_table(model)[0]
    json.dumps(rows)


def test_count_macs_model_total_matches_layers():
    model = Net()
    with torch.no_grad():
        model.conv.weight[:4] = 0.0  # half of the conv's filters
    x = torch.randn(1, 3, 8, 8)
    macs = count_macs(model, x)
    conv_macs, fc_macs = 8 * 8 * 8 * 27, 512 * 10
    assert macs["dense"] == conv_macs + fc_macs
    assert macs["effective"] == conv_macs // 2 + fc_macs


def test_evaluate_known_accuracy():
    labels = [0, 1, 0, 2, 0, 3, 4, 5, 6, 0]  # 4/10 zeros
    model = ConstantClassifier(classes=7).train()
    res = evaluate(model, make_loader(labels))
    assert res["accuracy"] == pytest.approx(0.4)
    assert res["n"] == 10
    # top-5 classes are 0..4 -> labels 5 and 6 are missed
    assert res["top5"] == pytest.approx(0.8)
    expected_loss = nn.functional.cross_entropy(model(torch.zeros(10, 2)), torch.tensor(labels)).item()
    assert res["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert model.training


def test_evaluate_few_classes_and_max_batches():
    model = ConstantClassifier(classes=3, cls=1)
    res = evaluate(model, make_loader([1, 1, 0, 2, 1, 1, 1, 1], batch=4), max_batches=1)
    assert res == {"accuracy": 0.5, "loss": pytest.approx(res["loss"]), "n": 4}
    assert "top5" not in res
    with pytest.raises(ValueError):
        evaluate(model, [])


def test_measure_latency_restores_state():
    model = Net().train()
    threads = torch.get_num_threads()
    res = measure_latency(model, torch.randn(3, 3, 8, 8), warmup=1, repeats=5, threads=1)
    assert res["median_ms"] > 0 and 0 < res["p10_ms"] <= res["median_ms"] <= res["p90_ms"]
    assert res["batch"] == 3 and res["threads"] == 1 and res["repeats"] == 5
    assert torch.get_num_threads() == threads
    assert model.training and torch.is_grad_enabled()


def test_size_on_disk_ignores_mask_buffers():
    layer = nn.Linear(256, 256)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.9] = 0.0
    plain = size_on_disk(layer)
    layer.register_buffer("weight_mask", (layer.weight != 0).to(torch.uint8))
    with_mask = size_on_disk(layer)
    assert with_mask == plain
    assert plain["ratio"] > 4 and plain["dense_bytes"] > 256 * 256 * 4


def test_summarize_json_safe():
    model = Net().train()
    with torch.no_grad():
        model.fc.weight[:, ::2] = 0.0
    loader = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))]
    res = summarize(model, torch.randn(2, 3, 8, 8), loader, batch=5, threads=1, repeats=3, warmup=1)
    json.dumps(res)
    assert res["params"] == count_parameters(model)["total"]
    assert res["nonzeros"] == res["params"] - 10 * 256 - 8  # fc zeros + BatchNorm bias (initialised to 0)
    assert res["macs_effective"] < res["macs"] and res["theoretical_speedup"] > 1
    assert res["compression_ratio"] == pytest.approx(res["params"] / res["nonzeros"])
    assert res["batch"] == 5 and res["threads"] == 1 and res["latency_ms"] > 0
    assert {"accuracy", "top5", "loss"} <= set(res)
    assert [r["name"] for r in res["layers"]] == ["conv", "bn", "fc"]
    assert model.training
    with pytest.raises(TypeError):
        summarize(model, torch.randn(1, 3, 8, 8), bogus=1)
    assert "latency_ms" not in summarize(model, torch.randn(1, 3, 8, 8), latency=False)


def test_format_table():
    rows = [{"name": "fc1", "params": 1000, "sparsity": 0.123456}, {"name": "conv", "params": 20}]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "params", "sparsity"]
    assert "fc1" in text and "0.1235" in text and "1000" in text
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    assert lines[3].split() == ["conv", "20"]  # missing cell left blank
    md = format_table(rows, columns=["name", "sparsity"], floatfmt=".2f", markdown=True).splitlines()
    assert md[0].startswith("| name") and md[1].startswith("|---") and md[1].endswith(":|")
    assert "0.12" in md[2] and "params" not in md[0]
    assert format_table([]) == ""


def test_multihead_attention_macs_are_counted():
    from prunekit.analysis.metrics import count_macs

    n, seq, e = 2, 10, 64

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(e, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    expected = 3 * n * seq * e * e + 2 * n * seq * seq * e + n * seq * e * e  # in-proj, scores + mix, out-proj
    assert count_macs(Attn().eval(), torch.randn(n, seq, e))["dense"] == expected
    assert torch.backends.mha.get_fastpath_enabled()  # the fast path is switched back on
