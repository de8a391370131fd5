"""prune_checkpoint: a checkpoint pruned block by block from its shards equals sequential_prune in memory, bit for
bit; one block in memory at a time; resumable after a crash; another run's folder refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from prunekit.apply import masking
from prunekit.deploy import hf
from prunekit.errors import PrunekitError
from prunekit.pruners import offload, sequential
from prunekit.pruners.offload import MANIFEST, prune_checkpoint, write_random_checkpoint
from prunekit.pruners.sequential import SequentialOptions, sequential_prune
from prunekit.spec import PruneSpec
from prunekit.zoo.llm import tiny_config

transformers = pytest.importorskip("transformers")
SHARD_BYTES = 200_000  # the tiny Llama (~730 kB of fp32) in 4 shards


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("src") / "llama", tiny_config("llama"), seed=0,
                                   shard_bytes=SHARD_BYTES)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _patch_prune_block(monkeypatch, wrapper):
    """Wrap prune_block wherever the streamed walk calls it (offload's own name, sequential's for its helpers)."""
    monkeypatch.setattr(sequential, "prune_block", wrapper)
    monkeypatch.setattr(offload, "prune_block", wrapper, raising=False)


def _options(method="wanda", **kw):
    return SequentialOptions(method=method, progress=False, **kw)


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def _in_memory(src, ids, amount, spec=None, options=None):
    ref = _load(src)
    plan = sequential_prune(ref, ids, amount, spec=spec, options=options)
    return ref, plan


def _assert_same_model(out, ref):
    """Every tensor of the folder (plain transformers) equals the in-memory pruned model's, bit for bit."""
    want, got = masking.plain_state_dict(ref), _load(out).state_dict()
    assert set(want) == set(got)
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, different


def _assert_same_plan(a, b):
    assert list(a.tensors) == list(b.tensors) or set(a.tensors) == set(b.tensors)
    for name, tp in a.tensors.items():
        other = b.tensors[name]
        assert (tp.shape, tp.pattern, tp.units, tp.pruned_units, tp.nm) == \
            (other.shape, other.pattern, other.units, other.pruned_units, other.nm), name
        assert torch.equal(tp.keep_bits, other.keep_bits), name


# ----------------------------------------------------------------------------- the random checkpoint

