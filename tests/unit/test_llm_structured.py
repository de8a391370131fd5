"""Structured decoder-LLM pruning (prunekit.surgery.decoder): SwiGLU neurons, GQA heads, whole layers; masked and
compacted models agree, generate the same tokens, and reload with plain transformers."""
import copy

import pytest
import torch

from prunekit import surgery
from prunekit.apply import masking
from prunekit.deploy.hf import save_pretrained
from prunekit.errors import PrunekitError
from prunekit.plan import Plan, TensorPlan
from prunekit.surgery import compact_decoder, decoder_plan, decoder_stats, plan_decoder
from prunekit.zoo.llm import tiny_decoder

ARCHS = ("llama", "qwen2", "mistral")
IDS = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(0))
# (unit, amount, criterion): every unit kind, every criterion at least once
CASES = [("ffn", 0.25, "l2"), ("kv_groups", 0.5, "wanda"), ("q_heads", 0.5, "output"), ("layers", 0.25, None)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()        # built before the per-test one_thread fixture: one thread here too
    torch.set_num_threads(1)
    try:
        out = {}
        for arch in ARCHS:
            m = tiny_decoder(arch, seed=1)
            out[arch] = (m, decoder_stats(m, IDS))
        return out
    finally:
        torch.set_num_threads(threads)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _greedy(model, n=10):
    return model.generate(input_ids=IDS[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit,amount,criterion", CASES)
def test_masked_equals_compacted_generates_and_reloads(arch, unit, amount, criterion, models, tmp_path):
    from transformers import AutoModelForCausalLM

    model, stats = models[arch]
    before = _state(model)
    plan = Plan.from_json(plan_decoder(model, amount, unit=unit, criterion=criterion, stats=stats).to_json())
    assert plan.meta["unit"] == unit and all(tp.pattern == "structured" for tp in plan)
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact_decoder(model, plan)
    assert _same_state(model, before)                              # the input model is never changed
    assert torch.allclose(_logits(masked), _logits(slim), atol=1e-4, rtol=0)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.equal(_greedy(masked), _greedy(slim))             # KV-cache decoding, same greedy tokens

    cfg, after = slim.config, plan.meta["after"]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.num_hidden_layers) == \
        (after["heads"], after["kv_heads"], after["intermediate"], after["layers"])
    assert [layer.self_attn.layer_idx for layer in slim.model.layers] == list(range(cfg.num_hidden_layers))
    assert all(layer.self_attn.num_key_value_groups == after["heads"] // after["kv_heads"]
               for layer in slim.model.layers)
    save_pretrained(slim, tmp_path / "slim")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()   # plain transformers
    assert torch.allclose(_logits(reloaded), _logits(slim), atol=1e-5, rtol=0)
    assert reloaded.config.num_hidden_layers == cfg.num_hidden_layers


@pytest.mark.parametrize("criterion", ["l1", "l2", "wanda", "activation", "output"])
@pytest.mark.parametrize("unit", ["ffn", "kv_groups", "q_heads"])
def test_every_criterion_plans_exactly(unit, criterion, models):
    model, stats = models["llama"]
    plan = plan_decoder(model, 0.5, unit=unit, criterion=criterion, stats=stats)
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    assert torch.allclose(_logits(masked), _logits(compact_decoder(model, plan)), atol=1e-4, rtol=0)


def test_activation_and_output_scores_match_a_hand_computation(models):
    model, stats = models["llama"]
    layer = model.model.layers[1]
    seen = []
    h = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    _logits(model)
    h.remove()
    x = torch.cat(seen).double()
    act = surgery.decoder.unit_scores(model, "ffn", "activation", stats)[1]
    assert torch.allclose(act, x.abs().mean(0), rtol=1e-5)
    out = surgery.decoder.unit_scores(model, "ffn", "output", stats)[1]
    w = layer.mlp.down_proj.weight.detach().double()
    energy = torch.stack([(x[:, i:i + 1] * w[:, i]).pow(2).sum(1).mean() for i in range(x.shape[1])])
    assert torch.allclose(out, energy, rtol=1e-4)


def test_query_heads_within_groups_keep_num_key_value_groups_integral():
    model = tiny_decoder("llama", seed=2, num_attention_heads=8)      # 8 query heads over 2 KV heads: 4 per group
    plan = plan_decoder(model, 0.25, unit="q_heads", criterion="l2")   # one query head from every group
    pruned = plan.meta["pruned"]
    assert all(len(v) == 2 and v[0] < 4 <= v[1] for v in pruned.values())
    slim = compact_decoder(model, plan)
    assert (slim.config.num_attention_heads, slim.config.num_key_value_heads, slim.config.head_dim) == (6, 2, 8)
    assert slim.model.layers[0].self_attn.num_key_value_groups == 3
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    assert torch.allclose(_logits(masked), _logits(slim), atol=1e-4, rtol=0)
    assert torch.equal(_greedy(masked), _greedy(slim))
    assert plan_decoder(model, 4, unit="q_heads", criterion="l1").meta["after"]["heads"] == 4   # 2 from each group
    with pytest.raises(PrunekitError, match=r"may lose 0, 2, 4, 6 of its 8"):
        plan_decoder(model, 3, unit="q_heads", criterion="l1")


def test_unequal_query_heads_per_group_are_refused_naming_the_allowed_counts(models):
    model, _ = models["llama"]                                          # 4 query heads, 2 KV groups of 2
    before = _state(model)
    with pytest.raises(PrunekitError, match=r"\[1, 2\] query heads.*may keep 2, 4 query heads"):
        decoder_plan(model, "q_heads", {i: [0] for i in range(4)})
    # a hand-made plan zeroing one query head's o_proj columns only: the masks work, compaction refuses
    o = model.model.layers[0].self_attn.o_proj.weight
    entry = TensorPlan("model.layers.0.self_attn.o_proj.weight", tuple(o.shape), "structured", units=o.shape[1],
                       pruned_units=16, dim=1, pruned_idx=list(range(16)))
    plan = Plan({entry.name: entry})
    with pytest.raises(PrunekitError, match=r"model\.layers\.0.*may keep 2, 4 query heads"):
        compact_decoder(model, plan)
    assert _same_state(model, before) and not masking.is_masked(model)


def test_per_layer_counts_are_refused_because_transformers_cannot_express_them(models):
    model, _ = models["qwen2"]
    with pytest.raises(PrunekitError, match="per_layer_config"):
        decoder_plan(model, "ffn", {0: [1, 2]})
    with pytest.raises(PrunekitError, match="per_layer_config"):
        decoder_plan(model, "kv_groups", {0: [1]})
    with pytest.raises(PrunekitError, match="every attention head"):
        decoder_plan(model, "kv_groups", {i: [0, 1] for i in range(4)})


def test_block_influence_equals_one_minus_cosine_by_hand(models):
    model, stats = models["llama"]
    out = model(input_ids=IDS, output_hidden_states=True)
    last = []
    h = model.model.norm.register_forward_pre_hook(lambda m, a: last.append(a[0]))   # the last layer's output
    _logits(model)
    h.remove()
    hs = list(out.hidden_states[:-1]) + last                 # hidden_states[-1] is after the final norm
    want = [1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).double().mean().item()
            for i in range(4)]
    assert stats.influence == pytest.approx(want, abs=1e-6)
    assert surgery.block_influence(model, IDS) == pytest.approx(want, abs=1e-6)
    plan = plan_decoder(model, 2, unit="layers", stats=stats)
    assert plan.meta["pruned"] == sorted(sorted(range(4), key=lambda i: want[i])[:2])
    assert plan.meta["influence"] == pytest.approx(want, abs=1e-6)


def test_padding_is_left_out_of_the_statistics(models):
    model, _ = models["mistral"]
    mask = torch.ones_like(IDS)
    mask[0, 12:] = 0
    padded = decoder_stats(model, [{"input_ids": IDS, "attention_mask": mask}])
    assert padded.tokens == IDS.numel() - 8


@pytest.mark.parametrize("unit,amount,match", [
    ("ffn", 1.0, r"out of range.*\[0, 1\)"), ("ffn", -0.1, "out of range"), ("ffn", 1.5, "out of range"),
    ("ffn", "half", "fraction in"), ("ffn", True, "fraction in"), ("ffn", float("nan"), "fraction in"),
    ("ffn", 0.001, "removes no MLP neurons"), ("ffn", 128, "would remove all 128"),
    ("kv_groups", 2, "would remove all 2 KV groups"), ("kv_groups", 0.9, "would remove all 2"),
    ("q_heads", 0.99, "would remove all 2 query heads per KV group"),
    ("layers", 4, "would remove all 4 decoder layers"), ("layers", 0.95, "would remove all 4"),
    ("layers", 0.05, "removes no decoder layers"),
])
def test_bad_amounts_are_refused_before_anything_changes(unit, amount, match, models):
    model, stats = models["llama"]
    before = _state(model)
    with pytest.raises(PrunekitError, match=match):
        plan_decoder(model, amount, unit=unit, stats=stats)
    assert _same_state(model, before) and not masking.is_masked(model)


def test_bad_requests_name_the_fix(models):
    model, stats = models["llama"]
    with pytest.raises(PrunekitError, match="needs calibration statistics: pass data=.*or a data-free"):
        plan_decoder(model, 0.25, unit="ffn")                       # the default criterion, "output", needs data
    with pytest.raises(PrunekitError, match="needs calibration statistics: pass data="):
        plan_decoder(model, 1, unit="layers")
    with pytest.raises(PrunekitError, match="criterion for unit='layers'"):
        plan_decoder(model, 1, unit="layers", criterion="l2", stats=stats)
    with pytest.raises(PrunekitError, match="unknown decoder unit"):
        plan_decoder(model, 0.25, unit="channels")
    with pytest.raises(PrunekitError, match="other shapes"):
        plan_decoder(tiny_decoder("llama", intermediate_size=96), 0.25, criterion="output", stats=stats)
    with pytest.raises(PrunekitError, match="removes all 4 decoder layers"):
        decoder_plan(model, "layers", [0, 1, 2, 3])
    with pytest.raises(PrunekitError, match="distinct ints"):
        decoder_plan(model, "layers", [0, 0])
    with pytest.raises(PrunekitError, match="GPT-2"):
        plan_decoder(tiny_decoder("gpt2"), 0.25, criterion="l2")
    # a plan made for the original does not fit a compacted model
    plan = plan_decoder(model, 0.25, criterion="l2")
    slim = compact_decoder(model, plan)
    with pytest.raises(PrunekitError, match="was made for"):
        compact_decoder(slim, plan)


def test_data_passed_directly_and_a_masked_model_compacts():
    model = tiny_decoder("qwen2", seed=3)
    plan = plan_decoder(model, 0.5, unit="ffn", criterion="activation", data=IDS, batch_size=2)
    assert plan.meta["tokens"] == IDS.numel()
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact_decoder(masked, plan)                          # from the masked model: masks folded in
    assert not masking.is_masked(slim) and masking.is_masked(masked)
    assert torch.allclose(_logits(masked), _logits(slim), atol=1e-4, rtol=0)
    assert slim.model.layers[0].mlp.gate_proj.out_features == 64


def test_graph_surgery_falls_back_to_the_decoder_block_rule(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_decoder("llama", seed=4)
    plan = surgery.plan_groups(model, IDS, 0.5)                   # fx fails on HF decoders: block rules instead
    assert any("fx could not trace" in n for n in plan.notes)
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = surgery.compact(model, plan)
    assert torch.allclose(_logits(masked), _logits(slim), atol=1e-4, rtol=0)
    assert (slim.config.num_attention_heads, slim.config.num_key_value_heads, slim.config.intermediate_size) == \
        (2, 1, 64)
    save_pretrained(slim, tmp_path / "g")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "g")), _logits(slim), atol=1e-5)
    uneven = surgery.plan_groups(model, IDS, 0.3, scope="global")
    with pytest.raises(PrunekitError, match="differ in shape"):
        surgery.compact(model, uneven)
