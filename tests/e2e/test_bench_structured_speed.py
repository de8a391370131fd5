"""benchmarks/structured_speed.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
from benchjson import check_convention, json_records, run_quick

UNITS = {"macs": "count", "params": "count", "latency_ms": "ms", "speedup": "x", "latency_per_macs": "frac"}
PEER_UNITS = {**UNITS, "time_s": "s"}  # time_s only with the optional torch-pruning peer
TP = "torch-pruning"


def test_structured_speed_quick_prints_json_lines():
    rows = json_records(run_quick("structured_speed.py").stdout)
    tp_rows = [r for r in rows if r.get("peer") == TP]
    hand_rows = [r for r in rows if r.get("peer") == "hand_written"]
    rows = [r for r in rows if r.get("peer") not in (TP, "hand_written")]
    check_tp_peer(tp_rows, rows)
    check_hand_written(hand_rows, rows)
    for r in rows:
        check_convention(r, "structured_speed", UNITS)
        assert r["metric"] in UNITS, r
        assert r["value"] > 0, r
        assert r["case"].endswith("/dense") or "/ratio=" in r["case"], r
        if r["metric"] in ("latency_ms", "speedup", "latency_per_macs"):
            assert isinstance(r.get("batch"), int) and r["batch"] >= 1, r
        if "peer" in r:
            assert r["peer"] == "dense"
            assert abs(r["ratio"] - r["peer_value"] / r["value"]) < 1e-9, r
    assert {r["metric"] for r in rows} == set(UNITS)

    def one(case, metric, batch=None):
        hits = [r for r in rows if r["case"] == case and r["metric"] == metric and r.get("batch") == batch]
        assert len(hits) == 1, (case, metric, batch, hits)
        return hits[0]

    models = {r["case"].split("/")[0] for r in rows}
    assert models
    for model in models:
        dense_macs = one(f"{model}/dense", "macs")["value"]
        dense_params = one(f"{model}/dense", "params")["value"]
        pruned = sorted({r["case"] for r in rows if r["case"].startswith(f"{model}/ratio=")})
        assert pruned, model
        batches = sorted({r["batch"] for r in rows if r["case"] == f"{model}/dense" and r["metric"] == "latency_ms"})
        assert batches == [1, 4]
        for case in pruned:
            macs = one(case, "macs")
            assert macs["value"] < dense_macs and macs["peer_value"] == dense_macs
            assert one(case, "params")["value"] < dense_params
            for b in batches:
                dense_lat = one(f"{model}/dense", "latency_ms", b)["value"]
                lat = one(case, "latency_ms", b)
                assert lat["peer"] == "dense" and lat["peer_value"] == dense_lat
                speedup = one(case, "speedup", b)["value"]
                assert abs(speedup - dense_lat / lat["value"]) < 1e-9
                lpm = one(case, "latency_per_macs", b)["value"]
                assert abs(lpm - speedup / (dense_macs / macs["value"])) < 1e-9


def check_tp_peer(tp_rows, rows):
    """Optional torch-pruning lines (present only when torch_pruning imports): one per metric, case and batch."""
    if not tp_rows:
        return
    keys = set()
    for r in tp_rows:
        check_convention(r, "structured_speed", PEER_UNITS)
        assert r["metric"] in ("macs", "latency_ms", "time_s"), r
        assert r["value"] > 0 and r["peer_value"] > 0, r
        assert abs(r["ratio"] - r["peer_value"] / r["value"]) < 1e-9, r
        assert "/ratio=" in r["case"], r
        key = (r["case"], r["metric"], r.get("batch"))
        assert key not in keys, key
        keys.add(key)
        if r["metric"] != "time_s":  # same value as the prunekit line against the dense peer
            own = [o for o in rows if (o["case"], o["metric"], o.get("batch")) == key]
            assert len(own) == 1 and own[0]["value"] == r["value"], (r, own)
    assert {r["metric"] for r in tp_rows} == {"macs", "latency_ms", "time_s"}


def check_hand_written(hand_rows, rows):
    """The VGG baseline built at the compacted widths: one latency line per pruned case and batch."""
    assert hand_rows, "the quick VGG must get a hand-written baseline"
    for r in hand_rows:
        check_convention(r, "structured_speed", UNITS)
        assert r["metric"] == "latency_ms" and r["peer_value"] > 0
        same = [x for x in rows if x["case"] == r["case"] and x["metric"] == "latency_ms"
                and x["batch"] == r["batch"]]
        assert len(same) == 1 and same[0]["value"] == r["value"]
        assert abs(r["ratio"] - r["peer_value"] / r["value"]) < 1e-9
