"""Tests of prunekit.report: figures, Markdown/HTML rendering and metrics.json."""
from __future__ import annotations

import html
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
                "history", "heatmap_fc1", "heatmap_conv1", "accuracy_latency"}
    assert expected <= set(paths)
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert paths["html"].name == "report.html" and paths["markdown"].name == "report.md"


@pytest.mark.parametrize("key,size_in", [("tradeoff", (8, 5)), ("size_latency", (12, 4.8)),
                                         ("history", (9, 5)), ("heatmap_fc1", (8.3, 3.75))])
def test_pngs_are_valid_images(report, key, size_in):
    path = report[1][key]
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # a real plot, not an empty canvas
    img = mpimg.imread(path)
    # the height as drawn; the width grows by the legend's, which sits right of the axes
    assert img.shape[0] == round(size_in[1] * F.DPI)
    assert round(size_in[0] * F.DPI) <= img.shape[1] <= round((size_in[0] + 4) * F.DPI)
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
    assert "5.0×" in page  # dense MACs / effective MACs at 80% sparsity
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
    assert "<th>Latency, median [IQR]</th>" not in page  # an all-empty column is dropped
    assert "<th>Measured speedup [IQR]</th>" not in page
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
                         "0.050 ms → 0.025 ms", "2.00×", "97.50% (-0.70 pp)"]
    # no compacted point, no section
    build_report(make_results(), tmp_path / "plain")
    assert "before and after surgery" not in (tmp_path / "plain" / "report.md").read_text()


# --------------------------------------------------------------------------- issue 14: what a reader needs
# A run like `prunekit demo`'s: a masked sweep and a compacted (surgery) one, latencies with their spread and
# speedups timed against dense in alternation, the dense model's layers, and the config's methods.
DENSE_LAYERS = [{"name": n, "type": "Linear", "params": p, "nonzeros": p, "sparsity": 0.0, "macs_dense": p,
                 "macs_effective": p} for n, p in LAYER_PARAMS.items()]
LONG_LABELS = ("one-shot first-order Taylor |w·∂L/∂w| per layer (loss-aware)",
               "structured L1 groups + surgery (physically smaller)")


def _timed(point, median, q1, q3, speedup=None):
    point = dict(point, latency_ms=median, latency_q1_ms=q1, latency_q3_ms=q3, latency_repeats=30)
    if speedup is not None:
        point.update(speedup_measured=speedup[0], speedup_q1=speedup[1], speedup_q3=speedup[2])
    return point


def _slim(target, params, macs, accuracy, latency, speedup):
    p = dict(_point(target, 1 - params / 266_610, accuracy), params=params, nonzeros=params, macs=macs,
             macs_effective=macs, theoretical_speedup=1.0, compacted=True, size_bytes=4 * params,
             size_compressed_bytes=4 * params + 600)
    p["pruned_sparsity"] = p["sparsity"]
    return _timed(p, latency, latency * 0.97, latency * 1.03, speedup)


def make_run():
    dense = _timed(_point(None, 0.0, 0.982), 0.050, 0.049, 0.052)
    dense.pop("target_sparsity")
    masked = [_timed(dict(_point(t, t - 0.005, a), pruned_sparsity=t), 0.049, 0.047, 0.051, (s, s - 0.03, s + 0.03))
              for t, a, s in ((0.8, 0.978, 1.01), (0.95, 0.960, 0.99))]
    slim = [_slim(0.5, 89_610, 89_400, 0.981, 0.033, (1.38, 1.37, 1.39)),
            _slim(0.75, 5_455, 5_345, 0.90, 0.024, (1.61, 1.58, 1.63))]
    surgery_layers = [{"name": "fc1", "type": "Linear", "params": 3_925, "nonzeros": 3_925, "sparsity": 0.0,
                       "macs_dense": 3_920, "macs_effective": 3_920},
                      {"name": "fc2", "type": "Linear", "params": 570, "nonzeros": 570, "sparsity": 0.0,
                       "macs_dense": 475, "macs_effective": 475},
                      {"name": "fc3", "type": "Linear", "params": 960, "nonzeros": 960, "sparsity": 0.0,
                       "macs_dense": 950, "macs_effective": 950}]
    methods = [{"name": "taylor", "label": LONG_LABELS[0], "kind": "oneshot", "prune": {"criterion": "taylor"},
                "points": masked, "final": masked[-1], "layers": _layers(0.95)},
               {"name": "surgery_l1", "label": LONG_LABELS[1], "kind": "surgery", "prune": {"criterion": "l1"},
                "points": slim, "final": slim[-1], "layers": surgery_layers}]
    config = {"model": "lenet300", "seed": 0,
              "methods": [{"name": "taylor", "kind": "oneshot", "sparsities": [0.8, 0.95],
                           "prune": {"criterion": "taylor", "scope": "layer"}, "finetune": {"epochs": 1}},
                          {"name": "surgery_l1", "kind": "surgery", "sparsities": [0.5, 0.75],
                           "prune": {"criterion": "l1", "scope": "global"}}]}
    history = {"taylor": [{"step": s, "sparsity": min(0.95, 0.2 * s), "accuracy": 0.98 - 0.003 * s}
                          for s in range(6)]}
    return {"title": "run", "config": config, "env": {"processor": "x86_64"}, "dense": dense,
            "dense_layers": DENSE_LAYERS, "methods": methods, "history": history}


