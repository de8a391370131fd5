"""The shared helpers of prunekit._util: the atomic writer, the eval-mode guard, the timer."""
import os
import stat

import pytest
import torch
from torch import nn

from prunekit import _util
from prunekit._util import atomic_write, atomic_write_text, eval_mode, time_calls
from prunekit.errors import PrunekitError

# ----------------------------------------------------------------------------- atomic_write

def _count_fsyncs(monkeypatch):
    calls = []
    real = os.fsync

    def spy(fd):
        calls.append(fd)
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_atomic_write_replaces_the_file_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "out.bin"
    fsyncs = _count_fsyncs(monkeypatch)
    atomic_write(target, lambda f: f.write(b"new bytes"))
    assert target.read_bytes() == b"new bytes"
    assert len(fsyncs) == (2 if hasattr(os, "O_DIRECTORY") else 1)  # the temp file, then the folder
    assert os.listdir(target.parent) == ["out.bin"]  # no temp file left


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("old")

    def half_then_fail(f):
        f.write("half of the new")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail, binary=False)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["plan.json"]  # the temp file is gone


def test_atomic_write_by_path_hands_the_temp_path_and_fsyncs_it(tmp_path, monkeypatch):
    target = tmp_path / "w.bin"
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"by name")  # a library that opens the file itself
    fsyncs = _count_fsyncs(monkeypatch)
    atomic_write(target, write, by_path=True)
    assert target.read_bytes() == b"by name" and not seen[0].exists()
    assert len(fsyncs) >= 1

    def check_fails(tmp):  # e.g. an exported ONNX file that fails its check
        tmp.write_bytes(b"wrong")
        raise ValueError("bad")
    with pytest.raises(ValueError, match="bad"):
        atomic_write(target, check_fails, by_path=True)
    assert target.read_bytes() == b"by name" and os.listdir(tmp_path) == ["w.bin"]


def test_atomic_write_text_is_utf8_and_the_mode_follows_the_umask(tmp_path):
    target = tmp_path / "advice.md"
    atomic_write_text(target, "± 0.5 pp → ok")
    assert target.read_bytes().decode("utf-8") == "± 0.5 pp → ok"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # like open(), not mkstemp's 0600


def test_before_rename_sees_the_whole_temp_file_and_a_kill_there_keeps_the_old_file(tmp_path):
    target = tmp_path / "c.pt"
    target.write_bytes(b"step 3")
    seen = []

    def killed(tmp):
        seen.append(tmp.read_bytes())
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda f: f.write(b"step 6"), before_rename=killed, fixed_temp=True)
    assert seen == [b"step 6"]
    assert target.read_bytes() == b"step 3"
    # as a real kill would: the whole temp file stays, under the fixed name the next write overwrites
    assert (tmp_path / "c.pt.tmp").read_bytes() == b"step 6"
    atomic_write(target, lambda f: f.write(b"step 9"), fixed_temp=True)
    assert target.read_bytes() == b"step 9" and os.listdir(tmp_path) == ["c.pt"]


# ----------------------------------------------------------------------------- eval_mode

def test_eval_mode_restores_a_frozen_submodule_after_an_exception():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # deliberately frozen BatchNorm
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_eval_mode_restores_flags_the_block_changed():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.eval()
    with eval_mode(model):
        model.train()
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------- time_calls

def test_time_calls_returns_repeat_samples_per_fn():
    calls = {"a": 0, "b": 0}

    def fn(k):
        def call():
            calls[k] += 1
        return call
    out = time_calls({"a": fn("a"), "b": fn("b")}, repeat=5, warmup=2, sample_ms=None)
    assert set(out) == {"a", "b"} and [len(v) for v in out.values()] == [5, 5]
    assert all(isinstance(t, float) and t >= 0 for v in out.values() for t in v)
    assert calls == {"a": 7, "b": 7}  # single calls: warm-up rounds run, untimed


def test_time_calls_runs_before_ahead_of_every_call_and_rotates_the_order():
    log = []
    fns = {k: (lambda k=k: log.append(k)) for k in "abc"}
    out = time_calls(fns, repeat=3, warmup=1, before=lambda: log.append("evict"))
    assert [len(v) for v in out.values()] == [3, 3, 3]
    # before() precedes every call, warm-up included, and implies one call per sample
    assert log[0::2] == ["evict"] * 12 and "evict" not in log[1::2]
    rounds = [log[1::2][i:i + 3] for i in range(0, 12, 3)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_time_calls_calibrates_in_at_least_one_untimed_round(monkeypatch):
    log = []
    monkeypatch.setattr(_util, "MAX_INNER", 3)  # whatever the clock says, a sample repeats at most 3 calls
    out = time_calls({"a": lambda: log.append("a")}, repeat=2, warmup=0, sample_ms=1000.0)
    assert len(out["a"]) == 2
    assert len(log) == 1 + 2 * 3  # one calibration call, then two samples of 3 calls


def test_time_calls_syncs_around_each_sample():
    log = []
    time_calls({"a": lambda: log.append("a")}, repeat=2, warmup=0, sample_ms=None, sync=lambda: log.append("s"))
    assert log == ["s", "a", "s"] * 2


@pytest.mark.parametrize("repeat, warmup", [(0, 1), (-1, 1), (3, -1)])
def test_time_calls_refuses_bad_counts(repeat, warmup):
    with pytest.raises(PrunekitError, match="repeat >= 1"):
        time_calls({"a": lambda: None}, repeat=repeat, warmup=warmup)


def test_callers_share_the_one_timer():
    from prunekit import advise
    from prunekit.analysis import metrics
    from prunekit.deploy import export, sparse
    for mod in (advise, metrics, export, sparse):
        assert mod.time_calls is time_calls
        assert not hasattr(mod, "_SAMPLE_MS") and not hasattr(mod, "_MAX_INNER")
    assert not hasattr(advise, "_alternating_ms")
    assert metrics.measure_latency(nn.Linear(3, 3), torch.randn(2, 3), warmup=0, repeats=3)["repeats"] == 3
