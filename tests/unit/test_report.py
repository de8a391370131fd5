"""Tests of prunekit.report: figures, Markdown/HTML rendering and metrics.json."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from prunekit._util import to_jsonable
from prunekit.report import build_report, figures as F
from prunekit.report.blocks import fmt_int, fmt_kb, fmt_ms, fmt_pct, fmt_pp, fmt_ratio

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYER_PARAMS = {"fc1": 235_500, "fc2": 30_100, "fc3": 1_010}  # LeNet-300-100, 266,610 total


def _point(target, sparsity, accuracy, latency=0.05):
    params = sum(LAYER_PARAMS.values())
    nonzeros = round(params * (1 - sparsity))
    return {"target_sparsity": target, "sparsity": sparsity, "accuracy": accuracy,
            "top5": 0.999, "loss": 0.07, "params": params, "nonzeros": nonzeros,
            "compression_ratio": params / nonzeros, "macs": 266_200,
            "macs_effective": round(266_200 * (1 - sparsity)),
            "theoretical_speedup": 1 / (1 - sparsity), "size_bytes": 4 * params,
            "size_compressed_bytes": 8 * nonzeros + 2000, "latency_ms": latency,
            "batch": 1, "threads": 2}


def _layers(sparsity):
    return [{"name": n, "type": "Linear", "params": p, "nonzeros": round(p * (1 - sparsity)),
             "sparsity": sparsity, "macs_dense": p, "macs_effective": round(p * (1 - sparsity))}
            for n, p in LAYER_PARAMS.items()]


def make_results():
    dense = _point(None, 0.0, 0.982)
    dense.pop("target_sparsity")
    methods = []
    for name, label, accs in (("oneshot_l1", "one-shot L1 (unstructured)", (0.981, 0.975, 0.951)),
                              ("gradual", "gradual magnitude", (0.982, 0.980, 0.971))):
        points = [_point(t, t, a, latency=0.05 - 0.01 * k)
                  for k, (t, a) in enumerate(zip((0.5, 0.8, 0.95), accs))]
        methods.append({"name": name, "label": label, "points": points, "final": points[1],
                        "layers": _layers(0.8), "notes": ["layer fc3 kept its floor of 1% (min_keep)"]})
    history = {m["name"]: [{"step": s, "sparsity": min(0.8, 0.2 * s), "accuracy": 0.98 - 0.002 * s}
                           for s in range(6)] for m in methods}
    return {"title": "prunekit report: lenet300 on mnist", "created": "2026-11-24T21:00:00",
            "config": {"model": "lenet300", "prune": {"method": "l1", "sparsity": 0.8}},
            "env": {"torch": "2.13.0", "threads": 2}, "dense": dense, "methods": methods,
            "history": history}


def make_heatmaps():
    rng = np.random.default_rng(0)
    fc1 = rng.normal(size=(300, 784)).astype(np.float32)
    pruned = fc1 * (np.abs(fc1) > np.quantile(np.abs(fc1), 0.8))
    conv = torch.randn(16, 3, 3, 3)
    conv_after = conv.clone()
    conv_after[:8] = 0  # structured: half of the filters removed
    return {"oneshot_l1/fc1": (fc1, pruned), "gradual/conv1": (conv, conv_after)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = make_results()
    return results, build_report(results, out, heatmaps=make_heatmaps())


def _pngs(paths):
    return {k: p for k, p in paths.items() if p.suffix == ".png"}


# --------------------------------------------------------------------------- files
def test_all_files_written(report):
    _, paths = report
    expected = {"html", "markdown", "metrics", "tradeoff", "size_latency", "layer_sparsity",
                "history", "heatmap_oneshot_l1_fc1", "heatmap_gradual_conv1", "accuracy_latency"}
    assert expected <= set(paths)
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert paths["html"].name == "report.html" and paths["markdown"].name == "report.md"


@pytest.mark.parametrize("key,size_in", [("tradeoff", (8, 5)), ("size_latency", (12, 4.8)),
                                         ("history", (9, 5)), ("heatmap_oneshot_l1_fc1", (11, 4.8))])
def test_pngs_are_valid_images(report, key, size_in):
    path = report[1][key]
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # a real plot, not an empty canvas
    img = mpimg.imread(path)
    assert img.shape[:2] == (round(size_in[1] * F.DPI), round(size_in[0] * F.DPI))
    assert img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05  # not a single flat colour


def test_every_png_has_signature(report):
    for path in _pngs(report[1]).values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------- HTML / Markdown
def test_html_is_self_contained(report):
    _, paths = report
    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert page.count('src="data:image/png;base64,') == len(_pngs(paths))


def test_html_content(report):
    results, paths = report
    page = paths["html"].read_text(encoding="utf-8")
    for method in results["methods"]:
        assert method["label"] in page
    assert "98.20%" in page  # dense accuracy
    summary = page.split("<h2>Summary</h2>")[1].split("<h2>")[0]
    assert "98.10% (-0.10 pp)" not in summary  # final is points[1], not points[0]
    assert "97.50% (-0.70 pp)" in summary and "98.00% (-0.20 pp)" in summary
    assert "98.10% (-0.10 pp)" in page  # ...which the per-method sweep table lists
    assert "266,610" in page  # thousands separators
    assert "5.0×" in page  # compression ratio at 80% sparsity
    assert "layer fc3 kept its floor of 1% (min_keep)" in page
    assert "2026-11-24T21:00:00" in page and "prune.method" in page  # created, nested config
    assert "<figcaption>" in page


def test_markdown_links_pngs(report):
    _, paths = report
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# prunekit report: lenet300 on mnist")
    for key, path in _pngs(paths).items():
        assert f"]({path.name})" in md
        assert (paths["markdown"].parent / path.name).is_file()
    assert "| dense |" in md and "---:" in md
    assert "base64" not in md


def test_user_strings_are_escaped(tmp_path):
    results = make_results()
    results["methods"][0]["label"] = "<script>alert('x')</script> & co"
    results["methods"][1]["notes"] = ["a <b>bold</b> note | with pipe"]
    paths = build_report(results, tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    assert "<script" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "<script" not in md and "&lt;b&gt;bold" in md and "\\| with pipe" in md


# --------------------------------------------------------------------------- metrics.json
def test_metrics_json_round_trips_and_nan_becomes_null(tmp_path):
    results = make_results()
    results["dense"]["loss"] = float("nan")
    results["dense"]["top5"] = np.float32(0.5)
    results["methods"][0]["final"]["latency_ms"] = torch.tensor(float("inf"))
    results["methods"][0]["final"]["params"] = np.int64(266_610)
    results["env"]["shape"] = np.arange(3)
    paths = build_report(results, tmp_path)
    text = paths["metrics"].read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["dense"]["loss"] is None
    assert data["dense"]["top5"] == pytest.approx(0.5)
    assert data["methods"][0]["final"]["latency_ms"] is None
    assert data["methods"][0]["final"]["params"] == 266_610
    assert data["env"]["shape"] == [0, 1, 2]
    assert data["methods"][1]["points"] == make_results()["methods"][1]["points"]
    assert data["title"] == results["title"]


def test_to_jsonable_converts_nested_values():
    out = to_jsonable({1: (np.float64(1.5), float("-inf")), "t": torch.ones(2), "n": None})
    assert out == {"1": [1.5, None], "t": [1.0, 1.0], "n": None}
    json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------------- missing data
def _strip(results, keys):
    for point in [results["dense"]] + [p for m in results["methods"] for p in m["points"] + [m["final"]]]:
        for key in keys:
            point.pop(key, None)
    return results


def test_missing_latency_keeps_size_panel(tmp_path):
    results = _strip(make_results(), ["latency_ms"])
    paths = build_report(results, tmp_path)
    assert paths["size_latency"].is_file()  # size data still plots; latency panel says so
    assert "accuracy_latency" not in paths  # nothing to put on its x axis
    page = paths["html"].read_text(encoding="utf-8")
    assert "<th>Latency</th>" not in page  # an all-empty column is dropped
    assert "<th>Size (compressed)</th>" in page


def test_missing_size_and_latency_skips_figure(tmp_path):
    results = _strip(make_results(), ["latency_ms", "size_compressed_bytes"])
    results["methods"][0]["final"]["accuracy"] = None
    del results["history"]
    paths = build_report(results, tmp_path)
    assert "size_latency" not in paths and "history" not in paths
    assert not (tmp_path / "size_latency.png").exists()
    assert "tradeoff" in paths
    assert "—" in paths["html"].read_text(encoding="utf-8")  # the missing accuracy


@pytest.mark.parametrize("results", [
    {},
    {"title": "only dense", "dense": {"accuracy": 0.9}},
    {"methods": [{"name": "m", "final": {"sparsity": 0.5, "accuracy": None}, "layers": [{}]}],
     "history": {"m": [{"step": 0}], "other": []}},
    {"methods": [{"label": "no name", "final": {"sparsity": 0.5, "accuracy": 0.9}}],
     "dense": {"accuracy": float("nan")}, "config": None, "env": {"x": [1, 2]}},
])
def test_sparse_inputs_do_not_crash(tmp_path, results):
    paths = build_report(results, tmp_path)
    assert {"html", "markdown", "metrics"} <= set(paths)
    json.loads(paths["metrics"].read_text(encoding="utf-8"))


def test_method_with_only_final_point_is_plotted(tmp_path):
    results = {"methods": [{"name": "m", "final": {"sparsity": 0.5, "accuracy": 0.9}}],
               "dense": {"accuracy": 0.95}}
    paths = build_report(results, tmp_path)
    assert "tradeoff" in paths


# --------------------------------------------------------------------------- heatmaps
def test_heatmap_matrix_shapes():
    assert F.heatmap_matrix(np.ones((300, 784)), max_side=400).shape == (300, 392)
    assert F.heatmap_matrix(np.ones((300, 784)), max_side=100).shape == (100, 98)
    assert F.heatmap_matrix(np.ones((10, 20)), max_side=400).shape == (10, 20)
    assert F.heatmap_matrix(torch.ones(16, 3, 3, 3)).shape == (16, 27)  # out x in*k*k
    assert F.heatmap_matrix(np.ones(5)).shape == (1, 5)
    with pytest.raises(ValueError):
        F.heatmap_matrix(np.ones((2, 2)), max_side=0)


def test_heatmap_matrix_max_pools_abs_and_keeps_zero_blocks():
    w = np.zeros((8, 8))
    w[0, 0] = -3.0   # one survivor keeps its block visible, as |W|
    w[4:, 4:] = 0.5  # a dense block
    shown = F.heatmap_matrix(w, max_side=2)
    assert shown.shape == (2, 2)
    np.testing.assert_array_equal(shown, [[3.0, 0.0], [0.0, 0.5]])  # all-zero blocks stay 0


def test_heatmap_matrix_pads_ragged_edges_without_inventing_values():
    w = np.zeros((5, 7))
    w[4, 6] = 2.0
    shown = F.heatmap_matrix(w, max_side=2)  # blocks of 3x4, last ones partial
    assert shown.shape == (2, 2)
    assert shown[1, 1] == 2.0 and np.count_nonzero(shown) == 1


def test_heatmap_masked_fraction_matches_structured_pruning():
    after = torch.randn(16, 3, 3, 3)
    after[:8] = 0
    assert F.weight_sparsity(after) == pytest.approx(0.5)
    shown = F.heatmap_matrix(after, max_side=8)  # 2x4 blocks: pruned filters stay zero
    masked = np.ma.masked_equal(shown, 0.0)
    assert masked.mask.mean() == pytest.approx(0.5)


def test_weight_heatmap_draws_pruned_cells_white(tmp_path):
    before = np.ones((40, 40))
    after = before.copy()
    after[:, :20] = 0  # left half pruned
    path = F.weight_heatmap(before, after, tmp_path / "h.png", "fc")
    img = mpimg.imread(path)[..., :3]
    white = np.all(img > 0.99, axis=-1).mean()
    before_only = F.weight_heatmap(before, before, tmp_path / "b.png", "fc")
    white_before = np.all(mpimg.imread(before_only)[..., :3] > 0.99, axis=-1).mean()
    assert white > white_before + 0.05  # the pruned half adds a visible white area


# --------------------------------------------------------------------------- other figures
def test_layer_sparsity_bars_and_history_figures(tmp_path):
    methods = [{"label": "a", "layers": _layers(0.5)}, {"label": "b", "layers": _layers(0.9)[:2]}]
    assert F.layer_sparsity_bars(methods, tmp_path / "bars.png").read_bytes()[:8] == PNG_SIGNATURE
    history = {"a": [{"accuracy": 0.9}, {"accuracy": 0.91, "sparsity": 0.5}]}  # no "step": index
    assert F.history_curve(history, tmp_path / "hist.png").is_file()
    assert F.tradeoff_curve({}, tmp_path / "empty.png").is_file()  # empty axes say "no data"


# --------------------------------------------------------------------------- formatting
def test_number_formatting():
    assert fmt_pct(0.982) == "98.20%" and fmt_pct(0.95, 1) == "95.0%"
    assert fmt_pp(-0.011) == "-1.10 pp" and fmt_pp(0.002) == "+0.20 pp"
    assert fmt_int(266610) == "266,610" and fmt_int(np.int64(3)) == "3"
    assert fmt_ratio(12.34) == "12.3×"
    assert fmt_kb(1067300) == "1,042.3 KB"
    assert fmt_ms(0.0512) == "0.051 ms" and fmt_ms(123.4) == "123.4 ms"
    for fmt in (fmt_pct, fmt_pp, fmt_int, fmt_ratio, fmt_kb, fmt_ms):
        assert fmt(None) == "—" and fmt(float("nan")) == "—" and fmt("x") == "—"
    assert not math.isnan(F._scaled(0.5, "accuracy"))


def test_structured_before_after_table(tmp_path):
    """Compacted points get their own table: params, MACs and latency before -> after, and the ×."""
    results = make_results()
    dense = results["dense"]
    slim = dict(_point(0.5, 0.75, 0.975, latency=0.025), params=dense["params"] // 4,
                macs=dense["macs"] // 4, compacted=True)
    results["methods"].append({"name": "surgery_l1", "label": "surgery L1 (channels removed)",
                               "points": [slim]})
    build_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md.split("Structured pruning: before and after surgery", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| surgery L1"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["50%", "266,610 → 66,652", "4.0×", "266,200 → 66,550", "4.0×",
                         "0.050 ms → 0.025 ms", "2.0×", "97.50% (-0.70 pp)"]
    # no compacted point, no section
    build_report(make_results(), tmp_path / "plain")
    assert "before and after surgery" not in (tmp_path / "plain" / "report.md").read_text()