def _cells(md: str, heading: str, first: str):
    """The cells of the row starting with ``first`` in the first table after ``heading`` (no-break characters
    that keep intervals on one line dropped)."""
    section = md.split(heading, 1)[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| {first}"))
    return [c.strip().replace("\u2060", "").replace("\u00a0", " ").replace("\\|", "|")
            for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def test_conclusion_recommends_a_method_by_advises_rule(tmp_path):
    """The report ends the guesswork: a method recommended from the measured points and the accuracy budget,
    by prunekit advise's own rule (recommend), with its reason."""
    from prunekit.advise import recommend
    from prunekit.experiment import conclusion

    results = make_run()
    c = conclusion(results, budget_pp=1.0)
    # within 1 pp: dense, taylor 80% (-0.4 pp), surgery 50% (-0.1 pp); surgery is the one measurably faster
    assert c["recommended"] == f"{LONG_LABELS[1]} at 50%"
    assert "1.38x faster than dense" in c["reason"] and "(budget 1 pp)" in c["reason"]
    assert "at 75% would be 1.61x but -8.20 pp is over the budget" in c["reason"]
    # the budget is the user's: 10 pp buys the smallest, fastest model; 0 pp keeps the dense one
    assert conclusion(results, budget_pp=10)["recommended"] == f"{LONG_LABELS[1]} at 75%"
    assert conclusion(results, budget_pp=0)["recommended"] == "dense"
    # the same rule as advise: a tie on latency goes to the smaller file
    rows = [dict(name=n, kind=k, metric_value=0.9, params=100, nonzeros=nz, macs=100, macs_effective=nz,
                 size_bytes=size, latency_ms=ms) for n, k, nz, size, ms in
            (("dense", "dense", 100, 400, 1.0), ("a", "unstructured", 50, 300, 0.98), ("b", "unstructured", 10, 90, 1.02))]
    assert recommend(rows, budget_pp=1.0).recommended == "b"
    results["conclusion"] = c
    paths = build_report(results, tmp_path)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.index("## Conclusion") < md.index("## Summary")
    assert f"### Recommended: {LONG_LABELS[1]} at 50%" in md
    assert html.escape("Why: " + c["reason"]) in paths["html"].read_text(encoding="utf-8")
    assert _cells(md, "## Conclusion", "★")[0] == f"★ {LONG_LABELS[1]} at 50%"
    assert "budget of 1 pp (3 of 5 here, dense included)" in md


def test_speedup_columns_are_effective_macs_and_measured_latency(tmp_path):
    """No 'theoretical speedup': the effective-MACs ratio (a compacted model's real reduction, 49.8x, not 1.0x;
    a masked model's 18.2x that no CPU delivers)
    and the measured speedup (a masked model's ~1x) are separate, honestly named columns."""
    paths = build_report(make_run(), tmp_path)
    md = paths["markdown"].read_text(encoding="utf-8")
    page = paths["html"].read_text(encoding="utf-8")
    assert "Speedup (theor.)" not in page and "Theoretical" not in page
    assert "<th>MACs ÷ (dense / effective)</th>" in page and "<th>Measured speedup [IQR]</th>" in page
    head = _cells(md, "## Summary", "Method")
    surgery, taylor = _cells(md, "## Summary", "structured L1"), _cells(md, "## Summary", "one-shot first")
    col = head.index("MACs ÷ (dense / effective)")
    assert surgery[col] == "49.8×" and taylor[col] == "18.2×"
    col = head.index("Measured speedup [IQR]")
    assert surgery[col] == "1.61× [1.58–1.63]"      # faster beyond the noise: no mark
    assert taylor[col] == "0.99× [0.96–1.02] ≈"     # a masked model: ~1x, inside the noise
    struct = _cells(md, "## Structured pruning", "structured L1")
    assert "1.38× [1.37–1.39]" in struct and "0.050 ms [0.049–0.052] → 0.033 ms [0.032–0.034]" in struct


def test_latency_shows_its_spread_and_flags_noise():
    """Medians come with their interquartile range; a difference inside the noise is marked '≈'."""
    from prunekit.report.blocks import fmt_latency, fmt_speedup, within_noise

    def clean(text):
        return text.replace("\u2060", "").replace("\u00a0", " ")

    dense = {"latency_ms": 0.050, "latency_q1_ms": 0.049, "latency_q3_ms": 0.052}
    close = {"latency_ms": 0.047, "latency_q1_ms": 0.046, "latency_q3_ms": 0.0495}   # IQRs overlap
    fast = {"latency_ms": 0.030, "latency_q1_ms": 0.029, "latency_q3_ms": 0.031}
    assert clean(fmt_latency(dense)) == "0.050 ms [0.049–0.052]" and fmt_latency({"latency_ms": 1.5}) == "1.500 ms"
    assert within_noise(dense, close) and not within_noise(dense, fast)
    assert within_noise({"latency_ms": 1.0}, {"latency_ms": 1.04})          # within 5%, no spread recorded
    assert fmt_speedup(dense, close) == "1.06× ≈" and fmt_speedup(dense, fast) == "1.67×"
    assert fmt_speedup(dense, dense) == "reference"
    paired = {"speedup_measured": 1.2, "speedup_q1": 0.95, "speedup_q3": 1.4}  # 1x inside its IQR: noise
    assert clean(fmt_speedup(dense, paired)) == "1.20× [0.95–1.40] ≈"


def test_runs_record_the_latency_spread_and_a_paired_speedup(mlp, one_thread):
    """Where latency is measured: summarize keeps the quartiles and range of its timings, and the experiment
    times each model against dense in alternation."""
    import copy

    from prunekit.analysis.metrics import summarize
    from prunekit.experiment import paired_speedup

    x = torch.randn(1, 64)
    res = summarize(mlp, x, latency=True, repeats=15, warmup=2)
    assert res["latency_min_ms"] <= res["latency_q1_ms"] <= res["latency_ms"] <= res["latency_q3_ms"] \
        <= res["latency_max_ms"] and res["latency_repeats"] == 15
    twin = paired_speedup(copy.deepcopy(mlp), mlp, x, repeats=12, warmup=2)
    assert twin["speedup_repeats"] == 12 and twin["speedup_q1"] <= twin["speedup_measured"] <= twin["speedup_q3"]
    assert 0.5 < twin["speedup_measured"] < 2.0   # a model against its own copy


def test_layer_sparsity_of_a_compacted_model_is_against_the_dense_layer(tmp_path, monkeypatch):
    """A layer shrunk from 235,500 to 3,925 weights is 98.3% sparse, not 0% (the heatmap and the bars agree)."""
    seen = {}
    bars = F.layer_sparsity_bars

    def spy(methods, path, *a, **k):
        seen.update({m["label"]: {l["name"]: l["sparsity"] for l in m["layers"]} for m in methods})
        return bars(methods, path, *a, **k)

    monkeypatch.setattr(F, "layer_sparsity_bars", spy)
    paths = build_report(make_run(), tmp_path)
    surgery = seen[LONG_LABELS[1]]
    assert surgery["fc1"] == pytest.approx(1 - 3_925 / 235_500) and surgery["fc3"] == pytest.approx(1 - 960 / 1_010)
    assert seen[LONG_LABELS[0]]["fc1"] == pytest.approx(0.95)
    md = paths["markdown"].read_text(encoding="utf-8")
    layers = md.split(f"### {LONG_LABELS[1]}", 1)[1]
    assert "Sparsity (layer, vs its dense size)" in layers
    assert _cells(layers, "#### Layers", "fc1") == ["fc1", "Linear", "235,500", "3,925", "3,925", "98.3%", "3,920",
                                                    "3,920"]


def _legend_problems(fig):
    """Legends outside the canvas or over any axes, after a real draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    renderer, box, out = canvas.get_renderer(), fig.bbox, []
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for legend in legends:
        e = legend.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            out.append(f"legend {[round(v) for v in e.extents]} outside the canvas {[round(v) for v in box.extents]}")
        for ax in fig.axes:
            if ax.get_visible() and ax.axison and e.overlaps(ax.get_window_extent(renderer)):
                out.append(f"legend over the axes {ax.get_title()!r}")
    return out


def test_figure_legends_stay_on_the_canvas_and_off_the_data(tmp_path, monkeypatch):
    """Long method names: every legend is inside the saved canvas and covers no axes (per-layer bars, size and
    latency, accuracy, history)."""
    problems = {}
    save = F._save

    def check(fig, path):
        problems[path.name] = _legend_problems(fig)
        return save(fig, path)

    monkeypatch.setattr(F, "_save", check)
    results = make_run()
    results["methods"] += [dict(m, name=f"{m['name']}{k}", label=f"{m['label']} variant {k}")
                           for k in range(2) for m in make_results()["methods"]]
    build_report(results, tmp_path)
    assert {"layer_sparsity.png", "size_latency.png", "tradeoff.png", "history.png"} <= set(problems)
    assert {k: v for k, v in problems.items() if v} == {}


def test_heatmaps_show_before_once_per_layer(tmp_path, monkeypatch):
    """One figure per layer: the dense "before" once, then every method's "after" (was: before and after per
    method and layer, the same before drawn again and again)."""
    calls = []
    grid = F.weight_heatmaps

    def spy(before, afters, path, *a, **k):
        calls.append((path.name, [label for label, _ in afters]))
        return grid(before, afters, path, *a, **k)

    monkeypatch.setattr(F, "weight_heatmaps", spy)
    rng = np.random.default_rng(0)
    layers = {"fc1": rng.normal(size=(120, 250)), "fc2": rng.normal(size=(60, 120))}
    heat = {f"{m}/{layer}": (w, w * (rng.random(w.shape) > s)) for m, s in (("oneshot_l1", 0.8), ("gradual", 0.95))
            for layer, w in layers.items()}
    paths = build_report(make_results(), tmp_path, heatmaps=heat)
    maps = sorted(k for k in paths if k.startswith("heatmap"))
    assert maps == ["heatmap_fc1", "heatmap_fc2"]
    labels = ["one-shot L1 (unstructured)", "gradual magnitude"]
    assert sorted(calls) == [("heatmap_fc1.png", labels), ("heatmap_fc2.png", labels)]
    page = paths["html"].read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == len([p for p in paths.values() if p.suffix == ".png"])
    # a different dense matrix under the same layer name is not drawn as the same "before"
    heat["other/fc1"] = (layers["fc1"] + 1, layers["fc1"])
    assert sorted(k for k in build_report(make_results(), tmp_path / "b", heatmaps=heat) if "heatmap" in k) == \
        ["heatmap_fc1", "heatmap_fc1_", "heatmap_fc2"]


def test_sparsity_is_named_whole_model_or_pruned_layers(tmp_path):
    """Both sparsities, named, in the HTML and in the console table (they differ: biases, unpruned layers)."""
    from prunekit.experiment import summary_rows

    results = make_run()
    page = build_report(results, tmp_path)["html"].read_text(encoding="utf-8")
    assert "<th>Sparsity (whole model)</th>" in page and "<th>Sparsity (pruned layers)</th>" in page
    assert "<th>Sparsity</th>" not in page
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    head, taylor = _cells(md, "## Summary", "Method"), _cells(md, "## Summary", "one-shot first")
    assert taylor[head.index("Sparsity (whole model)")] == "94.5%"
    assert taylor[head.index("Sparsity (pruned layers)")] == "95.0%"
    row = summary_rows(results)[1]
    assert row["sparsity_whole_model"] == 0.945 and row["sparsity_pruned_layers"] == 0.95 and "sparsity" not in row


def test_config_methods_are_a_table_not_json(tmp_path):
    page = build_report(make_run(), tmp_path)["html"].read_text(encoding="utf-8")
    config = page.split("<h2>Configuration</h2>", 1)[1]
    assert "&quot;name&quot;" not in config and '"name"' not in config  # no raw JSON blob
    assert "<h3>Configuration: methods</h3>" in config
    for cell in ("<th>sparsities</th>", "<td>0.8, 0.95</td>", "<td>criterion=taylor, scope=layer</td>",
                 "<td>epochs=1</td>", "<td>surgery_l1</td>"):
        assert cell in config, cell
    assert "<td>model</td><td>lenet300</td>" in config  # plain keys stay key / value


def test_every_img_is_a_decodable_png_of_sane_size(report):
    """What a browser would show: every <img> of report.html decodes, is a figure-sized PNG and not blank."""
    import base64
    import io

    page = report[1]["html"].read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and len(srcs) == len(_pngs(report[1]))
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        img = mpimg.imread(io.BytesIO(data), format="png")
        assert 300 <= img.shape[1] <= 5000 and 200 <= img.shape[0] <= 5000, img.shape
        assert img[..., :3].std() > 0.05


def _screenshot_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "report_screenshot.py"
    spec = importlib.util.spec_from_file_location("report_screenshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_in_a_real_browser(report, tmp_path):
    """Headless Chromium loads report.html: every figure decodes, shows (not one flat colour) and fits the
    window; the page does not scroll sideways. Skipped where no Chromium is installed."""
    shot = _screenshot_script()
    if shot.find_browser() is None:
        pytest.skip("no Chromium here (Debian: apt-get install --no-install-recommends chromium)")
    result = shot.check_report(report[1]["html"], tmp_path / "shot.png")
    assert result["problems"] == []
    assert result["images"] == len(_pngs(report[1]))
    assert mpimg.imread(result["screenshot"]).shape[1] == shot.WIDTH