def test_random_checkpoint_is_sharded_deterministic_and_loads(src, tmp_path, one_thread):
    index = json.loads((src / offload.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((src / s).is_file() for s in shards)
    assert all(os.path.getsize(src / s) <= SHARD_BYTES + 4096 for s in shards)  # header aside
    model = _load(src)
    sd = model.state_dict()
    assert set(index["weight_map"]) == set(sd)
    assert torch.equal(sd["model.norm.weight"], torch.ones(64))
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert 0.015 < float(q.std()) < 0.025 and not torch.equal(q, sd["model.layers.1.self_attn.q_proj.weight"])
    again = write_random_checkpoint(tmp_path / "again", tiny_config("llama"), seed=0, shard_bytes=SHARD_BYTES)
    assert all((src / s).read_bytes() == (again / s).read_bytes() for s in shards)  # seed and names alone
    other = write_random_checkpoint(tmp_path / "other", tiny_config("llama"), seed=1, shard_bytes=10**9)
    assert sorted(os.listdir(other)) == ["config.json", "model.safetensors"]
    assert not torch.equal(_load(other).state_dict()["model.layers.0.self_attn.q_proj.weight"], q)


# ----------------------------------------------------------------------------- equal to the in-memory pruner

@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
def test_output_equals_in_memory_sequential_prune_bit_for_bit(method, src, ids, tmp_path, one_thread):
    out = tmp_path / "out"
    plan = prune_checkpoint(src, out, ids, 0.5, options=_options(method))
    ref, ref_plan = _in_memory(src, ids, 0.5, options=_options(method))
    _assert_same_model(out, ref)
    _assert_same_plan(plan, ref_plan)
    assert masking.global_sparsity(ref, list(plan.tensors)) == pytest.approx(0.5, abs=1e-3)
    assert plan.meta["method"] == method and plan.meta["layer_sparsity"] == ref_plan.meta["layer_sparsity"]
    # prunekit's loader gets the masks back, checked against the weights and the digest
    loaded = hf.load_pretrained(out)
    want, got = masking.masks(ref), masking.masks(loaded)
    assert set(want) == set(got) and all(torch.equal(want[n], got[n]) for n in want)
    assert masking.digest(loaded) == masking.digest(ref)
    index = json.loads((out / offload.INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 4 + 1  # a shard per block, then the rest
    assert not (out / offload.WORK).exists() and json.loads((out / MANIFEST).read_text())["complete"]


def test_hf_format_names_agree():
    assert (offload.HF_FORMAT, offload.HF_MASKS, offload.HF_META) == (hf.FORMAT, hf.MASKS, hf.META)


@pytest.mark.parametrize("arch", ("qwen2", "gpt2"))
def test_other_architectures_and_tied_embeddings(arch, tmp_path, ids, one_thread):
    """GPT-2: Conv1D projections, learned positions, lm_head tied to the token embeddings (stored once)."""
    src = write_random_checkpoint(tmp_path / "src", tiny_config(arch), seed=2, shard_bytes=SHARD_BYTES)
    prune_checkpoint(src, tmp_path / "out", ids, 0.5, options=_options())
    ref, _ = _in_memory(src, ids, 0.5, options=_options())
    _assert_same_model(tmp_path / "out", ref)


def test_owl_allocation_streamed(src, ids, tmp_path, monkeypatch, one_thread):
    """OWL's dense pass runs block by block too (one block in memory) and allocates as in memory."""
    spec = PruneSpec(criterion="sequential", allocation="owl")
    name = "owl_block_scores" if hasattr(offload, "owl_block_scores") else "_owl_block_scores"
    real = getattr(offload, name)
    seen = []

    def one_block(walk, k, inputs):
        seen.append(k)
        assert offload._materialised_blocks(walk.blocks) == 1
        return real(walk, k, inputs)

    monkeypatch.setattr(offload, name, one_block)
    plan = prune_checkpoint(src, tmp_path / "out", ids, 0.7, spec=spec, options=_options())
    assert seen == [0, 1, 2, 3]
    ref, ref_plan = _in_memory(src, ids, 0.7, spec=spec, options=_options())
    assert plan.meta["layer_sparsity"] == ref_plan.meta["layer_sparsity"]
    assert len(set(plan.meta["layer_sparsity"].values())) > 1
    _assert_same_model(tmp_path / "out", ref)


def test_sensitivity_allocation_streamed(src, ids, tmp_path, monkeypatch, one_thread):
    """sequential's own sensitivity pass runs unchanged on blocks loaded one at a time from the source."""
    spec = PruneSpec(criterion="sequential", allocation="sensitivity")
    loads = []
    real = offload._Run.block

    def block(run, k, read):
        loads.append(k)
        assert offload._materialised_blocks(run.walk.blocks) == 0
        return real(run, k, read)

    monkeypatch.setattr(offload._Run, "block", block)
    plan = prune_checkpoint(src, tmp_path / "out", ids, 0.6, spec=spec, options=_options())
    assert loads == [0, 1, 2, 3] * 2  # the dense pass, then the walk: each block loaded once per pass
    ref, ref_plan = _in_memory(src, ids, 0.6, spec=spec, options=_options())
    assert plan.meta["layer_sparsity"] == ref_plan.meta["layer_sparsity"]
    assert plan.meta["block_sensitivity"] == ref_plan.meta["block_sensitivity"]
    _assert_same_model(tmp_path / "out", ref)


def test_blocks_past_the_last_selected_one_are_copied(src, ids, tmp_path, monkeypatch, one_thread):
    spec = PruneSpec(criterion="sequential", include=["*.layers.0.*", "*.layers.2.*"])
    pruned = _count_pruned(monkeypatch)
    prune_checkpoint(src, tmp_path / "out", ids, 0.5, spec=spec, options=_options("sparsegpt"))
    assert pruned == [0, 2]
    ref, _ = _in_memory(src, ids, 0.5, spec=spec, options=_options("sparsegpt"))
    _assert_same_model(tmp_path / "out", ref)
    assert all(".layers.3." not in n for n in masking.masks(hf.load_pretrained(tmp_path / "out")))


def test_nm_and_dense_targets(src, ids, tmp_path, one_thread):
    spec = PruneSpec(criterion="sequential", pattern="nm", nm=(2, 4))
    prune_checkpoint(src, tmp_path / "nm", ids, spec=spec, options=_options("sparsegpt"))
    _assert_same_model(tmp_path / "nm", _in_memory(src, ids, None, spec=spec, options=_options("sparsegpt"))[0])
    opts = _options("sparsegpt", dense_targets=True)
    prune_checkpoint(src, tmp_path / "dense", ids, 0.5, options=opts)
    _assert_same_model(tmp_path / "dense", _in_memory(src, ids, 0.5, options=opts)[0])


# ----------------------------------------------------------------------------- memory

def test_at_most_one_block_in_memory(src, ids, tmp_path, monkeypatch, one_thread):
    """Counted, not timed: whenever a block is pruned or written, it is the only block holding real tensors, the
    lm_head was never loaded, and at the end every block is back on the meta device."""
    real_prune, real_write = sequential.prune_block, offload._Run.write_block
    walks = []

    def check(walk, k):
        walks.append(walk)
        blocks = walk.blocks
        assert offload._materialised_blocks(blocks) == 1
        assert not blocks[k].mlp.down_proj.weight.is_meta
        assert walk.model.lm_head.weight.is_meta
        assert not walk.backup  # no copy of the original weights piles up

    def prune(walk, k, inputs, targets_of):
        check(walk, k)
        return real_prune(walk, k, inputs, targets_of)

    def write(run, k):
        check(run.walk, k)
        assert len(run.walk.plan.tensors) == len(run.walk.targets[k])  # earlier blocks' masks are on disk
        return real_write(run, k)

    _patch_prune_block(monkeypatch, prune)
    monkeypatch.setattr(offload._Run, "write_block", write)
    prune_checkpoint(src, tmp_path / "out", ids, 0.5, options=_options("sparsegpt"))
    assert len(walks) == 8
    walk = walks[-1]
    assert offload._materialised_blocks(walk.blocks) == 0
    assert all(p.is_meta for p in walk.model.parameters())


# ----------------------------------------------------------------------------- resume

class Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, blocks: int, before_manifest: bool):
    """Kill the run once ``blocks`` blocks are written: before their manifest (that block is redone) or after."""
    real = offload._save_manifest

    def save(out, doc):
        if len(doc["blocks"]) == blocks and not doc.get("complete"):
            if not before_manifest:
                real(out, doc)
            raise Crash(f"killed after block {blocks - 1}")
        real(out, doc)

    monkeypatch.setattr(offload, "_save_manifest", save)


def _count_pruned(monkeypatch):
    done, real = [], sequential.prune_block

    def prune(walk, k, inputs, targets_of):
        done.append(k)
        return real(walk, k, inputs, targets_of)

    _patch_prune_block(monkeypatch, prune)
    return done


@pytest.mark.parametrize("before_manifest", (False, True))
def test_resume_after_a_crash_is_bit_identical(before_manifest, src, ids, tmp_path, monkeypatch, one_thread):
    opts = _options("sparsegpt")
    whole = prune_checkpoint(src, tmp_path / "whole", ids, 0.5, options=opts)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_after(m, 2, before_manifest)
        with pytest.raises(Crash):
            prune_checkpoint(src, out, ids, 0.5, options=opts)
    doc = json.loads((out / MANIFEST).read_text())
    assert len(doc["blocks"]) == (1 if before_manifest else 2) and not doc["complete"]
    assert not (out / hf.META).exists()
    pruned = _count_pruned(monkeypatch)
    plan = prune_checkpoint(src, out, ids, 0.5, options=opts)
    assert pruned == ([1, 2, 3] if before_manifest else [2, 3])  # the finished blocks are not pruned again
    _assert_same_plan(plan, whole)
    for name in sorted(os.listdir(tmp_path / "whole")):
        if name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    _assert_same_model(out, _in_memory(src, ids, 0.5, options=opts)[0])
    # a finished run gives its plan back without pruning anything
    pruned.clear()
    _assert_same_plan(prune_checkpoint(src, out, ids, 0.5, options=opts), whole)
    assert pruned == []


def test_another_runs_folder_is_refused_naming_the_difference(src, ids, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_after(m, 1, before_manifest=False)
        with pytest.raises(Crash):
            prune_checkpoint(src, out, ids, 0.5, options=_options())
    with pytest.raises(PrunekitError, match=r"another run.*amount \(0\.5 there, 0\.6 now\)"):
        prune_checkpoint(src, out, ids, 0.6, options=_options())
    with pytest.raises(PrunekitError, match=r"options\.method \('wanda' there, 'sparsegpt' now\)"):
        prune_checkpoint(src, out, ids, 0.5, options=_options("sparsegpt"))
    with pytest.raises(PrunekitError, match="calibration_sha256"):
        prune_checkpoint(src, out, ids[:4], 0.5, options=_options())
    other = write_random_checkpoint(tmp_path / "other", tiny_config("llama"), seed=5, shard_bytes=SHARD_BYTES)
    with pytest.raises(PrunekitError, match=r"source\.shards\..*header_sha256|source\.shards\..*mtime_ns"):
        prune_checkpoint(other, out, ids, 0.5, options=_options())
    # resume=False starts over there
    pruned = _count_pruned(monkeypatch)
    prune_checkpoint(src, out, ids, 0.6, options=_options(), resume=False)
    assert pruned == [0, 1, 2, 3]
    _assert_same_model(out, _in_memory(src, ids, 0.6, options=_options())[0])


def test_refusals(src, ids, tmp_path):
    spec = PruneSpec(criterion="sequential", allocation="magnitude")
    with pytest.raises(PrunekitError, match="whole model in memory"):
        prune_checkpoint(src, tmp_path / "a", ids, 0.5, spec=spec, options=_options())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PrunekitError, match="not empty"):
        prune_checkpoint(src, tmp_path / "busy", ids, 0.5, options=_options())
    with pytest.raises(PrunekitError, match="source folder"):
        prune_checkpoint(src, src, ids, 0.5, options=_options())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(PrunekitError, match="safetensors"):
        prune_checkpoint(tmp_path / "empty", tmp_path / "b", ids, 0.5, options=_options())
    with pytest.raises(PrunekitError, match="amount"):
        prune_checkpoint(src, tmp_path / "c", ids, 1.5, options=_options())
