"""Kill a fine-tuning process hard (SIGKILL) mid-epoch, resume it in a new process, compare.

The worker (tests/scripts/finetune_worker.py) runs a tiny model with a checkpoint
every 5 steps (13 steps per epoch, 3 epochs). The resumed run must end with a
state_dict bit-identical to an uninterrupted one: same batches, same dropout and
augmentation draws, same optimizer state, same gradual-pruning events.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.bits import unpack_bits
from prunekit.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow  # three processes, then one: ~10 s on 2 idle cores

WORKER = Path(__file__).resolve().parents[1] / "scripts" / "finetune_worker.py"
VARIANTS = ("tensor", "gradual", "dataloader")
KILL_AT = 18  # epoch 1, batch 5; the last checkpoint before it is step 15 (epoch 1, batch 2)


def _start(jobs):
    env = dict(os.environ, PRUNEKIT_PROGRESS="0")
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(jobs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    # each process first runs its variant uninterrupted (the reference), then again until killed
    jobs = {v: {"variant": v, "ckpt": str(d / f"{v}.pt"), "out": str(d / f"{v}.final"), "kill_at": KILL_AT}
            for v in VARIANTS}
    # the DataLoader variant dies inside its 2nd checkpoint write (step 10), between temp file and rename
    jobs["dataloader"] = {**jobs["dataloader"], "kill_at": None, "kill_in_write": 2}
    killed = {v: _start([{"variant": v, "ckpt": str(d / f"ref-{v}.pt"), "out": str(d / f"ref-{v}.final")}, job])
              for v, job in jobs.items()}
    codes = {v: _finish(p) for v, p in killed.items()}
    after_kill = {v: read_checkpoint(d / f"{v}.pt") for v in VARIANTS}
    tmp_left = (d / "dataloader.pt.tmp").is_file()
    resume = _start([{"variant": v, "ckpt": str(d / f"{v}.pt"), "out": str(d / f"{v}.final"), "model_seed": 7,
                      "fresh": True}
                     for v in VARIANTS])
    code, err = _finish(resume)
    assert code == 0, err
    return {"dir": d, "codes": codes, "after_kill": after_kill, "tmp_left": tmp_left}


@pytest.mark.parametrize("variant", VARIANTS)
def test_killed_process_died_by_sigkill_and_left_a_mid_epoch_checkpoint(runs, variant):
    code, err = runs["codes"][variant]
    assert code == -signal.SIGKILL, err
    ckpt = runs["after_kill"][variant]
    if variant == "dataloader":  # killed while writing step 10's checkpoint: step 5's is intact
        assert runs["tmp_left"]
        assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (5, 0, 5)
    else:
        assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (15, 1, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs, variant):
    d = runs["dir"]
    ref = torch.load(d / f"ref-{variant}.final", weights_only=True)
    got = torch.load(d / f"{variant}.final", weights_only=True)
    assert list(ref) == list(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    info = json.loads((d / f"{variant}.final.json").read_text())
    ref_info = json.loads((d / f"ref-{variant}.final.json").read_text())
    assert info["start_step"] == runs["after_kill"][variant]["step"] > 0  # it resumed, not restarted
    assert info["step"] == ref_info["step"] == 39
    assert info["events"] == ref_info["events"]
    masks = [k for k in got if k.endswith("_mask")]
    assert masks
    for key in masks:  # pruned weights are still exactly zero
        w = got[key[: -len("_mask")]]
        keep = unpack_bits(got[key], w.numel()).reshape(w.shape)
        assert 0 < keep.sum() < w.numel() and (w[~keep] == 0).all()


def test_gradual_schedule_state_survives_the_kill(runs):
    info = json.loads((runs["dir"] / "gradual.final.json").read_text())
    assert [e["step"] for e in info["events"]] == [6, 12, 18, 24]  # two before the kill, two after
    assert runs["after_kill"]["gradual"]["callbacks"]["0:GradualPruner"]["current"] > 0
