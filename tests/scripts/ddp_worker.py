"""Worker for tests/unit/test_distributed.py, launched as ``torchrun --nproc_per_node=2 ddp_worker.py OUT``.

Each rank writes what the test compares into OUT: rank<r>-*.pt state_dicts and
rank<r>.json (error messages, shard indices). Three parts:

A. masks: random (rank-dependent) masks must be refused, then broadcast from rank 0;
B. DDP with 2 x batch 16 must match one process with batch 32 (rank 0 computes that);
C. gradual pruning + dropout with mid-epoch checkpoints: interrupted and resumed
   must be bit-identical to uninterrupted, on every rank.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

import prunekit
from prunekit.train import distributed as pkdist
from prunekit.train.callbacks import GradualPruner
from prunekit.train.loop import finetune
from prunekit.train.schedules import make_schedule
from prunekit.train.state import Callback
from prunekit.zoo.data import TensorLoader


def make_loader(batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 64, generator=g)
    return TensorLoader(x, x[:, :10].argmax(dim=1), batch, shuffle=True, seed=1)  # 12 batches of 16 per rank


def make_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10))


class Stop(Callback):
    def on_step_end(self, state):
        if state.step == 9:  # every rank at the same step: no collective is left half-done
            raise KeyboardInterrupt


def part_masks(info):
    model = make_model()
    prunekit.prune(model, 0.5, criterion="random", seed=pkdist.get_rank(), include_classifier=True)
    try:
        pkdist.check_masks_equal(model)
    except ValueError as e:
        info["mismatch_error"] = str(e)
    pkdist.broadcast_masks(model)
    pkdist.check_masks_equal(model)  # raises if the broadcast did not work
    return model


def part_equivalence(model, out, rank):
    init = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, make_loader(), epochs=1, lr=0.1, lr_schedule="constant", momentum=0.0)
    torch.save(model.state_dict(), out / f"rank{rank}-ddp.pt")
    if rank == 0:  # the same training in one process: batch 32 = the two shards' batches of 16
        single = make_model()
        prunekit.apply.masking.load_state_dict(single, init)
        finetune(single, make_loader(32), epochs=1, lr=0.1, lr_schedule="constant", momentum=0.0,
                 distributed=False)
        torch.save(single.state_dict(), out / "single.pt")


def part_resume(out, rank):
    def run(name, callbacks=(), seed=0):
        model = make_model(0.2, seed)
        torch.manual_seed(100 + rank)  # every rank its own dropout stream: its RNG must be restored
        pruner = GradualPruner(make_schedule("cubic", final=0.75, n=3, every=5), scope="global")
        finetune(model, make_loader(), epochs=2, lr=0.05, callbacks=[pruner, *callbacks],
                 checkpoint=out / f"{name}.pt", checkpoint_every=4)
        torch.save(model.state_dict(), out / f"rank{rank}-{name}.pt")
        return pruner.events

    events = run("ref")
    try:
        run("resumed", [Stop()])
    except KeyboardInterrupt:
        pass
    assert run("resumed", seed=5) == events, "gradual pruning events differ after resume"


def main(out: Path) -> None:
    torch.set_num_threads(1)
    assert pkdist.init_from_env(), "not launched by torchrun with 2 processes"
    rank = pkdist.get_rank()
    info = {"shard": make_loader().shard(rank, pkdist.get_world_size()).epoch_indices(0).tolist()}
    model = part_masks(info)
    part_equivalence(model, out, rank)
    part_resume(out, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    pkdist.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
