"""prunekit.distributed: sharding and single-process behaviour here; 2 real processes (gloo) at the end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

import prunekit
from prunekit.bits import unpack_bits
from prunekit.train import distributed as pkdist
from prunekit.train.loop import finetune
from prunekit.zoo.data import TensorLoader

WORKER = Path(__file__).resolve().parents[1] / "scripts" / "ddp_worker.py"


def _rows(loader):
    return torch.cat([yb for _, yb in loader]).tolist()


@pytest.mark.parametrize("shuffle", [False, True])
def test_tensor_loader_shards_partition_the_epoch_order(shuffle):
    x, y = torch.zeros(10, 1), torch.arange(10)
    base = TensorLoader(x, y, batch_size=2, shuffle=shuffle, seed=3)
    shards = [base.shard(r, 3) for r in range(3)]
    full = base.epoch_indices(1).tolist()
    for r, s in enumerate(shards):
        assert len(s) == 2 and s.epoch_indices(1).tolist() == (full + full[:2])[r::3]  # padded to 12, strided
        s.set_epoch(1)
        assert _rows(s) == s.epoch_indices(1).tolist()
    assert sorted(sum((s.epoch_indices(1).tolist() for s in shards), [])) == sorted(full + full[:2])
    if shuffle:
        assert shards[0].epoch_indices(1).tolist() != shards[0].epoch_indices(2).tolist()
    assert base.shard(1, 3).epoch_indices(1).tolist() == shards[1].epoch_indices(1).tolist()  # pure function


def test_sharded_loader_seeks_and_checks_its_arguments():
    x, y = torch.zeros(20, 1), torch.arange(20)
    s = TensorLoader(x, y, batch_size=3, shuffle=True, rank=1, world_size=2)
    assert len(s) == 4 and s.num_examples == 20
    s.seek(5, 2)
    assert _rows(s) == s.epoch_indices(5).tolist()[6:]
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="0 <= rank < world_size"):
            TensorLoader(x, y, batch_size=3, rank=rank, world_size=world)


def test_shard_loader_handles_tensor_loaders_and_dataloaders():
    x, y = torch.zeros(10, 1), torch.arange(10)
    tl = TensorLoader(x, y, batch_size=2, shuffle=True)
    assert pkdist.shard_loader(tl) is tl  # one process: nothing to shard
    part = pkdist.shard_loader(tl, rank=1, world_size=2)
    assert (part.rank, part.world_size) == (1, 2) and pkdist.shard_loader(part, rank=1, world_size=2) is part
    with pytest.raises(ValueError, match="sharded for rank 1 of 2, but this is rank 0 of 2"):
        pkdist.shard_loader(part, rank=0, world_size=2)
    dl = pkdist.shard_loader(DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True), rank=0, world_size=2,
                             seed=4)
    assert isinstance(dl.sampler, DistributedSampler) and dl.sampler.shuffle and dl.sampler.seed == 4
    assert len(dl) == 3 and pkdist.shard_loader(dl, rank=0, world_size=2) is dl

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))
    with pytest.raises(ValueError, match="IterableDataset"):
        pkdist.shard_loader(DataLoader(Stream()), rank=0, world_size=2)
    with pytest.raises(ValueError, match="cannot shard a list"):
        pkdist.shard_loader([(x, y)], rank=0, world_size=2)


def test_single_process_helpers(mlp, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert pkdist.get_rank() == 0 and pkdist.get_world_size() == 1 and pkdist.is_main()
    assert not pkdist.init_from_env() and not pkdist.is_active()
    prunekit.prune(mlp, 0.5)
    digests = pkdist.mask_digests(mlp)
    assert set(digests) == {"1.weight", "3.weight"}
    pkdist.check_masks_equal(mlp)  # one rank agrees with itself
    pkdist.broadcast_masks(mlp)
    pkdist.barrier()
    assert pkdist.mask_digests(mlp) == digests and pkdist.all_gather_objects(3) == [3]
    prunekit.prune(mlp, 0.8)
    assert pkdist.mask_digests(mlp)["1.weight"] != digests["1.weight"]


def test_bad_environment_and_arguments(mlp, monkeypatch):
    with pytest.raises(ValueError, match="allowed: gloo, nccl"):
        pkdist.init_from_env("tcp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT not set: launch with torchrun"):
        finetune(mlp, TensorLoader(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), 2))
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        pkdist.init_from_env()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="distributed=True but this is a single process"):
        finetune(mlp, TensorLoader(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), 2), distributed=True)


# ----------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PRUNEKIT_PROGRESS="0", OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # --standalone: a private rendezvous on a free port, so parallel test runs cannot collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _load(out, name):
    return torch.load(out / name, weights_only=True)


def _same(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_masks_must_agree_and_can_be_broadcast(ddp_run):
    for rank in (0, 1):
        msg = json.loads((ddp_run / f"rank{rank}.json").read_text())["mismatch_error"]
        assert "masks differ between rank 0 and rank(s) [1] on 0.weight, 3.weight" in msg
        assert "broadcast_masks" in msg


@pytest.mark.slow
@pytest.mark.parametrize("part", ["ddp", "ref", "resumed"])
def test_ddp_ranks_end_identical_with_pruned_weights_zero(ddp_run, part):
    a, b = _load(ddp_run, f"rank0-{part}.pt"), _load(ddp_run, f"rank1-{part}.pt")
    assert _same(a, b)
    masks = [k for k in a if k.endswith("_mask")]
    assert masks
    for key in masks:
        w = a[key[: -len("_mask")]]
        keep = unpack_bits(a[key], w.numel()).reshape(w.shape)
        assert 0 < keep.sum() < w.numel() and (w[~keep] == 0).all()


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_combined_batch(ddp_run):
    # 2 ranks x batch 16 with averaged gradients = 1 process x batch 32 (the shards interleave the order)
    ddp, single = _load(ddp_run, "rank0-ddp.pt"), _load(ddp_run, "single.pt")
    assert list(ddp) == list(single)
    for k in ddp:
        assert torch.allclose(ddp[k].float(), single[k].float(), atol=1e-6), k
    torch.manual_seed(0)  # the worker's initial model
    init = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 10))
    assert not torch.allclose(ddp["3.weight"], init[3].weight.detach())  # it trained


@pytest.mark.slow
def test_ddp_shards_are_disjoint_and_cover_the_data(ddp_run):
    s0, s1 = (json.loads((ddp_run / f"rank{r}.json").read_text())["shard"] for r in (0, 1))
    assert len(s0) == len(s1) == 96 and sorted(s0 + s1) == list(range(192))


@pytest.mark.slow
def test_ddp_interrupted_and_resumed_equals_uninterrupted(ddp_run):
    for rank in (0, 1):
        assert _same(_load(ddp_run, f"rank{rank}-ref.pt"), _load(ddp_run, f"rank{rank}-resumed.pt"))
    payload = torch.load(ddp_run / "resumed.pt", weights_only=True)
    assert payload["world_size"] == 2 and len(payload["rng"]) == 2  # every rank's RNG, one file
    assert not torch.equal(payload["rng"][0]["torch"], payload["rng"][1]["torch"])
