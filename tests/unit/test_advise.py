"""prunekit.advise: candidates built from copies (deterministic, the user's model untouched), the budget and the
target's measure decide the recommendation, the reason states the numbers, and the result round-trips as JSON.

Latency depends on the machine (shared and noisy here), so no test asserts which candidate is faster; tests
assert consistency instead (speedup == dense_ms / ms; the pick is the best of the in-budget set by the rule).
Exact cases use ``eval_fn`` = the fraction of the dense model's weights still non-zero, so every drop is known.
"""
import json

import pytest
import torch
from torch import nn

from prunekit.advise import (
    DEFAULT_CANDIDATES,
    LATENCY_TIE,
    Advice,
    TargetUnavailable,
    _digest,
    _pick,
    advise,
    build_candidate,
    parse_candidate,
)
from prunekit.analysis.metrics import count_parameters

FAST = {"repeat": 2, "warmup": 1, "threads": 1}


def wide_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def kept_fraction(dense_total):
    """A metric with known drops: 100 * (fraction of weights pruned or removed) percentage points."""
    return lambda m: count_parameters(m)["nonzero"] / dense_total


def agreement_loader(model, x):
    """(x, the dense model's own predictions): dense accuracy is exactly 1."""
    with torch.no_grad():
        return [(x, model(x).argmax(1))]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_consistent(a: Advice):
    """What every Advice must satisfy, whatever the machine's noise."""
    dense = next(r for r in a.candidates if r["kind"] == "dense")
    assert dense["drop_pp"] == 0 and dense["within_budget"] and dense["speedup"] == 1.0
    for r in a.candidates:
        if r["status"] != "ok":
            continue
        assert [b["batch"] for b in r["batches"]] == a.batches
        for mine, ref in zip(r["batches"], dense["batches"]):
            assert mine["speedup"] == pytest.approx(ref["latency_ms"] / mine["latency_ms"])
        assert r["latency_ms"] == r["batches"][0]["latency_ms"] and r["score"] == r[a.rank_by]
        assert r["within_budget"] == (r["drop_pp"] <= a.budget_pp + 1e-9)
        assert r["plain_pytorch"] == (not r["needs_prunekit"])
    ok = [r for r in a.candidates if r["status"] == "ok" and r["within_budget"]]
    rec = a.candidate(a.recommended)
    assert rec in ok
    best = min(r[a.rank_by] for r in ok)
    tie = a.settings["latency_tie"] if a.rank_by == "latency_ms" else 0.0
    assert rec[a.rank_by] <= best * (1 + tie)
    # among the tied, the smallest file
    assert rec["size_bytes"] == min(r["size_bytes"] for r in ok if r[a.rank_by] <= best * (1 + tie))


# ------------------------------------------------------------------------------ candidates
def test_parse_candidate_forms_and_names():
    assert parse_candidate("structured:0.5") == {"name": "structured 50%", "kind": "structured", "amount": 0.5,
                                                 "nm": None, "options": {}}
    assert parse_candidate("nm:2:4")["nm"] == [2, 4] and parse_candidate("nm")["name"] == "2:4"
    assert parse_candidate({"kind": "unstructured", "amount": 0.9, "min_speedup": 1.5, "name": "u"}) == \
        {"name": "u", "kind": "unstructured", "amount": 0.9, "nm": None, "options": {"min_speedup": 1.5}}
    assert [parse_candidate(c)["name"] for c in DEFAULT_CANDIDATES] == [
        "dense", "structured 25%", "structured 50%", "structured 75%", "unstructured 50%", "unstructured 80%",
        "unstructured 90%", "unstructured 95%", "2:4"]


@pytest.mark.parametrize("spec, match", [
    ("pruned:0.5", "unknown candidate kind 'pruned'.*allowed: dense, structured"),
    ("structured:1.5", "fraction in \\(0, 1\\)"),
    ("unstructured", "must be a fraction"),
    ("nm:4:2", "0 < N < M"),
    ({"kind": "structured", "amount": 0.5, "sparse_kernels": True}, "unknown option.*allowed: criterion, scope"),
    ("dense:0.5", "dense takes no amount"),
])
def test_parse_candidate_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_candidate(spec)


