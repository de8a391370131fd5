"""Subprocess worker for tests/unit/test_resume_kill.py: fine-tune a tiny model, maybe die on the way.

    python finetune_worker.py '[{"variant": "tensor", "ckpt": "a.pt", "out": "a-final.pt", "kill_at": 18}]'

Runs each job in turn. ``kill_at=N`` SIGKILLs this process at the end of step N
(a hard kill: no cleanup, no exception handlers); ``kill_in_write=K`` SIGKILLs it
during the K-th checkpoint write, after the temporary file is written and
before it is renamed into place. A job that finishes writes the final
state_dict to ``out`` and a JSON summary next to it (``out`` + ".json").
"""
import json
import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn

import prunekit
from prunekit.train.callbacks import GradualPruner
from prunekit.train.checkpoint import Checkpointer
from prunekit.train.loop import finetune
from prunekit.train.schedules import make_schedule
from prunekit.train.state import Callback
from prunekit.zoo.data import TensorLoader

EPOCHS, EVERY, N, BATCH = 3, 5, 200, 16  # 13 batches per epoch, a checkpoint every 5 steps


class NoisyDataset(torch.utils.data.Dataset):
    """Augmentation drawing from torch, numpy and Python RNGs: a resume must restore all three."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = 0.1 * torch.randn(()) + 0.1 * float(np.random.randn()) + 0.1 * random.random()
        return self.x[i] + noise, self.y[i]


def make_loader(variant):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 64, generator=g)
    y = x[:, :10].argmax(dim=1)
    if variant == "dataloader":  # a generic loader, shuffled by the global torch RNG
        return torch.utils.data.DataLoader(NoisyDataset(x, y), batch_size=BATCH, shuffle=True)
    return TensorLoader(x, y, BATCH, shuffle=True, seed=1)


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


class Recorder(Callback):
    """Remembers where training (re)started."""

    def __init__(self):
        self.start_step = None

    def on_train_begin(self, state):
        self.start_step = state.step


class Kill(Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, state):
        if state.step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_write(k):
    calls = []

    def hook(tmp):
        calls.append(tmp)
        if len(calls) == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def run_job(job):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model = make_model(job.get("model_seed", 0))
    callbacks, pruner, recorder = [], None, Recorder()
    if job["variant"] == "gradual":  # sparsity rises 0 -> 0.8 at steps 6, 12, 18, 24
        pruner = GradualPruner(make_schedule("cubic", final=0.8, n=4, every=6), scope="global",
                               include_classifier=True)
        callbacks.append(pruner)
        opt = dict(optimizer="adam", lr=0.01)
    else:
        if not job.get("fresh"):  # a fresh model (no masks) takes weights and masks from the checkpoint
            prunekit.prune(model, 0.5, scope="global", include_classifier=True)
        opt = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
    callbacks.append(recorder)
    if job.get("kill_at"):
        callbacks.append(Kill(job["kill_at"]))  # last: the others keep their checkpoint keys
    Checkpointer._before_rename = _kill_on_write(job["kill_in_write"]) if job.get("kill_in_write") else None
    state = finetune(model, make_loader(job["variant"]), epochs=EPOCHS, checkpoint=job["ckpt"],
                     checkpoint_every=EVERY, callbacks=callbacks, **opt)
    torch.save(model.state_dict(), job["out"])
    with open(job["out"] + ".json", "w") as f:
        json.dump({"start_step": recorder.start_step, "step": state.step,
                   "events": pruner.events if pruner else []}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same kernels in every process: results bit-comparable
    for j in json.loads(sys.argv[1]):
        run_job(j)