def test_build_is_deterministic_given_the_seed_and_leaves_the_model_alone():
    model = wide_mlp()
    before = state(model)
    x = torch.randn(2, 64)
    spec = {"kind": "unstructured", "amount": 0.7, "criterion": "random"}  # the seed decides the masks
    a, _ = build_candidate(model, x, spec, seed=3)
    b, _ = build_candidate(model, x, spec, seed=3)
    c, _ = build_candidate(model, x, spec, seed=4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a[1].weight, c[1].weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()


def test_structured_candidate_is_a_smaller_dense_cnn():
    model = tiny_cnn()
    x = torch.randn(2, 1, 8, 8)
    slim, _ = build_candidate(model, x, {"kind": "structured", "amount": 0.5, "scope": "layer"})
    assert [m.out_channels for m in slim if isinstance(m, nn.Conv2d)] == [4, 8]
    assert slim[-1].in_features == 8 * 8 * 8 and slim(x).shape == (2, 10)


# ------------------------------------------------------------------------------ advise: measured
def test_wide_mlp_unstructured_runs_on_csr_and_is_measured():
    model = wide_mlp()
    x = torch.randn(4, 64)
    # min_speedup ~0: convert whatever the timing says, so which layers run CSR does not depend on noise
    cand = ["dense", {"kind": "unstructured", "amount": 0.9, "min_speedup": 1e-9}, "structured:0.5"]
    a = advise(model, x, eval_loader=agreement_loader(model, x), candidates=cand, budget_pp=100, batch=[1, 4],
               **FAST)
    check_consistent(a)
    u = a.candidate("unstructured 90%")
    # the classifier is not pruned (no zeros): its two hidden layers got CSR forms, timed in the whole model
    # against the plain masked model at every batch; the faster of the two is what the row reports
    for b in u["batches"]:
        sparse_ms, plain_ms = b["forms_ms"]["sparse_kernels"], b["forms_ms"]["plain"]
        assert b["latency_ms"] == min(sparse_ms, plain_ms)
        assert [x_["name"] for x_ in b["sparse_layers"]] == (["1", "3"] if sparse_ms < plain_ms else [])
    csr = bool(u["sparse_layers"])
    assert u["needs_prunekit"] == (["SparseLinear"] if csr else []) and u["plain_pytorch"] == (not csr)
    assert u["nonzeros"] < 0.15 * u["params"] and u["macs_effective"] < 0.15 * u["macs"]
    s = a.candidate("structured 50%")
    assert s["sparse_layers"] == [] and s["plain_pytorch"] and s["params"] < a.candidate("dense")["params"]
    assert s["nonzeros"] == s["params"] and s["macs"] == s["macs_effective"] < a.candidate("dense")["macs"]
    assert a.candidate("dense")["metric_value"] == 1.0 and a.rank_by == "latency_ms" and a.measured


def test_budget_excludes_aggressive_candidates():
    model = tiny_cnn()
    total = count_parameters(model)["total"]
    cand = ["unstructured:0.3", "unstructured:0.5", "unstructured:0.8", "unstructured:0.95", "structured:0.75"]
    a = advise(model, torch.randn(1, 1, 8, 8), eval_fn=kept_fraction(total), candidates=cand, budget_pp=60,
               **FAST)
    check_consistent(a)
    drops = {r["name"]: r["drop_pp"] for r in a.candidates}
    # global magnitude prunes the conv weights only (not biases, not the classifier): drops are below the amount
    assert 0 < drops["unstructured 30%"] < drops["unstructured 50%"] < drops["unstructured 80%"]
    over = {n for n, d in drops.items() if d > 60}
    assert {r["name"] for r in a.candidates if not r["within_budget"]} == over and over
    assert a.recommended not in over


def test_nothing_within_budget_recommends_dense_and_says_why():
    model = tiny_cnn()
    a = advise(model, torch.randn(1, 1, 8, 8), eval_fn=kept_fraction(count_parameters(model)["total"]),
               candidates=["unstructured:0.5", "structured:0.5"], budget_pp=0.0, **FAST)
    assert a.recommended == "dense"
    assert all(not r["within_budget"] for r in a.candidates if r["kind"] != "dense")
    closest = min((r for r in a.candidates if r["kind"] != "dense"), key=lambda r: r["drop_pp"])
    assert a.reason.startswith("dense: no pruned candidate stays within the 0 pp budget "
                               f"(closest: {closest['name']} at {-closest['drop_pp']:+.2f} pp)")


def test_sparse_target_ranks_by_effective_macs_exactly():
    model = wide_mlp()
    total = count_parameters(model)["total"]
    cand = ["unstructured:0.3", "unstructured:0.55", "unstructured:0.8", "nm:2:4", "structured:0.25"]
    a = advise(model, torch.randn(1, 64), eval_fn=kept_fraction(total), target="sparse", candidates=cand,
               budget_pp=60, **FAST)
    check_consistent(a)
    assert a.rank_by == "macs_effective" and not a.measured
    ok = [r for r in a.candidates if r["within_budget"]]
    assert a.recommended == "unstructured 55%" == min(ok, key=lambda r: r["macs_effective"])["name"]
    assert "unstructured 80%" not in {r["name"] for r in ok}  # 80% would have the fewest, but is over budget
    assert "skips zeros" in a.reason and "not the target's" in a.reason


def test_gpu_without_cuda_is_a_clear_error_or_an_explicit_proxy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = wide_mlp()
    before = state(model)
    with pytest.raises(TargetUnavailable, match="run advise on the GPU machine.*allow_proxy=True"):
        advise(model, torch.randn(1, 64), eval_fn=lambda m: 1.0, target="gpu")
    a = advise(model, torch.randn(1, 64), eval_fn=lambda m: 1.0, target="gpu", allow_proxy=True, budget_pp=1,
               candidates=["unstructured:0.9", "nm:2:4", "structured:0.5"], **FAST)
    check_consistent(a)
    assert a.rank_by == "gpu_macs" and not a.measured and "NOT MEASURED" in a.reason
    gpu = {r["name"]: r["gpu_macs"] for r in a.candidates}
    u, nm = a.candidate("unstructured 90%"), a.candidate("2:4")
    assert gpu["unstructured 90%"] == u["macs"] and gpu["2:4"] == nm["macs_effective"] < nm["macs"]
    assert a.recommended == "structured 50%" == min(gpu, key=gpu.get)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_users_model_is_never_modified():
    model = tiny_cnn()
    model.train()
    model[0].eval()  # mixed flags must survive as they are
    model[2].weight.requires_grad_(False)
    before, flags = state(model), [m.training for m in model.modules()]
    threads = torch.get_num_threads()
    x = torch.randn(2, 1, 8, 8)
    train = [(x, torch.tensor([1, 2]))]
    advise(model, x, eval_loader=agreement_loader(model, x), candidates=["unstructured:0.5", "structured:0.5",
           "nm:2:4"], train_loader=train, finetune_epochs=1, **FAST)
    assert model.state_dict().keys() == before.keys()  # no mask buffers added
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags and not model[2].weight.requires_grad
    assert torch.get_num_threads() == threads


def test_same_seed_same_candidates_and_finetune_keeps_masks():
    model = wide_mlp()
    x = torch.randn(8, 64)
    loader = [(x, torch.arange(8) % 10)]
    kw = dict(eval_loader=loader, train_loader=loader, finetune_epochs=2, repeat=1, warmup=1, threads=1,
              candidates=[{"kind": "unstructured", "amount": 0.6, "criterion": "random"}, "nm:2:4"])
    a, b = advise(model, x, seed=1, **kw), advise(model, x, seed=1, **kw)
    c = advise(model, x, seed=2, **kw)
    digest = lambda adv: {r["name"]: r["digest"] for r in adv.candidates}  # noqa: E731
    assert digest(a) == digest(b) and digest(a)["unstructured 60%"] != digest(c)["unstructured 60%"]
    assert [r["metric_value"] for r in a.candidates] == [r["metric_value"] for r in b.candidates]
    # dense is the reference, never fine-tuned; the pruned ones were, with their zeros held
    assert digest(a)["dense"] == _digest(model)
    untuned, _ = build_candidate(model, x, "nm:2:4", seed=1)
    assert digest(a)["2:4"] != _digest(untuned)
    assert a.candidate("2:4")["nonzeros"] == count_parameters(untuned)["nonzero"]
    assert a.candidate("unstructured 60%")["sparsity"] == pytest.approx(
        c.candidate("unstructured 60%")["sparsity"])


def test_failed_candidate_is_reported_not_recommended():
    class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it, so surgery cannot plan it
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(h if h.sum() > 0 else -h)

    torch.manual_seed(0)
    a = advise(Branchy(), torch.randn(1, 16), eval_fn=lambda m: 1.0, candidates=["structured:0.5",
               "unstructured:0.5"], budget_pp=5, **FAST)
    s = a.candidate("structured 50%")
    assert s["status"] == "failed" and s["error"] and s["latency_ms"] is None and not s["within_budget"]
    assert a.recommended != "structured 50%" and "could not build structured 50%" in a.reason
    assert "failed" in a.table() and "structured 50%" in a.to_markdown()


# ------------------------------------------------------------------------------ ranking and reason
def _row(name, ms, size, drop=0.0, kind="structured", within=True):
    return {"name": name, "kind": kind, "status": "ok", "latency_ms": ms, "size_bytes": size, "drop_pp": drop,
            "within_budget": within}


def test_pick_ties_go_to_the_smaller_file_and_over_budget_never_wins():
    rows = [_row("dense", 1.0, 1000, kind="dense"), _row("a", 0.50, 600), _row("b", 0.52, 300),
            _row("c", 0.10, 10, drop=5, within=False)]
    assert _pick(rows, "latency_ms", LATENCY_TIE)["name"] == "b"   # 0.52 is within 5% of 0.50, and smaller
    assert _pick(rows, "latency_ms", 0.0)["name"] == "a"
    rows[2]["latency_ms"] = 0.6
    assert _pick(rows, "latency_ms", LATENCY_TIE)["name"] == "a"


def test_reason_quotes_the_numbers():
    model = wide_mlp()
    x = torch.randn(1, 64)
    a = advise(model, x, eval_loader=agreement_loader(model, x), candidates=["structured:0.5", "nm:2:4",
               "unstructured:0.9"], budget_pp=100, **FAST)
    rec, dense = a.candidate(a.recommended), a.candidate("dense")
    if a.recommended != "dense":
        assert a.reason.startswith(f"{rec['name']}: ")
        assert f"{rec['speedup']:.2f}x" in a.reason and "(budget 100 pp)" in a.reason
        if rec["speedup"] >= 1 + LATENCY_TIE:
            assert f"({rec['latency_ms']:.3g} vs {dense['latency_ms']:.3g} ms)" in a.reason
    if a.recommended != "2:4":
        assert f"2:4 at {a.candidate('2:4')['speedup']:.2f}x: CPUs have no N:M kernels" in a.reason


# ------------------------------------------------------------------------------ bad input, JSON
@pytest.mark.parametrize("kw, match", [
    ({"target": "tpu"}, "unknown target 'tpu'; allowed: cpu, gpu, sparse"),
    ({"budget_pp": -1}, "budget_pp=-1 must be a number >= 0"),
    ({"eval_fn": None}, "exactly one of eval_fn .* or eval_loader"),
    ({"eval_loader": [1]}, "exactly one of eval_fn"),
    ({"finetune_epochs": 1}, "finetune_epochs=1 needs train_loader"),
    ({"batch": [1, 0]}, "batch=\\[1, 0\\] must be a positive int"),
    ({"candidates": ["dense", "dense"]}, "names must be unique; repeated: dense"),
    ({"repeat": 0}, "repeat=0 must be an int >= 1"),
    ({"dtype": torch.float16}, "dtype applies only to target='gpu'"),
    ({"finetune_kwargs": {"epochs": 3}}, "finetune_kwargs: unknown option\\(s\\) \\['epochs'\\]; allowed: lr"),
])
def test_bad_input_is_a_clear_error_before_any_work(kw, match):
    model = wide_mlp()
    args = {"eval_fn": lambda m: 1.0, **kw}
    with pytest.raises(ValueError, match=match):
        advise(model, torch.randn(1, 64), **args)


def test_json_round_trip_table_and_markdown(tmp_path):
    model = tiny_cnn()
    a = advise(model, torch.randn(1, 1, 8, 8), eval_fn=lambda m: 0.9, candidates=["structured:0.5", "nm:2:4"],
               batch=[1, 2], keep_models=True, **FAST)
    text = a.to_json()
    doc = json.loads(text)
    assert doc["format"] == "prunekit.advice/1" and doc["recommended"] == a.recommended
    again = Advice.from_json(text)
    assert again == a and again.models == {} and set(a.models) == {"dense", "structured 50%", "2:4"}
    json_path, md_path = a.save(tmp_path / "out")
    assert Advice.from_json(json_path.read_text()) == a
    md = md_path.read_text()
    assert f"**Recommended: {a.recommended}.**" in md and "| structured 50%" in md
    table = a.table()
    for needle in ("ms@1", "x@2", "macs_effective", "size_kb", f"recommended: {a.recommended}", a.reason):
        assert needle in table
    with pytest.raises(ValueError, match="not a prunekit advice document"):
        Advice.from_dict({"format": "other"})
    with pytest.raises(KeyError, match="no candidate 'x'; known: dense"):
        a.candidate("x")


def test_a_barely_trained_reference_is_warned_about():
    """issue 14: advise --quick recommended from a 48%-accurate model without a word."""
    model = tiny_cnn()
    with pytest.warns(UserWarning, match="only 48.00%"):
        a = advise(model, torch.randn(1, 1, 8, 8), eval_fn=lambda m: 0.48, candidates=["dense", "structured:0.5"],
                   budget_pp=100, **FAST)
    assert "barely trained" in a.reason and any("barely trained" in n for n in a.candidate("dense")["notes"])
    quiet = advise(model, torch.randn(1, 1, 8, 8), eval_fn=lambda m: 0.95, candidates=["dense"], budget_pp=1, **FAST)
    assert "barely trained" not in quiet.reason
